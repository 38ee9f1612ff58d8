/*
 * redis_bench.c — the C driver of benchmarks/redis_ops.py: shared-dictionary
 * operations per second from N threads of one host, without Python (so the GIL
 * is not what is measured). Built at run time by benchmarks/native.py (-O2,
 * against native/*.c, the embedded Lua library and one engine's static Lua).
 *
 * Usage: redis_bench SCRIPT URL OP THREADS SECONDS [WARMUP_FIRES]
 *
 * The host has two dictionaries: "mem" in this process (1 MiB) and "red" in Redis
 * at URL, and loads the handlers of SCRIPT (c/redis_bench.lua). Before timing, "v"
 * is set to a 64-byte string in both. Each of THREADS threads does WARMUP_FIRES
 * operations (default 200: its Lua state made, its connection pooled), then all
 * start together and run OP in a loop for SECONDS. OP is a hook of the script,
 * fired with hs_fire on the thread's own transaction (what a server pays per
 * request, the handler included):
 *
 *   incr_mem    hs.shared.mem:incr("n", 1, 0)         get_mem    hs.shared.mem:get("v")
 *   incr_redis  hs.shared.red:incr("n", 1, 0)         get_redis  hs.shared.red:get("v")
 *   incr_call   hs.redis("red"):call("INCR", prefix .. "c")
 *   single16    16 x r:call("INCR", prefix .. "p")    pipeline16 r:pipeline of 16 INCRs
 *
 * or one of the C API alone, without a fire: c_incr_redis (hs_shared_incr),
 * c_get_redis (hs_shared_get). Any failure (a handler error, a nil result) stops
 * the run. Prints "engine=", "op=", "threads=", "ops=" (operations completed),
 * "seconds=" (the timed span), "cpu_seconds=" (the process's user + system time
 * from the start until every thread stopped) lines and exits 0; on failure
 * "error=..." and 1.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "hostscript.h"

#define MAX_THREADS 256

static const char *const HOOKS[] = {"incr_mem", "get_mem", "incr_redis", "get_redis",
                                    "incr_call", "single16", "pipeline16"};
#define NHOOKS (int)(sizeof HOOKS / sizeof *HOOKS)

static hs_host *H;
static hs_shared *RED;
static int hook = -1;    /* the op's hook, or -1 for a C API op */
static int c_op;         /* 1 c_incr_redis, 2 c_get_redis */
static long warmup = 200;
static pthread_barrier_t start_line;
static atomic_int stop;
static atomic_int failed;
static char failure[1200];
static pthread_mutex_t failure_mu = PTHREAD_MUTEX_INITIALIZER;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double cpu_s(void) { /* user + system time of every thread of the process */
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e-6;
}

static void fail(const char *msg) {
    pthread_mutex_lock(&failure_mu);
    if (!atomic_load(&failed)) snprintf(failure, sizeof failure, "%s", msg);
    atomic_store(&failed, 1);
    atomic_store(&stop, 1);
    pthread_mutex_unlock(&failure_mu);
}

/* One operation; 0 ok, -1 failed (the failure recorded). */
static int op(hs_txn *t) {
    if (hook >= 0) {
        if ((hs_fire(H, hook, t) & 3) != HS_ERROR) return 0;
        hs_error e;
        hs_last_error(H, &e);
        fail(e.message);
        return -1;
    }
    hs_value out;
    char buf[128];
    int rc;
    if (c_op == 1) {
        hs_value one = {.type = HS_VAL_INTEGER, .i = 1}, zero = {.type = HS_VAL_INTEGER, .i = 0};
        rc = hs_shared_incr(RED, "n", 1, &one, &zero, 0, &out, NULL);
    } else {
        rc = hs_shared_get(RED, "v", 1, &out, buf, sizeof buf, NULL);
    }
    if (rc == HS_SHARED_OK) return 0;
    fail(hs_shared_strerror(rc));
    return -1;
}

static void *worker(void *arg) {
    long *count = arg;
    hs_txn *t = hs_txn_new();
    for (long i = 0; i < warmup && !atomic_load(&stop); i++) op(t);
    pthread_barrier_wait(&start_line);
    long n = 0;
    while (!atomic_load_explicit(&stop, memory_order_relaxed) && op(t) == 0) n++;
    *count = n;
    hs_txn_free(t);
    return NULL;
}

static int usage(void) {
    printf("error=usage: redis_bench SCRIPT URL OP THREADS SECONDS [WARMUP_FIRES]\n");
    return 1;
}

/* The whole file PATH, NUL-terminated; NULL when unreadable. */
static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *s = NULL;
    size_t cap = 0, n = 0, got;
    do {
        if (n + 4096 + 1 > cap) {
            char *bigger = realloc(s, cap = (n + 4096 + 1) * 2);
            if (!bigger) break;
            s = bigger;
        }
        got = fread(s + n, 1, cap - n - 1, f);
        n += got;
    } while (got);
    int bad = ferror(f) || !s;
    fclose(f);
    if (bad) {
        free(s);
        return NULL;
    }
    s[n] = 0;
    *len = n;
    return s;
}

int main(int argc, char **argv) {
    if (argc < 6 || argc > 7) return usage();
    const char *script_path = argv[1], *url = argv[2], *opname = argv[3];
    int threads = atoi(argv[4]);
    double seconds = atof(argv[5]);
    if (argc > 6) warmup = atol(argv[6]);
    if (threads < 1 || threads > MAX_THREADS || !(seconds > 0) || warmup < 0) return usage();
    for (int i = 0; i < NHOOKS; i++)
        if (!strcmp(opname, HOOKS[i])) hook = i;
    if (!strcmp(opname, "c_incr_redis")) c_op = 1;
    else if (!strcmp(opname, "c_get_redis")) c_op = 2;
    else if (hook < 0) {
        printf("error=unknown op '%s'\n", opname);
        return 1;
    }

    hs_shared_spec specs[] = {{"mem", 1 << 20, NULL}, {"red", 0, url}};
    hs_config cfg = {HOOKS, NHOOKS, 0, 0, 1, NULL, 0, 16, specs, 2}; /* no limits, sandbox on */
    hs_error err;
    H = hs_host_new(&cfg, &err);
    if (!H) {
        printf("error=%s\n", err.message);
        return 1;
    }
    size_t len;
    char *script = read_file(script_path, &len);
    if (!script) {
        printf("error=cannot read %s\n", script_path);
        return 1;
    }
    if (hs_load(H, "redis_bench.lua", script, len, &err)) {
        printf("error=%s\n", err.message);
        return 1;
    }
    free(script);
    RED = hs_host_shared(H, "red");
    char v[64];
    memset(v, 'v', sizeof v);
    hs_value value = {.type = HS_VAL_STRING, .s = v, .len = sizeof v};
    const char *names[] = {"mem", "red"};
    for (int i = 0; i < 2; i++) {
        int rc = hs_shared_store(hs_host_shared(H, names[i]), HS_STORE_SET, "v", 1, &value, 0, NULL);
        if (rc) {
            printf("error=storing v in %s: %s\n", names[i], hs_shared_strerror(rc));
            return 1;
        }
    }

    pthread_t th[MAX_THREADS];
    long counts[MAX_THREADS] = {0};
    pthread_barrier_init(&start_line, NULL, (unsigned)threads + 1);
    for (int i = 0; i < threads; i++) pthread_create(&th[i], NULL, worker, &counts[i]);
    pthread_barrier_wait(&start_line);
    double t0 = now_s(), cpu0 = cpu_s();
    struct timespec nap = {(time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9)};
    while (nanosleep(&nap, &nap)) {
    }
    atomic_store(&stop, 1);
    double t1 = now_s();
    long total = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(th[i], NULL);
        total += counts[i];
    }
    double cpu = cpu_s() - cpu0;
    pthread_barrier_destroy(&start_line);
    hs_host_free(H);
    if (atomic_load(&failed)) {
        printf("error=%s\n", failure);
        return 1;
    }
    printf("engine=%s\nop=%s\nthreads=%d\nops=%ld\nseconds=%.6f\ncpu_seconds=%.6f\n", hs_engine(), opname,
           threads, total, t1 - t0, cpu);
    return 0;
}
