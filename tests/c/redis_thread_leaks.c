/*
 * redis_thread_leaks.c — reproducers of two leaks of the Redis code when a thread
 * ends (found by redis_stress.c; tests/test_sanitizers.py runs this under ASan and
 * expects LeakSanitizer's report until the core frees them):
 *
 *   call — a thread fires a handler that makes one hs.redis call, then ends: the
 *          thread's command buffer (lapi_redis.c, tl_cmd) is never freed;
 *   kept — a thread reads a value into a buffer too small (HS_SHARED_BUFFER) and
 *          ends without the retry: the reply kept for it (shared_redis.c, tl_kept)
 *          and its copy of the key are never freed.
 *
 * Usage: redis_thread_leaks call|kept URL. Prints "ok" and exits 0 (the leak, if
 * any, is LeakSanitizer's to report at exit).
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
    "  assert(r:call('PING') == 'PONG')\n"
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
    if (argc != 3 || (strcmp(argv[1], "call") && strcmp(argv[1], "kept"))) {
        fprintf(stderr, "usage: redis_thread_leaks call|kept URL\n");
        return 2;
    }
    const char *hooks[] = {"read_request"};
    hs_shared_spec specs[] = {{"d", 0, argv[2]}};
    hs_config cfg = {hooks, 1, 0, 0, 1, NULL, 0, 0, specs, 1};
    hs_error err;
    if (!(H = hs_host_new(&cfg, &err)) || hs_load(H, "leak.lua", script, strlen(script), &err)) {
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
    pthread_t t;
    pthread_create(&t, NULL, strcmp(argv[1], "call") ? read_too_small : one_call, NULL);
    pthread_join(t, NULL);
    hs_shared_delete(D, "k", 1);
    hs_host_free(H);
    printf("ok\n");
    fflush(stdout);
    return 0;
}
