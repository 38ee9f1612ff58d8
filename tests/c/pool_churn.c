/*
 * pool_churn.c — many short-lived threads share a host's pool of idle states, and
 * the host is freed while the last of them end (tests/test_sanitizers.py runs it
 * under ASan+LSan and TSan).
 *
 * Usage: pool_churn [ROUNDS]   (default 20)
 *
 * Each round: a host with state_pool POOL; WAVES waves of WIDTH threads started at
 * once (so they race for the pooled states), each firing a few times and once
 * more with a failing handler, then waiting for the others (so a wave holds WIDTH
 * states); pthread_join waits for the thread's exit destructor, so after each wave
 * the counts are exact and are checked. A last wave fires and signals, and the
 * host is freed at once, racing the threads' exit (some states already pooled,
 * some on their way, some being closed).
 * Prints "ok" when every check passed.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hostscript.h"

enum { POOL = 3, WIDTH = 5, WAVES = 6, FIRES = 3 };

static hs_host *H;
static atomic_int fired, fresh;
static pthread_barrier_t all_fired; /* a wave's threads hold WIDTH states at once */

#define CHECK(cond, ...)                                \
    do {                                                \
        if (!(cond)) {                                  \
            fprintf(stderr, "FAIL %s: ", #cond);        \
            fprintf(stderr, __VA_ARGS__);               \
            fprintf(stderr, "\n");                      \
            exit(1);                                    \
        }                                               \
    } while (0)

static const char *SRC =
    "local n = 0 -- module-level: lives as long as the state, across threads\n"
    "local C = {}\n"
    "function C:on_read_request(txn)\n"
    "  n = n + 1\n"
    "  txn.resp.headers['x-n'] = n\n"
    "  txn.ctx.pad = string.rep('p', 300)\n"
    "  if txn.req.headers['x-fail'] then error('failed on purpose') end\n"
    "end\n"
    "return C\n";

static int fire_n(hs_txn *t) {
    int r = hs_fire(H, 0, t);
    CHECK((r & 3) == HS_CONTINUE, "outcome %d", r & 3);
    size_t len;
    const char *v = hs_txn_header(t, HS_RESP, "x-n", &len);
    CHECK(v != NULL && len < 16, "no x-n");
    char num[16];
    memcpy(num, v, len); /* header values are not NUL-terminated */
    num[len] = 0;
    return atoi(num);
}

static void *worker(void *arg) {
    int signal_only = arg != NULL;
    hs_txn *t = hs_txn_new();
    CHECK(t != NULL, "hs_txn_new");
    int first = fire_n(t);
    if (first == 1) atomic_fetch_add(&fresh, 1);
    /* a taken-over state does not report the previous thread's error as ours */
    hs_error e;
    hs_last_error(H, &e);
    CHECK(e.kind == HS_ERR_NONE, "inherited error '%s'", e.message);
    for (int i = 1; i < FIRES; i++) {
        int n = fire_n(t);
        CHECK(n == first + i, "counter jumped: %d after %d", n, first);
    }
    if (!signal_only) { /* leave an error behind for whoever takes the state next */
        CHECK(hs_txn_add_header(t, HS_REQ, "x-fail", "1") == 0, "add header");
        CHECK((hs_fire(H, 0, t) & 3) == HS_ERROR, "failing fire did not fail");
    }
    hs_txn_free(t);
    pthread_barrier_wait(&all_fired);
    atomic_fetch_add(&fired, 1);
    return NULL; /* the state goes to the pool (or is closed) on the way out */
}

static hs_stats stats(void) {
    hs_stats s;
    hs_host_stats(H, &s, NULL);
    return s;
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 20;
    const char *hooks[] = {"read_request"};
    pthread_barrier_init(&all_fired, NULL, WIDTH);
    for (int round = 0; round < rounds; round++) {
        hs_config cfg = {hooks, 1, 0, 0, 1, NULL, 0, POOL};
        hs_error err;
        H = hs_host_new(&cfg, &err);
        CHECK(H && hs_load(H, "churn.lua", SRC, strlen(SRC), &err) == 0, "%s", err.message);
        atomic_store(&fresh, 0);
        pthread_t th[WIDTH];
        for (int w = 0; w < WAVES; w++) {
            for (int i = 0; i < WIDTH; i++) pthread_create(&th[i], NULL, worker, NULL);
            for (int i = 0; i < WIDTH; i++) pthread_join(th[i], NULL);
            hs_stats s = stats();
            CHECK(s.pooled == POOL && s.states == POOL, "wave %d: pooled %llu states %llu", w,
                  (unsigned long long)s.pooled, (unsigned long long)s.states);
            CHECK(s.pool_hits == (uint64_t)POOL * w, "wave %d: pool_hits %llu", w,
                  (unsigned long long)s.pool_hits);
        }
        CHECK(atomic_load(&fresh) == WIDTH * WAVES - POOL * (WAVES - 1), "fresh %d",
              atomic_load(&fresh));
        hs_stats s = stats();
        CHECK(s.fires == (uint64_t)WAVES * WIDTH * (FIRES + 1), "fires %llu",
              (unsigned long long)s.fires);
        CHECK(s.rehydrations == (uint64_t)atomic_load(&fresh), "rehydrations %llu",
              (unsigned long long)s.rehydrations);
        /* the last wave: free the host while its threads end */
        atomic_store(&fired, 0);
        for (int i = 0; i < WIDTH; i++) pthread_create(&th[i], NULL, worker, (void *)1);
        while (atomic_load(&fired) < WIDTH) {
        }
        hs_host_free(H);
        for (int i = 0; i < WIDTH; i++) pthread_join(th[i], NULL);
    }
    pthread_barrier_destroy(&all_fired);
    puts("ok");
    return 0;
}
