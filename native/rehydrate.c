/*
 * rehydrate.c — bringing a thread state up to the published program.
 *
 * Rehydration (on the first fire after the program generation changed) loads the
 * bytecode of new or changed scripts only, running their chunks again (and
 * rebuilds classes registered at run time from their serialized form, once per
 * program version) — unchanged scripts keep their classes, instances and
 * module-level locals — then rebuilds the per-hook handler cache, handlers sorted
 * by their class's order, then program order.
 * It is two-phase: everything new is built first; only if all of it succeeded is
 * it swapped in, so a thread never runs half of a program. When the new versions
 * do not fit in the memory limit next to the old ones, the state is reopened and
 * the new program loaded alone (its module-level data starts over, as on a new
 * thread) rather than leaving the thread stuck on an error.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"

typedef struct rehydration {
    hs_prog *p;
    hs_slot *slots;         /* p->nscripts; refs set */
    char *fresh;            /* slots[i] made here (not shared with the old ones) */
    hs_hookcache *hooks;    /* nhooks */
    int nloaded;
} rehydration;

static void slot_drop(lua_State *L, hs_slot *sl) {
    for (int k = 0; sl->refs && k < 2 * sl->script->nclasses; k++) /* 0 is no reference */
        luaL_unref(L, LUA_REGISTRYINDEX, sl->refs[k]);
    free(sl->refs);
    sl->refs = NULL;
}

static void rehydration_undo(hs_state *S, rehydration *r) {
    lua_State *L = S->L;
    for (int i = 0; r->slots && i < r->p->nscripts; i++)
        if (r->fresh[i]) slot_drop(L, &r->slots[i]);
    for (int hk = 0; r->hooks && hk < S->host->nhooks; hk++) {
        for (int j = 0; j < r->hooks[hk].n; j++) luaL_unref(L, LUA_REGISTRYINDEX, r->hooks[hk].items[j].fn_ref);
        free(r->hooks[hk].items);
    }
    free(r->slots);
    free(r->fresh);
    free(r->hooks);
}

/* Run script S's chunk (or rebuild its serialized class) into SL's references. */
static int load_script(hs_state *S, hs_script *s, hs_slot *sl) {
    lua_State *L = S->L;
    hs_state_deadline(S, hs_now_ns()); /* each script's chunk and new() get a time limit */
    if (!(sl->refs = calloc(2 * s->nclasses, sizeof *sl->refs))) return luaL_error(L, "not enough memory");
    if (s->kind == HS_SCRIPT_CLASS) {
        S->cur_name = s->name;
        hs_class_decode(S, L, s->name, s->bc, s->bclen);
        if (hs_state_instantiate(S, s->name, NULL, &S->err) != 0) return -1;
        sl->refs[1] = luaL_ref(L, LUA_REGISTRYINDEX);
        sl->refs[0] = luaL_ref(L, LUA_REGISTRYINDEX);
        return 0;
    }
    int rc = hs_state_load(S, s->name, s->bc, s->bclen, 1);
    if (rc != 0) {
        hs_error_from_lua(S, &S->err, rc, s->name, 0);
        return -1;
    }
    hs_buf classes = {0};
    if (hs_state_run_chunk(S, s->name, &classes, &S->err) != 0) return -1;
    hs_class *c = (hs_class *)classes.p;
    int n = (int)(classes.len / sizeof *c), same = n == s->nclasses;
    for (int k = 0; same && k < n; k++) same = !strcmp(c[k].name, s->classes[k].name);
    hs_classes_free(&classes);
    if (!same) {
        hs_error_set(&S->err, HS_ERR_SCRIPT, s->name, "",
                     "%s: the chunk made %d handler class(es) here but %d when it was loaded: a "
                     "script must return and register the same classes on every thread",
                     s->name, n, s->nclasses);
        lua_pop(L, 1);
        return -1;
    }
    for (int k = 0; k < 2 * n; k++) {
        lua_rawgeti(L, -1, k + 1);
        sl->refs[k] = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    lua_pop(L, 1);
    return 0;
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
            r->slots[i].refs = S->slots[old].refs;
            continue;
        }
        r->fresh[i] = 1; /* from here undo drops what is set */
        if (load_script(S, s, &r->slots[i]) != 0) return -1;
        r->nloaded++;
    }
    hs_state_deadline(S, hs_now_ns()); /* reading on_<hook> may run a class's __index */
    for (int hk = 0; hk < h->nhooks; hk++) {
        int n = 0;
        for (int i = 0; i < p->nscripts; i++)
            for (int k = 0; k < p->scripts[i]->nclasses; k++) n += (p->scripts[i]->classes[k].hookmask >> hk) & 1;
        if (!n) continue;
        hs_hookcache *hc = &r->hooks[hk];
        if (!(hc->items = calloc(n, sizeof *hc->items))) return luaL_error(L, "not enough memory");
        for (int i = 0; i < p->nscripts; i++)
            for (int k = 0; k < p->scripts[i]->nclasses; k++) {
                const hs_class *c = &p->scripts[i]->classes[k];
                if (!((c->hookmask >> hk) & 1)) continue;
                lua_rawgeti(L, LUA_REGISTRYINDEX, r->slots[i].refs[2 * k]);
                lua_pushfstring(L, "on_%s", h->hooks[hk]);
                lua_gettable(L, -2);
                int at = hc->n; /* by order, then program order: a stable insertion */
                while (at > 0 && p->scripts[hc->items[at - 1].slot]->classes[hc->items[at - 1].cls].order > c->order)
                    at--;
                memmove(hc->items + at + 1, hc->items + at, (hc->n - at) * sizeof *hc->items);
                hs_handler *it = &hc->items[at];
                it->self_ref = r->slots[i].refs[2 * k + 1];
                it->slot = i;
                it->cls = k;
                hc->n++;
                it->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
                lua_pop(L, 1);
            }
    }
    return 0;
}

int hs_state_rehydrate(hs_state *S) {
    if (!S->L) { /* a reopen failed earlier: try again */
        hs_error e;
        if (hs_state_reopen(S, &e) != 0) {
            S->err = e;
            return -1;
        }
    }
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
    hs_state_end_deadline(S);
    S->modprog = NULL;
    if (failed) {
        rehydration_undo(S, &r);
        hs_prog_release(r.p);
        if (S->err.kind == HS_ERR_MEMORY && S->nslots > 0) {
            /* The old versions still hold their memory while the new ones load (a
             * module-level cache, say): start over from a fresh state, with the new
             * program only, as a new thread would. */
            hs_error e;
            if (hs_state_reopen(S, &e) != 0) {
                S->err = e;
                return -1;
            }
            return hs_state_rehydrate(S);
        }
        char msg[sizeof S->err.message];
        snprintf(msg, sizeof msg, "%s", S->err.message);
        snprintf(S->err.message, sizeof S->err.message,
                 "cannot prepare the program on this thread: %.970s", msg);
        return -1;
    }
    int had_program = S->nslots > 0;
    /* Swap in: drop what the new program no longer uses. */
    for (int j = 0; j < S->nslots; j++) {
        int kept = 0;
        for (int i = 0; i < r.p->nscripts; i++)
            if (!r.fresh[i] && r.slots[i].script == S->slots[j].script) kept = 1;
        if (!kept) slot_drop(L, &S->slots[j]);
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
    /* The old classes are garbage now: the collector's own pace takes them, unless the
     * state is short of room (a full collection takes time in proportion to the heap,
     * on every thread, after every registration). */
    if (had_program && S->heap_limit &&
        atomic_load_explicit(&S->heap, memory_order_relaxed) > S->heap_limit / 2)
        lua_gc(L, LUA_GCCOLLECT, 0);
    return 0;
}
