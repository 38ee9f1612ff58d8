/*
 * embed.c — libhostscript embedded in a plain C program, no Python anywhere.
 *
 * Usage: embed [ITERATIONS [THREADS]]   (defaults 1000, 4)
 *
 * Creates a host with the hooks read_request and log, loads a handler from a string
 * (it copies a request header into a response header and counts its calls in a
 * module-level local, which is per thread), fires read_request ITERATIONS times
 * from each of THREADS pthreads (one hs_txn each) and checks the response header
 * after every fire. Checks that failing loads return -1 with a message and leave
 * the program unchanged, that a failing handler reports through hs_last_error,
 * and that states are closed when their threads end. Frees everything.
 *
 * Prints "key=value" lines (read by tests/test_c_embed.py) and "FAIL: ..." for
 * every failed check; exits 0 only when every check passed.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hostscript.h"

static int failures;
static pthread_mutex_t out_mu = PTHREAD_MUTEX_INITIALIZER;

#define FAIL(...)                                  \
    do {                                           \
        pthread_mutex_lock(&out_mu);               \
        printf("FAIL: " __VA_ARGS__);              \
        printf("\n");                              \
        failures++;                                \
        pthread_mutex_unlock(&out_mu);             \
    } while (0)

static const char *SCRIPT =
    "local util = require \"hs.util\"\n"
    "local calls = 0 -- module-level local: one per thread state\n"
    "local Embed = {}\n"
    "function Embed:on_read_request(txn)\n"
    "  calls = calls + 1\n"
    "  local v = txn.req.headers[\"x-in\"]\n"
    "  txn.resp.headers[\"x-out\"] = util.trim(\"  \" .. v .. \"  \") .. \":\" .. calls\n"
    "  txn.resp.headers[\"x-engine\"] = hs.engine\n"
    "  if txn.req.headers[\"x-fail\"] then error(\"asked to fail\") end\n"
    "end\n"
    "function Embed:on_log(txn)\n"
    "  txn.ctx.logged = (txn.ctx.logged or 0) + 1\n"
    "end\n"
    "return Embed\n";

typedef struct worker {
    hs_host *host;
    int id, iters, hook_rr, hook_log;
    int ok;         /* fires whose x-out was right */
    char last[128]; /* last x-out seen */
} worker;

static void *run_worker(void *arg) {
    worker *w = arg;
    char in[64], want[128];
    snprintf(in, sizeof in, "thread-%d", w->id);
    hs_txn *t = hs_txn_new();
    if (!t) {
        FAIL("thread %d: hs_txn_new returned NULL", w->id);
        return NULL;
    }
    if (hs_txn_set(t, HS_F_METHOD, "GET", 3) || hs_txn_set(t, HS_F_URI, "/embed", 6))
        FAIL("thread %d: hs_txn_set failed", w->id);
    if (hs_txn_add_header(t, HS_REQ, "Host", "example") ||
        hs_txn_add_header(t, HS_REQ, "X-In", in))
        FAIL("thread %d: hs_txn_add_header failed", w->id);
    for (int i = 1; i <= w->iters; i++) {
        int r = hs_fire(w->host, w->hook_rr, t);
        if ((r & 3) != HS_CONTINUE) {
            hs_error e;
            hs_last_error(w->host, &e);
            FAIL("thread %d fire %d: outcome %d: %s", w->id, i, r & 3, e.message);
            break;
        }
        if (!((r >> 2) & HS_CH_RESP_HEADERS)) {
            FAIL("thread %d fire %d: changes 0x%x lack HS_CH_RESP_HEADERS", w->id, i, r >> 2);
            break;
        }
        size_t len = 0;
        const char *v = hs_txn_header(t, HS_RESP, "x-out", &len);
        snprintf(want, sizeof want, "%s:%d", in, i);
        if (!v || len != strlen(want) || memcmp(v, want, len) != 0) {
            FAIL("thread %d fire %d: x-out is '%.*s', expected '%s'", w->id, i,
                 v ? (int)len : 6, v ? v : "(null)", want);
            break;
        }
        snprintf(w->last, sizeof w->last, "%.*s", (int)len, v);
        w->ok++;
    }
    /* the log hook: ctx written in Lua is serialized into the transaction */
    int r = hs_fire(w->host, w->hook_log, t);
    size_t clen = 0;
    hs_txn_ctx(t, &clen);
    if ((r & 3) != HS_CONTINUE || !((r >> 2) & HS_CH_CTX) || clen == 0)
        FAIL("thread %d: log fire returned %d, ctx %zu bytes", w->id, r, clen);
    /* a handler error is reported, and the next fire works again */
    if (hs_txn_add_header(t, HS_REQ, "X-Fail", "1") != 0) FAIL("thread %d: add X-Fail", w->id);
    r = hs_fire(w->host, w->hook_rr, t);
    hs_error e;
    hs_last_error(w->host, &e);
    if ((r & 3) != HS_ERROR || e.kind != HS_ERR_RUNTIME || !strstr(e.message, "asked to fail") ||
        strcmp(e.hook, "read_request") != 0 || strcmp(e.script, "embed.lua") != 0)
        FAIL("thread %d: failing handler gave outcome %d kind %d hook '%s' script '%s' msg '%s'",
             w->id, r & 3, e.kind, e.hook, e.script, e.message);
    hs_txn_free(t);
    return NULL;
}

static int count_scripts(hs_host *h, char *names, size_t cap) {
    size_t need = hs_scripts(h, names, cap);
    int n = 0;
    for (size_t i = 0; i < need && i < cap; i++) n += names[i] == 0;
    return n;
}

int main(int argc, char **argv) {
    int iters = argc > 1 ? atoi(argv[1]) : 1000;
    int nthreads = argc > 2 ? atoi(argv[2]) : 4;
    if (iters < 1 || nthreads < 1 || nthreads > 64) {
        fprintf(stderr, "usage: embed [ITERATIONS [THREADS]]\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("engine=%s\n", hs_engine());
    printf("engine_version=%s\n", hs_engine_version());

    static const char *const hooks[] = {"read_request", "log"};
    hs_config cfg = {0};
    cfg.hooks = hooks;
    cfg.nhooks = 2;
    cfg.sandbox = 1;
    hs_error err;
    memset(&err, 0, sizeof err);
    hs_host *h = hs_host_new(&cfg, &err);
    if (!h) {
        printf("FAIL: hs_host_new: %s\n", err.message);
        return 1;
    }
    int rr = hs_hook_index(h, "read_request"), lg = hs_hook_index(h, "log");
    if (rr != 0 || lg != 1 || hs_hook_index(h, "nope") != -1)
        FAIL("hs_hook_index: read_request=%d log=%d", rr, lg);

    if (hs_load(h, "embed.lua", SCRIPT, strlen(SCRIPT), &err) != 0) {
        printf("FAIL: hs_load: %s\n", err.message);
        hs_host_free(h);
        return 1;
    }

    /* failing loads: -1, a message naming the script, the program unchanged */
    static const char bad_syntax[] = "local C = {}\nfunction C:on_read_request(txn)\n  if then\nend\nreturn C\n";
    memset(&err, 0, sizeof err);
    int rc = hs_load(h, "bad.lua", bad_syntax, strlen(bad_syntax), &err);
    printf("bad_syntax_rc=%d\n", rc);
    printf("bad_syntax_kind=%d\n", err.kind);
    printf("bad_syntax_line=%d\n", err.line);
    printf("bad_syntax_message=%s\n", err.message);
    if (rc != -1 || err.kind != HS_ERR_SYNTAX || !strstr(err.message, "bad.lua") || err.line != 3)
        FAIL("syntax error load: rc %d kind %d line %d message '%s'", rc, err.kind, err.line,
             err.message);

    static const char bad_hook[] = "local C = {}\nfunction C:on_nope(txn) end\nreturn C\n";
    memset(&err, 0, sizeof err);
    rc = hs_load(h, "hook.lua", bad_hook, strlen(bad_hook), &err);
    printf("bad_hook_rc=%d\n", rc);
    printf("bad_hook_message=%s\n", err.message);
    if (rc != -1 || err.kind != HS_ERR_SCRIPT || !strstr(err.message, "nope") || !err.message[0])
        FAIL("undeclared hook load: rc %d kind %d message '%s'", rc, err.kind, err.message);

    /* replacing embed.lua with a broken version keeps the working one */
    static const char bad_chunk[] = "error('chunk fails')\n";
    memset(&err, 0, sizeof err);
    rc = hs_load(h, "embed.lua", bad_chunk, strlen(bad_chunk), &err);
    printf("bad_chunk_rc=%d\n", rc);
    printf("bad_chunk_message=%s\n", err.message);
    if (rc != -1 || err.kind != HS_ERR_SCRIPT || !strstr(err.message, "chunk fails"))
        FAIL("failing chunk load: rc %d kind %d message '%s'", rc, err.kind, err.message);

    char names[256];
    int nscripts = count_scripts(h, names, sizeof names);
    printf("scripts=%d %s\n", nscripts, names);
    if (nscripts != 1 || strcmp(names, "embed.lua") != 0) FAIL("scripts after failed loads");
    if (hs_unload(h, "bad.lua") != -1) FAIL("hs_unload of a script never loaded did not fail");

    worker *ws = calloc((size_t)nthreads, sizeof *ws);
    pthread_t *tids = calloc((size_t)nthreads, sizeof *tids);
    if (!ws || !tids) return 1;
    for (int i = 0; i < nthreads; i++) {
        ws[i] = (worker){h, i, iters, rr, lg, 0, ""};
        if (pthread_create(&tids[i], NULL, run_worker, &ws[i]) != 0) {
            printf("FAIL: pthread_create\n");
            return 1;
        }
    }
    for (int i = 0; i < nthreads; i++) pthread_join(tids[i], NULL);
    for (int i = 0; i < nthreads; i++)
        printf("thread %d ok=%d last=%s\n", i, ws[i].ok, ws[i].last);

    hs_stats st;
    hs_hook_stats hk[2];
    hs_host_stats(h, &st, hk);
    printf("fires=%llu errors=%llu states=%llu rehydrations=%llu\n",
           (unsigned long long)st.fires, (unsigned long long)st.errors,
           (unsigned long long)st.states, (unsigned long long)st.rehydrations);
    printf("hook read_request fires=%llu errors=%llu\n", (unsigned long long)hk[0].fires,
           (unsigned long long)hk[0].errors);
    printf("hook log fires=%llu errors=%llu\n", (unsigned long long)hk[1].fires,
           (unsigned long long)hk[1].errors);
    unsigned long long n = (unsigned long long)nthreads;
    if (st.fires != n * (unsigned long long)(iters + 2)) FAIL("fires %llu", (unsigned long long)st.fires);
    if (st.errors != n) FAIL("errors %llu, expected %llu", (unsigned long long)st.errors, n);
    if (st.states != 0) FAIL("%llu states still alive after their threads ended",
                             (unsigned long long)st.states);
    if (st.rehydrations != n) FAIL("rehydrations %llu, expected %llu",
                                   (unsigned long long)st.rehydrations, n);
    if (hk[1].fires != n || hk[1].errors != 0) FAIL("log hook stats");

    /* the main thread fires too: its own state, its own counter */
    hs_txn *t = hs_txn_new();
    hs_txn_add_header(t, HS_REQ, "x-in", "main");
    int r = hs_fire(h, rr, t);
    size_t len = 0;
    const char *v = hs_txn_header(t, HS_RESP, "X-OUT", &len);
    printf("main x-out=%.*s\n", v ? (int)len : 0, v ? v : "");
    if ((r & 3) != HS_CONTINUE || !v || len != 6 || memcmp(v, "main:1", 6) != 0)
        FAIL("main thread fire");
    v = hs_txn_header(t, HS_RESP, "x-engine", &len);
    if (!v || len != strlen(hs_engine()) || memcmp(v, hs_engine(), len) != 0)
        FAIL("x-engine is not hs.engine");
    hs_txn_free(t);

    free(ws);
    free(tids);
    hs_host_free(h); /* closes the main thread's state */
    printf("failures=%d\n", failures);
    if (failures == 0) printf("ok\n");
    return failures ? 1 : 0;
}
