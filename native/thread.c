/*
 * thread.c — which Lua state the calling thread has for each host, the host's pool
 * of idle states, and what happens to a thread's states when the thread ends.
 *
 * One process-wide pthread key holds a per-thread hs_thread: a short list of the
 * thread's states (one per host it fired on). Its destructor runs at thread exit.
 * A one-entry thread-local cache (host pointer + host id, since a freed host's
 * address may come back) makes the common lookup free of locks.
 *
 * Pool: creating a Lua state and rehydrating the program costs far more than a
 * short request, and a thread-per-connection server starts a thread per request.
 * So when a thread ends, each of its states goes to its host's pool of idle states
 * (LIFO: the warmest first) while the pool has fewer than hs_config.state_pool;
 * the next thread that fires on that host for the first time takes one over
 * instead of creating one, and hs_fire's generation check rehydrates what changed
 * since. Module-level locals therefore live per state, not per thread; a state
 * still serves one thread at a time.
 *
 * A state is listed by its host (always, pooled or not) and by its thread (while
 * it has one), and either may end first, even at the same moment (a thread exiting
 * while hs_host_free runs). The rules that keep that safe:
 *   - each listing holds a reference on the state; the struct is freed by the last;
 *   - whoever sets S->claimed first closes the Lua state; the other only unlinks;
 *   - a state holds references on its host, and on its thread while it has one, so
 *     both outlive it;
 *   - entering and leaving the pool happen under host->mu, and only while the state
 *     is still on the host's list (S->linked): entering drops the thread's listing
 *     and the state's thread reference, leaving takes both for the new thread. A
 *     pooled state is on no thread's list and in no thread's cache, so it is never
 *     claimed by a thread: hs_host_free, which empties the pool and clears S->linked
 *     under the same lock, closes it like any other (hs_thread_detach skips it);
 *   - once hs_host_free has cleared S->linked, an ending thread closes its state
 *     as before (claimed flag) rather than pooling it.
 */
#include <stdlib.h>
#include <string.h>

#include "core.h"

struct hs_thread {
    pthread_mutex_t mu; /* guards states */
    atomic_int refs;    /* the thread while it runs + each state on the list */
    hs_state *states;
};

static pthread_key_t thread_key;
static pthread_once_t key_once = PTHREAD_ONCE_INIT;
static int key_ok;

static __thread hs_host *cache_host; /* the last host this thread fired on... */
static __thread uint64_t cache_id;   /* ...its id (addresses are reused) */
static __thread hs_state *cache_state;
static __thread hs_error create_error; /* when this thread's state cannot be created */

void hs_thread_unref(hs_thread *T) {
    if (atomic_fetch_sub(&T->refs, 1) == 1) {
        pthread_mutex_destroy(&T->mu);
        free(T);
    }
}

/* Put S, which its ending thread has just taken off its list, in the host's pool;
 * 0 when the pool is full or off, or the host is closing (then the caller closes S).
 * A state whose thread ended in the middle of a fire (pthread_exit from a callback)
 * holds a half-run call on its Lua stack: only closing it is safe. */
static int pool_put(hs_state *S) {
    hs_host *h = S->host; /* S holds a reference: h is alive */
    hs_thread *T = S->thread;
    int pooled = 0;
    pthread_mutex_lock(&h->mu);
    if (S->linked && h->npooled < (uint64_t)h->pool_max && S->hook < 0) {
        S->thread = NULL;
        S->pool_next = h->pool;
        h->pool = S;
        h->npooled++;
        pooled = 1;
    }
    pthread_mutex_unlock(&h->mu);
    if (!pooled) return 0;
    hs_thread_unref(T);  /* the state's reference on its old thread */
    hs_state_release(S); /* the thread's listing; the host's keeps S */
    return 1;
}

/* Take the most recently pooled state of H for thread T, or NULL. */
static hs_state *pool_take(hs_host *h, hs_thread *T) {
    if (!h->pool_max) return NULL; /* no pool: not worth the lock */
    pthread_mutex_lock(&h->mu);
    hs_state *S = h->pool;
    if (S) {
        h->pool = S->pool_next;
        S->pool_next = NULL;
        h->npooled--;
        h->pool_hits++;
        atomic_fetch_add(&S->refs, 1); /* T's listing, made by the caller */
        atomic_fetch_add(&T->refs, 1); /* the state's reference on T */
        S->thread = T;
    }
    pthread_mutex_unlock(&h->mu);
    /* hs_last_error of this thread must not report the previous thread's failure */
    if (S) memset(&S->err, 0, sizeof S->err);
    return S;
}

/* The state is off the thread's list and the pool did not take it: close it unless
 * the host got there first, and take it off the host's list unless the host is
 * closing. */
static void end_from_thread(hs_state *S) {
    if (pool_put(S)) return;
    if (!atomic_exchange(&S->claimed, 1)) hs_state_teardown(S);
    hs_host *h = S->host; /* S holds a reference: h is alive */
    int unlinked = 0;
    pthread_mutex_lock(&h->mu);
    if (S->linked) {
        if (S->prev) S->prev->next = S->next;
        else h->states = S->next;
        if (S->next) S->next->prev = S->prev;
        S->linked = 0;
        h->nstates--;
        hs_host_retire_counters(h, &S->c);
        unlinked = 1;
    }
    pthread_mutex_unlock(&h->mu);
    if (unlinked) hs_state_release(S); /* the host's listing */
    hs_state_release(S);               /* the thread's listing */
}

static void thread_exit(void *p) {
    hs_thread *T = p;
    pthread_mutex_lock(&T->mu);
    hs_state *list = T->states;
    T->states = NULL;
    pthread_mutex_unlock(&T->mu);
    while (list) {
        hs_state *S = list;
        list = S->tnext;
        S->tnext = NULL;
        end_from_thread(S);
    }
    cache_host = NULL;
    cache_state = NULL;
    hs_thread_unref(T);
}

static void make_key(void) { key_ok = pthread_key_create(&thread_key, thread_exit) == 0; }

static hs_thread *this_thread(int create) {
    pthread_once(&key_once, make_key);
    if (!key_ok) return NULL;
    hs_thread *T = pthread_getspecific(thread_key);
    if (T || !create) return T;
    T = calloc(1, sizeof *T);
    if (!T) return NULL;
    pthread_mutex_init(&T->mu, NULL);
    atomic_init(&T->refs, 1);
    if (pthread_setspecific(thread_key, T) != 0) {
        pthread_mutex_destroy(&T->mu);
        free(T);
        return NULL;
    }
    return T;
}

static hs_state *find(hs_thread *T, hs_host *h) {
    hs_state *S;
    pthread_mutex_lock(&T->mu);
    for (S = T->states; S && S->host != h; S = S->tnext) {
    }
    pthread_mutex_unlock(&T->mu);
    return S;
}

static hs_state *hs_thread_peek(hs_host *h) {
    if (cache_host == h && cache_id == h->id) return cache_state;
    hs_thread *T = this_thread(0);
    return T ? find(T, h) : NULL;
}

hs_state *hs_thread_state(hs_host *h, hs_error **errp) {
    if (cache_host == h && cache_id == h->id) return cache_state;
    hs_thread *T = this_thread(1);
    if (!T) {
        hs_error_set(&create_error, HS_ERR_MEMORY, "", "", "cannot register this thread");
        *errp = &create_error;
        return NULL;
    }
    hs_state *S = find(T, h);
    if (!S) {
        S = pool_take(h, T);
        if (!S) {
            S = hs_state_new(h, 0, &create_error);
            if (!S) {
                *errp = &create_error;
                return NULL;
            }
            atomic_fetch_add(&T->refs, 1);
            S->thread = T;
        }
        pthread_mutex_lock(&T->mu);
        S->tnext = T->states;
        T->states = S;
        pthread_mutex_unlock(&T->mu);
    }
    cache_host = h;
    cache_id = h->id;
    cache_state = S;
    return S;
}

/* hs_host_free took S off the host's list and closed it (or saw the thread do so):
 * take it off its thread's list too, unless the thread already did. A pooled state
 * has no thread. */
void hs_thread_detach(hs_state *S) {
    hs_thread *T = S->thread; /* S holds a reference: T is alive */
    if (!T) return;
    int found = 0;
    pthread_mutex_lock(&T->mu);
    for (hs_state **pp = &T->states; *pp; pp = &(*pp)->tnext)
        if (*pp == S) {
            *pp = S->tnext;
            S->tnext = NULL;
            found = 1;
            break;
        }
    pthread_mutex_unlock(&T->mu);
    if (found) hs_state_release(S); /* the thread's listing */
}

void hs_last_error(hs_host *h, hs_error *out) {
    hs_state *S = hs_thread_peek(h);
    memcpy(out, S ? &S->err : &create_error, sizeof *out);
}

const char *hs_logs(hs_host *h, size_t *len) {
    hs_state *S = hs_thread_peek(h);
    *len = S ? S->logs.len : 0;
    return S ? S->logs.p : NULL;
}
