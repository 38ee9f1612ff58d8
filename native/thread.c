/*
 * thread.c — which Lua state the calling thread has for each host, and handing a
 * thread's states back to their hosts when it ends.
 *
 * One process-wide pthread key holds a per-thread hs_thread: a short list of the
 * thread's states (one per host it fired on). Its destructor runs at thread exit
 * and gives each state back to its host (host.c pools it or closes it). A
 * one-entry thread-local cache (host pointer + host id, since a freed host's
 * address may come back) makes the common lookup free of locks.
 *
 * This file calls host.c, never the reverse: a state a thread lists is the
 * thread's to let go of. hs_host_free closes such a state and clears S->linked but
 * leaves it on the thread's list; the thread drops it the next time it looks
 * (find) or when it ends. The rules of the listing itself (references, the pool,
 * the claimed flag) are host.c's.
 */
#include <stdlib.h>
#include <string.h>

#include "core.h"

typedef struct hs_thread {
    pthread_mutex_t mu; /* guards states: hs_last_error may look while the thread fires */
    hs_state *states;
} hs_thread;

static pthread_key_t thread_key;
static pthread_once_t key_once = PTHREAD_ONCE_INIT;
static int key_ok;

static __thread hs_host *cache_host; /* the last host this thread fired on... */
static __thread uint64_t cache_id;   /* ...its id (addresses are reused) */
static __thread hs_state *cache_state;
static __thread hs_error create_error; /* when this thread's state cannot be created */

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
        hs_host_state_ended(S); /* pooled, or closed and dropped */
    }
    cache_host = NULL;
    cache_state = NULL;
    pthread_mutex_destroy(&T->mu);
    free(T);
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
    if (pthread_setspecific(thread_key, T) != 0) {
        pthread_mutex_destroy(&T->mu);
        free(T);
        return NULL;
    }
    return T;
}

/* This thread's state for H, or NULL. States whose host was freed (hs_host_free
 * closed them and left them here) are taken off the list on the way and dropped. */
static hs_state *find(hs_thread *T, hs_host *h) {
    hs_state *S = NULL, *dead = NULL;
    pthread_mutex_lock(&T->mu);
    for (hs_state **pp = &T->states; *pp;) {
        hs_state *x = *pp;
        if (!atomic_load(&x->linked)) {
            *pp = x->tnext;
            x->tnext = dead;
            dead = x;
            continue;
        }
        if (x->host == h) S = x;
        pp = &x->tnext;
    }
    pthread_mutex_unlock(&T->mu);
    while (dead) {
        hs_state *x = dead;
        dead = x->tnext;
        x->tnext = NULL;
        hs_host_state_ended(x);
    }
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
        S = hs_host_take_pooled(h);
        if (!S) S = hs_host_new_state(h, &create_error);
        if (!S) {
            *errp = &create_error;
            return NULL;
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

void hs_last_error(hs_host *h, hs_error *out) {
    hs_state *S = hs_thread_peek(h);
    memcpy(out, S ? &S->err : &create_error, sizeof *out);
}

const char *hs_logs(hs_host *h, size_t *len) {
    hs_state *S = hs_thread_peek(h);
    *len = S ? S->logs.len : 0;
    return S ? S->logs.p : NULL;
}
