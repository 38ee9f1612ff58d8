/*
 * reload_stress.c — the core's concurrency invariants, without Python, for the
 * sanitizer builds (tests/test_sanitizers.py):
 *   4 threads fire continuously while the main thread reloads two scripts N times
 *   and short-lived threads come and go. Script a.lua sets x-a = v, b.lua sets
 *   x-b = v; reloads publish a.lua then b.lua, so a fire that saw one program sees
 *   x-a == x-b or x-a == x-b + 1. Anything else is a fire that mixed programs.
 * Prints "ok fires=F states=S" and exits 0 when every check held.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hostscript.h"

static hs_host *H;
static atomic_int stop;

static int header_int(hs_txn *t, const char *name) {
    size_t n;
    const char *v = hs_txn_header(t, HS_RESP, name, &n);
    char buf[32];
    if (!v || n >= sizeof buf) return -1;
    memcpy(buf, v, n);
    buf[n] = 0;
    return atoi(buf);
}

static void *worker(void *arg) {
    (void)arg;
    hs_txn *t = hs_txn_new();
    hs_txn_add_header(t, HS_REQ, "Host", "x");
    long bad = 0;
    while (!atomic_load(&stop)) {
        int r = hs_fire(H, 0, t);
        if ((r & 3) == HS_ERROR) {
            hs_error e;
            hs_last_error(H, &e);
            fprintf(stderr, "fire failed: %s\n", e.message);
            bad++;
            continue;
        }
        int a = header_int(t, "x-a"), b = header_int(t, "x-b");
        if (a < 0 || b < 0 || !(a == b || a == b + 1)) {
            fprintf(stderr, "mixed programs: x-a=%d x-b=%d\n", a, b);
            bad++;
        }
    }
    hs_txn_free(t);
    return (void *)bad;
}

static void *short_lived(void *arg) {
    (void)arg;
    hs_txn *t = hs_txn_new();
    hs_fire(H, 0, t);
    hs_txn_free(t);
    return NULL;
}

static int load(const char *name, char header, int version) {
    char src[512];
    hs_error err;
    snprintf(src, sizeof src,
             "local C = {}\n"
             "function C:on_read_request(txn)\n"
             "  txn.resp.headers['x-%c'] = '%d'\n"
             "  txn.ctx.n = (txn.ctx.n or 0) + 1\n"
             "end\n"
             "return C\n",
             header, version);
    if (hs_load(H, name, src, strlen(src), &err) != 0) {
        fprintf(stderr, "load failed: %s\n", err.message);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    int reloads = argc > 1 ? atoi(argv[1]) : 100;
    const char *hooks[] = {"read_request", "log"};
    hs_config cfg = {hooks, 2, 0.5, 32 << 20, 1, NULL, 0};
    hs_error err;
    H = hs_host_new(&cfg, &err);
    if (!H) {
        fprintf(stderr, "%s\n", err.message);
        return 1;
    }
    if (load("a.lua", 'a', 0) || load("b.lua", 'b', 0)) return 1;
    pthread_t th[4];
    for (int i = 0; i < 4; i++) pthread_create(&th[i], NULL, worker, NULL);
    for (int v = 1; v <= reloads; v++) {
        if (load("a.lua", 'a', v) || load("b.lua", 'b', v)) return 1;
        pthread_t s;
        pthread_create(&s, NULL, short_lived, NULL);
        pthread_join(s, NULL);
    }
    atomic_store(&stop, 1);
    long bad = 0;
    for (int i = 0; i < 4; i++) {
        void *r;
        pthread_join(th[i], &r);
        bad += (long)r;
    }
    hs_stats st;
    hs_host_stats(H, &st, NULL);
    hs_host_free(H);
    if (bad) {
        printf("FAILED checks=%ld\n", bad);
        return 1;
    }
    printf("ok fires=%llu states=%llu\n", (unsigned long long)st.fires, (unsigned long long)st.states);
    return 0;
}
