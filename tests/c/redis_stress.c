/*
 * redis_stress.c — a Redis-backed shared dictionary hammered from 8 threads of one
 * host, without Python, for the sanitizer builds (tests/test_sanitizers.py).
 *
 * Phase 1, Redis up (URL, a prefix of this run's own): 4 threads fire a Lua handler
 * that incr's "hits" through hs.shared, INCRs it again through hs.redis (and, every
 * 4th fire, sends a pipeline of INCR, INCRBY 2, GET, an HGET answered with a
 * WRONGTYPE error and EXISTS), churns keys (set with TTLs and flags, get, delete), and is
 * refused MULTI; 4 threads do the same through the C API (hs_shared_incr of
 * integers and of 0.5s, store in every mode and value type, get through a small
 * buffer and the retry with the size given, delete, ttl, expire, keys, incr of a
 * string). Connections are closed under the threads' feet, deterministically: a
 * second endpoint ("small", max_reply=1024) is asked for a 4 KiB value ("reply too
 * large": the connection is dropped) and a third ("slow", timeout=0.05) waits in
 * BLPOP for longer than its timeout ("timeout": dropped too). At the end "hits" must
 * be an integer (on LuaJIT too) and exactly the increments made, "half" exactly 0.5 per C increment, the error
 * counters must account for the dropped connections, and flush_all must leave no key.
 *
 * Phase 2, Redis unreachable (DEAD_URL, a closed port): 8 threads (4 firing Lua, 4
 * in C) call everything again; every call fails with HS_SHARED_BACKEND and a
 * "redis: ..." message (Lua: nil/false, "redis: ..."), keys answers count -1, and
 * the endpoint's counters say every call failed. ASan's leak check runs at exit.
 *
 * Usage: redis_stress ITERATIONS URL DEAD_URL   (ITERATIONS per thread, phase 1;
 * URL and DEAD_URL are redis://host:port/db?prefix=P). Prints "ok hits=N ...".
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
#define BIG 4096 /* the value "small" is asked for: over its max_reply */

static hs_host *H;
static hs_shared *COUNT, *SMALL;
static int iterations;
static atomic_long bad, c_incrs;

static void failf(const char *what, int rc) {
    fprintf(stderr, "%s: rc=%d %s\n", what, rc, hs_shared_strerror(rc));
    atomic_fetch_add(&bad, 1);
}

/* ---- phase 1 ---- */

/* Per fire: "hits" +1 (hs.shared incr), +1 (INCR through hs.redis) and, every 4th
 * fire, +3 more (the pipeline): the dictionary keeps an integer as Redis's digits,
 * which INCR works on (on LuaJIT too, whose integral increments count as integers). */
static const char live_script[] =
    "local C = {}\n"
    "local n = 0\n"
    "local function check(ok, what, err) if not ok then error(what .. ': ' .. tostring(err), 0) end end\n"
    "function C:on_read_request(txn)\n"
    "  local d, r = hs.shared.count, hs.redis('count')\n"
    "  n = n + 1\n"
    "  local v, err = d:incr('hits', 1, 0)\n"
    "  check(v, 'incr', err)\n"
    "  local k = 'lua' .. (n % 17)\n"
    "  local ok, err = d:set(k, string.rep('v', n % 300), (n % 3) * 0.05, n % 5)\n"
    "  check(ok, 'set', err)\n"
    "  local got, flags = d:get(k)\n"
    "  check(got == nil or (type(got) == 'string' and got == string.rep('v', #got)), 'get', got)\n"
    "  if n % 5 == 0 then d:delete(k) end\n"
    "  local x, err = r:call('INCR', r.prefix .. 'hits')\n"
    "  check(type(x) == 'number', 'INCR', err)\n"
    "  if n % 4 == 0 then\n"
    "    local res, err = r:pipeline(function(p)\n"
    "      p:call('INCR', r.prefix .. 'hits')\n"
    "      p:call('INCRBY', r.prefix .. 'hits', 2)\n"
    "      p:call('GET', r.prefix .. k)\n"
    "      p:call('HGET', r.prefix .. 'hits', 'field')\n"
    "      p:call('EXISTS', r.prefix .. 'absent')\n"
    "    end)\n"
    "    check(res, 'pipeline', err)\n"
    "    check(res.n == 5 and res[2] > res[1] and type(res[4]) == 'table' and res[4].err and res[5] == 0,\n"
    "          'pipeline replies', res[4])\n"
    "  end\n"
    "  if n % 10 == 0 then\n"
    "    local ok, e = pcall(r.call, r, 'MULTI')\n"
    "    check(not ok and tostring(e):find('not allowed', 1, true), 'MULTI refused', e)\n"
    "  end\n"
    "  if n % 8 == 0 then\n"
    "    local s = hs.redis('small')\n"
    "    local v, err = s:call('GET', s.prefix .. 'big')\n"
    "    check(v == nil and err == 'redis: reply too large', 'reply too large', err)\n"
    "  end\n"
    "  if n % 50 == 0 then\n"
    "    local s = hs.redis('slow')\n"
    "    local v, err = s:call('BLPOP', s.prefix .. 'nolist', 1)\n"
    "    check(v == nil and err == 'redis: timeout', 'BLPOP timeout', err)\n"
    "  end\n"
    "end\n"
    "return C\n";

static long lua_increments(long n) { return 2 * n + 3 * (n / 4); }
static long lua_too_large(long n) { return n / 8; }
static long lua_timeouts(long n) { return n / 50; }

static void *lua_worker(void *arg) {
    (void)arg;
    stress_fire(H, iterations, &bad);
    return NULL;
}

static int is_filled(const char *s, size_t n, char c) {
    for (size_t i = 0; i < n; i++)
        if (s[i] != c) return 0;
    return 1;
}

/* get KEY through a 16-byte buffer, then, when it is too small, again with the size
 * given (the value kept from the first round trip) */
static int get_retrying(hs_shared *d, const char *key, size_t klen, hs_value *out, char **heap) {
    char small[16];
    int rc = hs_shared_get(d, key, klen, out, small, sizeof small, NULL);
    if (rc != HS_SHARED_BUFFER) return rc;
    size_t need = out->len;
    *heap = malloc(need);
    rc = hs_shared_get(d, key, klen, out, *heap, need, NULL);
    if (rc == HS_SHARED_OK && out->type == HS_VAL_STRING && out->len != need) failf("retry: another length", rc);
    return rc;
}

static void *c_worker(void *arg) {
    long id = (long)arg;
    hs_value one = {.type = HS_VAL_INTEGER, .i = 1}, zero = {.type = HS_VAL_INTEGER, .i = 0};
    hs_value half = {.type = HS_VAL_NUMBER, .n = 0.5};
    char value[300], key[32], keys[4096];
    memset(value, 'c', sizeof value);
    for (int i = 0; i < iterations; i++) {
        hs_value out;
        int rc = hs_shared_incr(COUNT, "hits", 4, &one, &zero, 0, &out, NULL);
        if (rc || out.type != HS_VAL_INTEGER) failf("incr", rc);
        else atomic_fetch_add(&c_incrs, 1);
        if (i % 3 == 0) {
            rc = hs_shared_incr(COUNT, "half", 4, &half, &zero, 0, &out, NULL);
            if (rc || out.type != HS_VAL_NUMBER) failf("incr 0.5", rc);
        }
        int klen = snprintf(key, sizeof key, "c%d", (int)((i * 7 + id) % 23));
        hs_value v = {.flags = (uint32_t)(i % 3 ? id : 0)};
        switch (i % 4) {
        case 0: v.type = HS_VAL_STRING, v.s = value, v.len = (size_t)(i % 300); break;
        case 1: v.type = HS_VAL_INTEGER, v.i = -i; break;
        case 2: v.type = HS_VAL_NUMBER, v.n = i + 0.25; break;
        default: v.type = HS_VAL_BOOLEAN, v.i = i & 1; break;
        }
        static const int modes[] = {HS_STORE_SET, HS_STORE_SAFE_SET, HS_STORE_ADD, HS_STORE_SAFE_ADD,
                                    HS_STORE_REPLACE};
        int mode = modes[i % 5], forcible = -1;
        rc = hs_shared_store(COUNT, mode, key, (size_t)klen, &v, (i % 3) * 0.05, &forcible);
        if (rc && rc != HS_SHARED_EXISTS && rc != HS_SHARED_NOT_FOUND) failf("store", rc);
        if (forcible != 0) failf("store: forcible in Redis", rc);
        char *heap = NULL;
        rc = get_retrying(COUNT, key, (size_t)klen, &out, &heap);
        if (rc == HS_SHARED_OK && out.type == HS_VAL_STRING && !is_filled(out.s, out.len, 'c'))
            failf("get: foreign bytes", rc);
        else if (rc && rc != HS_SHARED_NOT_FOUND) failf("get", rc);
        free(heap);
        heap = NULL;
        if (i % 13 == 0) {
            rc = hs_shared_delete(COUNT, key, (size_t)klen);
            if (rc && rc != HS_SHARED_NOT_FOUND) failf("delete", rc);
        }
        if (i % 17 == 0) {
            double ttl;
            rc = hs_shared_ttl(COUNT, key, (size_t)klen, &ttl);
            if (rc && rc != HS_SHARED_NOT_FOUND) failf("ttl", rc);
            rc = hs_shared_expire(COUNT, key, (size_t)klen, i % 2 ? 0.05 : 0);
            if (rc && rc != HS_SHARED_NOT_FOUND) failf("expire", rc);
        }
        if (i % 29 == 0) {
            rc = hs_shared_incr(COUNT, "string", 6, &one, NULL, 0, &out, NULL);
            if (rc != HS_SHARED_NOT_NUMBER) failf("incr of a string", rc);
            rc = hs_shared_incr(COUNT, "absent", 6, &one, NULL, 0, &out, NULL);
            if (rc != HS_SHARED_NOT_FOUND) failf("incr of an absent key", rc);
        }
        if (i % 31 == 0) {
            int count;
            size_t need = hs_shared_keys(COUNT, 0, keys, sizeof keys, &count);
            if (count < 0) failf("keys", HS_SHARED_BACKEND);
            else if (need <= sizeof keys) { /* every listed key is whole */
                size_t pos = 0;
                for (int k = 0; k < count; k++) {
                    uint32_t len;
                    memcpy(&len, keys + pos, sizeof len);
                    if (len == 0 || len > 8) failf("keys: a broken entry", 0);
                    pos += sizeof len + len;
                }
            }
        }
        if (i % 37 == 0) { /* the "small" endpoint drops its connection: too large */
            rc = get_retrying(SMALL, "big", 3, &out, &heap);
            free(heap);
            heap = NULL;
            if (rc != HS_SHARED_BACKEND || strcmp(hs_shared_strerror(rc), "redis: reply too large"))
                failf("get of a value over max_reply", rc);
        }
    }
    return NULL;
}

static long c_too_large(long n) { return (n + 36) / 37; }

static void run_threads(void *(*even)(void *), void *(*odd)(void *)) {
    pthread_t th[THREADS];
    for (long i = 0; i < THREADS; i++) pthread_create(&th[i], NULL, i % 2 ? odd : even, (void *)i);
    for (int i = 0; i < THREADS; i++) pthread_join(th[i], NULL);
}

static hs_host *new_host(const hs_shared_spec *specs, int n, const char *script) {
    const char *hooks[] = {"read_request"};
    /* a time limit (never reached) so the Lua calls' waits are bounded by it too */
    hs_config cfg = {hooks, 1, 60, 0, 1, NULL, 0, 0, specs, n};
    hs_error err;
    hs_host *h = hs_host_new(&cfg, &err);
    if (!h) {
        fprintf(stderr, "hs_host_new: %s\n", err.message);
        exit(1);
    }
    if (hs_load(h, "stress.lua", script, strlen(script), &err) != 0) {
        fprintf(stderr, "load failed: %s\n", err.message);
        exit(1);
    }
    return h;
}

static void live_phase(const char *url) {
    char small_url[1024], slow_url[1024];
    snprintf(small_url, sizeof small_url, "%s%smax_reply=1024", url, strchr(url, '?') ? "&" : "?");
    snprintf(slow_url, sizeof slow_url, "%s%stimeout=0.05", url, strchr(url, '?') ? "&" : "?");
    hs_shared_spec specs[] = {{"count", 0, url}, {"small", 0, small_url}, {"slow", 0, slow_url}};
    H = new_host(specs, 3, live_script);
    COUNT = hs_host_shared(H, "count");
    SMALL = hs_host_shared(H, "small");
    hs_shared *slow = hs_host_shared(H, "slow");
    /* a clean slate under the prefix, then the fixtures */
    if (hs_shared_flush_all(COUNT)) failf("flush_all before", HS_SHARED_BACKEND);
    char big[BIG];
    memset(big, 'b', sizeof big);
    hs_value v = {.type = HS_VAL_STRING, .s = big, .len = sizeof big};
    int rc = hs_shared_store(COUNT, HS_STORE_SET, "big", 3, &v, 0, NULL);
    if (rc) failf("store big", rc);
    v.len = 5;
    rc = hs_shared_store(COUNT, HS_STORE_SET, "string", 6, &v, 0, NULL);
    if (rc) failf("store string", rc);

    run_threads(lua_worker, c_worker);

    long lua_threads = THREADS / 2, c_threads = THREADS / 2;
    long want = lua_threads * lua_increments(iterations) + atomic_load(&c_incrs);
    hs_value out;
    rc = hs_shared_get(COUNT, "hits", 4, &out, NULL, 0, NULL);
    if (rc || out.type != HS_VAL_INTEGER || out.i != want) {
        fprintf(stderr, "hits: rc=%d type=%d value=%lld, want %ld\n", rc, out.type, (long long)out.i, want);
        atomic_fetch_add(&bad, 1);
    }
    if (atomic_load(&c_incrs) != c_threads * iterations) failf("C increments failed", 0);
    double want_half = 0.5 * (double)(c_threads * ((iterations + 2) / 3));
    rc = hs_shared_get(COUNT, "half", 4, &out, NULL, 0, NULL);
    if (rc || out.type != HS_VAL_NUMBER || out.n != want_half) {
        fprintf(stderr, "half: rc=%d type=%d value=%g, want %g\n", rc, out.type, out.n, want_half);
        atomic_fetch_add(&bad, 1);
    }
    /* the dropped connections are counted: "small" failed every too-large read
     * (and nothing else), "slow" every BLPOP, as a timeout */
    hs_shared_info si, wi, ci;
    hs_shared_stats(SMALL, &si);
    hs_shared_stats(slow, &wi);
    hs_shared_stats(COUNT, &ci);
    long too_large = lua_threads * lua_too_large(iterations) + c_threads * c_too_large(iterations);
    long timeouts = lua_threads * lua_timeouts(iterations);
    if (si.backend != HS_SHARED_REDIS || (long)si.errors != too_large || (long)si.calls != too_large ||
        si.timeouts) {
        fprintf(stderr, "small: calls=%llu errors=%llu timeouts=%llu, want %ld too large\n",
                (unsigned long long)si.calls, (unsigned long long)si.errors,
                (unsigned long long)si.timeouts, too_large);
        atomic_fetch_add(&bad, 1);
    }
    if ((long)wi.errors != timeouts || (long)wi.timeouts != timeouts || (long)wi.calls != timeouts) {
        fprintf(stderr, "slow: calls=%llu errors=%llu timeouts=%llu, want %ld timeouts\n",
                (unsigned long long)wi.calls, (unsigned long long)wi.errors,
                (unsigned long long)wi.timeouts, timeouts);
        atomic_fetch_add(&bad, 1);
    }
    if (ci.errors || !ci.calls || ci.capacity || ci.keys) {
        fprintf(stderr, "count: calls=%llu errors=%llu\n", (unsigned long long)ci.calls,
                (unsigned long long)ci.errors);
        atomic_fetch_add(&bad, 1);
    }
    /* flush_all deletes every key of the prefix */
    if (hs_shared_flush_all(COUNT)) failf("flush_all", HS_SHARED_BACKEND);
    int count;
    char keys[256];
    hs_shared_keys(COUNT, 0, keys, sizeof keys, &count);
    if (count != 0) {
        fprintf(stderr, "after flush_all: %d keys\n", count);
        atomic_fetch_add(&bad, 1);
    }
    printf("ok hits=%ld calls=%llu too_large=%ld timeouts=%ld\n", want, (unsigned long long)ci.calls,
           too_large, timeouts);
    hs_host_free(H);
}

/* ---- phase 2: Redis unreachable ---- */

static const char dead_script[] =
    "local C = {}\n"
    "local function refused(what, v, err)\n"
    "  if v or type(err) ~= 'string' or err:sub(1, 7) ~= 'redis: ' then\n"
    "    error(what .. ': ' .. tostring(v) .. ', ' .. tostring(err), 0)\n"
    "  end\n"
    "end\n"
    "function C:on_read_request(txn)\n"
    "  local d, r = hs.shared.down, hs.redis('down')\n"
    "  refused('get', d:get('k'))\n"
    "  refused('set', d:set('k', 'v', 1))\n"
    "  refused('incr', d:incr('n', 1, 0))\n"
    "  refused('delete', d:delete('k'))\n"
    "  refused('get_keys', d:get_keys(10))\n"
    "  refused('call', r:call('GET', r.prefix .. 'k'))\n"
    "  refused('pipeline', r:pipeline(function(p) p:call('INCR', 'a') p:call('GET', 'b') end))\n"
    "end\n"
    "return C\n";

#define DEAD_LUA_CALLS 7 /* round trips tried per fire */
#define DEAD_C_CALLS 8   /* per iteration of dead_c_worker */

static int dead_iterations;

static void *dead_lua_worker(void *arg) {
    (void)arg;
    stress_fire(H, dead_iterations, &bad);
    return NULL;
}

static void refused(const char *what, int rc) {
    const char *msg = hs_shared_strerror(rc);
    if (rc != HS_SHARED_BACKEND || strncmp(msg, "redis: ", 7)) {
        fprintf(stderr, "%s on a dead Redis: rc=%d %s\n", what, rc, msg);
        atomic_fetch_add(&bad, 1);
    }
}

static void *dead_c_worker(void *arg) {
    (void)arg;
    hs_value one = {.type = HS_VAL_INTEGER, .i = 1}, out;
    hs_value v = {.type = HS_VAL_STRING, .s = "value", .len = 5};
    char buf[64];
    double ttl;
    int count;
    for (int i = 0; i < dead_iterations; i++) {
        refused("get", hs_shared_get(COUNT, "k", 1, &out, buf, sizeof buf, NULL));
        refused("store", hs_shared_store(COUNT, i % 5, "k", 1, &v, i % 2, NULL));
        refused("incr", hs_shared_incr(COUNT, "n", 1, &one, &one, 0, &out, NULL));
        refused("delete", hs_shared_delete(COUNT, "k", 1));
        refused("ttl", hs_shared_ttl(COUNT, "k", 1, &ttl));
        refused("expire", hs_shared_expire(COUNT, "k", 1, i % 2));
        if (hs_shared_keys(COUNT, 0, buf, sizeof buf, &count) != 0 || count != -1) {
            fprintf(stderr, "keys on a dead Redis: count %d\n", count);
            atomic_fetch_add(&bad, 1);
        }
        refused("keys", HS_SHARED_BACKEND);
        refused("flush_all", hs_shared_flush_all(COUNT));
    }
    return NULL;
}

static void dead_phase(const char *url) {
    hs_shared_spec specs[] = {{"down", 0, url}};
    H = new_host(specs, 1, dead_script);
    COUNT = hs_host_shared(H, "down");
    run_threads(dead_lua_worker, dead_c_worker);
    hs_shared_info info;
    hs_shared_stats(COUNT, &info);
    long calls = (THREADS / 2) * (long)dead_iterations * (DEAD_LUA_CALLS + DEAD_C_CALLS);
    if ((long)info.calls != calls || info.errors != info.calls || info.reconnects) {
        fprintf(stderr, "down: calls=%llu errors=%llu reconnects=%llu, want %ld failed calls\n",
                (unsigned long long)info.calls, (unsigned long long)info.errors,
                (unsigned long long)info.reconnects, calls);
        atomic_fetch_add(&bad, 1);
    }
    printf("ok down: %ld calls failed\n", calls);
    hs_host_free(H);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: redis_stress ITERATIONS URL DEAD_URL\n");
        return 2;
    }
    iterations = atoi(argv[1]);
    dead_iterations = iterations / 4 + 1;
    live_phase(argv[2]);
    dead_phase(argv[3]);
    if (atomic_load(&bad)) {
        printf("FAILED checks=%ld\n", atomic_load(&bad));
        return 1;
    }
    return 0;
}
