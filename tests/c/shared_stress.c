/*
 * shared_stress.c — one shared dictionary hammered from 8 threads, without Python,
 * for the sanitizer builds (tests/test_sanitizers.py) and tests/test_shared.py:
 *   4 threads fire a Lua handler that incr's "hits" and churns keys through
 *   hs.shared (set with short TTLs, get, get_keys, delete); 4 threads do the same
 *   through the C API (hs_shared_incr, _store, _get, _keys, _flush_expired,
 *   _delete). The dictionary is small, so entries are evicted all the time, and
 *   "hits" is kept alive in a dictionary of its own. At the end "hits" must equal
 *   the number of increments made, and the dictionary's accounting must add up.
 * Usage: shared_stress ITERATIONS (per thread). Prints "ok hits=N evictions=E".
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hostscript.h"
#include "stress.h"

#define THREADS 8

static hs_host *H;
static hs_shared *CHURN, *COUNT;
static int iterations;
static atomic_long bad;

static const char script[] =
    "local C = {}\n"
    "local n = 0\n"
    "function C:on_read_request(txn)\n"
    "  local c, churn = hs.shared.count, hs.shared.churn\n"
    "  local v, err = c:incr('hits', 1, 0)\n"
    "  if not v then error('incr: ' .. tostring(err)) end\n"
    "  n = n + 1\n"
    "  local k = 'lua' .. (n % 97)\n"
    "  churn:set(k, string.rep('v', n % 300), (n % 3) * 0.001, n % 5)\n"
    "  local got = churn:get(k)\n"
    "  if got ~= nil and type(got) ~= 'string' then error('bad type') end\n"
    "  if n % 50 == 0 then churn:get_keys(20) end\n"
    "  if n % 7 == 0 then churn:delete(k) end\n"
    "  if n % 11 == 0 then churn:get_stale('c' .. (n % 31)) end\n"
    "end\n"
    "return C\n";

static void fail(const char *what, int rc) {
    fprintf(stderr, "%s: %s\n", what, hs_shared_strerror(rc));
    atomic_fetch_add(&bad, 1);
}

static void *lua_worker(void *arg) {
    (void)arg;
    stress_fire(H, iterations, &bad);
    return NULL;
}

static void *c_worker(void *arg) {
    long id = (long)arg;
    hs_value one = {.type = HS_VAL_INTEGER, .i = 1}, zero = {.type = HS_VAL_INTEGER, .i = 0};
    char value[400], buf[512], keys[2048], key[32];
    memset(value, 'c', sizeof value);
    for (int i = 0; i < iterations; i++) {
        hs_value out;
        int rc = hs_shared_incr(COUNT, "hits", 4, &one, &zero, 0, &out, NULL);
        if (rc) fail("incr", rc);
        int klen = snprintf(key, sizeof key, "c%d", (int)((i * 7 + id) % 31));
        hs_value v = {.type = HS_VAL_STRING, .s = value, .len = (size_t)(i % 400), .flags = (uint32_t)id};
        int mode = i % 4 == 0 ? HS_STORE_SAFE_SET : i % 4 == 1 ? HS_STORE_ADD : HS_STORE_SET;
        int forcible;
        rc = hs_shared_store(CHURN, mode, key, (size_t)klen, &v, (i % 5) * 0.0005, &forcible);
        if (rc && rc != HS_SHARED_NO_MEMORY && rc != HS_SHARED_EXISTS) fail("store", rc);
        int stale;
        rc = hs_shared_get(CHURN, key, (size_t)klen, &out, buf, sizeof buf, i % 2 ? &stale : NULL);
        if (rc == HS_SHARED_OK && out.type == HS_VAL_STRING && out.len && out.s[0] != 'c' && out.s[0] != 'v')
            fail("get: foreign bytes", rc);
        else if (rc && rc != HS_SHARED_NOT_FOUND) fail("get", rc);
        if (i % 40 == 0) {
            int count;
            size_t need = hs_shared_keys(CHURN, 0, keys, sizeof keys, &count);
            if (need <= sizeof keys) { /* every listed key is whole */
                size_t pos = 0;
                for (int k = 0; k < count; k++) {
                    uint32_t len;
                    memcpy(&len, keys + pos, sizeof len);
                    if (len == 0 || len > 8) fail("keys: a broken entry", 0);
                    pos += sizeof len + len;
                }
            }
        }
        if (i % 100 == 0) hs_shared_flush_expired(CHURN, 10);
        if (i % 13 == 0) hs_shared_delete(CHURN, key, (size_t)klen);
        if (i % 500 == 0) {
            double ttl;
            hs_shared_ttl(CHURN, key, (size_t)klen, &ttl);
            hs_shared_expire(CHURN, key, (size_t)klen, 0.001);
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    iterations = argc > 1 ? atoi(argv[1]) : 10000;
    const char *hooks[] = {"read_request"};
    hs_shared_spec specs[] = {{"churn", 16384, NULL}, {"count", 8192, NULL}};
    hs_config cfg = {hooks, 1, 0, 0, 1, NULL, 0, 0, specs, 2};
    hs_error err;
    H = hs_host_new(&cfg, &err);
    if (!H) {
        fprintf(stderr, "%s\n", err.message);
        return 1;
    }
    CHURN = hs_host_shared(H, "churn");
    COUNT = hs_host_shared(H, "count");
    if (!CHURN || !COUNT || hs_host_shared(H, "nope")) {
        fprintf(stderr, "hs_host_shared does not find the dictionaries\n");
        return 1;
    }
    if (hs_load(H, "stress.lua", script, strlen(script), &err) != 0) {
        fprintf(stderr, "load failed: %s\n", err.message);
        return 1;
    }
    pthread_t th[THREADS];
    for (long i = 0; i < THREADS; i++)
        pthread_create(&th[i], NULL, i % 2 ? c_worker : lua_worker, (void *)i);
    for (int i = 0; i < THREADS; i++) pthread_join(th[i], NULL);

    hs_value out;
    int rc = hs_shared_get(COUNT, "hits", 4, &out, NULL, 0, NULL);
    long long want = (long long)THREADS * iterations;
    /* an integer on both engines (LuaJIT's integral increments count as integers) */
    double got = out.type == HS_VAL_INTEGER ? (double)out.i : out.n;
    if (rc || (out.type != HS_VAL_INTEGER && out.type != HS_VAL_NUMBER) || got != (double)want) {
        fprintf(stderr, "hits: rc=%d type=%d value=%.0f, want %lld\n", rc, out.type, got, want);
        atomic_fetch_add(&bad, 1);
    }
    /* accounting: after reclaiming everything, the free space is the capacity */
    hs_shared_info info;
    hs_shared_flush_all(CHURN);
    hs_shared_flush_expired(CHURN, 0);
    hs_shared_stats(CHURN, &info);
    if (info.free_space != info.capacity || info.keys != 0) {
        fprintf(stderr, "accounting: free %zu of %zu with %llu keys\n", info.free_space, info.capacity,
                (unsigned long long)info.keys);
        atomic_fetch_add(&bad, 1);
    }
    hs_host_free(H);
    if (atomic_load(&bad)) {
        printf("FAILED checks=%ld\n", atomic_load(&bad));
        return 1;
    }
    printf("ok hits=%lld evictions=%llu\n", want, (unsigned long long)info.evictions);
    return 0;
}
