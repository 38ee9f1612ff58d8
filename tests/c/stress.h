/*
 * stress.h — what the stress programs (shared_stress.c, redis_stress.c) share:
 * firing hook 0 of a host many times on one transaction, counting the fires that
 * failed. Header-only; each program includes it once.
 */
#ifndef HS_TESTS_STRESS_H
#define HS_TESTS_STRESS_H

#include <stdatomic.h>
#include <stdio.h>

#include "hostscript.h"

/* Fire hook 0 of H N times; each failed fire is printed and counted in *BAD. */
static void stress_fire(hs_host *h, int n, atomic_long *bad) {
    hs_txn *t = hs_txn_new();
    for (int i = 0; i < n; i++) {
        int r = hs_fire(h, 0, t);
        if ((r & 3) == HS_ERROR) {
            hs_error e;
            hs_last_error(h, &e);
            fprintf(stderr, "fire failed: %s\n", e.message);
            atomic_fetch_add(bad, 1);
        }
    }
    hs_txn_free(t);
}

#endif
