/*
 * host.c — the host: its configuration, its list of live states (those serving a
 * thread and those idle in its pool), the statistics summed over them, and its
 * shared dictionaries (created and freed here; shared.c is what they are).
 *
 * A host is shared by every thread that fires. The only mutable thing the hot path
 * reads from it is the atomic program generation (see dispatch.c); everything here
 * runs at set-up, at thread start/end, or when someone asks for stats, under
 * host->mu.
 *
 * It also owns the rules of a worker state's life, which thread.c follows without
 * knowing them (this file never calls thread.c):
 *   - a state is listed by its host (always, pooled or not) and by its thread
 *     (while it has one); each listing holds one of S->refs, and the owner of the
 *     last frees the struct and drops the state's reference on the host, so the
 *     host outlives its states;
 *   - whoever sets S->claimed first closes the Lua state: the thread letting go of
 *     it, or hs_host_free; the other only unlinks;
 *   - pooling and taking from the pool happen under host->mu, only while S->linked;
 *     a pooled state is on no thread's list;
 *   - hs_host_free empties the list and the pool and clears S->linked under
 *     host->mu, closes every state, and leaves those a thread still lists on that
 *     thread's list: the thread drops them (thread.c, find and thread_exit).
 */
#include <stdlib.h>
#include <string.h>

#include "core.h"
#include "shared.h"

static _Atomic uint64_t next_host_id;

static char *dupstr(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = malloc(n);
    if (p) memcpy(p, s, n);
    return p;
}

static int valid_hook_name(const char *s) {
    if (!*s) return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') || *s == '_')) return 0;
    return 1;
}

hs_host *hs_host_new(const hs_config *cfg, hs_error *err) {
    if (cfg->nhooks < 1 || cfg->nhooks > HS_MAX_HOOKS) {
        hs_error_set(err, HS_ERR_USAGE, "", "", "a host needs 1 to %d hooks", HS_MAX_HOOKS);
        return NULL;
    }
    for (int i = 0; i < cfg->nhooks; i++) {
        if (!valid_hook_name(cfg->hooks[i])) {
            hs_error_set(err, HS_ERR_USAGE, "", "", "invalid hook name '%s' (use a-z, 0-9, _)",
                         cfg->hooks[i]);
            return NULL;
        }
        for (int j = 0; j < i; j++)
            if (!strcmp(cfg->hooks[i], cfg->hooks[j])) {
                hs_error_set(err, HS_ERR_USAGE, "", "", "hook '%s' declared twice", cfg->hooks[i]);
                return NULL;
            }
    }
    char msg[sizeof err->message];
    if (hs_shared_check_specs(cfg->shared, cfg->nshared, msg, sizeof msg)) {
        hs_error_set(err, HS_ERR_USAGE, "", "", "%s", msg);
        return NULL;
    }
    hs_clock_init();
    hs_host *h = calloc(1, sizeof *h);
    if (!h) goto nomem;
    atomic_init(&h->refs, 1);
    h->nhooks = cfg->nhooks;
    h->hooks = calloc(cfg->nhooks, sizeof *h->hooks);
    h->hookflags = calloc(cfg->nhooks, sizeof *h->hookflags);
    if (!h->hooks || !h->hookflags) goto nomem;
    for (int i = 0; i < cfg->nhooks; i++) {
        if (!(h->hooks[i] = dupstr(cfg->hooks[i]))) goto nomem;
        if (!strcmp(cfg->hooks[i], "log")) h->hookflags[i] |= HS_HOOK_OBSERVE_ONLY;
    }
    h->time_limit = cfg->time_limit > 0 ? cfg->time_limit : 0;
    h->memory_limit = cfg->memory_limit;
    h->sandbox = cfg->sandbox;
    h->pool_max = cfg->state_pool > 0 ? cfg->state_pool : 0;
    h->reg_max = cfg->max_registrations < 0 ? -1
               : cfg->max_registrations ? cfg->max_registrations : HS_REGISTRATIONS_DEFAULT;
    if (cfg->nlua_path > 0) {
        h->lua_path = calloc(cfg->nlua_path, sizeof *h->lua_path);
        if (!h->lua_path) goto nomem;
        h->nlua_path = cfg->nlua_path;
        for (int i = 0; i < cfg->nlua_path; i++)
            if (!(h->lua_path[i] = dupstr(cfg->lua_path[i]))) goto nomem;
    }
    if (cfg->nshared > 0) {
        h->shared = calloc(cfg->nshared, sizeof *h->shared);
        if (!h->shared) goto nomem;
        h->nshared = cfg->nshared;
        for (int i = 0; i < cfg->nshared; i++)
            if (!(h->shared[i] = hs_shared_open(&cfg->shared[i], msg, sizeof msg))) {
                hs_error_set(err, HS_ERR_MEMORY, "", "", "%s", msg);
                goto fail;
            }
    }
    h->prog = calloc(1, sizeof *h->prog);
    if (!h->prog) goto nomem;
    atomic_init(&h->prog->refs, 1);
    h->prog->gen = 1;
    atomic_init(&h->gen, 1);
    h->id = atomic_fetch_add(&next_host_id, 1) + 1;
    pthread_mutex_init(&h->mu, NULL);
    pthread_mutex_init(&h->load_mu, NULL);

    /* Prove the configuration yields a working state (memory limit large enough...). */
    hs_state *probe = hs_state_new(h, 1, err);
    if (!probe) {
        hs_host_free(h);
        return NULL;
    }
    hs_state_close(probe);
    return h;
nomem:
    hs_error_set(err, HS_ERR_MEMORY, "", "", "out of memory creating the host");
fail:
    if (h) {
        /* partially built: free what exists without touching the mutexes */
        if (h->hooks)
            for (int i = 0; i < h->nhooks; i++) free(h->hooks[i]);
        free(h->hooks);
        free(h->hookflags);
        if (h->lua_path)
            for (int i = 0; i < h->nlua_path; i++) free(h->lua_path[i]);
        free(h->lua_path);
        for (int i = 0; i < h->nshared; i++) hs_shared_close(h->shared[i]);
        free(h->shared);
        free(h->prog);
        free(h);
    }
    return NULL;
}

static void host_destroy(hs_host *h) {
    hs_prog_release(h->prog);
    for (int i = 0; i < h->nhooks; i++) free(h->hooks[i]);
    free(h->hooks);
    free(h->hookflags);
    for (int i = 0; i < h->nlua_path; i++) free(h->lua_path[i]);
    free(h->lua_path);
    hs_buf_free(&h->load_logs);
    hs_buf_free(&h->wrap_bc);
    hs_module **mods = (hs_module **)h->modules.p;
    for (size_t i = 0; i < h->modules.len / sizeof *mods; i++) {
        free(mods[i]->name);
        free(mods[i]->bc);
        free(mods[i]);
    }
    hs_buf_free(&h->modules);
    for (int i = 0; i < h->nshared; i++) hs_shared_close(h->shared[i]);
    free(h->shared);
    pthread_mutex_destroy(&h->mu);
    pthread_mutex_destroy(&h->load_mu);
    free(h);
}

void hs_host_unref(hs_host *h) {
    if (atomic_fetch_sub(&h->refs, 1) == 1) host_destroy(h);
}

static void hs_host_retire_counters(hs_host *h, const hs_counters *c);

/* Drop one listing of S; the last frees it and its reference on the host. */
static void drop(hs_state *S) {
    hs_host *h = S->host;
    if (!hs_state_unref(S)) return;
    hs_state_destroy(S);
    hs_host_unref(h);
}

hs_state *hs_host_new_state(hs_host *h, hs_error *err) {
    hs_state *S = hs_state_new(h, 0, err);
    if (!S) return NULL;
    atomic_fetch_add(&h->refs, 1); /* a listed state keeps its host alive */
    atomic_init(&S->refs, 2);      /* the host's listing and the thread's */
    pthread_mutex_lock(&h->mu);
    S->next = h->states;
    if (h->states) h->states->prev = S;
    h->states = S;
    atomic_store(&S->linked, 1);
    h->nstates++;
    pthread_mutex_unlock(&h->mu);
    return S;
}

hs_state *hs_host_take_pooled(hs_host *h) {
    if (!h->pool_max) return NULL; /* no pool: not worth the lock */
    pthread_mutex_lock(&h->mu);
    hs_state *S = h->pool;
    if (S) {
        h->pool = S->pool_next;
        S->pool_next = NULL;
        h->npooled--;
        h->pool_hits++;
        atomic_fetch_add(&S->refs, 1); /* the new thread's listing */
    }
    pthread_mutex_unlock(&h->mu);
    /* hs_last_error of this thread must not report the previous thread's failure */
    if (S) memset(&S->err, 0, sizeof S->err);
    return S;
}

/* Its thread has let go of S. Pool it if there is room (it stays on the host's list);
 * else close it unless the host did, take it off the host's list unless the host
 * is freeing, and drop the listings that ended. A state whose thread ended in the
 * middle of a fire (pthread_exit from a callback) holds a half-run call on its Lua
 * stack: only closing it is safe. */
void hs_host_state_ended(hs_state *S) {
    hs_host *h = S->host; /* S holds a reference: h is alive */
    int pooled = 0, unlinked = 0;
    pthread_mutex_lock(&h->mu);
    if (atomic_load(&S->linked) && h->npooled < (uint64_t)h->pool_max && S->hook < 0) {
        S->pool_next = h->pool;
        h->pool = S;
        h->npooled++;
        pooled = 1;
    } else if (atomic_load(&S->linked)) {
        if (S->prev) S->prev->next = S->next;
        else h->states = S->next;
        if (S->next) S->next->prev = S->prev;
        atomic_store(&S->linked, 0);
        h->nstates--;
        hs_host_retire_counters(h, &S->c);
        unlinked = 1;
    }
    pthread_mutex_unlock(&h->mu);
    if (!pooled && !atomic_exchange(&S->claimed, 1)) hs_state_teardown(S);
    if (unlinked) drop(S); /* the host's listing */
    drop(S);               /* the thread's listing */
}

void hs_host_free(hs_host *h) {
    if (!h) return;
    pthread_mutex_lock(&h->mu);
    hs_state *list = h->states;
    h->states = NULL;
    h->nstates = 0;
    h->pool = NULL; /* its states are on the list: closed below with the others */
    h->npooled = 0;
    for (hs_state *S = list; S; S = S->next) {
        atomic_store(&S->linked, 0);
        S->pool_next = NULL;
    }
    pthread_mutex_unlock(&h->mu);
    /* A state a thread still lists stays on that list, closed: the thread drops it
     * when it next looks (thread.c) or ends. Our reference keeps h alive until the
     * end; each state's keeps it alive until that state is dropped. */
    while (list) {
        hs_state *S = list;
        list = S->next;
        if (!atomic_exchange(&S->claimed, 1)) hs_state_teardown(S); /* else its thread did */
        drop(S); /* the host's listing */
    }
    hs_host_unref(h);
}

void hs_host_set_release(hs_host *h, void (*release)(void), double long_seconds) {
    h->long_ns = long_seconds > 0 ? (uint64_t)(long_seconds * 1e9) : 0;
    h->release = release;
}

int hs_hook_index(const hs_host *h, const char *name) {
    for (int i = 0; i < h->nhooks; i++)
        if (!strcmp(h->hooks[i], name)) return i;
    return -1;
}

hs_shared *hs_host_shared(hs_host *h, const char *name) {
    for (int i = 0; i < h->nshared; i++)
        if (!strcmp(hs_shared_name(h->shared[i]), name)) return h->shared[i];
    return NULL;
}

const char *hs_engine(void) { return HS_ENGINE_NAME; }
const char *hs_engine_version(void) { return HS_ENGINE_VERSION; }

#define LOAD(x) atomic_load_explicit(&(x), memory_order_relaxed)

static void add_counters(hs_counters *dst, const hs_counters *src, int nhooks) {
    dst->fires += LOAD(src->fires);
    dst->errors += LOAD(src->errors);
    dst->timeouts += LOAD(src->timeouts);
    dst->memory_errors += LOAD(src->memory_errors);
    dst->rehydrations += LOAD(src->rehydrations);
    dst->releases += LOAD(src->releases);
    for (int i = 0; i < nhooks; i++) {
        dst->hook_fires[i] += LOAD(src->hook_fires[i]);
        dst->hook_errors[i] += LOAD(src->hook_errors[i]);
        dst->hook_ns[i] += LOAD(src->hook_ns[i]);
        for (int b = 0; b < HS_LATENCY_BUCKETS; b++)
            dst->hook_buckets[i][b] += LOAD(src->hook_buckets[i][b]);
    }
}

/* Caller holds h->mu. */
static void hs_host_retire_counters(hs_host *h, const hs_counters *c) {
    add_counters(&h->retired, c, h->nhooks);
}

void hs_host_stats(hs_host *h, hs_stats *out, hs_hook_stats *hooks) {
    hs_counters *sum = calloc(1, sizeof *sum);
    memset(out, 0, sizeof *out);
    if (!sum) return;
    pthread_mutex_lock(&h->mu);
    add_counters(sum, &h->retired, h->nhooks);
    for (hs_state *S = h->states; S; S = S->next) {
        add_counters(sum, &S->c, h->nhooks);
        size_t heap = LOAD(S->heap);
        out->heap_bytes += heap;
        if (heap > out->heap_max) out->heap_max = heap;
    }
    out->states = h->nstates;
    out->compilations = h->compilations;
    out->generation = LOAD(h->gen);
    out->pooled = h->npooled;
    out->pool_hits = h->pool_hits;
    out->registered = h->prog->nregistered;
    out->registrations = h->registrations;
    out->unregistrations = h->unregistrations;
    out->registrations_refused = h->registrations_refused;
    pthread_mutex_unlock(&h->mu);
    out->fires = sum->fires;
    out->errors = sum->errors;
    out->timeouts = sum->timeouts;
    out->memory_errors = sum->memory_errors;
    out->rehydrations = sum->rehydrations;
    out->releases = sum->releases;
    if (hooks)
        for (int i = 0; i < h->nhooks; i++) {
            hooks[i].fires = sum->hook_fires[i];
            hooks[i].errors = sum->hook_errors[i];
            hooks[i].total_ns = sum->hook_ns[i];
            for (int b = 0; b < HS_LATENCY_BUCKETS; b++) hooks[i].buckets[b] = sum->hook_buckets[i][b];
        }
    free(sum);
}

static void put_name(const char *name, char *buf, size_t cap, size_t *need) {
    size_t n = strlen(name) + 1;
    if (buf && *need + n <= cap) memcpy(buf + *need, name, n);
    *need += n;
}

size_t hs_scripts(hs_host *h, char *buf, size_t cap) {
    hs_prog *p = hs_prog_acquire(h);
    size_t need = 0;
    for (int i = 0; i < p->nscripts; i++) {
        hs_script *s = p->scripts[i];
        put_name(s->name, buf, cap, &need);
        for (int k = 0; s->kind == HS_SCRIPT_CHUNK && k < s->nclasses; k++)
            if (strcmp(s->classes[k].name, s->name)) put_name(s->classes[k].name, buf, cap, &need);
    }
    hs_prog_release(p);
    return need;
}

uint64_t hs_generation(hs_host *h) { return atomic_load_explicit(&h->gen, memory_order_acquire); }

uint64_t hs_hooks_handled(hs_host *h) {
    hs_prog *p = hs_prog_acquire(h);
    uint64_t mask = 0;
    for (int i = 0; i < p->nscripts; i++) mask |= p->scripts[i]->hookmask;
    hs_prog_release(p);
    return mask;
}

const char *hs_load_logs(hs_host *h, size_t *len) {
    *len = h->load_logs.len;
    return h->load_logs.p;
}
