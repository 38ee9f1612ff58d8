/*
 * state.c — the per-thread Lua state: creation and teardown, protected calls, and
 * running a script's chunk into a handler class. Its limits live in limits.c, its
 * rehydration from the published program in rehydrate.c.
 *
 * Who lists a state, pools it and frees it is host.c's and thread.c's business;
 * this file only makes, reopens and closes the Lua side, and frees the struct when
 * told to. A "scratch" state is the same thing used once by hs_load to validate a
 * script; it is in no list.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core.h"

/* ---- protected helpers: every Lua call outside a fire goes through here ---- */

typedef struct protected_call {
    hs_state *S;
    int (*body)(hs_state *S, void *arg);
    void *arg;
    int ret;
} protected_call;

static int protected_trampoline(lua_State *L) {
    protected_call *pc = lua_touserdata(L, 1);
    lua_pop(L, 1);
    pc->ret = pc->body(pc->S, pc->arg);
    return 0;
}

/* Run BODY in protected mode; a raised error (memory...) becomes -1 with ERR set. */
int hs_protected(hs_state *S, int (*body)(hs_state *, void *), void *arg, hs_error *err,
                 const char *script) {
    lua_State *L = S->L;
    int top = lua_gettop(L);
    protected_call pc = {S, body, arg, -1};
    /* LuaJIT allocates a closure for lua_pushcfunction, which out of memory would
     * throw with nothing to catch it: after the first call, reuse the one made. */
    if (S->trampoline_ref) lua_rawgeti(L, LUA_REGISTRYINDEX, S->trampoline_ref);
    else lua_pushcfunction(L, protected_trampoline);
    lua_pushlightuserdata(L, &pc);
    int rc = lua_pcall(L, 1, 0, 0);
    if (rc != 0) {
        hs_error_from_lua(S, err, rc, script, 0);
        if (err->kind == HS_ERR_RUNTIME) err->kind = HS_ERR_SCRIPT;
        pc.ret = -1;
    }
    lua_settop(L, top);
    return pc.ret;
}

/* ---- state creation ---- */

static int init_body(hs_state *S, void *arg) {
    (void)arg;
    lua_State *L = S->L;
    hs_host *h = S->host;
    if (!h->sandbox) {
        luaL_openlibs(L);
    } else {
        hs_openlib(L, "_G", luaopen_base);
        hs_openlib(L, LUA_TABLIBNAME, luaopen_table);
        hs_openlib(L, LUA_STRLIBNAME, luaopen_string);
        hs_openlib(L, LUA_MATHLIBNAME, luaopen_math);
        hs_openlib(L, LUA_OSLIBNAME, luaopen_os);
#ifdef HS_ENGINE_LUAJIT
        hs_openlib(L, LUA_BITLIBNAME, luaopen_bit);
        /* LuaJIT keeps coroutine functions in the base library */
#else
        hs_openlib(L, LUA_COLIBNAME, luaopen_coroutine);
        hs_openlib(L, LUA_UTF8LIBNAME, luaopen_utf8);
#endif
    }
    lua_pushlightuserdata(L, S);
    lua_pushcclosure(L, hs_lapi_errh, 1);
    S->errh_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushcfunction(L, protected_trampoline);
    S->trampoline_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    int jit = hs_engine_setup(L, h->time_limit > 0 || h->memory_limit > 0);
    hs_lapi_open(S); /* leaves hs */
    lua_pushboolean(L, jit);
    lua_setfield(L, -2, "jit");
    lua_setglobal(L, "hs");
    return hs_sandbox_open(S);
}

/* Make S->L (NULL before): libraries, hs, the sandbox, the stack entries a fire
 * expects, the limits. 0, or -1 with ERR set and S->L closed again. */
static int open_lua(hs_state *S, hs_error *err) {
    hs_host *h = S->host;
    S->heap_limit = 0; /* LuaJIT cannot survive running out of memory inside lua_newstate */
    S->L = lua_newstate(hs_limits_alloc, S);
    if (!S->L) {
        hs_error_set(err, HS_ERR_MEMORY, "", "", "out of memory creating a Lua state");
        return -1;
    }
    if (hs_protected(S, init_body, NULL, err, "") != 0) {
        char msg[sizeof err->message];
        snprintf(msg, sizeof msg, "%s", err->message);
        hs_error_set(err, err->kind, "", "", "cannot create a Lua state: %s%s", msg,
                     err->kind == HS_ERR_MEMORY ? " (raise memory_limit)" : "");
        return -1;
    }
    size_t base = atomic_load_explicit(&S->heap, memory_order_relaxed);
    if (h->memory_limit && base + (base >> 1) > h->memory_limit) {
        hs_error_set(err, HS_ERR_MEMORY, "", "",
                     "memory_limit of %zu bytes is too small: a fresh %s state already takes %zu "
                     "bytes (allow at least %zu)", h->memory_limit, HS_ENGINE_NAME, base, 2 * base);
        return -1;
    }
    S->heap_limit = h->memory_limit;
    lua_rawgeti(S->L, LUA_REGISTRYINDEX, S->errh_ref); /* HS_STACK_ERRH */
    lua_rawgeti(S->L, LUA_REGISTRYINDEX, S->txn_ref);  /* HS_STACK_TXN */
    hs_limits_install(S);
    return 0;
}

/* Close S->L and drop everything that lived in it (classes, handler cache, the
 * program it ran); the struct, its listings and counters stay. */
static void close_lua(hs_state *S) {
    if (S->L) lua_close(S->L);
    S->L = NULL;
    S->env_ref = S->txn_ref = S->errh_ref = S->loaded_ref = S->trampoline_ref = 0;
    S->names_ref = S->names_nmods = 0;
    for (int i = 0; i < S->nslots; i++) {
        free(S->slots[i].refs);
        hs_script_release(S->slots[i].script);
    }
    free(S->slots);
    S->slots = NULL;
    S->nslots = 0;
    if (S->hooks)
        for (int i = 0; i < S->host->nhooks; i++) {
            free(S->hooks[i].items);
            S->hooks[i].items = NULL;
            S->hooks[i].n = 0;
        }
    hs_prog_release(S->prog);
    S->prog = NULL;
    S->gen = 0;
    hs_buf_free(&S->ctxbuf);
    atomic_store_explicit(&S->heap, 0, memory_order_relaxed);
}

hs_state *hs_state_new(hs_host *h, int scratch, hs_error *err) {
    hs_state *S = calloc(1, sizeof *S);
    if (!S) goto nomem;
    S->host = h; /* the caller keeps h alive (host.c takes a reference for a listed state) */
    S->scratch = scratch;
    S->hook = -1;
    S->hooks = calloc(h->nhooks, sizeof *S->hooks);
    if (!S->hooks) goto nomem;
    if (open_lua(S, err) != 0) {
        hs_state_close(S);
        return NULL;
    }
    if (scratch) S->prog = hs_prog_acquire(h);
    return S;
nomem:
    hs_error_set(err, HS_ERR_MEMORY, "", "", "out of memory creating a Lua state");
    if (S) hs_state_close(S);
    return NULL;
}

int hs_state_reopen(hs_state *S, hs_error *err) {
    close_lua(S);
    return open_lua(S, err);
}

/* Close the Lua state and free what it used; the struct stays (hs_state_destroy). */
void hs_state_teardown(hs_state *S) {
    close_lua(S);
    free(S->hooks);
    S->hooks = NULL;
    hs_module **mods = (hs_module **)S->pending.p;
    for (size_t i = 0; i < S->pending.len / sizeof *mods; i++) {
        free(mods[i]->name);
        free(mods[i]->bc);
        free(mods[i]);
    }
    hs_buf_free(&S->pending);
    hs_register_discard(S);
    hs_buf_free(&S->codec);
    hs_buf_free(&S->logs);
}

int hs_state_unref(hs_state *S) { return atomic_fetch_sub(&S->refs, 1) == 1; }

void hs_state_destroy(hs_state *S) { free(S); }

/* A scratch state, or a worker state that never got listed. */
void hs_state_close(hs_state *S) {
    hs_state_teardown(S);
    free(S);
}

/* ---- loading and running chunks ---- */

int hs_state_load(hs_state *S, const char *name, const char *buf, size_t len, int binary) {
    char chunkname[300];
    snprintf(chunkname, sizeof chunkname, "@%s", name);
    return luaL_loadbufferx(S->L, buf, len, chunkname, binary ? "b" : "t");
}

/* Call the function on top with NARGS arguments below it, through the message
 * handler; 0 or the pcall code (error value on top). The caller has started the
 * deadline (and ends it), so that everything it runs — the chunk, reading the
 * class's fields through metamethods, new() — shares one time limit. */
static int call_user(hs_state *S, int nargs, int nres) {
    lua_State *L = S->L;
    int fn = lua_gettop(L) - nargs;
    lua_rawgeti(L, LUA_REGISTRYINDEX, S->errh_ref);
    lua_insert(L, fn);
    S->err.message[0] = S->err.traceback[0] = 0;
    int rc = lua_pcall(L, nargs, nres, fn);
    lua_remove(L, fn);
    return rc;
}

int hs_state_instantiate(hs_state *S, const char *name, uint64_t *mask, hs_error *err) {
    lua_State *L = S->L;
    int cls = lua_gettop(L);
    char msg[1024];
    uint64_t m = 0;
    if (hs_class_check(L, S->host, cls, name, &m, msg, sizeof msg) != 0) {
        hs_error_set(err, HS_ERR_SCRIPT, name, "", "%s", msg);
        lua_settop(L, cls - 1);
        return -1;
    }
    if (mask) *mask = m;
    lua_getfield(L, cls, "new");
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_pushvalue(L, cls);
        return 0;
    }
    if (!lua_isfunction(L, -1)) {
        hs_error_set(err, HS_ERR_SCRIPT, name, "", "%s: the class's 'new' must be a function, not %s",
                     name, luaL_typename(L, -1));
        lua_settop(L, cls - 1);
        return -1;
    }
    int rc = call_user(S, 0, 1);
    if (rc != 0) {
        hs_error_from_lua(S, err, rc, name, 1);
        if (err->kind == HS_ERR_RUNTIME) err->kind = HS_ERR_SCRIPT;
        lua_settop(L, cls - 1);
        return -1;
    }
    if (lua_isnil(L, -1)) {
        hs_error_set(err, HS_ERR_SCRIPT, name, "", "%s: new() returned nil, not the handler instance",
                     name);
        lua_settop(L, cls - 1);
        return -1;
    }
    return 0;
}

void hs_classes_free(hs_buf *classes) {
    hs_class *c = (hs_class *)classes->p;
    for (size_t i = 0; i < classes->len / sizeof *c; i++) free(c[i].name);
    hs_buf_free(classes);
}

/* Instantiate the class on top (named NAME; registered on LINE of SCRIPT, or 0) into
 * the list at LIST and record it. */
static int add_class(hs_state *S, int list, const char *script, const char *name, int line, int order,
                     hs_buf *classes, hs_error *err) {
    lua_State *L = S->L;
    uint64_t mask = 0;
    if (hs_state_instantiate(S, name, &mask, err) != 0) {
        if (line > 0 && !err->line) { /* where it was registered: a position for the message */
            char msg[sizeof err->message];
            snprintf(msg, sizeof msg, "%s", err->message);
            snprintf(err->message, sizeof err->message, "%s:%d: %.900s", script, line, msg);
            err->line = line;
        }
        return -1;
    }
    int n = (int)hs_rawlen(L, list);
    lua_rawseti(L, list, n + 2); /* self */
    lua_rawseti(L, list, n + 1); /* class */
    hs_class c = {strdup(name), order, mask};
    if (!c.name || hs_buf_put(classes, &c, sizeof c) != 0) {
        free(c.name);
        luaL_error(L, "not enough memory");
    }
    return 0;
}

/* The function on top is a script's main chunk: give it the script environment,
 * run it while hs.register collects classes, check every class it registered or
 * returned and make their instances. Protected context, under a deadline the
 * caller started: reading "new" may run an __index. */
int hs_state_run_chunk(hs_state *S, const char *name, hs_buf *classes, hs_error *err) {
    lua_State *L = S->L;
    hs_sandbox_push_env(S, L);
    hs_setenv(L, lua_gettop(L) - 1);
    S->cur_name = name;
    S->in_module = S->in_new = 0;
    int fn = lua_gettop(L);
    lua_newtable(L); /* what hs.register collects: {class, name, order} entries */
    int outer = S->collecting;
    lua_pushvalue(L, -1);
    S->collecting = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_insert(L, fn); /* below the chunk: stays after the call */
    int rc = call_user(S, 0, 1);
    luaL_unref(L, LUA_REGISTRYINDEX, S->collecting);
    S->collecting = outer;
    int regs = fn, ret = fn + 1;
    size_t first = classes->len;
    if (rc != 0) {
        hs_error_from_lua(S, err, rc, name, 1); /* before the deadline ends: it tells a timeout */
        if (err->kind == HS_ERR_RUNTIME) err->kind = HS_ERR_SCRIPT;
        lua_settop(L, fn - 1);
        return -1;
    }
    int nregs = (int)hs_rawlen(L, regs);
    if (!lua_istable(L, ret) && !(nregs > 0 && lua_isnil(L, ret))) {
        hs_error_set(err, HS_ERR_SCRIPT, name, "",
                     "%s: the script must return a handler class (a table)%s, not %s", name,
                     nregs ? "" : " or register one with hs.register", luaL_typename(L, ret));
        lua_settop(L, fn - 1);
        return -1;
    }
    lua_newtable(L);
    int list = lua_gettop(L);
    for (int i = 1; i <= nregs; i++) {
        lua_rawgeti(L, regs, i);
        int e = lua_gettop(L);
        lua_getfield(L, e, "name");
        const char *cname = lua_tostring(L, -1);
        lua_getfield(L, e, "order");
        int order = (int)lua_tointeger(L, -1);
        lua_getfield(L, e, "line");
        int line = (int)lua_tointeger(L, -1);
        lua_getfield(L, e, "class");
        if (lua_rawequal(L, -1, ret)) lua_pushnil(L), lua_replace(L, ret); /* returned too: once */
        if (add_class(S, list, name, cname, line, order, classes, err) != 0) goto fail;
        lua_settop(L, list);
    }
    if (lua_istable(L, ret)) {
        lua_pushvalue(L, ret);
        if (add_class(S, list, name, name, 0, 0, classes, err) != 0) goto fail;
    }
    lua_replace(L, fn);
    lua_settop(L, fn);
    return 0;
fail: {
        hs_class *c = (hs_class *)classes->p; /* drop the ones recorded here */
        for (size_t i = first / sizeof *c; i < classes->len / sizeof *c; i++) free(c[i].name);
        classes->len = first;
        lua_settop(L, fn - 1);
        return -1;
    }
}
