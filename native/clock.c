/*
 * clock.c — hs_now_ns(), the monotonic clock of the hot path.
 *
 * Every fire reads the clock twice (per-hook time, the time limit, the GIL-release
 * estimate), and clock_gettime(CLOCK_MONOTONIC) costs ~20 ns here — as much as the
 * lua_pcall it measures. On x86-64 with an invariant TSC (constant_tsc and
 * nonstop_tsc in /proc/cpuinfo) the time stamp counter is read instead (~9 ns) and
 * scaled with a factor calibrated once per process against CLOCK_MONOTONIC.
 * Elsewhere, or when the check fails, clock_gettime is used.
 */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "core.h"

#if defined(__x86_64__)
#include <x86intrin.h>
#define HS_HAVE_TSC 1
#endif

static uint64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

#ifdef HS_HAVE_TSC
static pthread_once_t calibrated = PTHREAD_ONCE_INIT;
static int use_tsc;
static uint64_t tsc0, mono0;
static double ns_per_tick;

static int invariant_tsc(void) {
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return 0;
    char line[8192];
    int ok = 0;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "flags", 5)) {
            ok = strstr(line, " constant_tsc") && strstr(line, " nonstop_tsc");
            break;
        }
    fclose(f);
    return ok;
}

static void calibrate(void) {
    if (!invariant_tsc()) return;
    uint64_t m0 = mono_ns(), t0 = __rdtsc(), m1, t1;
    do { /* 2 ms is enough for a factor good to ~1e-4 */
        m1 = mono_ns();
        t1 = __rdtsc();
    } while (m1 - m0 < 2000000);
    if (t1 <= t0) return;
    ns_per_tick = (double)(m1 - m0) / (double)(t1 - t0);
    tsc0 = t1;
    mono0 = m1;
    use_tsc = 1;
}

void hs_clock_init(void) { pthread_once(&calibrated, calibrate); }

uint64_t hs_now_ns(void) {
    if (use_tsc) return mono0 + (uint64_t)((double)(__rdtsc() - tsc0) * ns_per_tick);
    return mono_ns();
}
#else
void hs_clock_init(void) {}
uint64_t hs_now_ns(void) { return mono_ns(); }
#endif
