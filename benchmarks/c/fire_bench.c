/*
 * fire_bench.c — the floor under every Python figure: what one hook call costs
 * in C, through the core and without it. Built at run time by benchmarks/native.py
 * (-O2, against native/*.c, the embedded Lua library and the static Lua archive of
 * one engine), so it measures exactly the core the Python modules are built from.
 *
 * Usage: fire_bench [ITERATIONS [ROUNDS]]   (defaults 1000000, 7)
 *
 * Two loops, interleaved round by round so a noisy neighbour hits both alike:
 *   pcall: lua_pcall of a no-op Lua function with two arguments (self, txn) on a
 *          plain lua_State — the least any core can do to call a handler method;
 *   fire:  hs_fire of a host whose one script has a no-op on_read_request, on one
 *          transaction, from the same thread.
 * Prints "engine=", "pcall_ns=" and "fire_ns=" lines (the median round, ns per call)
 * and exits 0; on any failure prints "error=..." and exits 1.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "hostscript.h"

static const char NOOP_SCRIPT[] =
    "local Noop = {}\n"
    "function Noop:on_read_request(txn) end\n"
    "return Noop\n";

static unsigned long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static int fail(const char *what) {
    printf("error=%s\n", what);
    return 1;
}

/* The bare loop's state: the no-op function, self and txn stay on the stack at 1..3. */
static lua_State *bare_state(void) {
    lua_State *L = luaL_newstate();
    if (!L) return NULL;
    luaL_openlibs(L);
    if (luaL_loadstring(L, "return function(self, txn) end") != 0 || lua_pcall(L, 0, 1, 0) != 0) {
        lua_close(L);
        return NULL;
    }
    lua_newtable(L); /* self */
    lua_newtable(L); /* txn */
    return L;
}

static double bare_round(lua_State *L, long n) {
    unsigned long long t0 = now_ns();
    for (long i = 0; i < n; i++) {
        lua_pushvalue(L, 1);
        lua_pushvalue(L, 2);
        lua_pushvalue(L, 3);
        if (lua_pcall(L, 2, 1, 0) != 0) return -1;
        lua_pop(L, 1);
    }
    return (double)(now_ns() - t0) / (double)n;
}

static double fire_round(hs_host *h, hs_txn *t, long n) {
    unsigned long long t0 = now_ns();
    for (long i = 0; i < n; i++)
        if ((hs_fire(h, 0, t) & 3) == HS_ERROR) return -1;
    return (double)(now_ns() - t0) / (double)n;
}

int main(int argc, char **argv) {
    long iterations = argc > 1 ? atol(argv[1]) : 1000000;
    int rounds = argc > 2 ? atoi(argv[2]) : 7;
    if (iterations < 1 || rounds < 1) return fail("ITERATIONS and ROUNDS must be positive");

    lua_State *L = bare_state();
    if (!L) return fail("cannot create the bare Lua state");

    const char *hooks[] = {"read_request"};
    hs_config cfg = {hooks, 1, 0, 0, 1, NULL, 0}; /* no limits, sandbox on, no state pool */
    hs_error err;
    hs_host *h = hs_host_new(&cfg, &err);
    if (!h) return fail(err.message);
    if (hs_load(h, "noop.lua", NOOP_SCRIPT, sizeof NOOP_SCRIPT - 1, &err) != 0) return fail(err.message);
    hs_txn *t = hs_txn_new();
    if (!t) return fail("cannot allocate a transaction");
    hs_txn_add_header(t, HS_REQ, "Host", "bench.local");

    /* warm-up: the state is created and rehydrated, both loops reach steady state */
    if (fire_round(h, t, 1000) < 0 || bare_round(L, 1000) < 0) return fail("warm-up failed");

    double *pcall = malloc(sizeof(double) * (size_t)rounds);
    double *fire = malloc(sizeof(double) * (size_t)rounds);
    if (!pcall || !fire) return fail("out of memory");
    for (int r = 0; r < rounds; r++) {
        pcall[r] = bare_round(L, iterations);
        fire[r] = fire_round(h, t, iterations);
        if (pcall[r] < 0) return fail("lua_pcall failed");
        if (fire[r] < 0) return fail("hs_fire failed");
    }
    printf("engine=%s\n", hs_engine());
    printf("pcall_ns=%.2f\n", median(pcall, rounds));
    printf("fire_ns=%.2f\n", median(fire, rounds));

    free(pcall);
    free(fire);
    hs_txn_free(t);
    hs_host_free(h);
    lua_close(L);
    return 0;
}
