/*
 * load.c — hs_load: compiling a script once and publishing it.
 *
 * The source is loaded as text on the calling thread, on a throw-away "scratch"
 * state (state.c), dumped to bytecode, and its chunk is run there — under one time
 * limit for the chunk, the classes' fields and new() — to prove that it returns
 * or registers (hs.register) valid handler classes and to learn which hooks each
 * handles. Only then is a new
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
    hs_buf *classes;
    hs_error *err;
} compilation;

/* Compile NAME on a scratch state: bytecode into BC, its classes into CLASSES.
 * Runs protected (compile below): any Lua call here may run out of memory. */
static int compile_body(hs_state *S, void *arg) {
    compilation *c = arg;
    const char *name = c->name;
    hs_error *err = c->err;
    hs_buf *bc = c->bc;
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
    if (hs_state_run_chunk(S, name, c->classes, err) != 0) return -1;
    lua_pop(L, 1);
    return 0;
}

static int compile(hs_state *S, const char *name, const char *src, size_t len, hs_buf *bc,
                   hs_buf *classes, hs_error *err) {
    compilation c = {name, src, len, bc, classes, err};
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
    if (strchr(name, '#')) {
        hs_error_set(err, HS_ERR_USAGE, name, "", "%s: a script name may not contain '#' (it names the "
                     "classes a script registers: <script>#<name>)", name);
        return -1;
    }
    if (len > 0 && src[0] == LUA_SIGNATURE[0]) {
        hs_error_set(err, HS_ERR_SYNTAX, name, "", "%s: bytecode is not accepted; load Lua source text",
                     name);
        return -1;
    }
    pthread_mutex_lock(&h->load_mu);
    int ret = -1;
    hs_buf bc = {0}, classes = {0};
    hs_script *s = NULL;
    hs_state *S = hs_state_new(h, 1, err);
    if (!S || hs_limits_enter(S, err) != 0) goto done;
    if (compile(S, name, src, len, &bc, &classes, err) != 0) goto done;

    if (!(s = hs_script_new(HS_SCRIPT_CHUNK, name, name))) goto nomem;
    s->bc = bc.p;
    s->bclen = bc.len;
    bc.p = NULL;
    hs_class *cl = (hs_class *)classes.p;
    for (size_t i = 0; i < classes.len / sizeof *cl; i++)
        if (hs_script_add_class(s, cl[i].name, cl[i].order, cl[i].hookmask) != 0) goto nomem;

    pthread_mutex_lock(&h->mu);
    h->compilations++;
    pthread_mutex_unlock(&h->mu);
    hs_module **mods = (hs_module **)S->pending.p;
    int nmods = (int)(S->pending.len / sizeof *mods);
    hs_prog_op op = {name, s, 0};
    if (hs_prog_publish(h, &op, 1, mods, nmods, -1) != 0) goto nomem;
    S->pending.len = 0; /* now owned by the host */
    s = NULL;
    ret = 0;
    goto done;
nomem:
    hs_error_set(err, HS_ERR_MEMORY, name, "", "%s: out of memory publishing the script", name);
done:
    if (s) hs_script_release(s);
    hs_buf_free(&bc);
    hs_classes_free(&classes);
    h->load_logs.len = 0;
    if (S) {
        hs_buf_put(&h->load_logs, S->logs.p, S->logs.len);
        hs_state_close(S);
    }
    pthread_mutex_unlock(&h->load_mu);
    return ret;
}

