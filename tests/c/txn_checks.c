/*
 * txn_checks.c — the transaction's C entry points (tests/test_txn_entry_points.py):
 *   validate   every setter refuses CR/LF/NUL in header values, non-token names
 *              and methods, URIs with a space or control character, bad statuses,
 *              and changes nothing when it refuses.
 *   busy       two threads fire one transaction: while a long handler runs on it,
 *              the other's fire is refused with HS_ERR_USAGE (run under TSan too).
 *   lookup     headers on demand as the Traffic Server plugin binds them (txn.h's
 *              fetch/lookup/journal): one-field reads are answered by the host's
 *              lookup and the journal, never by copying the set in; a read after an
 *              edit sees the edit; listing the headers fetches them once, with the
 *              same answers; the request line is fetched once, before it is set.
 *   peek N     N random cases: host fields (duplicates, names differing in case,
 *              values the core refuses) and random set/add/remove edits journaled;
 *              every name's peek must be what fetching the set and replaying the
 *              journal gives.
 * Prints "ok" on success; anything else is a failure.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "hostscript.h"
#include "txn.h"

#define CHECK(cond) do { if (!(cond)) { printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); exit(1); } } while (0)

static size_t count_headers(hs_txn *t, int which) {
    size_t len, n = 0;
    const char *p = hs_txn_headers(t, which, &len);
    for (size_t i = 0; i < len; i++) n += p[i] == 0;
    return len ? (n + 1) / 2 : 0;
}

static int validate(void) {
    hs_txn *t = hs_txn_new();
    CHECK(hs_txn_add_header(t, HS_REQ, "Host", "example") == 0);
    /* add: bad names and values */
    CHECK(hs_txn_add_header(t, HS_REQ, "X-A", "a\r\nX-Injected: 1") == -1);
    CHECK(hs_txn_add_header(t, HS_REQ, "X-A", "a\nb") == -1);
    CHECK(hs_txn_add_header(t, HS_REQ, "X A", "v") == -1);
    CHECK(hs_txn_add_header(t, HS_REQ, "X:A", "v") == -1);
    CHECK(hs_txn_add_header(t, HS_REQ, "", "v") == -1);
    CHECK(hs_txn_add_header(t, 7, "X-A", "v") == -1);
    CHECK(count_headers(t, HS_REQ) == 1);
    /* packed: one bad entry refuses all, the old headers stay */
    static const char bad_value[] = "X-A\0ok\0X-B\0a\rb";
    CHECK(hs_txn_set_headers(t, HS_REQ, bad_value, sizeof bad_value - 1) == -1);
    static const char bad_name[] = "X-A\0ok\0X B\0v";
    CHECK(hs_txn_set_headers(t, HS_REQ, bad_name, sizeof bad_name - 1) == -1);
    static const char no_value[] = "X-A\0o\0k"; /* a NUL inside a value leaves a name with none */
    CHECK(hs_txn_set_headers(t, HS_REQ, no_value, sizeof no_value - 1) == -1);
    CHECK(count_headers(t, HS_REQ) == 1);
    static const char good[] = "X-A\0one\0x-a\0two\0Y\0";
    CHECK(hs_txn_set_headers(t, HS_REQ, good, sizeof good - 1) == 0);
    CHECK(count_headers(t, HS_REQ) == 3);
    size_t len;
    const char *v = hs_txn_header(t, HS_REQ, "x-A", &len);
    CHECK(v && len == 3 && !memcmp(v, "one", 3));
    /* raw blocks */
    const char *blocks_bad[] = {"Host: a\r\nX-B: c\rd\r\n", "Host: a\r\n folded\r\n", "Host a\r\n",
                                "Bad Name: v\r\n", "Host: a\r\n\r\nGET / HTTP/1.1\r\n", NULL};
    for (int i = 0; blocks_bad[i]; i++) {
        CHECK(hs_txn_parse_headers(t, HS_REQ, blocks_bad[i], strlen(blocks_bad[i])) == -1);
        CHECK(count_headers(t, HS_REQ) == 3);
    }
    const char *block = "Host: example.com\r\nAccept:  */*  \r\nX-Rep: 1\nx-rep: 2\r\n\r\n";
    CHECK(hs_txn_parse_headers(t, HS_RESP, block, strlen(block)) == 0);
    CHECK(count_headers(t, HS_RESP) == 4);
    v = hs_txn_header(t, HS_RESP, "accept", &len);
    CHECK(v && len == 3 && !memcmp(v, "*/*", 3));
    /* method, uri, status */
    CHECK(hs_txn_set(t, HS_F_METHOD, "GET", 3) == 0);
    CHECK(hs_txn_set(t, HS_F_METHOD, "GET / HTTP/1.1\r\nHost: internal\r\n\r\nGET", 39) == -1);
    CHECK(hs_txn_set(t, HS_F_METHOD, "", 0) == -1);
    CHECK(hs_txn_set(t, HS_F_URI, "/a?b=1", 6) == 0);
    CHECK(hs_txn_set(t, HS_F_URI, "/a b", 4) == -1);
    CHECK(hs_txn_set(t, HS_F_URI, "/a\r\nX: y", 8) == -1);
    CHECK(hs_txn_set(t, HS_F_URI, "/a\0b", 4) == -1);
    v = hs_txn_get(t, HS_F_METHOD, &len);
    CHECK(len == 3 && !memcmp(v, "GET", 3));
    v = hs_txn_get(t, HS_F_URI, &len);
    CHECK(len == 6 && !memcmp(v, "/a?b=1", 6));
    CHECK(hs_txn_set_status(t, 204) == 0 && hs_txn_status(t) == 204);
    CHECK(hs_txn_set_status(t, 99) == -1 && hs_txn_set_status(t, 1000) == -1 && hs_txn_set_status(t, -7) == -1);
    CHECK(hs_txn_status(t) == 204);
    hs_txn_reset(t);
    CHECK(count_headers(t, HS_REQ) == 0 && count_headers(t, HS_RESP) == 0 && hs_txn_status(t) == 0);
    hs_txn_free(t);
    return 0;
}

static hs_host *H;
static hs_txn *T;

static void *long_fire(void *arg) {
    (void)arg;
    int r = hs_fire(H, 0, T);
    CHECK((r & 3) == HS_CONTINUE);
    return NULL;
}

static int busy(void) {
    const char *hooks[] = {"read_request"};
    /* the main thread may not read T while the fire runs: it waits until the fire
     * has started by polling the host's counters instead */
    const char *src = "local C = {} function C:on_read_request(txn)\n"
                      "  local t0 = os.clock() while os.clock() - t0 < 0.3 do end\n"
                      "  txn.resp.headers['x-done'] = 'yes'\n"
                      "end return C";
    hs_config cfg = {hooks, 1, 0, 0, 1, NULL, 0};
    hs_error err;
    H = hs_host_new(&cfg, &err);
    CHECK(H && hs_load(H, "long.lua", src, strlen(src), &err) == 0);
    T = hs_txn_new();
    pthread_t th;
    pthread_create(&th, NULL, long_fire, NULL);
    hs_stats st;
    do hs_host_stats(H, &st, NULL); while (st.fires == 0);
    int refused = 0;
    for (int i = 0; i < 50; i++) { /* while the first fire runs (0.3 s), every other is refused */
        int r = hs_fire(H, 0, T);
        if ((r & 3) != HS_ERROR) break;
        hs_last_error(H, &err);
        CHECK(err.kind == HS_ERR_USAGE && strstr(err.message, "in use"));
        refused++;
    }
    pthread_join(th, NULL);
    CHECK(refused > 0);
    size_t len;
    const char *v = hs_txn_header(T, HS_RESP, "x-done", &len);
    CHECK(v && len == 3);
    CHECK((hs_fire(H, 0, T) & 3) == HS_CONTINUE); /* free again once the first returned */
    hs_txn_free(T);
    hs_host_free(H);
    return 0;
}

/* The host's copy of the request, as a host binding headers on demand keeps it:
 * what host_fetch copies in and host_lookup reads (a value the core refuses, or the
 * name in host_unsure, makes the lookup say "fetch instead", as the plugin does). */
static struct { const char *n, *v; } host[8];
static int nhost;
static const char *host_uri, *host_unsure;
static int fetches, lookups, line_fetches;

static void host_fetch(hs_txn *t, int which, void *ud) {
    (void)ud;
    if (which == HS_TXN_LINE) { /* the request line, left to the first use */
        line_fetches++;
        hs_txn_set(t, HS_F_METHOD, "GET", 3);
        hs_txn_set(t, HS_F_URI, host_uri, strlen(host_uri));
        return;
    }
    fetches++;
    hs_txn_set_headers(t, which, "", 0);
    for (int i = 0; which == HS_REQ && i < nhost; i++) hs_txn_add_header(t, which, host[i].n, host[i].v);
}

static int host_lookup(hs_txn *t, int which, const char *name, size_t nl, void *ud, const char **v, size_t *vl) {
    (void)t, (void)ud;
    lookups++;
    if (which != HS_REQ) return 0;
    if (host_unsure && strlen(host_unsure) == nl && !strncasecmp(host_unsure, name, nl)) return -1;
    for (int i = 0; i < nhost; i++)
        if (strlen(host[i].n) == nl && !strncasecmp(host[i].n, name, nl)) {
            if (!hs_valid_field_value(host[i].v, strlen(host[i].v))) return -1;
            *v = host[i].v, *vl = strlen(host[i].v);
            return 1;
        }
    return 0;
}

static int lookup(void) {
    static const char *fields[][2] = {{"Host", "h.example"}, {"X-A", "a1"}, {"X-Dup", "d1"}, {"X-Dup", "d2"},
                                      {"X-E", "orig"}, {"X-C", "gone"}, {"X-F", "old"}, {"X-Bad", "v"}};
    for (nhost = 0; nhost < 8; nhost++) host[nhost].n = fields[nhost][0], host[nhost].v = fields[nhost][1];
    host_unsure = "x-bad";
    const char *hooks[] = {"read_request"};
    /* each read's answer goes into the response as "x-got-N" (a Lua table keeps them
     * until the end, so that no read happens after the response set is fetched) */
    const char *src =
        "local C = {} function C:on_read_request(txn)\n"
        "  txn.req.method = 'PUT'\n"
        "  local h, got = txn.req.headers, {txn.req.method .. ' ' .. txn.req.uri}\n"
        "  local function r(n) got[#got + 1] = h[n] or '<nil>' end\n"
        "  r('x-a'); r('X-DUP'); r('x-none'); r('bad name')\n"
        "  h['x-b'] = 'new'; r('x-b')\n"
        "  h['x-c'] = nil; r('x-c')\n"
        "  h:add('x-d', 'added'); h:add('x-d', 'second'); r('x-d')\n"
        "  h:add('x-e', 'more'); r('x-e')\n"
        "  h:remove('x-f'); h:add('x-f', 'after'); r('x-f')\n"
        "  h['x-a'] = {'l1', 'l2'}; r('x-a')\n"
        "  h:remove('x-keep\\0'); h:remove(('a'):rep(60) .. '\\0'); h:remove('x\\0\\0aX-A\\0v')\n"
        "  h:add('x-new', 'v'); r('x-new')\n"
        "  if txn.req.uri == '/list' then for _ in h:each() do end end\n"
        "  r('x-bad')\n"
        "  for i, v in ipairs(got) do txn.resp.headers['x-got-' .. i] = v end\n"
        "end return C";
    const char *want[] = {"PUT /list" /* or "PUT /", below */, "a1", "d1", "<nil>", "<nil>", "new", "<nil>", "added", "orig", "after", "l1", "v", "v"};
    hs_config cfg = {hooks, 1, 0, 0, 1, NULL, 0};
    hs_error err;
    hs_host *h = hs_host_new(&cfg, &err);
    CHECK(h && hs_load(h, "lookup.lua", src, strlen(src), &err) == 0);
    for (int list = 0; list < 2; list++) {
        hs_txn *t = hs_txn_new();
        host_uri = list ? "/list" : "/";
        want[0] = list ? "PUT /list" : "PUT /";
        fetches = lookups = line_fetches = 0;
        t->fetch = host_fetch;
        t->lookup = host_lookup;
        t->fetch_ud = NULL;
        t->unfetched = 1u << HS_REQ | 1u << HS_TXN_LINE;
        int r = hs_fire(h, 0, t);
        CHECK((r & 3) == HS_CONTINUE);
        for (size_t i = 0; i < sizeof want / sizeof *want; i++) {
            char name[16];
            size_t len;
            snprintf(name, sizeof name, "x-got-%zu", i + 1);
            const char *v = hs_txn_header(t, HS_RESP, name, &len);
            if (!v || len != strlen(want[i]) || memcmp(v, want[i], len)) {
                printf("FAIL list=%d %s: got '%.*s', want '%s'\n", list, name, v ? (int)len : 5, v ? v : "<nil>", want[i]);
                exit(1);
            }
        }
        /* one-field reads: the six names the edits leave open asked of the host, nothing copied in
         * until x-bad (the lookup says "fetch"); listing fetches once, before x-bad */
        printf("list=%d fetches=%d lookups=%d line=%d\n", list, fetches, lookups, line_fetches);
        CHECK(line_fetches == 1); /* before the method was set: the uri is the host's */
        CHECK(fetches == 1);
        CHECK(list ? lookups == 6 : lookups == 7);
        hs_txn_free(t);
    }
    /* the journal itself refuses what would break its records apart (a NUL); names
     * and values are the caller's to validate, as for hs_hdrs_add */
    hs_txn *t = hs_txn_new();
    CHECK(hs_txn_journal(t, HS_REQ, 'r', "x\0y", 3, "", 0) == -2);
    CHECK(hs_txn_journal(t, HS_REQ, 'a', "x-a", 3, "v\0w", 3) == -2);
    CHECK(t->journal[HS_REQ].len == 0);
    hs_txn_free(t);
    hs_host_free(h);
    return 0;
}

/* ---- peek against fetch + replay ---- */

static int peek(long cases) {
    static const char *names[] = {"x", "X", "y", "X-Long-Name"};
    static const char *values[] = {"h1", "h2", "bad\x01", "", "h3 with spaces"};
    srand(7);
    host_unsure = NULL;
    long checked = 0;
    for (long c = 0; c < cases; c++) {
        nhost = rand() % 6;
        for (int i = 0; i < nhost; i++) host[i].n = names[rand() % 4], host[i].v = values[rand() % 5];
        hs_txn *t = hs_txn_new();
        t->lookup = host_lookup, t->fetch = host_fetch, t->unfetched = 1u << HS_REQ;
        int nops = rand() % 6;
        for (int k = 0; k < nops; k++) {
            char op = "sar"[rand() % 3];
            const char *n = names[rand() % 4], *v = op == 'r' ? "" : rand() % 2 ? "j1" : "j2";
            CHECK(hs_txn_journal(t, HS_REQ, op, n, strlen(n), v, strlen(v)) == 0);
        }
        for (int q = 0; q < 4; q++) {
            const char *pv;
            size_t pl, wl;
            int r = hs_txn_peek(t, HS_REQ, names[q], strlen(names[q]), &pv, &pl);
            if (r < 0) continue; /* the host cannot say: the caller fetches */
            hs_txn *u = hs_txn_new();
            u->fetch = host_fetch, u->unfetched = 1u << HS_REQ;
            CHECK(hs_buf_put(&u->journal[HS_REQ], t->journal[HS_REQ].p, t->journal[HS_REQ].len) == 0);
            hs_txn_fetch(u, HS_REQ);
            const char *w = hs_txn_header(u, HS_REQ, names[q], &wl);
            if ((r == 0) != (w == NULL) || (w && (wl != pl || memcmp(w, pv, wl)))) {
                printf("FAIL case %ld, %s: peek %d '%.*s', fetched '%.*s'\n", c, names[q], r, r == 1 ? (int)pl : 0,
                       r == 1 ? pv : "", w ? (int)wl : 5, w ? w : "<nil>");
                exit(1);
            }
            checked++;
            hs_txn_free(u);
        }
        hs_txn_free(t);
    }
    printf("ok peek=%ld\n", checked);
    return 0;
}

int main(int argc, char **argv) {
    const char *what = argc > 1 ? argv[1] : "validate";
    if (!strcmp(what, "validate")) validate();
    else if (!strcmp(what, "busy")) busy();
    else if (!strcmp(what, "lookup")) lookup();
    else if (!strcmp(what, "peek")) return peek(argc > 2 ? atol(argv[2]) : 50000);
    else return 2;
    printf("ok\n");
    return 0;
}
