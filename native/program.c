/*
 * program.c — compiled scripts and the immutable, versioned program.
 *
 * A new program is the published one with script entries added, replaced or
 * removed — a script loaded (load.c) or unloaded, classes registered or
 * unregistered by handlers at run time (lapi_register.c) — plus any module
 * compiled for the first time. It is built from the program published at that
 * moment and swapped in with a generation bump, both under host->mu, so changes
 * made at once from several threads all land. No Lua state is involved here.
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

hs_script *hs_script_new(int kind, const char *name, const char *origin) {
    hs_script *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    atomic_init(&s->refs, 1);
    s->kind = kind;
    s->name = strdup(name);
    s->origin = strdup(origin);
    if (!s->name || !s->origin) {
        hs_script_release(s);
        return NULL;
    }
    return s;
}

int hs_script_add_class(hs_script *s, const char *name, int order, uint64_t hookmask) {
    hs_class *c = realloc(s->classes, (s->nclasses + 1) * sizeof *c);
    if (!c) return -1;
    s->classes = c;
    if (!(c[s->nclasses].name = strdup(name))) return -1;
    c[s->nclasses].order = order;
    c[s->nclasses].hookmask = hookmask;
    s->nclasses++;
    s->hookmask |= hookmask;
    return 0;
}

void hs_script_release(hs_script *s) {
    if (s && atomic_fetch_sub(&s->refs, 1) == 1) {
        for (int i = 0; i < s->nclasses; i++) free(s->classes[i].name);
        free(s->classes);
        free(s->name);
        free(s->origin);
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

/* Remove entry I of P (its reference is released). */
static void drop_entry(hs_prog *p, int i) {
    if (p->scripts[i]->kind == HS_SCRIPT_CLASS) p->nregistered--;
    hs_script_release(p->scripts[i]);
    memmove(p->scripts + i, p->scripts + i + 1, (p->nscripts - i - 1) * sizeof *p->scripts);
    p->nscripts--;
}

static int apply_op(hs_prog *p, hs_prog_op *op, int reg_max) {
    int i = hs_prog_find(p, op->name);
    hs_script *s = op->script;
    if (!s) {
        if (i < 0) return HS_OP_MISSING;
        int chunk = p->scripts[i]->kind == HS_SCRIPT_CHUNK;
        drop_entry(p, i);
        for (int j = p->nscripts - 1; chunk && j >= 0; j--) /* what it registered at run time */
            if (p->scripts[j]->kind == HS_SCRIPT_CLASS && !strcmp(p->scripts[j]->origin, op->name))
                drop_entry(p, j);
        return HS_OP_DONE;
    }
    if (s->kind == HS_SCRIPT_CHUNK) /* a class the chunk registers wins over a run-time one */
        for (int c = 0; c < s->nclasses; c++) {
            int j = hs_prog_find(p, s->classes[c].name);
            if (j >= 0 && p->scripts[j]->kind == HS_SCRIPT_CLASS) {
                drop_entry(p, j);
                if (j < i) i--;
            }
        }
    if (s->kind == HS_SCRIPT_CLASS) {
        int at = hs_prog_find(p, s->origin);
        if (at < 0) { /* its script is gone */
            hs_script_release(s);
            return HS_OP_MISSING;
        }
        for (int c = 0; c < p->scripts[at]->nclasses; c++)
            if (!strcmp(p->scripts[at]->classes[c].name, s->name)) { /* a class its chunk makes now */
                hs_script_release(s);
                return HS_OP_TAKEN;
            }
    }
    if (i >= 0) {
        if (p->scripts[i]->kind == HS_SCRIPT_CLASS) p->nregistered--;
        hs_script_release(p->scripts[i]);
        p->scripts[i] = s;
    } else {
        if (s->kind == HS_SCRIPT_CLASS && reg_max >= 0 && p->nregistered >= reg_max) {
            hs_script_release(s);
            return HS_OP_LIMIT;
        }
        p->scripts[p->nscripts++] = s;
    }
    if (s->kind == HS_SCRIPT_CLASS) p->nregistered++;
    return HS_OP_DONE;
}

int hs_prog_publish(hs_host *h, hs_prog_op *ops, int nops, hs_module **newmods, int nnew, int reg_max) {
    hs_prog *p = calloc(1, sizeof *p);
    if (!p) return -1;
    pthread_mutex_lock(&h->mu); /* from the program published now: nothing made meanwhile is lost */
    hs_prog *old = h->prog;
    int cap = old->nscripts + nops;
    p->scripts = calloc(cap > 0 ? cap : 1, sizeof *p->scripts);
    p->modules = calloc(old->nmodules + nnew + 1, sizeof *p->modules);
    if (!p->scripts || !p->modules) {
        pthread_mutex_unlock(&h->mu);
        free(p->scripts);
        free(p->modules);
        free(p);
        return -1;
    }
    for (int i = 0; i < nnew; i++) /* the host frees every module it ever had */
        if (hs_buf_put(&h->modules, &newmods[i], sizeof newmods[i]) != 0) {
            h->modules.len -= i * sizeof *newmods;
            pthread_mutex_unlock(&h->mu);
            free(p->scripts);
            free(p->modules);
            free(p);
            return -1;
        }
    atomic_init(&p->refs, 1);
    for (int i = 0; i < old->nscripts; i++) {
        atomic_fetch_add(&old->scripts[i]->refs, 1);
        p->scripts[p->nscripts++] = old->scripts[i];
    }
    p->nregistered = old->nregistered;
    for (int i = 0; i < nops; i++) ops[i].result = apply_op(p, &ops[i], reg_max);
    if (old->nmodules) memcpy(p->modules, old->modules, old->nmodules * sizeof *p->modules);
    p->nmodules = old->nmodules;
    for (int i = 0; i < nnew; i++) p->modules[p->nmodules++] = newmods[i];
    p->gen = old->gen + 1;
    h->prog = p;
    atomic_store_explicit(&h->gen, p->gen, memory_order_release);
    pthread_mutex_unlock(&h->mu);
    hs_prog_release(old);
    return 0;
}

int hs_prog_find(const hs_prog *p, const char *name) {
    for (int i = 0; i < p->nscripts; i++)
        if (!strcmp(p->scripts[i]->name, name)) return i;
    return -1;
}

int hs_unload(hs_host *h, const char *name) {
    pthread_mutex_lock(&h->load_mu);
    hs_prog_op op = {name, NULL, 0};
    int ret = hs_prog_publish(h, &op, 1, NULL, 0, -1) == 0 && op.result == HS_OP_DONE ? 0 : -1;
    pthread_mutex_unlock(&h->load_mu);
    return ret;
}
