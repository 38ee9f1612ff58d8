/*
 * limits_stress.c — the time and memory limits and error reporting from 4 threads at
 * once, for the sanitizer builds (tests/test_sanitizers.py, `make test-sanitize`).
 *
 * Usage: limits_stress [ROUNDS]   (default 3)
 *
 * One host with a time limit (0.5 s) and a memory limit (8 MiB), one script whose
 * on_read_request does what the request's x-what header says. Each of 4 threads,
 * ROUNDS times, walks the cases below (starting at a different one per thread) and,
 * after every one of them, fires an "ok" request on the same transaction (reset) and
 * on a fresh one, which must work: CONTINUE, its header and txn.ctx written.
 *   spin, spin_pcall     a Lua loop; a loop of pcalls around one     -> HS_ERR_TIMEOUT
 *   bomb_string, bomb_table, bomb_rep
 *                        strings doubled; a table grown; a table of 64 KiB strings
 *                                                                     -> HS_ERR_MEMORY
 *   error                error() two Lua calls deep                  -> HS_ERR_RUNTIME with
 *                        the message, line, script, hook and a traceback naming both functions
 *   error_table          error({})                                    -> HS_ERR_RUNTIME
 *   recurse              unbounded Lua recursion -> HS_ERR_RUNTIME "stack overflow" (LuaJIT;
 *                        Lua 5.4 when its stack fits the limit) or HS_ERR_MEMORY (Lua 5.4's
 *                        stack outgrows 8 MiB first)
 *   deep                 5000-deep recursion that returns             -> CONTINUE, x-depth 5000
 *   xpcall_spin          a time-limited loop inside xpcall whose handler loops too -> TIMEOUT
 * (Lua re-entered through C library calls — gsub calling itself back — is left out:
 * on LuaJIT it overflows the C stack; see tests/test_fuzz_findings.py.)
 * The host's release callback (what Python's GIL hand-over uses) counts calls; the
 * stats must match what the threads saw (timeouts, memory errors, errors, fires),
 * and the heap must be back under the limit. Prints "ok fires=F" when every check held.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hostscript.h"

enum { NTHREADS = 4 };
#define TIME_LIMIT 0.5 /* memory bombs must end well before it, under TSan too */
#define MEMORY_LIMIT ((size_t)8 << 20)
#define SLOW_BOUND 5.0 /* seconds: a limited fire must end well within this */

#define CHECK(cond, ...)                                                    \
    do {                                                                    \
        if (!(cond)) {                                                      \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                   \
            fprintf(stderr, "\n");                                          \
            exit(1);                                                        \
        }                                                                   \
    } while (0)

static const char *SRC =
    "local C = {}\n"
    "local function inner(n) error('boom ' .. n) end\n"
    "local function outer(n) inner(n) end\n"
    "function C:on_read_request(txn)\n"
    "  local what = txn.req.headers['x-what']\n"
    "  if what == 'spin' then while true do end\n"
    "  elseif what == 'spin_pcall' then while true do pcall(function() while true do end end) end\n"
    "  elseif what == 'xpcall_spin' then\n"
    "    xpcall(function() while true do end end, function(e) while true do end end)\n"
    "  elseif what == 'bomb_string' then local s = 'x' while true do s = s .. s end\n"
    "  elseif what == 'bomb_table' then local t = {} for i = 1, 1e9 do t[i] = i end\n"
    "  elseif what == 'bomb_rep' then\n"
    "    local s = 'y' for i = 1, 16 do s = s .. s end -- 64 KiB, few copies: quick under TSan too\n"
    "    local t = {} for i = 1, 1e6 do t[i] = s .. i end\n"
    "  elseif what == 'error' then outer(txn.req.headers['x-n'])\n"
    "  elseif what == 'error_table' then error({code = 7})\n"
    "  elseif what == 'recurse' then\n"
    "    local function r(n, a, b, c, d, e, f, g) return 1 + r(n + 1, n, n, n, n, n, n, n) end r(1)\n"
    "  elseif what == 'deep' then\n"
    "    local function r(n) if n == 0 then return 0 end return 1 + r(n - 1) end\n"
    "    txn.resp.headers['x-depth'] = r(5000)\n"
    "  else\n"
    "    txn.ctx.ok = (txn.ctx.ok or 0) + 1\n"
    "    txn.resp.headers['x-ok'] = txn.req.headers['x-n']\n"
    "  end\n"
    "end\n"
    "return C\n";

typedef struct {
    const char *what;
    int kind;  /* expected HS_ERR_*; HS_ERR_NONE: the fire succeeds */
    int alt;   /* another acceptable kind (recurse), or -1 */
} kase;

static const kase CASES[] = {
    {"spin", HS_ERR_TIMEOUT, -1},       {"bomb_string", HS_ERR_MEMORY, -1},
    {"error", HS_ERR_RUNTIME, -1},      {"spin_pcall", HS_ERR_TIMEOUT, -1},
    {"bomb_table", HS_ERR_MEMORY, -1},  {"recurse", HS_ERR_RUNTIME, HS_ERR_MEMORY},
    {"error_table", HS_ERR_RUNTIME, -1}, {"bomb_rep", HS_ERR_MEMORY, -1},
    {"deep", HS_ERR_NONE, -1},
    {"xpcall_spin", HS_ERR_TIMEOUT, -1},
};
enum { NCASES = sizeof CASES / sizeof *CASES };

static hs_host *H;
static int ROUNDS = 3;
static atomic_long seen_fires, seen_errors, seen_timeouts, seen_memory, releases;

static void count_release(void) { atomic_fetch_add(&releases, 1); }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int header_is(hs_txn *t, int which, const char *name, const char *want) {
    size_t len;
    const char *v = hs_txn_header(t, which, name, &len);
    return v && len == strlen(want) && !memcmp(v, want, len);
}

static int fire(hs_txn *t) {
    int r = hs_fire(H, 0, t);
    atomic_fetch_add(&seen_fires, 1);
    if ((r & 3) == HS_ERROR) atomic_fetch_add(&seen_errors, 1);
    return r & 3;
}

/* The "ok" request: must work on T (reset) and on a fresh transaction. */
static void check_next_fire_works(hs_txn *t, const char *after, int id, int n) {
    char num[32];
    snprintf(num, sizeof num, "%d-%d", id, n);
    for (int fresh = 0; fresh < 2; fresh++) {
        hs_txn *u = fresh ? hs_txn_new() : t;
        CHECK(u != NULL, "hs_txn_new");
        if (!fresh) hs_txn_reset(u);
        CHECK(hs_txn_add_header(u, HS_REQ, "x-n", num) == 0, "add x-n");
        int r = fire(u);
        hs_error e;
        if (r == HS_ERROR) hs_last_error(H, &e);
        CHECK(r == HS_CONTINUE, "after %s (thread %d): the next fire ended %d: %s", after, id, r,
              r == HS_ERROR ? e.message : "");
        CHECK(header_is(u, HS_RESP, "x-ok", num), "after %s: x-ok missing", after);
        size_t len;
        CHECK(hs_txn_ctx(u, &len) != NULL && len > 0, "after %s: txn.ctx not saved", after);
        if (fresh) hs_txn_free(u);
    }
}

static void run_case(hs_txn *t, const kase *c, int id, int n) {
    hs_txn_reset(t);
    char num[32];
    snprintf(num, sizeof num, "%d-%d", id, n);
    CHECK(hs_txn_add_header(t, HS_REQ, "x-what", c->what) == 0, "add x-what");
    CHECK(hs_txn_add_header(t, HS_REQ, "x-n", num) == 0, "add x-n");
    double t0 = now_s();
    int r = fire(t);
    double took = now_s() - t0;
    if (getenv("LIMITS_STRESS_VERBOSE")) fprintf(stderr, "thread %d: %-12s %.3f s\n", id, c->what, took);
    CHECK(took < SLOW_BOUND, "%s took %.2f s (time limit %.2f s)", c->what, took, TIME_LIMIT);
    if (c->kind == HS_ERR_NONE) {
        CHECK(r == HS_CONTINUE, "%s ended %d", c->what, r);
        CHECK(header_is(t, HS_RESP, "x-depth", "5000"), "%s: no x-depth", c->what);
        return;
    }
    CHECK(r == HS_ERROR, "%s ended %d, not HS_ERROR", c->what, r);
    hs_error e;
    hs_last_error(H, &e);
    CHECK(e.kind == c->kind || e.kind == c->alt, "%s: kind %d, want %d: %s", c->what, e.kind, c->kind,
          e.message);
    CHECK(!strcmp(e.script, "limits.lua"), "%s: script '%s'", c->what, e.script);
    CHECK(!strcmp(e.hook, "read_request"), "%s: hook '%s'", c->what, e.hook);
    if (e.kind == HS_ERR_TIMEOUT) {
        atomic_fetch_add(&seen_timeouts, 1);
        CHECK(strstr(e.message, "time limit exceeded"), "%s: message '%s'", c->what, e.message);
    } else if (e.kind == HS_ERR_MEMORY) {
        atomic_fetch_add(&seen_memory, 1);
        CHECK(strstr(e.message, "memory limit exceeded"), "%s: message '%s'", c->what, e.message);
    } else if (!strcmp(c->what, "error")) {
        char want[64];
        snprintf(want, sizeof want, "boom %s", num);
        CHECK(strstr(e.message, want) && strstr(e.message, "limits.lua:2:"), "message '%s'", e.message);
        CHECK(e.line == 2, "line %d", e.line);
        CHECK(strstr(e.traceback, "stack traceback") && strstr(e.traceback, "inner") &&
                  strstr(e.traceback, "outer"),
              "traceback '%s'", e.traceback);
    } else if (!strcmp(c->what, "error_table")) {
        CHECK(strstr(e.message, "table value"), "message '%s'", e.message);
    } else if (!strcmp(c->what, "recurse")) {
        CHECK(strstr(e.message, "stack overflow"), "message '%s'", e.message);
    }
}

static void *worker(void *arg) {
    int id = (int)(long)arg;
    hs_txn *t = hs_txn_new();
    CHECK(t != NULL, "hs_txn_new");
    int n = 0;
    for (int round = 0; round < ROUNDS; round++) {
        for (int i = 0; i < NCASES; i++) {
            const kase *c = &CASES[(i + id * 3) % NCASES];
            run_case(t, c, id, ++n);
            check_next_fire_works(t, c->what, id, ++n);
        }
    }
    hs_txn_free(t);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc > 1) ROUNDS = atoi(argv[1]);
    const char *hooks[] = {"read_request"};
    hs_config cfg = {hooks, 1, TIME_LIMIT, MEMORY_LIMIT, 1, NULL, 0, 2};
    hs_error err;
    H = hs_host_new(&cfg, &err);
    CHECK(H != NULL, "%s", err.message);
    hs_host_set_release(H, count_release, 0.001);
    CHECK(hs_load(H, "limits.lua", SRC, strlen(SRC), &err) == 0, "%s", err.message);
    pthread_t th[NTHREADS];
    for (long i = 0; i < NTHREADS; i++) pthread_create(&th[i], NULL, worker, (void *)i);
    for (int i = 0; i < NTHREADS; i++) pthread_join(th[i], NULL);
    hs_stats st;
    hs_host_stats(H, &st, NULL);
    CHECK(st.fires == (uint64_t)atomic_load(&seen_fires), "fires %llu, seen %ld",
          (unsigned long long)st.fires, atomic_load(&seen_fires));
    CHECK(st.errors == (uint64_t)atomic_load(&seen_errors), "errors %llu, seen %ld",
          (unsigned long long)st.errors, atomic_load(&seen_errors));
    CHECK(st.timeouts == (uint64_t)atomic_load(&seen_timeouts), "timeouts %llu, seen %ld",
          (unsigned long long)st.timeouts, atomic_load(&seen_timeouts));
    CHECK(st.memory_errors == (uint64_t)atomic_load(&seen_memory), "memory_errors %llu, seen %ld",
          (unsigned long long)st.memory_errors, atomic_load(&seen_memory));
    CHECK(atomic_load(&seen_timeouts) == (long)NTHREADS * ROUNDS * 3, "timeouts seen %ld",
          atomic_load(&seen_timeouts));
    CHECK(atomic_load(&seen_memory) >= (long)NTHREADS * ROUNDS * 3, "memory errors seen %ld",
          atomic_load(&seen_memory));
    /* every thread's fires released the host's lock at least once per timeout */
    CHECK(st.releases >= (uint64_t)atomic_load(&seen_timeouts) && st.releases == (uint64_t)atomic_load(&releases),
          "releases %llu (callback %ld)", (unsigned long long)st.releases, atomic_load(&releases));
    CHECK(st.heap_max <= MEMORY_LIMIT, "heap_max %llu over the limit", (unsigned long long)st.heap_max);
    hs_host_free(H);
    printf("ok fires=%llu\n", (unsigned long long)st.fires);
    return 0;
}
