/*
 * program.c — compiled scripts and the immutable, versioned program.
 *
 * hs_load compiles a script once, on the calling thread: the source is loaded as
 * text, dumped to bytecode, and its chunk is run on a throw-away "scratch" state to
 * prove that it returns a valid handler class. Only then is a new program built
 * (the old one's scripts with this one added or replaced, plus any module the
 * chunk required for the first time) and published with one pointer swap and a
 * generation bump under host->mu. A failure at any step publishes nothing.
 *
 * Programs and scripts are refcounted: the host holds the current program, each
 * thread state holds the one it last rehydrated, and a program holds its scripts.
 * Loads and unloads are serialized by host->load_mu, so compiling never blocks a
 * worker that is rehydrating (which only takes host->mu for a moment).
 */
#include <stdlib.h>
#include <string.h>

#include "core.h"

int hs_buf_writer(lua_State *L, const void *p, size_t sz, void *ud) {
    (void)L;
    return hs_buf_put(ud, p, sz);
}

void hs_script_release(hs_script *s) {
    if (s && atomic_fetch_sub(&s->refs, 1) == 1) {
        free(s->name);
        free(s->bc);
        free(s);
    }
}

void hs_prog_release(hs_prog *p) {
    if (!p || atomic_fetch_sub(&p->refs, 1) != 1) return;
    for (int i = 0; i < p->nscripts; i++) hs_script_release(p->scripts[i]);
    free(p->scripts);
    free(p->modules);
    free(p);
}

hs_prog *hs_prog_acquire(hs_host *h) {
    pthread_mutex_lock(&h->mu);
    hs_prog *p = h->prog;
    atomic_fetch_add(&p->refs, 1);
    pthread_mutex_unlock(&h->mu);
    return p;
}

const hs_module *hs_prog_module(const hs_prog *p, const char *name) {
    for (int i = 0; p && i < p->nmodules; i++)
        if (!strcmp(p->modules[i]->name, name)) return p->modules[i];
    return NULL;
}

/* Publish a program made of OLD with script slot IDX replaced by S (IDX == nscripts:
 * appended; S == NULL: removed) plus the modules in NEWMODS. Caller holds load_mu. */
static int publish(hs_host *h, hs_prog *old, int idx, hs_script *s, hs_module **newmods, int nnew) {
    hs_prog *p = calloc(1, sizeof *p);
    if (!p) return -1;
    int n = old->nscripts + (idx == old->nscripts) - (s == NULL);
    p->scripts = calloc(n > 0 ? n : 1, sizeof *p->scripts);
    p->modules = calloc(old->nmodules + nnew + 1, sizeof *p->modules);
    if (!p->scripts || !p->modules) {
        free(p->scripts);
        free(p->modules);
        free(p);
        return -1;
    }
    atomic_init(&p->refs, 1);
    for (int i = 0; i < old->nscripts; i++) {
        hs_script *e = old->scripts[i];
        if (i == idx) {
            if (!s) continue;
            e = s;
        } else {
            atomic_fetch_add(&e->refs, 1);
        }
        p->scripts[p->nscripts++] = e;
    }
    if (idx == old->nscripts) p->scripts[p->nscripts++] = s;
    if (old->nmodules) memcpy(p->modules, old->modules, old->nmodules * sizeof *p->modules);
    p->nmodules = old->nmodules;
    for (int i = 0; i < nnew; i++) p->modules[p->nmodules++] = newmods[i];

    pthread_mutex_lock(&h->mu);
    for (int i = 0; i < nnew; i++) hs_buf_put(&h->modules, &newmods[i], sizeof newmods[i]);
    hs_prog *prev = h->prog;
    p->gen = prev->gen + 1;
    h->prog = p;
    atomic_store_explicit(&h->gen, p->gen, memory_order_release);
    pthread_mutex_unlock(&h->mu);
    hs_prog_release(prev);
    return 0;
}

static int find_script(const hs_prog *p, const char *name) {
    for (int i = 0; i < p->nscripts; i++)
        if (!strcmp(p->scripts[i]->name, name)) return i;
    return -1;
}

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
    int idx = find_script(old, name);
    if (idx < 0) idx = old->nscripts;
    pthread_mutex_lock(&h->mu);
    h->compilations++;
    pthread_mutex_unlock(&h->mu);
    hs_module **mods = (hs_module **)S->pending.p;
    int nmods = (int)(S->pending.len / sizeof *mods);
    if (publish(h, old, idx, s, mods, nmods) != 0) goto nomem;
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

int hs_unload(hs_host *h, const char *name) {
    pthread_mutex_lock(&h->load_mu);
    hs_prog *old = hs_prog_acquire(h);
    int idx = find_script(old, name), ret = -1;
    if (idx >= 0) ret = publish(h, old, idx, NULL, NULL, 0);
    hs_prog_release(old);
    pthread_mutex_unlock(&h->load_mu);
    return ret;
}
