/*
 * load.c — hs_load: compiling a script once and publishing it.
 *
 * The source is loaded as text on the calling thread, on a throw-away "scratch"
 * state (state.c), dumped to bytecode, and its chunk is run there — under one time
 * limit for the chunk, the class's fields and new() — to prove that it returns a
 * valid handler class and to learn which hooks it handles. Only then is a new
 * program published (program.c), with any module the chunk required for the first
 * time. A failure at any step publishes nothing. Loads are serialized by
 * host->load_mu, so compiling never blocks a worker that is rehydrating.
 */
#include <stdlib.h>
#include <string.h>

#include "core.h"

typedef struct compilation {
    const char *name, *src;
    size_t len;
    hs_buf *bc;
    uint64_t *mask;
    hs_error *err;
} compilation;

/* Compile NAME on a scratch state: bytecode into BC, the class's hook mask into MASK.
 * Runs protected (compile below): any Lua call here may run out of memory. */
static int compile_body(hs_state *S, void *arg) {
    compilation *c = arg;
    const char *name = c->name;
    hs_error *err = c->err;
    hs_buf *bc = c->bc;
    uint64_t *mask = c->mask;
    const char *src = c->src;
    size_t len = c->len;
    lua_State *L = S->L;
    int rc = hs_state_load(S, name, src, len, 0);
    if (rc != 0) {
        hs_error_from_lua(S, err, rc, name, 0);
        if (err->kind == HS_ERR_RUNTIME) err->kind = HS_ERR_SYNTAX;
        return -1;
    }
    if (hs_dump(L, hs_buf_writer, bc) != 0) {
        hs_error_set(err, HS_ERR_MEMORY, name, "", "%s: out of memory dumping bytecode", name);
        return -1;
    }
    if (hs_state_run_chunk(S, name, err) != 0) return -1;
    /* class and self are on top; hs_state_run_chunk validated them. Collect the hooks. */
    *mask = 0;
    for (int i = 0; i < S->host->nhooks; i++) {
        lua_pushfstring(L, "on_%s", S->host->hooks[i]);
        lua_gettable(L, -3);
        if (lua_isfunction(L, -1)) *mask |= (uint64_t)1 << i;
        lua_pop(L, 1);
    }
    lua_pop(L, 2);
    return 0;
}

static int compile(hs_state *S, const char *name, const char *src, size_t len, hs_buf *bc,
                   uint64_t *mask, hs_error *err) {
    compilation c = {name, src, len, bc, mask, err};
    hs_state_deadline(S, hs_now_ns()); /* chunk, class fields and new(): one time limit */
    int rc = hs_protected(S, compile_body, &c, err, name);
    hs_state_end_deadline(S);
    return rc;
}

int hs_load(hs_host *h, const char *name, const char *src, size_t len, hs_error *err) {
    hs_error_set(err, HS_ERR_NONE, name, "", "%s", "");
    if (!name || !*name || strlen(name) >= sizeof err->script) {
        hs_error_set(err, HS_ERR_USAGE, "", "", "a script needs a name of 1 to %d bytes",
                     (int)sizeof err->script - 1);
        return -1;
    }
    if (len > 0 && src[0] == LUA_SIGNATURE[0]) {
        hs_error_set(err, HS_ERR_SYNTAX, name, "", "%s: bytecode is not accepted; load Lua source text",
                     name);
        return -1;
    }
    pthread_mutex_lock(&h->load_mu);
    int ret = -1;
    hs_buf bc = {0};
    hs_script *s = NULL;
    hs_state *S = hs_state_new(h, 1, err);
    if (!S || hs_limits_enter(S, err) != 0) goto done;
    uint64_t mask = 0;
    if (compile(S, name, src, len, &bc, &mask, err) != 0) goto done;

    s = calloc(1, sizeof *s);
    if (!s || !(s->name = strdup(name))) goto nomem;
    atomic_init(&s->refs, 1);
    s->bc = bc.p;
    s->bclen = bc.len;
    bc.p = NULL;
    s->hookmask = mask;

    hs_prog *old = S->prog; /* the scratch state holds a reference to the current program */
    int idx = hs_prog_find(old, name);
    if (idx < 0) idx = old->nscripts;
    pthread_mutex_lock(&h->mu);
    h->compilations++;
    pthread_mutex_unlock(&h->mu);
    hs_module **mods = (hs_module **)S->pending.p;
    int nmods = (int)(S->pending.len / sizeof *mods);
    if (hs_prog_publish(h, old, idx, s, mods, nmods) != 0) goto nomem;
    S->pending.len = 0; /* now owned by the host */
    s = NULL;
    ret = 0;
    goto done;
nomem:
    hs_error_set(err, HS_ERR_MEMORY, name, "", "%s: out of memory publishing the script", name);
done:
    if (s) hs_script_release(s);
    hs_buf_free(&bc);
    h->load_logs.len = 0;
    if (S) {
        hs_buf_put(&h->load_logs, S->logs.p, S->logs.len);
        hs_state_close(S);
    }
    pthread_mutex_unlock(&h->load_mu);
    return ret;
}

