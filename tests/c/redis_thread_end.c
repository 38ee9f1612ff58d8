/*
 * redis_thread_end.c — what a thread leaves behind when it ends, for the ASan run
 * of tests/test_sanitizers.py (LeakSanitizer at exit): threads that each
 *   - fire a handler making one hs.redis call and one pipeline, then end (the
 *     command buffers were once kept per thread, and leaked when it ended);
 *   - read a value into a buffer too small (HS_SHARED_BUFFER) and end without the
 *     retry (the reply kept for it must be freed when the thread ends);
 * then the host is freed. Both kinds run on 4 threads at once, ROUNDS times.
 *
 * Usage: redis_thread_end ROUNDS URL. Prints "ok" and exits 0.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hostscript.h"

static hs_host *H;
static hs_shared *D;

static const char script[] =
    "local C = {}\n"
    "function C:on_read_request(txn)\n"
    "  local r = hs.redis('d')\n"
    "  assert(r:call('SET', r.prefix .. 'big', string.rep('b', 5000)) == 'OK')\n"
    "  local res = assert(r:pipeline(function(p) p:call('PING') p:call('GET', r.prefix .. 'big') end))\n"
    "  assert(res.n == 2 and res[1] == 'PONG' and #res[2] == 5000)\n"
    "end\n"
    "return C\n";

static void *one_call(void *arg) {
    (void)arg;
    hs_txn *t = hs_txn_new();
    if ((hs_fire(H, 0, t) & 3) == HS_ERROR) {
        hs_error e;
        hs_last_error(H, &e);
        fprintf(stderr, "fire failed: %s\n", e.message);
        exit(1);
    }
    hs_txn_free(t);
    return NULL;
}

static void *read_too_small(void *arg) {
    (void)arg;
    hs_value out;
    char small[8];
    if (hs_shared_get(D, "k", 1, &out, small, sizeof small, NULL) != HS_SHARED_BUFFER) {
        fprintf(stderr, "get: HS_SHARED_BUFFER expected\n");
        exit(1);
    }
    return NULL; /* no retry */
}

int main(int argc, char **argv) {
    if (argc != 3 || atoi(argv[1]) < 1) {
        fprintf(stderr, "usage: redis_thread_end ROUNDS URL\n");
        return 2;
    }
    const char *hooks[] = {"read_request"};
    hs_shared_spec specs[] = {{"d", 0, argv[2]}};
    hs_config cfg = {hooks, 1, 0, 0, 1, NULL, 0, 0, specs, 1};
    hs_error err;
    if (!(H = hs_host_new(&cfg, &err)) || hs_load(H, "thread_end.lua", script, strlen(script), &err)) {
        fprintf(stderr, "%s\n", err.message);
        return 1;
    }
    D = hs_host_shared(H, "d");
    char value[100];
    memset(value, 'x', sizeof value);
    hs_value v = {.type = HS_VAL_STRING, .s = value, .len = sizeof value};
    if (hs_shared_store(D, HS_STORE_SET, "k", 1, &v, 0, NULL)) {
        fprintf(stderr, "store: %s\n", hs_shared_strerror(HS_SHARED_BACKEND));
        return 1;
    }
    for (int round = 0, rounds = atoi(argv[1]); round < rounds; round++) {
        pthread_t t[8];
        for (int i = 0; i < 8; i++) pthread_create(&t[i], NULL, i % 2 ? read_too_small : one_call, NULL);
        for (int i = 0; i < 8; i++) pthread_join(t[i], NULL);
    }
    hs_shared_delete(D, "k", 1);
    hs_shared_delete(D, "big", 3);
    hs_host_free(H);
    printf("ok\n");
    fflush(stdout);
    return 0;
}
