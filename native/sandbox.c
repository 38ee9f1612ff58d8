/*
 * sandbox.c — the environment scripts run in, and `require`.
 *
 * Sandboxed (the default), every script, module and load()ed string gets an
 * environment table of its own whose reads fall through to one table of safe
 * globals: base functions without file or bytecode access, string (without dump),
 * table, math (without randomseed), utf8, coroutine, bit, a few os time functions,
 * and hs. Reading or writing an undeclared global is an error. The library tables
 * are read-only views (rawset refuses them too) and the string metatable is
 * hidden, so no script can change what another computes or see its arguments.
 * Without the sandbox, scripts share the state's ordinary globals.
 *
 * In both modes:
 *   - pcall/xpcall cannot swallow the time limit: once it fired they re-raise;
 *   - load accepts source text only (bytecode comes from the core alone);
 *   - require finds Lua modules only: compiled bytecode in the program first,
 *     then the embedded library (src/lua) and the host's lua_path directories,
 *     compiled from text. A module compiled while hs_load validates a script is
 *     published with the program, so worker threads rehydrate it instead of
 *     compiling it again.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "core.h"

#define STATE(L) ((hs_state *)lua_touserdata((L), lua_upvalueindex(1)))

static int strict_index(lua_State *L) {
    const char *k = lua_tostring(L, 2);
    return luaL_error(L, "undeclared global '%s'", k ? k : "?");
}

static int strict_newindex(lua_State *L) {
    const char *k = lua_tostring(L, 2);
    return luaL_error(L, "assignment to undeclared global '%s' (use local, or txn.ctx for data "
                         "that must outlive the call)",
                      k ? k : "?");
}

/* ---- read-only library tables ---- */

const char hs_readonly_key = 'R'; /* marks the metatable of a table rawset may not change */

static int readonly_newindex(lua_State *L) {
    const char *k = lua_tostring(L, 2);
    return luaL_error(L, "cannot assign '%s': library tables are read-only in the sandbox", k ? k : "?");
}

/* Replace t[name] (a table) by an empty table whose reads fall through to it and
 * whose writes fail; the real table is reachable from nowhere else in the sandbox. */
static void make_readonly(lua_State *L, int t, const char *name) {
    t = hs_absindex(L, t);
    lua_getfield(L, t, name);
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        return;
    }
    lua_newtable(L); /* the view */
    lua_createtable(L, 0, 4);
    lua_pushvalue(L, -3);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, readonly_newindex);
    lua_setfield(L, -2, "__newindex");
    lua_pushliteral(L, "read-only");
    lua_setfield(L, -2, "__metatable");
    lua_pushlightuserdata(L, (void *)&hs_readonly_key);
    lua_pushboolean(L, 1);
    lua_rawset(L, -3);
    lua_setmetatable(L, -2);
    lua_setfield(L, t, name);
    lua_pop(L, 1);
}

static int sb_rawset(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    if (lua_getmetatable(L, 1)) {
        lua_pushlightuserdata(L, (void *)&hs_readonly_key);
        lua_rawget(L, -2);
        if (lua_toboolean(L, -1))
            return luaL_error(L, "rawset: library tables and the txn objects are read-only in the sandbox");
        lua_pop(L, 2);
    }
    luaL_checkany(L, 3);
    lua_settop(L, 3);
    lua_rawset(L, 1);
    return 1;
}

/* Seed the state's math.random: states (and processes) must not share a sequence. */
static void seed_random(lua_State *L) {
    uint64_t x = 0;
    if (getrandom(&x, sizeof x, GRND_NONBLOCK) != (ssize_t)sizeof x)
        x = hs_now_ns() ^ (uint64_t)(uintptr_t)L ^ ((uint64_t)(uintptr_t)&x << 17);
    lua_getglobal(L, "math");
    lua_getfield(L, -1, "randomseed");
#ifdef HS_ENGINE_LUAJIT
    lua_pushnumber(L, (lua_Number)(x >> 11)); /* 53 bits: exact in a double */
    lua_call(L, 1, 0);
#else
    lua_pushinteger(L, (lua_Integer)(x >> 1));
    lua_call(L, 1, 0);
#endif
    lua_pop(L, 1);
}

/* ---- pcall / xpcall that cannot catch the time limit; coroutines bounded ----
 * Written in Lua around the engine's own functions so that coroutines may still
 * yield inside them (a C wrapper would be a yield barrier on both engines).
 *
 * Each nested coroutine.resume runs on the C stack of the thread that fires, and
 * LuaJIT's resume never passes a check of the patched engine (it is assembly), so
 * resume and wrap check the C stack themselves before resuming. */

/* A message handler may run inside the time-limit hook with hooks off, so once
 * the limit fired, the user's handler is skipped rather than trusted to return. */
static const char wrap_pcall_src[] =
    "local pcall, xpcall, error, aborted = ...\n"
    "local function finish(ok, ...)\n"
    "  if not ok and aborted() then error((...), 0) end\n"
    "  return ok, ...\n"
    "end\n"
    "local resume, create, cstack = coroutine.resume, coroutine.create, select(5, ...)\n"
    "local function rethrow(ok, ...)\n"
    "  if not ok then error((...), 0) end\n"
    "  return ...\n"
    "end\n"
    "return function(f, ...) return finish(pcall(f, ...)) end,\n"
    "       function(f, h, ...)\n"
    "         local function guarded(e) if aborted() then return e end return h(e) end\n"
    "         return finish(xpcall(f, guarded, ...))\n"
    "       end,\n"
    "       function(co, ...) cstack() return resume(co, ...) end,\n"
    "       function(f)\n"
    "         local co = create(f)\n"
    "         return function(...) cstack() return rethrow(resume(co, ...)) end\n"
    "       end\n";

/* The time or memory limit was hit in this fire: no pcall may swallow that. */
static int sb_aborted(lua_State *L) {
    hs_state *S = STATE(L);
    lua_pushboolean(L, S->abort != 0 || S->mem_refused);
    return 1;
}

static int sb_cstack(lua_State *L) {
    if (!hs_engine_cstack(L)) return 0;
    lua_pushliteral(L, "C stack overflow: coroutines nested too deep"); /* no position: */
    return lua_error(L); /* it would name the wrapper, not the script */
}

/* Replace G.pcall, G.xpcall, coroutine.resume and coroutine.wrap. The wrapper is parsed once per host (by the state
 * hs_host_new makes first, before any other thread can see the host) and loaded
 * from that bytecode afterwards: parsing it was a fifth of creating a state. */
static void wrap_pcall(lua_State *L, hs_state *S, int G) {
    hs_host *h = S->host;
    hs_buf *bc = &h->wrap_bc;
    if (!bc->len) {
        if (luaL_loadbuffer(L, wrap_pcall_src, sizeof wrap_pcall_src - 1, "=[hs pcall]") != 0)
            lua_error(L);
        if (!h->wrap_tried) { /* only the host's first state, before any thread sees the host */
            h->wrap_tried = 1;
            if (hs_dump(L, hs_buf_writer, bc) != 0) bc->len = 0;
        }
    } else if (luaL_loadbufferx(L, bc->p, bc->len, "=[hs pcall]", "b") != 0) {
        lua_error(L);
    }
    lua_getfield(L, G, "pcall");
    lua_getfield(L, G, "xpcall");
    lua_getfield(L, G, "error");
    lua_pushlightuserdata(L, S);
    lua_pushcclosure(L, sb_aborted, 1);
    lua_pushcfunction(L, sb_cstack);
    lua_call(L, 5, 4);
    lua_getfield(L, G, "coroutine");
    lua_insert(L, -3);
    lua_setfield(L, -3, "wrap");
    lua_setfield(L, -2, "resume");
    lua_pop(L, 1);
    lua_setfield(L, G, "xpcall");
    lua_setfield(L, G, "pcall");
}

/* load(text [, chunkname [, mode [, env]]]) — text only */
static int sb_load(lua_State *L) {
    hs_state *S = STATE(L);
    size_t len;
    if (lua_type(L, 1) != LUA_TSTRING) return luaL_error(L, "load: only source strings can be loaded here");
    const char *s = lua_tolstring(L, 1, &len);
    const char *name = luaL_optstring(L, 2, "=(load)");
    const char *mode = luaL_optstring(L, 3, "t");
    if (!strchr(mode, 't')) return luaL_error(L, "load: bytecode cannot be loaded here (mode must allow \"t\")");
    int envi = lua_isnoneornil(L, 4) ? 0 : 4;
    if (luaL_loadbufferx(L, s, len, name, "t") != 0) {
        lua_pushnil(L);
        lua_insert(L, -2);
        return 2;
    }
    if (envi) lua_pushvalue(L, envi);
    else hs_sandbox_push_env(S, L); /* L: the coroutine that runs load, maybe not S->L */
    hs_setenv(L, lua_gettop(L) - 1);
    return 1;
}

static int sb_collectgarbage(lua_State *L) {
    const char *opt = luaL_optstring(L, 1, "collect");
    if (!strcmp(opt, "count")) {
        lua_pushnumber(L, lua_gc(L, LUA_GCCOUNT, 0) + lua_gc(L, LUA_GCCOUNTB, 0) / 1024.0);
        return 1;
    }
    if (!strcmp(opt, "collect") || !strcmp(opt, "step")) {
        /* a full collection takes time in proportion to the heap, in C: a loop of them
         * would run far past the time limit between two count hooks */
        hs_engine_checkin(L);
        lua_gc(L, LUA_GCCOLLECT, 0);
        hs_engine_checkin(L);
        lua_pushinteger(L, 0);
        return 1;
    }
    return luaL_error(L, "collectgarbage('%s') is not available in the sandbox", opt);
}

/* Lua 5.4 runs __gc finalizers with hooks off: no time limit could stop one. */
static int sb_setmetatable(lua_State *L) {
    if (lua_istable(L, 2)) {
        lua_pushliteral(L, "__gc");
        lua_rawget(L, 2);
        if (!lua_isnil(L, -1)) return luaL_error(L, "__gc metamethods are not available in the sandbox");
        lua_pop(L, 1);
    }
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, 1);
    return 1;
}

static int sb_print(lua_State *L) {
    lua_pushvalue(L, lua_upvalueindex(2)); /* hs.log.info */
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, 0);
    return 0;
}

/* ---- require ---- */

static int valid_module_name(const char *s) {
    if (!*s || *s == '.') return 0;
    for (const char *p = s; *p; p++) {
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
              *p == '_' || *p == '-' || *p == '.'))
            return 0;
        if (p[0] == '.' && p[1] == '.') return 0;
    }
    return 1;
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    hs_buf b = {0};
    char chunk[8192];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
        if (hs_buf_put(&b, chunk, n)) {
            hs_buf_free(&b);
            fclose(f);
            return NULL;
        }
    fclose(f);
    if (!b.p) b.p = calloc(1, 1);
    *len = b.len;
    return b.p;
}

/* Compile module NAME from text; scratch states keep the bytecode for the program. */
static int compile_module(lua_State *L, hs_state *S, const char *name, const char *src, size_t len) {
    char chunkname[300];
    snprintf(chunkname, sizeof chunkname, "@%s", name);
    if (luaL_loadbufferx(L, src, len, chunkname, "t") != 0) return lua_error(L);
    pthread_mutex_lock(&S->host->mu);
    S->host->compilations++;
    pthread_mutex_unlock(&S->host->mu);
    if (!S->scratch) return 0;
    hs_module *m = calloc(1, sizeof *m);
    hs_buf bc = {0};
    if (!m || !(m->name = strdup(name)) || hs_dump(L, hs_buf_writer, &bc) != 0 ||
        hs_buf_put(&S->pending, &m, sizeof m) != 0) {
        if (m) free(m->name);
        free(m);
        hs_buf_free(&bc);
        return luaL_error(L, "not enough memory");
    }
    m->bc = bc.p;
    m->bclen = bc.len;
    return 0;
}

/* Push the loaded chunk of module NAME, or raise "module not found". */
static void find_module(lua_State *L, hs_state *S, const char *name) {
    const hs_module *m = hs_prog_module(S->modprog ? S->modprog : S->prog, name);
    hs_module **pend = (hs_module **)S->pending.p;
    for (size_t i = 0; !m && i < S->pending.len / sizeof *pend; i++)
        if (!strcmp(pend[i]->name, name)) m = pend[i];
    if (m) {
        char chunkname[300];
        snprintf(chunkname, sizeof chunkname, "@%s", name);
        if (luaL_loadbufferx(L, m->bc, m->bclen, chunkname, "b") != 0) lua_error(L);
        return;
    }
    for (const hs_lualib_entry *e = hs_lualib; e->name; e++)
        if (!strcmp(e->name, name)) {
            compile_module(L, S, name, e->src, e->len);
            return;
        }
    char tried[2048];
    size_t off = (size_t)snprintf(tried, sizeof tried, "the embedded library");
    hs_host *h = S->host;
    for (int i = 0; i < h->nlua_path; i++) {
        char path[4096];
        int n = snprintf(path, sizeof path, "%s/", h->lua_path[i]);
        for (const char *p = name; *p && n < (int)sizeof path - 5; p++) path[n++] = *p == '.' ? '/' : *p;
        snprintf(path + n, sizeof path - n, ".lua");
        size_t len;
        char *src = read_file(path, &len);
        if (src) {
            /* the display name is the module name, as for embedded modules */
            lua_pushlstring(L, src, len);
            free(src);
            compile_module(L, S, name, lua_tostring(L, -1), len);
            lua_remove(L, -2);
            return;
        }
        if (off < sizeof tried) off += (size_t)snprintf(tried + off, sizeof tried - off, ", %s", path);
    }
    luaL_error(L, "module '%s' not found (searched %s)", name, tried);
}

static int sb_require(lua_State *L) {
    hs_state *S = STATE(L);
    const char *name = luaL_checkstring(L, 1);
    if (!valid_module_name(name)) return luaL_error(L, "invalid module name '%s'", name);
    lua_settop(L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, S->loaded_ref); /* 2 */
    lua_getfield(L, 2, name);
    if (!lua_isnil(L, -1)) return 1;
    lua_pop(L, 1);
    find_module(L, S, name);
    int chunk = lua_gettop(L);
    hs_sandbox_push_env(S, L);
    hs_setenv(L, chunk);
    const char *outer = S->cur_name;
    int collecting = S->collecting; /* a module is loaded once per state: its chunk may not */
    S->collecting = 0;              /* register classes for whichever script required it first */
    S->in_module++;                 /* (nor at run time: hs.register refuses while this is set) */
    lua_pushvalue(L, 1);
    lua_call(L, 1, 1);
    S->in_module--;
    S->cur_name = outer;
    S->collecting = collecting;
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_pushboolean(L, 1);
    }
    lua_pushvalue(L, -1);
    lua_setfield(L, 2, name);
    return 1;
}

/* ---- building the environment ---- */

static void set_closure(lua_State *L, int t, const char *name, lua_CFunction f, hs_state *S) {
    lua_pushlightuserdata(L, S);
    lua_pushcclosure(L, f, 1);
    lua_setfield(L, t, name);
}

static void copy_fields(lua_State *L, int from, int to, const char *const *names) {
    from = hs_absindex(L, from);
    to = hs_absindex(L, to);
    for (; *names; names++) {
        lua_getfield(L, from, *names);
        lua_setfield(L, to, *names);
    }
}

void hs_sandbox_push_env(hs_state *S, lua_State *L) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, S->env_ref);
    if (!S->host->sandbox) return; /* the globals */
    lua_createtable(L, 0, 1);      /* env_ref is the metatable environments share */
    lua_pushvalue(L, -1);
    lua_setfield(L, -2, "_G");
    lua_insert(L, -2);
    lua_setmetatable(L, -2);
}

int hs_sandbox_open(hs_state *S) {
    lua_State *L = S->L;
    lua_newtable(L);
    S->loaded_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    seed_random(L);

    lua_pushglobaltable(L);
    int G = lua_gettop(L);
    /* in both modes: these replace the standard ones */
    wrap_pcall(L, S, G);
    set_closure(L, G, "load", sb_load, S);
    set_closure(L, G, "require", sb_require, S);

    if (!S->host->sandbox) {
        lua_pushvalue(L, G);
        S->env_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        lua_pop(L, 1);
        return 0;
    }

    static const char *const base_names[] = {
        "assert", "error", "ipairs", "next", "pairs", "rawequal", "rawget", "select",
        "setmetatable", "getmetatable", "tonumber", "tostring", "type", "_VERSION", "pcall",
        "xpcall", "load", "require", "hs", "string", "table", "math", "coroutine",
#ifdef HS_ENGINE_LUAJIT
        "unpack", "bit",
#else
        "rawlen", "utf8",
#endif
        NULL};
    static const char *const os_names[] = {"time", "clock", "date", "difftime", NULL};
    static const char *const readonly[] = {"string", "table", "math", "coroutine", "os", "hs",
                                           "bit", "utf8", NULL};

    lua_newtable(L); /* safe globals */
    int base = lua_gettop(L);
    copy_fields(L, G, base, base_names);
    lua_newtable(L);
    lua_getglobal(L, "os");
    copy_fields(L, -1, -2, os_names);
    lua_pop(L, 1);
    lua_setfield(L, base, "os");
    set_closure(L, base, "collectgarbage", sb_collectgarbage, S);
    lua_pushcfunction(L, sb_rawset);
    lua_setfield(L, base, "rawset");
    lua_getfield(L, G, "setmetatable");
    lua_pushcclosure(L, sb_setmetatable, 1);
    lua_setfield(L, base, "setmetatable");
    lua_pushlightuserdata(L, S);
    lua_getglobal(L, "hs");
    lua_getfield(L, -1, "log");
    lua_getfield(L, -1, "info");
    lua_replace(L, -3);
    lua_pop(L, 1);
    lua_pushcclosure(L, sb_print, 2);
    lua_setfield(L, base, "print");
    lua_getglobal(L, "string"); /* bytecode never leaves the core */
    lua_pushnil(L);
    lua_setfield(L, -2, "dump");
    lua_pop(L, 1);
    lua_getglobal(L, "math"); /* one script must not pick the sequence another one sees */
    lua_pushnil(L);
    lua_setfield(L, -2, "randomseed");
    lua_pop(L, 1);
    lua_getglobal(L, "hs");
    make_readonly(L, -1, "log");
    lua_pop(L, 1);
    for (const char *const *n = readonly; *n; n++) make_readonly(L, base, *n);
    lua_pushliteral(L, ""); /* s:method() keeps working; the metatable is out of reach */
    if (lua_getmetatable(L, -1)) {
        lua_pushliteral(L, "string");
        lua_setfield(L, -2, "__metatable");
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushcfunction(L, strict_index);
    lua_setfield(L, -2, "__index");
    lua_setmetatable(L, base);

    lua_newtable(L); /* the metatable of every script environment */
    lua_pushvalue(L, base);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, strict_newindex);
    lua_setfield(L, -2, "__newindex");
    lua_pushliteral(L, "sandbox");
    lua_setfield(L, -2, "__metatable");
    S->env_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_settop(L, G - 1);
    return 0;
}
