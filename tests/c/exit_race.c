/*
 * exit_race.c — threads that have finished firing end while the host is freed
 * (tests/test_sanitizers.py runs it under ASan and TSan). Each round: 8 threads
 * fire once and signal; the main thread frees the host at once, racing the
 * threads' exit (which closes their states). Prints "ok" when every round ends.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hostscript.h"

static hs_host *H;
static atomic_int fired;

static void *worker(void *arg) {
    (void)arg;
    hs_txn *t = hs_txn_new();
    int r = hs_fire(H, 0, t);
    hs_txn_free(t);
    if ((r & 3) == HS_ERROR) {
        fprintf(stderr, "fire failed\n");
        exit(1);
    }
    atomic_fetch_add(&fired, 1);
    return NULL; /* the thread's state is closed on the way out */
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 200;
    const char *hooks[] = {"read_request"};
    const char *src = "local C = {} function C:on_read_request(txn) txn.ctx.a = 1 end return C";
    for (int round = 0; round < rounds; round++) {
        hs_config cfg = {hooks, 1, 0, 0, 1, NULL, 0};
        hs_error err;
        H = hs_host_new(&cfg, &err);
        if (!H || hs_load(H, "a.lua", src, strlen(src), &err) != 0) {
            fprintf(stderr, "%s\n", err.message);
            return 1;
        }
        atomic_store(&fired, 0);
        pthread_t th[8];
        for (int i = 0; i < 8; i++) pthread_create(&th[i], NULL, worker, NULL);
        while (atomic_load(&fired) < 8) {
        }
        hs_host_free(H); /* the workers may be exiting right now */
        for (int i = 0; i < 8; i++) pthread_join(th[i], NULL);
    }
    puts("ok");
    return 0;
}
