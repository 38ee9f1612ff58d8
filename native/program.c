/*
 * program.c — compiled scripts and the immutable, versioned program.
 *
 * A new program is the old one's scripts with one added, replaced (load.c) or
 * removed (hs_unload), plus any module compiled for the first time; it is
 * published with one pointer swap and a generation bump under host->mu. No Lua
 * state is involved here.
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
int hs_prog_publish(hs_host *h, hs_prog *old, int idx, hs_script *s, hs_module **newmods, int nnew) {
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

int hs_prog_find(const hs_prog *p, const char *name) {
    for (int i = 0; i < p->nscripts; i++)
        if (!strcmp(p->scripts[i]->name, name)) return i;
    return -1;
}

int hs_unload(hs_host *h, const char *name) {
    pthread_mutex_lock(&h->load_mu);
    hs_prog *old = hs_prog_acquire(h);
    int idx = hs_prog_find(old, name), ret = -1;
    if (idx >= 0) ret = hs_prog_publish(h, old, idx, NULL, NULL, 0);
    hs_prog_release(old);
    pthread_mutex_unlock(&h->load_mu);
    return ret;
}
