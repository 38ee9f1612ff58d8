/*
 * lapi_register.c — hs.register and hs.unregister: handler classes added by Lua.
 *
 * While a script's chunk runs (load, or rehydration on a thread), hs.register
 * adds a class to that script, named "<script>#<name>" (or "#<n>", its rank):
 * hs_state_run_chunk collects them, and they are compiled, checked and published
 * with the script like the class it returns.
 *
 * Inside a fire, hs.register(Class, {name = ...}) checks the class, serializes it
 * (class_codec.c) and keeps it pending in the state; so does hs.unregister(name).
 * A handler that fails (error, time or memory limit) drops what it registered;
 * when the fire is over the rest is published as one new program (program.c), so
 * the fire itself ran on one program and every thread sees the classes from its
 * next fire on, rebuilt once per program version. Names are always under the
 * registering script: a script can replace or remove only its own classes. The
 * host bounds how many run-time classes a program holds (hs_config.max_registrations),
 * or refuses run-time registration altogether.
 *
 * It also owns what makes a table a handler class (hs_class_check), for the
 * classes a chunk returns as much as for registered ones.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"

#define STATE(L) ((hs_state *)lua_touserdata((L), lua_upvalueindex(1)))
#define NAME_MAX_LEN 64

typedef struct hs_reg {
    hs_script *script; /* NULL: unregister NAME */
    char *name;        /* "<script>#<name>" */
    char *by;          /* the class whose handler asked */
    int hook;
} hs_reg;

static int valid_name(const char *s, size_t n) {
    if (n < 1 || n > NAME_MAX_LEN) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
              c == '-' || c == '.' || c == ':'))
            return 0;
    }
    return 1;
}

/* The short name in argument IDX (a string, or the name field of a table), or NULL. */
static const char *opt_name(lua_State *L, int idx, const char *api) {
    if (lua_isnoneornil(L, idx)) return NULL;
    size_t n = 0;
    const char *s = lua_type(L, idx) == LUA_TSTRING ? lua_tolstring(L, idx, &n) : NULL;
    if (!s || !valid_name(s, n))
        luaL_error(L, "%s: a name is 1 to %d letters, digits or _-.: (got %s)", api, NAME_MAX_LEN,
                   lua_type(L, idx) == LUA_TSTRING ? s : luaL_typename(L, idx));
    return s;
}

static int is_declared_hook(hs_host *h, const char *s) {
    for (int i = 0; i < h->nhooks; i++)
        if (!strcmp(h->hooks[i], s)) return 1;
    return 0;
}

static void declared_hooks(hs_host *h, char *buf, size_t cap) {
    size_t off = 0;
    buf[0] = 0;
    for (int i = 0; i < h->nhooks && off < cap; i++)
        off += snprintf(buf + off, cap - off, "%s%s", i ? ", " : "", h->hooks[i]);
}

int hs_class_check(lua_State *L, hs_host *h, int idx, const char *name, uint64_t *maskp, char *msg,
                   size_t msglen) {
    int cls = hs_absindex(L, idx);
    lua_pushnil(L);
    while (lua_next(L, cls)) {
        const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
        if (k && !strncmp(k, "on_", 3) && !is_declared_hook(h, k + 3)) {
            char hooks[512];
            declared_hooks(h, hooks, sizeof hooks);
            snprintf(msg, msglen, "%s: %s handles an undeclared hook '%s' (declared hooks: %s)", name, k,
                     k + 3, hooks);
            lua_pop(L, 2);
            return -1;
        }
        if (k && !strncmp(k, "on_", 3) && !lua_isfunction(L, -1)) {
            snprintf(msg, msglen, "%s: %s must be a function, not %s", name, k, luaL_typename(L, -1));
            lua_pop(L, 2);
            return -1;
        }
        lua_pop(L, 1);
    }
    uint64_t mask = 0; /* read as a fire will (a metatable's __index may supply methods) */
    for (int i = 0; i < h->nhooks; i++) {
        lua_pushfstring(L, "on_%s", h->hooks[i]);
        lua_gettable(L, cls);
        if (lua_isfunction(L, -1)) mask |= (uint64_t)1 << i;
        lua_pop(L, 1);
    }
    *maskp = mask;
    return 0;
}

void hs_register_discard(hs_state *S) {
    hs_register_truncate(S, 0);
    hs_buf_free(&S->regs);
}

size_t hs_register_count(const hs_state *S) { return S->regs.len / sizeof(hs_reg); }

void hs_register_truncate(hs_state *S, size_t n) {
    hs_reg *r = (hs_reg *)S->regs.p;
    for (size_t i = n; i < hs_register_count(S); i++) {
        hs_script_release(r[i].script);
        free(r[i].name);
        free(r[i].by);
    }
    if (n < hs_register_count(S)) S->regs.len = n * sizeof *r;
}

/* Keep the change S (NULL: removal) of NAME for the end of the fire; an earlier one
 * of the same name in this fire is replaced: only the last counts. */
static void queue(lua_State *L, hs_state *S, hs_script *s, const char *name) {
    hs_reg *q = (hs_reg *)S->regs.p;
    for (size_t i = 0; i < hs_register_count(S); i++)
        if (!strcmp(q[i].name, name)) {
            hs_script_release(q[i].script);
            q[i].script = s;
            q[i].hook = S->hook;
            return;
        }
    hs_reg r = {s, strdup(name), strdup(S->cur_name ? S->cur_name : ""), S->hook};
    if (!r.name || !r.by || hs_buf_put(&S->regs, &r, sizeof r) != 0) {
        free(r.name);
        free(r.by);
        hs_script_release(s);
        luaL_error(L, "not enough memory");
    }
}

/* Is NAME an entry or a class of the state's program; kind of that entry, or -1. */
static int program_kind(const hs_prog *p, const char *name) {
    for (int i = 0; p && i < p->nscripts; i++) {
        if (!strcmp(p->scripts[i]->name, name)) return p->scripts[i]->kind;
        for (int k = 0; k < p->scripts[i]->nclasses; k++)
            if (!strcmp(p->scripts[i]->classes[k].name, name)) return p->scripts[i]->kind;
    }
    return -1;
}

/* Pending in this fire: the last change queued for NAME, 1 set, 0 removed, -1 none. */
static int pending_state(const hs_state *S, const char *name) {
    const hs_reg *r = (const hs_reg *)S->regs.p;
    int st = -1;
    for (size_t i = 0; i < hs_register_count(S); i++)
        if (!strcmp(r[i].name, name)) st = r[i].script != NULL;
    return st;
}

/* Run-time classes the program will hold once this fire's changes land (a name is
 * pending once at most: queue replaces). */
static int registered_after(const hs_state *S) {
    int n = S->prog ? S->prog->nregistered : 0;
    const hs_reg *r = (const hs_reg *)S->regs.p;
    for (size_t i = 0; i < hs_register_count(S); i++)
        n += (r[i].script != NULL) - (program_kind(S->prog, r[i].name) == HS_SCRIPT_CLASS);
    return n;
}

static void full_name(lua_State *L, hs_state *S, const char *shortname, char *out, size_t cap,
                      const char *api) {
    if (!S->cur_script || !S->txn)
        luaL_error(L, "%s: call it while a script's chunk runs, or from a handler during a fire", api);
    if (S->host->reg_max < 0)
        luaL_error(L, "%s: registering classes at run time is turned off for this host "
                      "(runtime_register=False)", api);
    if ((size_t)snprintf(out, cap, "%s#%s", S->cur_script->origin, shortname) >= cap)
        luaL_error(L, "%s: the name is too long", api);
}

/* Call the rebuilt class's new() (on top) as each thread will; raise if it fails. */
static void trial_new(lua_State *L, hs_state *S, const char *name) {
    lua_getfield(L, -1, "new");
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return;
    }
    if (!lua_isfunction(L, -1))
        luaL_error(L, "hs.register: %s: the class's 'new' must be a function, not %s", name,
                   luaL_typename(L, -1));
    S->in_new++; /* hs.register from new() fails on other threads: here too */
    int rc = lua_pcall(L, 0, 1, 0);
    S->in_new--;
    if (rc != 0) {
        const char *e = lua_tostring(L, -1);
        luaL_error(L, "hs.register: %s: new() failed here, as it would on every thread: %s", name,
                   e ? e : luaL_typename(L, -1));
    }
    if (lua_isnil(L, -1))
        luaL_error(L, "hs.register: %s: new() returned nil, not the handler instance", name);
    lua_pop(L, 1);
}

/* hs.register(Class [, {name = "...", order = n}]) -> the class's full name */
static int l_register(lua_State *L) {
    hs_state *S = STATE(L);
    luaL_checktype(L, 1, LUA_TTABLE);
    if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 2);
    const char *shortname = NULL;
    lua_Integer order = 0;
    if (lua_istable(L, 2)) {
        lua_getfield(L, 2, "name");
        shortname = opt_name(L, 3, "hs.register");
        lua_getfield(L, 2, "order");
        if (!lua_isnil(L, 4)) {
            int isnum = lua_type(L, 4) == LUA_TNUMBER;
            order = lua_tointeger(L, 4);
            if (!isnum || (lua_Number)order != lua_tonumber(L, 4) || order < -1000000 || order > 1000000)
                return luaL_error(L, "hs.register: order must be an integer between -1000000 and 1000000");
        }
    }
    char name[sizeof S->err.script + NAME_MAX_LEN + 2];
    if (S->in_new) return luaL_error(L, "hs.register: not from a class's new()");
    if (S->in_module) return luaL_error(L, "hs.register: not while a module loads (register from "
                                           "the script that requires it)");
    if (S->collecting) { /* a script's chunk: the class goes with the script */
        lua_rawgeti(L, LUA_REGISTRYINDEX, S->collecting);
        int list = lua_gettop(L);
        int n = (int)hs_rawlen(L, list);
        char rank[16];
        snprintf(rank, sizeof rank, "%d", n + 1);
        snprintf(name, sizeof name, "%s#%s", S->cur_name ? S->cur_name : "?", shortname ? shortname : rank);
        for (int i = 1; i <= n; i++) {
            lua_rawgeti(L, list, i);
            lua_getfield(L, -1, "name");
            if (!strcmp(lua_tostring(L, -1), name))
                return luaL_error(L, "hs.register: this script registers '%s' twice", name);
            lua_getfield(L, -2, "class");
            if (lua_rawequal(L, -1, 1))
                return luaL_error(L, "hs.register: this class is registered already, as '%s'",
                                  lua_tostring(L, -2));
            lua_pop(L, 3);
        }
        lua_Debug ar; /* the line of the call, for the class's load errors */
        int line = lua_getstack(L, 1, &ar) && lua_getinfo(L, "l", &ar) ? ar.currentline : 0;
        lua_createtable(L, 0, 4);
        lua_pushinteger(L, line);
        lua_setfield(L, -2, "line");
        lua_pushvalue(L, 1);
        lua_setfield(L, -2, "class");
        lua_pushstring(L, name);
        lua_setfield(L, -2, "name");
        lua_pushinteger(L, order);
        lua_setfield(L, -2, "order");
        lua_rawseti(L, list, n + 1);
        lua_pushstring(L, name);
        return 1;
    }
    if (!shortname && S->cur_script && S->txn)
        return luaL_error(L, "hs.register: a class registered from a handler needs a name: "
                             "hs.register(Class, {name = \"...\"}) (registering the name again replaces it)");
    full_name(L, S, shortname, name, sizeof name, "hs.register");
    int kind = program_kind(S->prog, name);
    if (kind == HS_SCRIPT_CHUNK)
        return luaL_error(L, "hs.register: '%s' is a class its script registers when it loads", name);
    if (kind != HS_SCRIPT_CLASS && pending_state(S, name) != 1 && registered_after(S) >= S->host->reg_max)
        return luaL_error(L, "hs.register: this host allows %d classes registered at run time, and has "
                             "them (unregister one, or raise max_registrations)", S->host->reg_max);
    char msg[1024];
    uint64_t mask = 0;
    if (hs_class_check(L, S->host, 1, name, &mask, msg, sizeof msg) != 0)
        return luaL_error(L, "hs.register: %s", msg);
    if (!mask)
        return luaL_error(L, "hs.register: %s has no on_<hook> method for a declared hook", name);
    S->codec.len = 0;
    int rc = hs_class_encode(S, L, 1, shortname, &S->codec, msg, sizeof msg);
    if (rc == 0) /* the bytes as a Lua string: charged to this state's heap, freed if we raise */
        lua_pushlstring(L, S->codec.p ? S->codec.p : "", S->codec.len);
    if (S->codec.cap > (64 << 10)) hs_buf_free(&S->codec);
    if (rc != 0) return luaL_error(L, "hs.register: cannot register %s: %s", name, msg);
    size_t len;
    const char *bytes = lua_tolstring(L, -1, &len);
    /* rebuild it here once, under this fire's limits: what would fail on every other
     * thread (a library value missing, a module that does not load) fails now */
    hs_class_decode(S, L, name, bytes, len);
    uint64_t again = 0;
    int bad = hs_class_check(L, S->host, -1, name, &again, msg, sizeof msg) != 0;
    if (bad || again != mask)
        return luaL_error(L, "hs.register: %s does not rebuild the same on other threads: %s", name,
                          bad ? msg : "its on_<hook> methods differ");
    trial_new(L, S, name); /* every thread makes an instance: one that fails would stop them all */
    hs_script *s = hs_script_new(HS_SCRIPT_CLASS, name, S->cur_script->origin);
    if (!s || !(s->bc = malloc(len ? len : 1)) || hs_script_add_class(s, name, (int)order, mask) != 0) {
        hs_script_release(s);
        return luaL_error(L, "not enough memory");
    }
    memcpy(s->bc, bytes, len);
    s->bclen = len;
    queue(L, S, s, name);
    lua_pushstring(L, name);
    return 1;
}

/* hs.unregister(name) -> true when there was such a class */
static int l_unregister(lua_State *L) {
    hs_state *S = STATE(L);
    size_t n;
    const char *arg = luaL_checklstring(L, 1, &n);
    char name[sizeof S->err.script + NAME_MAX_LEN + 2];
    const char *hash = strchr(arg, '#');
    if (hash && S->cur_script &&
        ((size_t)(hash - arg) != strlen(S->cur_script->origin) || strncmp(arg, S->cur_script->origin, hash - arg)))
        return luaL_error(L, "hs.unregister: %s may unregister only its own classes (%s#...)",
                          S->cur_script->origin, S->cur_script->origin);
    const char *shortname = hash ? hash + 1 : arg;
    if (!valid_name(shortname, strlen(shortname)) || strlen(shortname) != n - (size_t)(shortname - arg))
        return luaL_error(L, "hs.unregister: '%s' is not a class name", arg);
    full_name(L, S, shortname, name, sizeof name, "hs.unregister");
    int kind = program_kind(S->prog, name);
    if (kind == HS_SCRIPT_CHUNK)
        return luaL_error(L, "hs.unregister: '%s' is a class its script registers when it loads", name);
    int pending = pending_state(S, name);
    int there = pending == 1 || (pending == -1 && kind == HS_SCRIPT_CLASS);
    if (there) queue(L, S, NULL, name);
    lua_pushboolean(L, there);
    return 1;
}

int hs_register_publish(hs_state *S) {
    hs_host *h = S->host;
    hs_reg *r = (hs_reg *)S->regs.p;
    size_t n = hs_register_count(S);
    hs_prog_op *ops = calloc(n, sizeof *ops);
    int rc = -1;
    if (ops) {
        for (size_t i = 0; i < n; i++) {
            ops[i].name = r[i].name;
            ops[i].script = r[i].script;
            /* ours until logged: once published, another thread may replace it at once */
            if (r[i].script) atomic_fetch_add(&r[i].script->refs, 1);
        }
        rc = hs_prog_publish(h, ops, (int)n, NULL, 0, h->reg_max);
        if (rc != 0)
            for (size_t i = 0; i < n; i++)
                if (r[i].script) atomic_fetch_sub(&r[i].script->refs, 1);
    }
    uint64_t reg = 0, unreg = 0, refused = 0;
    for (size_t i = 0; i < n; i++) {
        char msg[1024];
        int len, level = 20;
        const char *hook = r[i].hook >= 0 ? h->hooks[r[i].hook] : "?";
        if (rc != 0) {
            level = 40;
            len = snprintf(msg, sizeof msg, "out of memory publishing %s", r[i].name);
        } else if (ops[i].result == HS_OP_LIMIT) {
            level = 40;
            refused++;
            len = snprintf(msg, sizeof msg, "registration of %s refused: the host allows %d classes "
                                            "registered at run time", r[i].name, h->reg_max);
        } else if (ops[i].result == HS_OP_TAKEN) {
            level = 30;
            len = snprintf(msg, sizeof msg, "registration of %s dropped: its script now registers "
                                            "that name when it loads", r[i].name);
        } else if (ops[i].result == HS_OP_MISSING) {
            if (!r[i].script) continue; /* unregistered meanwhile by another thread */
            level = 30;
            len = snprintf(msg, sizeof msg, "registration of %s dropped: its script was unloaded",
                           r[i].name);
        } else if (r[i].script) {
            char hooks[512] = "";
            size_t off = 0;
            for (int k = 0; k < h->nhooks && off < sizeof hooks; k++)
                if ((r[i].script->hookmask >> k) & 1)
                    off += (size_t)snprintf(hooks + off, sizeof hooks - off, "%s%s", off ? ", " : "", h->hooks[k]);
            reg++;
            len = snprintf(msg, sizeof msg, "registered %s (hooks: %s) from %s in %s", r[i].name, hooks,
                           r[i].by, hook);
        } else {
            unreg++;
            len = snprintf(msg, sizeof msg, "unregistered %s from %s in %s", r[i].name, r[i].by, hook);
        }
        if (len >= (int)sizeof msg) len = (int)sizeof msg - 1;
        hs_log_put(S, level, r[i].by, msg, (size_t)len);
    }
    free(ops);
    hs_register_truncate(S, 0);
    pthread_mutex_lock(&h->mu);
    h->registrations += reg;
    h->unregistrations += unreg;
    h->registrations_refused += refused;
    pthread_mutex_unlock(&h->mu);
    return rc == 0;
}

void hs_lapi_register_open(hs_state *S) {
    lua_State *L = S->L;
    lua_pushlightuserdata(L, S);
    lua_pushcclosure(L, l_register, 1);
    lua_setfield(L, -2, "register");
    lua_pushlightuserdata(L, S);
    lua_pushcclosure(L, l_unregister, 1);
    lua_setfield(L, -2, "unregister");
}
