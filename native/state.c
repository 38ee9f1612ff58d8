/*
 * state.c — the per-thread Lua state: creation, the counting allocator, running a
 * script's chunk, and rehydration from the published program.
 *
 * A worker state is created on a thread's first fire (unless the host's pool has
 * an idle one to give) and listed both by its host and by its thread (thread.c).
 * When the thread ends it goes to the host's pool, if there is room, to serve the
 * next new thread with its program, classes and module-level locals as they were;
 * otherwise it is closed then, or when the host is freed, whichever comes first.
 * A "scratch" state is the same thing used once by hs_load to validate a script;
 * it is in neither list.
 *
 * Rehydration (on the first fire after the program generation changed) loads the
 * bytecode of new or changed scripts only — unchanged scripts keep their class,
 * instance and module-level locals — then rebuilds the per-hook handler cache.
 * It is two-phase: everything new is built first; only if all of it succeeded is
 * it swapped in, so a thread never runs half of a program.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core.h"

void hs_error_set(hs_error *e, int kind, const char *script, const char *hook, const char *fmt, ...) {
    e->kind = kind;
    e->line = 0;
    snprintf(e->script, sizeof e->script, "%s", script ? script : "");
    snprintf(e->hook, sizeof e->hook, "%s", hook ? hook : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    e->traceback[0] = 0;
}

/* The line of "chunk:LINE: message" — Lua may shorten a long chunk name to
 * "...tail", so look for the first ":digits:" rather than for the name. */
static int line_of(const char *msg) {
    for (const char *p = strchr(msg, ':'); p; p = strchr(p + 1, ':')) {
        const char *d = p + 1;
        while (*d >= '0' && *d <= '9') d++;
        if (d > p + 1 && *d == ':') return atoi(p + 1);
    }
    return 0;
}

/* Lua shortens a long chunk name to "...tail"; put the whole script name back in
 * front of "...tail:LINE: message" so the operator sees which file it was. */
static void expand_chunkname(char *msg, size_t cap, const char *script) {
    if (strncmp(msg, "...", 3) != 0) return;
    const char *colon = strchr(msg + 3, ':');
    while (colon && !(colon[1] >= '0' && colon[1] <= '9')) colon = strchr(colon + 1, ':');
    if (!colon) return;
    size_t tail = (size_t)(colon - (msg + 3)), slen = strlen(script);
    if (tail > slen || strncmp(script + slen - tail, msg + 3, tail) != 0) return;
    char out[1024];
    snprintf(out, sizeof out, "%s%s", script, colon);
    snprintf(msg, cap, "%s", out);
}

/* Fill E from a failed lua_pcall (rc) whose error value is on top. HANDLED: the call
 * ran with the message handler (lapi_hs.c), which stored message and traceback in
 * S->err; otherwise S->err is not looked at (it may hold another call's error). */
void hs_error_from_lua(hs_state *S, hs_error *e, int rc, const char *script, int handled) {
    lua_State *L = S->L;
    int kind = HS_ERR_RUNTIME;
    char msg[sizeof e->message];
    const char *sep = *script ? ": " : "";
    if (rc == LUA_ERRMEM || S->mem_refused) {
        kind = HS_ERR_MEMORY;
        snprintf(msg, sizeof msg, "%s%smemory limit exceeded (%zu bytes per state)", script, sep,
                 S->heap_limit);
    } else if (S->abort == HS_ERR_TIMEOUT) {
        kind = HS_ERR_TIMEOUT;
        snprintf(msg, sizeof msg, "%s%stime limit exceeded (%g s)", script, sep, S->host->time_limit);
    } else if (handled && S->err.message[0]) {
        snprintf(msg, sizeof msg, "%s", S->err.message);
    } else {
        const char *m = lua_tostring(L, -1);
        snprintf(msg, sizeof msg, "%s", m ? m : "(error object is not a string)");
    }
    expand_chunkname(msg, sizeof msg, script);
    char tb[sizeof e->traceback];
    snprintf(tb, sizeof tb, "%s", handled ? S->err.traceback : "");
    e->kind = kind;
    snprintf(e->script, sizeof e->script, "%s", script);
    memcpy(e->message, msg, sizeof msg);
    memcpy(e->traceback, tb, sizeof tb);
    e->line = line_of(e->message);
    if (kind == HS_ERR_MEMORY) lua_gc(L, LUA_GCCOLLECT, 0);
}

/* ---- counting allocator ---- */

static void *hs_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    hs_state *S = ud;
    size_t old = ptr ? osize : 0;
    size_t heap = atomic_load_explicit(&S->heap, memory_order_relaxed);
    if (nsize == 0) {
        free(ptr);
        atomic_store_explicit(&S->heap, heap - old, memory_order_relaxed);
        return NULL;
    }
    if (S->heap_limit && nsize > old) {
        size_t limit = S->heap_limit + (S->in_errh ? HS_ERRH_SLACK : 0);
        if (heap + (nsize - old) > limit) {
            S->mem_refused = 1;
            return NULL;
        }
    }
    void *p = realloc(ptr, nsize);
    if (p) atomic_store_explicit(&S->heap, heap - old + nsize, memory_order_relaxed);
    return p;
}

/* ---- time limit ---- */

static void count_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    void *ud;
    lua_getallocf(L, &ud);
    hs_state *S = ud;
    if (!S->release_at_ns && !S->deadline_ns) return;
    uint64_t now = hs_now_ns();
    if (S->release_at_ns && now >= S->release_at_ns) hs_state_release_host(S);
    if (!S->deadline_ns) return;
    if (!S->abort && now < S->deadline_ns) return;
    if (!S->abort) {
        /* From now on fail at every instruction, so no pcall loop can outlast us. */
        S->abort = HS_ERR_TIMEOUT;
        lua_sethook(L, count_hook, LUA_MASKCOUNT, 1);
    }
    luaL_error(L, "time limit exceeded");
}

/* The fire runs long: let the host's other threads go on (hostscript.h). */
void hs_state_release_host(hs_state *S) {
    S->release_at_ns = 0;
    S->host->release();
    atomic_store_explicit(&S->c.releases,
                          atomic_load_explicit(&S->c.releases, memory_order_relaxed) + 1,
                          memory_order_relaxed);
}

void hs_state_deadline(hs_state *S, uint64_t start_ns) {
    if (S->host->time_limit <= 0) return;
    S->deadline_ns = start_ns + (uint64_t)(S->host->time_limit * 1e9);
}

void hs_state_end_deadline(hs_state *S) {
    S->deadline_ns = 0;
    if (S->abort) {
        S->abort = 0;
        lua_sethook(S->L, count_hook, LUA_MASKCOUNT, HS_HOOK_COUNT);
    }
    S->mem_refused = 0;
}

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

hs_state *hs_state_new(hs_host *h, int scratch, hs_error *err) {
    hs_state *S = calloc(1, sizeof *S);
    if (!S) goto nomem;
    S->host = h;
    atomic_fetch_add(&h->refs, 1);
    S->scratch = scratch;
    S->heap_limit = 0; /* LuaJIT cannot survive running out of memory inside lua_newstate */
    S->hook = -1;
    S->slot = -1;
    S->hooks = calloc(h->nhooks, sizeof *S->hooks);
    if (!S->hooks) goto nomem;
    S->L = lua_newstate(hs_alloc, S);
    if (!S->L) goto nomem;
    if (hs_protected(S, init_body, NULL, err, "") != 0) {
        char msg[sizeof err->message];
        snprintf(msg, sizeof msg, "%s", err->message);
        hs_error_set(err, err->kind, "", "", "cannot create a Lua state: %s%s", msg,
                     err->kind == HS_ERR_MEMORY ? " (raise memory_limit)" : "");
        hs_state_close(S);
        return NULL;
    }
    size_t base = atomic_load_explicit(&S->heap, memory_order_relaxed);
    if (h->memory_limit && base + (base >> 1) > h->memory_limit) {
        hs_error_set(err, HS_ERR_MEMORY, "", "",
                     "memory_limit of %zu bytes is too small: a fresh %s state already takes %zu "
                     "bytes (allow at least %zu)", h->memory_limit, HS_ENGINE_NAME, base, 2 * base);
        hs_state_close(S);
        return NULL;
    }
    S->heap_limit = h->memory_limit;
    lua_rawgeti(S->L, LUA_REGISTRYINDEX, S->errh_ref); /* HS_STACK_ERRH */
    lua_rawgeti(S->L, LUA_REGISTRYINDEX, S->txn_ref);  /* HS_STACK_TXN */
    if (h->time_limit > 0) lua_sethook(S->L, count_hook, LUA_MASKCOUNT, HS_HOOK_COUNT);
    if (scratch) {
        S->prog = hs_prog_acquire(h);
    } else {
        atomic_init(&S->refs, 2); /* listed by the host and by its thread */
        pthread_mutex_lock(&h->mu);
        S->next = h->states;
        if (h->states) h->states->prev = S;
        h->states = S;
        S->linked = 1;
        h->nstates++;
        pthread_mutex_unlock(&h->mu);
    }
    return S;
nomem:
    hs_error_set(err, HS_ERR_MEMORY, "", "", "out of memory creating a Lua state");
    if (S) hs_state_close(S);
    return NULL;
}

/* Close the Lua state and free what it used; the struct stays (hs_state_release). */
void hs_state_teardown(hs_state *S) {
    if (S->L) lua_close(S->L);
    S->L = NULL;
    for (int i = 0; i < S->nslots; i++)
        hs_script_release(S->slots[i].script);
    free(S->slots);
    S->slots = NULL;
    S->nslots = 0;
    if (S->hooks) {
        for (int i = 0; i < S->host->nhooks; i++) free(S->hooks[i].items);
        free(S->hooks);
        S->hooks = NULL;
    }
    hs_prog_release(S->prog);
    S->prog = NULL;
    hs_module **mods = (hs_module **)S->pending.p;
    for (size_t i = 0; i < S->pending.len / sizeof *mods; i++) {
        free(mods[i]->name);
        free(mods[i]->bc);
        free(mods[i]);
    }
    hs_buf_free(&S->pending);
    hs_buf_free(&S->logs);
    hs_buf_free(&S->ctxbuf);
    atomic_store_explicit(&S->heap, 0, memory_order_relaxed);
}

static void state_free(hs_state *S) {
    hs_host *h = S->host;
    hs_thread *T = S->thread;
    free(S);
    hs_host_unref(h);
    if (T) hs_thread_unref(T);
}

/* Drop one of a worker state's listings (thread.c); the last one frees it. */
void hs_state_release(hs_state *S) {
    if (atomic_fetch_sub(&S->refs, 1) == 1) state_free(S);
}

/* A scratch state, or a worker state that never got listed. */
void hs_state_close(hs_state *S) {
    hs_state_teardown(S);
    state_free(S);
}

/* ---- loading and running chunks ---- */

int hs_state_load(hs_state *S, const char *name, const char *buf, size_t len, int binary) {
    char chunkname[300];
    snprintf(chunkname, sizeof chunkname, "@%s", name);
    return luaL_loadbufferx(S->L, buf, len, chunkname, binary ? "b" : "t");
}

/* Call the function on top with NARGS arguments below it, through the message
 * handler, under the time limit; 0 or the pcall code (error value on top). */
static int call_user(hs_state *S, int nargs, int nres) {
    lua_State *L = S->L;
    int fn = lua_gettop(L) - nargs;
    lua_rawgeti(L, LUA_REGISTRYINDEX, S->errh_ref);
    lua_insert(L, fn);
    S->err.message[0] = S->err.traceback[0] = 0;
    hs_state_deadline(S, hs_now_ns());
    int rc = lua_pcall(L, nargs, nres, fn);
    lua_remove(L, fn);
    return rc;
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

/* The function on top is a script's main chunk: give it the script environment,
 * run it, check that it returned a handler class, make the instance. Leaves
 * class and self on the stack (0) or nothing (-1, ERR set). Protected context. */
int hs_state_run_chunk(hs_state *S, const char *name, hs_error *err) {
    lua_State *L = S->L;
    hs_host *h = S->host;
    hs_sandbox_push_env(S);
    hs_setenv(L, lua_gettop(L) - 1);
    S->slot = -1;
    S->cur_name = name;
    int rc = call_user(S, 0, 1);
    if (rc != 0) {
        hs_error_from_lua(S, err, rc, name, 1); /* before the deadline ends: it tells a timeout */
        hs_state_end_deadline(S);
        if (err->kind == HS_ERR_RUNTIME) err->kind = HS_ERR_SCRIPT;
        lua_pop(L, 1);
        return -1;
    }
    hs_state_end_deadline(S);
    if (!lua_istable(L, -1)) {
        hs_error_set(err, HS_ERR_SCRIPT, name, "",
                     "%s: the script must return a handler class (a table), not %s", name,
                     luaL_typename(L, -1));
        lua_pop(L, 1);
        return -1;
    }
    int cls = lua_gettop(L);
    lua_pushnil(L);
    while (lua_next(L, cls)) {
        const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
        if (k && !strncmp(k, "on_", 3) && !is_declared_hook(h, k + 3)) {
            char hooks[512];
            declared_hooks(h, hooks, sizeof hooks);
            hs_error_set(err, HS_ERR_SCRIPT, name, "",
                         "%s: %s handles an undeclared hook '%s' (declared hooks: %s)", name, k,
                         k + 3, hooks);
            lua_settop(L, cls - 1);
            return -1;
        }
        lua_pop(L, 1);
    }
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
    rc = call_user(S, 0, 1);
    if (rc != 0) {
        hs_error_from_lua(S, err, rc, name, 1);
        hs_state_end_deadline(S);
        if (err->kind == HS_ERR_RUNTIME) err->kind = HS_ERR_SCRIPT;
        lua_settop(L, cls - 1);
        return -1;
    }
    hs_state_end_deadline(S);
    if (lua_isnil(L, -1)) {
        hs_error_set(err, HS_ERR_SCRIPT, name, "", "%s: new() returned nil, not the handler instance",
                     name);
        lua_settop(L, cls - 1);
        return -1;
    }
    return 0;
}

/* ---- rehydration ---- */

typedef struct rehydration {
    hs_prog *p;
    hs_slot *slots;         /* p->nscripts; class_ref/self_ref >= 0 */
    char *fresh;            /* slots[i] made here (not shared with the old ones) */
    hs_hookcache *hooks;    /* nhooks */
    int nloaded;
} rehydration;

static void rehydration_undo(hs_state *S, rehydration *r) {
    lua_State *L = S->L;
    for (int i = 0; r->slots && i < r->p->nscripts; i++)
        if (r->fresh[i] && r->slots[i].class_ref) {
            luaL_unref(L, LUA_REGISTRYINDEX, r->slots[i].class_ref);
            luaL_unref(L, LUA_REGISTRYINDEX, r->slots[i].self_ref);
        }
    for (int hk = 0; r->hooks && hk < S->host->nhooks; hk++) {
        for (int j = 0; j < r->hooks[hk].n; j++) luaL_unref(L, LUA_REGISTRYINDEX, r->hooks[hk].items[j].fn_ref);
        free(r->hooks[hk].items);
    }
    free(r->slots);
    free(r->fresh);
    free(r->hooks);
}

static int rehydrate_body(hs_state *S, void *arg) {
    rehydration *r = arg;
    lua_State *L = S->L;
    hs_host *h = S->host;
    hs_prog *p = r->p;
    for (int i = 0; i < p->nscripts; i++) {
        hs_script *s = p->scripts[i];
        int old = -1;
        for (int j = 0; j < S->nslots; j++)
            if (S->slots[j].script == s) old = j;
        r->slots[i].script = s;
        if (old >= 0) {
            r->slots[i].class_ref = S->slots[old].class_ref;
            r->slots[i].self_ref = S->slots[old].self_ref;
            continue;
        }
        int rc = hs_state_load(S, s->name, s->bc, s->bclen, 1);
        if (rc != 0) {
            hs_error_from_lua(S, &S->err, rc, s->name, 0);
            return -1;
        }
        if (hs_state_run_chunk(S, s->name, &S->err) != 0) return -1;
        r->fresh[i] = 1;
        r->slots[i].self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        r->slots[i].class_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        r->nloaded++;
    }
    for (int hk = 0; hk < h->nhooks; hk++) {
        int n = 0;
        for (int i = 0; i < p->nscripts; i++) n += (p->scripts[i]->hookmask >> hk) & 1;
        if (!n) continue;
        r->hooks[hk].items = calloc(n, sizeof *r->hooks[hk].items);
        if (!r->hooks[hk].items) return luaL_error(L, "not enough memory");
        for (int i = 0; i < p->nscripts; i++) {
            if (!((p->scripts[i]->hookmask >> hk) & 1)) continue;
            lua_rawgeti(L, LUA_REGISTRYINDEX, r->slots[i].class_ref);
            lua_pushfstring(L, "on_%s", h->hooks[hk]);
            lua_gettable(L, -2);
            hs_handler *it = &r->hooks[hk].items[r->hooks[hk].n];
            it->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
            it->self_ref = r->slots[i].self_ref;
            it->slot = i;
            r->hooks[hk].n++;
            lua_pop(L, 1);
        }
    }
    return 0;
}

int hs_state_rehydrate(hs_state *S) {
    hs_host *h = S->host;
    lua_State *L = S->L;
    rehydration r = {0};
    r.p = hs_prog_acquire(h);
    r.slots = calloc(r.p->nscripts + 1, sizeof *r.slots);
    r.fresh = calloc(r.p->nscripts + 1, 1);
    r.hooks = calloc(h->nhooks, sizeof *r.hooks);
    if (!r.slots || !r.fresh || !r.hooks) {
        hs_error_set(&S->err, HS_ERR_MEMORY, "", "", "out of memory preparing scripts");
        rehydration_undo(S, &r);
        hs_prog_release(r.p);
        return -1;
    }
    S->modprog = r.p;
    int failed = hs_protected(S, rehydrate_body, &r, &S->err, "") != 0;
    S->modprog = NULL;
    if (failed) {
        char msg[sizeof S->err.message];
        snprintf(msg, sizeof msg, "%s", S->err.message);
        snprintf(S->err.message, sizeof S->err.message,
                 "cannot prepare the program on this thread: %.970s", msg);
        rehydration_undo(S, &r);
        hs_prog_release(r.p);
        return -1;
    }
    int had_program = S->nslots > 0;
    /* Swap in: drop what the new program no longer uses. */
    for (int j = 0; j < S->nslots; j++) {
        int kept = 0;
        for (int i = 0; i < r.p->nscripts; i++)
            if (!r.fresh[i] && r.slots[i].script == S->slots[j].script) kept = 1;
        if (!kept) {
            luaL_unref(L, LUA_REGISTRYINDEX, S->slots[j].class_ref);
            luaL_unref(L, LUA_REGISTRYINDEX, S->slots[j].self_ref);
        }
    }
    for (int hk = 0; hk < h->nhooks; hk++) {
        for (int j = 0; j < S->hooks[hk].n; j++)
            luaL_unref(L, LUA_REGISTRYINDEX, S->hooks[hk].items[j].fn_ref);
        free(S->hooks[hk].items);
        S->hooks[hk] = r.hooks[hk];
    }
    free(r.hooks);
    /* script references: the state keeps its own on each slot's script */
    for (int i = 0; i < r.p->nscripts; i++) atomic_fetch_add(&r.slots[i].script->refs, 1);
    for (int j = 0; j < S->nslots; j++)
        hs_script_release(S->slots[j].script);
    free(S->slots);
    free(r.fresh);
    S->slots = r.slots;
    S->nslots = r.p->nscripts;
    hs_prog_release(S->prog);
    S->prog = r.p;
    S->gen = r.p->gen;
    atomic_fetch_add_explicit(&S->c.rehydrations, r.nloaded, memory_order_relaxed);
    if (had_program) lua_gc(L, LUA_GCCOLLECT, 0); /* old classes are garbage now */
    return 0;
}
