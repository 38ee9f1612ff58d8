/*
 * hostscript_ats.c — hostscript inside Apache Traffic Server: a global plugin on the
 * same C core (native/) as the Python package.
 *
 *   plugin.config:  hostscript_ats_<engine>.so [--time-limit S] [--memory-limit BYTES]
 *                   [--shared NAME=SIZE|NAME=redis://...] [--watch S] [--fail-closed]
 *                   script.lua ...
 *
 * The scripts' handler classes see Traffic Server's hooks under the Python host's
 * names: read_request (READ_REQUEST_HDR: the client request), send_request
 * (SEND_REQUEST_HDR: the request to the origin), read_response (READ_RESPONSE_HDR:
 * the origin's response), send_response (SEND_RESPONSE_HDR: the response to the
 * client) and log (TXN_CLOSE); and under their own names txn_start, pre_remap,
 * post_remap, os_dns, cache_lookup_complete, read_cache_hdr (hooks[] below). Only
 * the hooks some script handles are added (more when a reload or a run-time
 * registration handles more).
 *
 * Reload without restart: `traffic_ctl plugin msg hostscript reload` (the lifecycle
 * message hook) reloads every script, --watch S the changed ones every S seconds;
 * a script that fails to load keeps its running version, and the error is logged.
 *
 * Each net thread fires in its own Lua state (the core's per-thread states: no
 * lock on the path of a hook). A transaction gets one hs_txn, kept in a user arg
 * from its first hook to TXN_CLOSE (recycled per thread). Before a fire, the method,
 * URI or status of the message the hook concerns are copied in; its headers only
 * when a handler first reads them (hs_txn.fetch), written back by difference; edits
 * made before any read are journaled by the core and applied straight to Traffic
 * Server's message. txn:respond() in read_request answers the client directly;
 * txn:set_cache_key(s) before the cache lookup (read_request, pre_remap,
 * post_remap) mixes a stable hash of s into the cache key as the cache generation
 * (TS_CONFIG_HTTP_CACHE_GENERATION); Traffic Server stores a response under the key
 * it looked up, so a response a later hook keys otherwise is not stored.
 * txn.resp.body set in read_response replaces the origin's body (a response
 * transform that drops the origin's and writes the handler's). A failing
 * handler's error is logged (script, hook, message, traceback) and counted in
 * plugin.hostscript.errors; the transaction goes on as if it had not run, or, with
 * --fail-closed, ends in a 500 (in the hooks before send_response).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <ts/ts.h>

#include "hostscript.h"
#include "txn.h"

#define PLUGIN "hostscript"
#define EXPORT __attribute__((visibility("default")))

/* The hooks a script may handle: Traffic Server's, under the Python host's names for
 * the five every host has, and what the txn shows in each. */
enum { SRC_NONE, SRC_CLIENT_REQ, SRC_SERVER_REQ, SRC_SERVER_RESP, SRC_CLIENT_RESP, SRC_CACHED_RESP,
       SRC_CLIENT_BOTH /* log: the client's request and the response it got, read only */ };
enum { H_READ_REQUEST, H_SEND_REQUEST, H_READ_RESPONSE, H_SEND_RESPONSE, H_LOG, NHOOKS = 11 };

static const struct hook_def {
    const char *name;
    TSHttpHookID id;
    TSEvent event;
    int source;
    int early; /* before the cache lookup: txn:respond and txn:set_cache_key act */
} hooks[NHOOKS] = {
    {"read_request", TS_HTTP_READ_REQUEST_HDR_HOOK, TS_EVENT_HTTP_READ_REQUEST_HDR, SRC_CLIENT_REQ, 1},
    {"send_request", TS_HTTP_SEND_REQUEST_HDR_HOOK, TS_EVENT_HTTP_SEND_REQUEST_HDR, SRC_SERVER_REQ, 0},
    {"read_response", TS_HTTP_READ_RESPONSE_HDR_HOOK, TS_EVENT_HTTP_READ_RESPONSE_HDR, SRC_SERVER_RESP, 0},
    {"send_response", TS_HTTP_SEND_RESPONSE_HDR_HOOK, TS_EVENT_HTTP_SEND_RESPONSE_HDR, SRC_CLIENT_RESP, 0},
    {"log", TS_HTTP_TXN_CLOSE_HOOK, TS_EVENT_HTTP_TXN_CLOSE, SRC_CLIENT_BOTH, 0},
    {"txn_start", TS_HTTP_TXN_START_HOOK, TS_EVENT_HTTP_TXN_START, SRC_NONE, 0},
    {"pre_remap", TS_HTTP_PRE_REMAP_HOOK, TS_EVENT_HTTP_PRE_REMAP, SRC_CLIENT_REQ, 1},
    {"post_remap", TS_HTTP_POST_REMAP_HOOK, TS_EVENT_HTTP_POST_REMAP, SRC_CLIENT_REQ, 1},
    {"cache_lookup_complete", TS_HTTP_CACHE_LOOKUP_COMPLETE_HOOK, TS_EVENT_HTTP_CACHE_LOOKUP_COMPLETE,
     SRC_CLIENT_REQ, 0},
    {"read_cache_hdr", TS_HTTP_READ_CACHE_HDR_HOOK, TS_EVENT_HTTP_READ_CACHE_HDR, SRC_CACHED_RESP, 0},
    {"os_dns", TS_HTTP_OS_DNS_HOOK, TS_EVENT_HTTP_OS_DNS, SRC_CLIENT_REQ, 0},
};

static hs_host *host;
static TSCont hook_cont;
static TSMutex hooks_mu; /* guards hooks_added */
static uint64_t hooks_added; /* bit h: hooks[h] is added to Traffic Server */
static int txn_arg = -1;
static int fail_closed; /* --fail-closed: a handler error answers 500 */
static int stat_fires, stat_errors;
static TSCont respond_cont; /* per transaction that answered: writes its headers */

typedef struct txn_data {
    hs_txn *t;
    int answered;
    uint64_t generation; /* the cache generation the lookup used (0: none) */
    char *answer_headers; /* txn:respond's headers, packed, for the response (answer) */
    size_t answer_len;
} txn_data;

/* ---- copying messages between Traffic Server and the hs_txn ---- */

typedef struct packbuf {
    char *p;
    size_t len, cap;
} packbuf;

static __thread packbuf pack; /* per net thread, reused: the headers as copied in */
static __thread int pack_exact; /* pack holds Traffic Server's fields one for one, in order */

static int pack_put(const char *s, size_t n) {
    if (pack.len + n + 1 > pack.cap) {
        size_t cap = pack.cap ? pack.cap : 4096;
        while (cap < pack.len + n + 1) cap *= 2;
        char *p = realloc(pack.p, cap);
        if (!p) return -1;
        pack.p = p;
        pack.cap = cap;
    }
    memcpy(pack.p + pack.len, s, n);
    pack.p[pack.len + n] = 0;
    pack.len += n + 1;
    return 0;
}

static void headers_in(hs_txn *t, int which, TSMBuffer b, TSMLoc h) {
    pack.len = 0;
    pack_exact = 1;
    for (TSMLoc f = TSMimeHdrFieldGet(b, h, 0), next; f; f = next) { /* in order, one pass */
        int nl = 0, vl = 0;
        const char *name = TSMimeHdrFieldNameGet(b, h, f, &nl);
        const char *value = TSMimeHdrFieldValueStringGet(b, h, f, -1, &vl);
        if (!name || nl <= 0) pack_exact = 0;
        else if (pack_put(name, nl) != 0 || pack_put(value ? value : "", vl) != 0) {
            pack_exact = 0;
            TSHandleMLocRelease(b, h, f);
            break;
        }
        next = TSMimeHdrFieldNext(b, h, f);
        TSHandleMLocRelease(b, h, f);
    }
    /* packed for hs_txn_set_headers: pairs separated by NUL, the last value not ended */
    if (hs_txn_set_headers(t, which, pack.p ? pack.p : "", pack.len ? pack.len - 1 : 0) != 0) {
        pack_exact = 0;
        /* a field the core refuses (a control character...): keep the others */
        hs_txn_set_headers(t, which, "", 0);
        for (size_t off = 0; off < pack.len;) { /* each ends in NUL here (pack_put) */
            const char *name = pack.p + off;
            const char *value = name + strlen(name) + 1;
            off = (size_t)(value - pack.p) + strlen(value) + 1;
            hs_txn_add_header(t, which, name, value);
        }
    }
}

/* The next "name\0value" pair of a packed header list of LEN bytes (pairs separated
 * by NUL; the last value is not terminated); 0 at the end. */
static int next_pair(const char *p, size_t len, size_t *off, const char **name, size_t *nl,
                     const char **value, size_t *vl) {
    if (!p || *off >= len) return 0;
    *name = p + *off;
    const char *z = memchr(*name, 0, len - *off);
    if (!z) return 0;
    *nl = (size_t)(z - *name);
    *value = z + 1;
    size_t rest = len - (size_t)(*value - p);
    const char *e = memchr(*value, 0, rest);
    *vl = e ? (size_t)(e - *value) : rest;
    *off = (size_t)(*value - p) + *vl + 1;
    return 1;
}

static void headers_out(hs_txn *t, int which, TSMBuffer b, TSMLoc h, int replace);

static void append_field(TSMBuffer b, TSMLoc h, const char *name, size_t nl, const char *value, size_t vl) {
    TSMLoc f;
    if (TSMimeHdrFieldCreateNamed(b, h, name, (int)nl, &f) != TS_SUCCESS) return;
    TSMimeHdrFieldValueStringSet(b, h, f, -1, value, (int)vl);
    TSMimeHdrFieldAppend(b, h, f);
    TSHandleMLocRelease(b, h, f);
}

/* After a fire that changed the headers WHICH copied in from H (pack): write back
 * the difference when it is fields appended or values changed in place — what a
 * handler setting a few headers does —, else every field. */
static void headers_write(hs_txn *t, int which, TSMBuffer b, TSMLoc h) {
    size_t len = 0, old = pack.len ? pack.len - 1 : 0;
    const char *p = hs_txn_headers(t, which, &len);
    if (p && pack_exact) {
        if (len >= old && !memcmp(p, pack.p, old) && (len == old || old == 0 || p[old] == 0)) {
            const char *name, *value;
            size_t nl, vl, off = old ? old + 1 : 0;
            while (off < len && next_pair(p, len, &off, &name, &nl, &value, &vl))
                append_field(b, h, name, nl, value, vl);
            return;
        }
        const char *n1, *v1, *n2, *v2;
        size_t l1, m1, l2, m2, o1 = 0, o2 = 0;
        int same = 1, more1, more2;
        while ((more1 = next_pair(pack.p, old, &o1, &n1, &l1, &v1, &m1)) &
               (more2 = next_pair(p, len, &o2, &n2, &l2, &v2, &m2)))
            if (l1 != l2 || memcmp(n1, n2, l1)) same = 0;
        if (same && !more1 && !more2) { /* the same names in the same order: set what differs */
            o1 = o2 = 0;
            for (int i = 0; next_pair(pack.p, old, &o1, &n1, &l1, &v1, &m1) &&
                            next_pair(p, len, &o2, &n2, &l2, &v2, &m2); i++) {
                if (m1 == m2 && !memcmp(v1, v2, m1)) continue;
                TSMLoc f = TSMimeHdrFieldGet(b, h, i);
                if (!f) break;
                TSMimeHdrFieldValueStringSet(b, h, f, -1, v2, (int)m2);
                TSHandleMLocRelease(b, h, f);
            }
            return;
        }
    }
    headers_out(t, which, b, h, 1);
}

/* Write the hs_txn's headers WHICH into H: all of them in place of H's (REPLACE), or
 * appended to H's. */
static void headers_out(hs_txn *t, int which, TSMBuffer b, TSMLoc h, int replace) {
    size_t len = 0;
    const char *p = hs_txn_headers(t, which, &len);
    if (replace) TSMimeHdrFieldsClear(b, h);
    const char *name, *value;
    size_t nl, vl, off = 0;
    while (next_pair(p, len, &off, &name, &nl, &value, &vl)) append_field(b, h, name, nl, value, vl);
}

static void request_in(hs_txn *t, TSMBuffer b, TSMLoc h) {
    int ml = 0;
    const char *m = TSHttpHdrMethodGet(b, h, &ml);
    if (m) hs_txn_set(t, HS_F_METHOD, m, ml);
    TSMLoc url;
    if (TSHttpHdrUrlGet(b, h, &url) == TS_SUCCESS) {
        int pl = 0, ql = 0;
        const char *path = TSUrlPathGet(b, url, &pl);
        const char *query = TSUrlHttpQueryGet(b, url, &ql);
        static __thread char *uri;
        static __thread size_t cap;
        size_t need = (size_t)pl + (size_t)ql + 3;
        if (need > cap) {
            char *p = realloc(uri, need);
            if (p) uri = p, cap = need;
        }
        if (need <= cap) {
            size_t n = 0;
            uri[n++] = '/';
            if (path && pl) memcpy(uri + n, path, pl), n += pl;
            if (query && ql) uri[n++] = '?', memcpy(uri + n, query, ql), n += ql;
            hs_txn_set(t, HS_F_URI, uri, n);
        }
        TSHandleMLocRelease(b, h, url);
    }
}

static void request_out(hs_txn *t, unsigned changed, TSMBuffer b, TSMLoc h) {
    if (changed & HS_CH_METHOD) {
        size_t n;
        const char *m = hs_txn_get(t, HS_F_METHOD, &n);
        TSHttpHdrMethodSet(b, h, m, (int)n);
    }
    if (changed & HS_CH_URI) {
        TSMLoc url;
        if (TSHttpHdrUrlGet(b, h, &url) == TS_SUCCESS) {
            size_t n;
            const char *u = hs_txn_get(t, HS_F_URI, &n);
            const char *q = memchr(u, '?', n);
            size_t pl = q ? (size_t)(q - u) : n;
            const char *path = u;
            if (pl && *path == '/') path++, pl--;
            TSUrlPathSet(b, url, path, (int)pl);
            TSUrlHttpQuerySet(b, url, q ? q + 1 : "", q ? (int)(n - (size_t)(q - u) - 1) : 0);
            TSHandleMLocRelease(b, h, url);
        }
    }
    if (changed & HS_CH_REQ_HEADERS) headers_write(t, HS_REQ, b, h);
}

static void response_in(hs_txn *t, TSMBuffer b, TSMLoc h) {
    hs_txn_set_status(t, (int)TSHttpHdrStatusGet(b, h));
}

/* ---- headers on demand: copied in when a handler first reads them ---- */

typedef struct hook_msg {
    TSMBuffer b[2]; /* HS_REQ, HS_RESP: the messages this fire shows, NULL for none */
    TSMLoc h[2];
    TSHttpTxn txnp;
    TSMBuffer line_b; /* the request whose line txn.req.method/uri show, once asked */
    TSMLoc line_h;
} hook_msg;

static void fetch_headers(hs_txn *t, int which, void *ud) {
    hook_msg *m = ud;
    if (which == HS_TXN_LINE) {
        /* a request hook's own request; in the others, the client's request (none
         * to be had: empty, never an earlier hook's) */
        t->method.len = t->uri.len = 0;
        if (m->b[HS_REQ]) request_in(t, m->b[HS_REQ], m->h[HS_REQ]);
        else if (TSHttpTxnClientReqGet(m->txnp, &m->line_b, &m->line_h) == TS_SUCCESS)
            request_in(t, m->line_b, m->line_h);
        else
            m->line_b = NULL;
        return;
    }
    if (m->b[which]) headers_in(t, which, m->b[which], m->h[which]);
    else hs_txn_set_headers(t, which, "", 0);
}

/* One field read without copying the message in: Traffic Server's first field of
 * the name (its value stays in Traffic Server's heap while the handler pushes it). */
static int lookup_header(hs_txn *t, int which, const char *name, size_t nl, void *ud, const char **v,
                         size_t *vl) {
    (void)t;
    hook_msg *m = ud;
    TSMBuffer b = m->b[which];
    if (!b) return 0;
    TSMLoc f = TSMimeHdrFieldFind(b, m->h[which], name, (int)nl);
    if (!f) return 0;
    int len = 0;
    const char *value = TSMimeHdrFieldValueStringGet(b, m->h[which], f, -1, &len);
    TSHandleMLocRelease(b, m->h[which], f);
    if (!value || len < 0) value = "", len = 0;
    if (!hs_valid_field_value(value, (size_t)len)) return -1; /* as a fetch would drop it */
    *v = value;
    *vl = (size_t)len;
    return 1;
}

static void destroy_named(TSMBuffer b, TSMLoc h, const char *name, size_t nl, TSMLoc from) {
    TSMLoc f = from ? from : TSMimeHdrFieldFind(b, h, name, (int)nl);
    while (f) {
        TSMLoc dup = TSMimeHdrFieldNextDup(b, h, f);
        TSMimeHdrFieldDestroy(b, h, f);
        TSHandleMLocRelease(b, h, f);
        f = dup;
    }
}

/* The edits a handler made without reading the headers (hs_txn.journal), straight
 * into Traffic Server's message: a set field is one lookup and a write. */
static void apply_journal(hs_txn *t, int which, TSMBuffer b, TSMLoc h) {
    char op;
    const char *name, *v;
    size_t nl, vl, off = 0;
    while (hs_journal_next(&t->journal[which], &off, &op, &name, &nl, &v, &vl)) {
        if (op == 'a') {
            append_field(b, h, name, nl, v, vl);
        } else if (op == 'r') {
            destroy_named(b, h, name, nl, NULL);
        } else { /* 's': the first field of the name takes the value, the others go */
            TSMLoc f = TSMimeHdrFieldFind(b, h, name, (int)nl);
            if (!f) {
                append_field(b, h, name, nl, v, vl);
                continue;
            }
            TSMimeHdrFieldValueStringSet(b, h, f, -1, v, (int)vl);
            destroy_named(b, h, name, nl, TSMimeHdrFieldNextDup(b, h, f));
            TSHandleMLocRelease(b, h, f);
        }
    }
}

static void response_out(hs_txn *t, unsigned changed, TSMBuffer b, TSMLoc h) {
    if (changed & HS_CH_STATUS) {
        TSHttpStatus st = (TSHttpStatus)hs_txn_status(t);
        TSHttpHdrStatusSet(b, h, st);
        const char *reason = TSHttpHdrReasonLookup(st);
        if (reason) TSHttpHdrReasonSet(b, h, reason, (int)strlen(reason));
    }
    if (changed & HS_CH_RESP_HEADERS) headers_write(t, HS_RESP, b, h);
}

/* ---- a body a handler set: a response transform that sends it instead ---- */

typedef struct body_transform {
    char *body; /* the handler's body, owned here: the transaction's data may go first */
    size_t len;
    TSIOBuffer out;
    TSIOBufferReader out_reader;
    TSVIO out_vio;
} body_transform;

static void body_transform_free(body_transform *bt) {
    if (bt->out_reader) TSIOBufferReaderFree(bt->out_reader);
    if (bt->out) TSIOBufferDestroy(bt->out);
    free(bt->body);
    free(bt);
}

/* Writes the handler's body to the client side once, and consumes (drops) what the
 * origin or the cache sends until it ends. */
static void body_transform_step(TSCont contp, body_transform *bt) {
    if (!bt->out) {
        bt->out = TSIOBufferCreate();
        bt->out_reader = TSIOBufferReaderAlloc(bt->out);
        if (bt->len) TSIOBufferWrite(bt->out, bt->body, (int64_t)bt->len);
        bt->out_vio = TSVConnWrite(TSTransformOutputVConnGet(contp), contp, bt->out_reader, (int64_t)bt->len);
    }
    TSVIO in = TSVConnWriteVIOGet(contp);
    if (!TSVIOBufferGet(in)) { /* the writer is gone: what we have is all */
        TSVIOReenable(bt->out_vio);
        return;
    }
    int64_t todo = TSVIONTodoGet(in);
    if (todo > 0) {
        TSIOBufferReader r = TSVIOReaderGet(in);
        int64_t avail = TSIOBufferReaderAvail(r);
        if (todo > avail) todo = avail;
        if (todo > 0) {
            TSIOBufferReaderConsume(r, todo);
            TSVIONDoneSet(in, TSVIONDoneGet(in) + todo);
        }
    }
    if (TSVIONTodoGet(in) > 0) {
        if (todo > 0) TSContCall(TSVIOContGet(in), TS_EVENT_VCONN_WRITE_READY, in);
    } else {
        TSVIOReenable(bt->out_vio);
        TSContCall(TSVIOContGet(in), TS_EVENT_VCONN_WRITE_COMPLETE, in);
    }
}

static int on_body_transform(TSCont contp, TSEvent event, void *edata) {
    (void)edata;
    body_transform *bt = TSContDataGet(contp);
    if (TSVConnClosedGet(contp)) {
        body_transform_free(bt);
        TSContDestroy(contp);
        return 0;
    }
    switch (event) {
    case TS_EVENT_ERROR: {
        TSVIO in = TSVConnWriteVIOGet(contp);
        TSContCall(TSVIOContGet(in), TS_EVENT_ERROR, in);
        break;
    }
    case TS_EVENT_VCONN_WRITE_COMPLETE: /* the client side has the whole body */
        TSVConnShutdown(TSTransformOutputVConnGet(contp), 0, 1);
        break;
    default: /* TS_EVENT_IMMEDIATE, TS_EVENT_VCONN_WRITE_READY */
        body_transform_step(contp, bt);
        break;
    }
    return 0;
}

/* read_response set txn.resp.body: the client gets it instead of the origin's (and the
 * cache keeps it, as the reference proxy keeps what read_response left). */
static void replace_body(TSHttpTxn txnp, hs_txn *t) {
    /* a response to HEAD, and a 1xx, 204 or 304, has no body: one written after it
     * would be read as the start of the next response on the connection */
    size_t ml = 0;
    hs_txn_need_line(t); /* the client's request line, as txn.req shows it here */
    const char *method = hs_txn_get(t, HS_F_METHOD, &ml);
    int status = hs_txn_status(t);
    if ((ml == 4 && !memcmp(method, "HEAD", 4)) || status < 200 || status == 204 || status == 304) {
        TSError("[%s] txn.resp.body set in read_response is not sent: a %d response to %.*s has no body",
                PLUGIN, status, (int)ml, method ? method : "");
        return;
    }
    size_t n = 0;
    const char *v = hs_txn_get(t, HS_F_BODY, &n);
    body_transform *bt = calloc(1, sizeof *bt);
    if (!bt || !(bt->body = malloc(n ? n : 1))) {
        free(bt);
        TSError("[%s] out of memory: txn.resp.body not applied", PLUGIN);
        return;
    }
    if (n) memcpy(bt->body, v, n);
    bt->len = n;
    TSVConn conn = TSTransformCreate(on_body_transform, txnp);
    TSContDataSet(conn, bt);
    TSHttpTxnHookAdd(txnp, TS_HTTP_RESPONSE_TRANSFORM_HOOK, conn);
    TSHttpTxnTransformedRespCache(txnp, 1);
    TSHttpTxnUntransformedRespCache(txnp, 0);
}

/* ---- logs and errors ---- */

static void emit_logs(void) {
    size_t len = 0;
    const char *p = hs_logs(host, &len);
    for (size_t off = 0; p && off + 7 <= len;) {
        uint8_t level = (uint8_t)p[off];
        uint16_t sl;
        uint32_t ml;
        memcpy(&sl, p + off + 1, 2);
        const char *script = p + off + 3;
        if (off + 3 + sl + 4 > len) break;
        memcpy(&ml, script + sl, 4);
        const char *msg = script + sl + 4;
        if ((size_t)(msg - p) + ml > len) break;
        if (level >= 40) TSError("[%s] %.*s: %.*s", PLUGIN, (int)sl, script, (int)ml, msg);
        else if (level >= 30) TSWarning("[%s] %.*s: %.*s", PLUGIN, (int)sl, script, (int)ml, msg);
        else if (level >= 20) TSNote("[%s] %.*s: %.*s", PLUGIN, (int)sl, script, (int)ml, msg);
        else TSDebug(PLUGIN, "%.*s: %.*s", (int)sl, script, (int)ml, msg);
        off = (size_t)(msg - p) + ml;
    }
}

static void report_error(void) {
    hs_error e;
    hs_last_error(host, &e);
    TSStatIntIncrement(stat_errors, 1);
    TSError("[%s] %s in %s: %s%s%s", PLUGIN, e.script[0] ? e.script : "?", e.hook[0] ? e.hook : "?",
            e.message, e.traceback[0] ? "\n" : "", e.traceback);
}

/* ---- the hooks ---- */

static uint64_t fnv1a(const char *p, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)p[i]) * 1099511628211ULL;
    return h;
}

/* Transactions stay on their net thread: each keeps a few spent txn_data (and their
 * hs_txn's memory) for the next ones instead of allocating per transaction. */
#define SPARE_MAX 64
static __thread txn_data *spare[SPARE_MAX];
static __thread int nspare;

/* The transaction's txn_data lives in its user arg. Traffic Server 9's TSUserArgGet
 * and TSUserArgSet check the pointer with a dynamic_cast (about 500 instructions
 * each); the TSHttpTxnArg calls they deprecate reach the same slot (same index) with
 * a magic-number check. Traffic Server 10 has only the former. */
#if TS_VERSION_MAJOR < 10
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
static void *txn_arg_get(TSHttpTxn txnp) { return TSHttpTxnArgGet(txnp, txn_arg); }
static void txn_arg_set(TSHttpTxn txnp, void *d) { TSHttpTxnArgSet(txnp, txn_arg, d); }
#pragma GCC diagnostic pop
#else
static void *txn_arg_get(TSHttpTxn txnp) { return TSUserArgGet(txnp, txn_arg); }
static void txn_arg_set(TSHttpTxn txnp, void *d) { TSUserArgSet(txnp, txn_arg, d); }
#endif

static txn_data *txn_of(TSHttpTxn txnp, int create) {
    txn_data *d = txn_arg_get(txnp);
    if (d || !create) return d;
    if (nspare) {
        d = spare[--nspare];
    } else {
        d = calloc(1, sizeof *d);
        if (!d || !(d->t = hs_txn_new())) {
            free(d);
            return NULL;
        }
    }
    txn_arg_set(txnp, d);
    return d;
}

static void txn_done(TSHttpTxn txnp, txn_data *d) {
    txn_arg_set(txnp, NULL);
    free(d->answer_headers);
    if (nspare < SPARE_MAX) {
        hs_txn_reset(d->t);
        hs_txn *t = d->t;
        memset(d, 0, sizeof *d);
        d->t = t;
        spare[nspare++] = d;
        return;
    }
    hs_txn_free(d->t);
    free(d);
}

/* The hooks the program handles: read again only when its generation moved. */
static uint64_t handled_hooks(void) {
    static __thread uint64_t gen = UINT64_MAX, mask;
    uint64_t now = hs_generation(host);
    if (now != gen) {
        mask = hs_hooks_handled(host);
        gen = now;
    }
    return mask;
}

static void answer(TSHttpTxn txnp, txn_data *d) {
    hs_txn *t = d->t;
    size_t n = 0;
    const char *body = hs_txn_get(t, HS_F_BODY, &n);
    d->answered = 1;
    TSHttpTxnStatusSet(txnp, (TSHttpStatus)hs_txn_status(t));
    char *copy = TSmalloc(n + 1);
    memcpy(copy, body ? body : "", n);
    copy[n] = 0;
    TSHttpTxnErrorBodySet(txnp, copy, n, TSstrdup("text/plain"));
    size_t len = 0;
    const char *p = hs_txn_headers(t, HS_RESP, &len);
    if (p && len && (d->answer_headers = malloc(len))) {
        memcpy(d->answer_headers, p, len);
        d->answer_len = len;
        TSHttpTxnHookAdd(txnp, TS_HTTP_SEND_RESPONSE_HDR_HOOK, respond_cont);
    }
}

/* The response of a transaction a handler answered: its headers as the handler set them. */
static int on_responded(TSCont contp, TSEvent event, void *edata) {
    (void)contp;
    (void)event;
    TSHttpTxn txnp = edata;
    txn_data *d = txn_of(txnp, 0);
    TSMBuffer b;
    TSMLoc h;
    if (d && d->answer_headers && TSHttpTxnClientRespGet(txnp, &b, &h) == TS_SUCCESS) {
        size_t off = 0, nl, vl;
        const char *p = d->answer_headers, *name, *value;
        while (next_pair(p, d->answer_len, &off, &name, &nl, &value, &vl)) {
            TSMLoc f = TSMimeHdrFieldFind(b, h, name, (int)nl);
            while (f) { /* the handler's value replaces Traffic Server's */
                TSMLoc dup = TSMimeHdrFieldNextDup(b, h, f);
                TSMimeHdrFieldDestroy(b, h, f);
                TSHandleMLocRelease(b, h, f);
                f = dup;
            }
            if (TSMimeHdrFieldCreateNamed(b, h, name, (int)nl, &f) != TS_SUCCESS) continue;
            TSMimeHdrFieldValueStringSet(b, h, f, -1, value, (int)vl);
            TSMimeHdrFieldAppend(b, h, f);
            TSHandleMLocRelease(b, h, f);
        }
        TSHandleMLocRelease(b, TS_NULL_MLOC, h);
    }
    TSHttpTxnReenable(txnp, TS_EVENT_HTTP_CONTINUE);
    return 0;
}

/* Add the Traffic Server hooks the program handles now and were not added yet (a
 * reload or a class registered at run time may handle more); TXN_CLOSE always, to
 * free the transaction's data. Hooks are never removed: an unhandled one returns
 * at once. */
static void add_hooks(void) {
    uint64_t mask = hs_hooks_handled(host);
    if (!(mask & ~__atomic_load_n(&hooks_added, __ATOMIC_ACQUIRE))) return;
    TSMutexLock(hooks_mu);
    if (mask) mask |= (uint64_t)1 << H_LOG;
    for (int hk = 0; hk < NHOOKS; hk++)
        if (((mask & ~hooks_added) >> hk) & 1) TSHttpHookAdd(hooks[hk].id, hook_cont);
    __atomic_store_n(&hooks_added, hooks_added | mask, __ATOMIC_RELEASE);
    TSMutexUnlock(hooks_mu);
}

static TSReturnCode message_of(TSHttpTxn txnp, int source, TSMBuffer *b, TSMLoc *h) {
    switch (source) {
    case SRC_CLIENT_REQ: return TSHttpTxnClientReqGet(txnp, b, h);
    case SRC_SERVER_REQ: return TSHttpTxnServerReqGet(txnp, b, h);
    case SRC_SERVER_RESP: return TSHttpTxnServerRespGet(txnp, b, h);
    case SRC_CLIENT_RESP: return TSHttpTxnClientRespGet(txnp, b, h);
    case SRC_CACHED_RESP: return TSHttpTxnCachedRespGet(txnp, b, h);
    default: return TS_ERROR;
    }
}

static int on_hook(TSCont contp, TSEvent event, void *edata) {
    (void)contp;
    TSHttpTxn txnp = edata;
    int hook = -1;
    for (int hk = 0; hk < NHOOKS && hook < 0; hk++)
        if (hooks[hk].event == event) hook = hk;
    if (hook < 0) {
        TSHttpTxnReenable(txnp, TS_EVENT_HTTP_CONTINUE);
        return 0;
    }
    const struct hook_def *def = &hooks[hook];
    int handled = (handled_hooks() >> hook) & 1, failed = 0;
    txn_data *d = txn_of(txnp, handled);
    if (d && handled) {
        TSMBuffer b = NULL;
        TSMLoc h = TS_NULL_MLOC;
        int source = def->source;
        hook_msg m = {{NULL, NULL}, {TS_NULL_MLOC, TS_NULL_MLOC}, txnp, NULL, TS_NULL_MLOC};
        if (source == SRC_CLIENT_BOTH) { /* log: what the client sent and got, to look at */
            if (TSHttpTxnClientReqGet(txnp, &m.b[HS_REQ], &m.h[HS_REQ]) != TS_SUCCESS) m.b[HS_REQ] = NULL;
            source = SRC_CLIENT_RESP;
        }
        TSReturnCode got = message_of(txnp, source, &b, &h);
        int request = source == SRC_CLIENT_REQ || source == SRC_SERVER_REQ;
        int which = request ? HS_REQ : HS_RESP;
        if (got == TS_SUCCESS) {
            if (!request) response_in(d->t, b, h);
            m.b[which] = b;
            m.h[which] = h;
        }
        d->t->fetch = fetch_headers; /* headers and request line copied in only if a */
        d->t->lookup = lookup_header; /* handler lists them; one field read in place */
        d->t->fetch_ud = &m;
        d->t->unfetched = (m.b[HS_REQ] ? 1u << HS_REQ : 0) | (m.b[HS_RESP] ? 1u << HS_RESP : 0) |
                          (source != SRC_NONE ? 1u << HS_TXN_LINE : 0);
        int r = hs_fire(host, hook, d->t);
        int fetched = !(d->t->unfetched & (1u << which));
        TSStatIntIncrement(stat_fires, 1);
        unsigned changed = (unsigned)r >> 2;
        if (changed & HS_CH_LOGS) emit_logs();
        if (changed & HS_CH_PROGRAM) add_hooks();
        if ((r & 3) == HS_ERROR) {
            report_error();
            if (fail_closed && hook != H_LOG && hook != H_SEND_RESPONSE && !d->answered) {
                /* --fail-closed: the client gets a 500, not what the handler would have
                 * stopped (the response to the client is already made in send_response) */
                static const char why[] = "hostscript: a handler failed\n";
                TSHttpTxnStatusSet(txnp, TS_HTTP_STATUS_INTERNAL_SERVER_ERROR);
                TSHttpTxnErrorBodySet(txnp, TSstrdup(why), sizeof why - 1, TSstrdup("text/plain"));
                failed = 1;
            }
        } else if (got == TS_SUCCESS && def->source != SRC_CACHED_RESP && hook != H_LOG) {
            /* (the cache's copy, and a transaction that is over, are read only) */
            unsigned hdrs = request ? HS_CH_REQ_HEADERS : HS_CH_RESP_HEADERS;
            if (request) request_out(d->t, changed & ~hdrs, b, h);
            else response_out(d->t, changed & ~hdrs, b, h);
            if ((changed & HS_CH_BODY) && hook == H_READ_RESPONSE) replace_body(txnp, d->t);
            else if ((changed & HS_CH_BODY) && hook == H_SEND_RESPONSE)
                TSError("[%s] txn.resp.body set in send_response is not sent: set it in read_response", PLUGIN);
            if (!fetched) apply_journal(d->t, which, b, h);
            else if (changed & hdrs) headers_write(d->t, which, b, h);
        }
        d->t->fetch = NULL;
        d->t->lookup = NULL;
        d->t->unfetched = 0;
        d->t->journal[0].len = d->t->journal[1].len = 0;
        if (source != def->source && m.b[HS_REQ]) TSHandleMLocRelease(m.b[HS_REQ], TS_NULL_MLOC, m.h[HS_REQ]);
        if (m.line_b) TSHandleMLocRelease(m.line_b, TS_NULL_MLOC, m.line_h);
        if ((changed & HS_CH_CACHE_KEY) && (r & 3) != HS_ERROR) {
            size_t n = 0;
            const char *k = hs_txn_get(d->t, HS_F_CACHE_KEY, &n);
            uint64_t gen = n ? (fnv1a(k, n) & INT64_MAX) | 1 : 0;
            if (def->early) { /* before the lookup: the key of both the lookup and the store */
                d->generation = gen;
                TSHttpTxnConfigIntSet(txnp, TS_CONFIG_HTTP_CACHE_GENERATION, (TSMgmtInt)gen);
            } else if (gen != d->generation) {
                /* Traffic Server stores under the key it looked up: a response the handler
                 * keys otherwise (read_response) would be found by the wrong requests */
                TSHttpTxnServerRespNoStoreSet(txnp, 1);
                TSDebug(PLUGIN, "response not stored: keyed after the lookup");
            }
        }
        if (def->early && (r & 3) != HS_ERROR) {
            if ((r & 3) == HS_DONE && hs_txn_status(d->t) >= 100 && !d->answered) answer(txnp, d);
        }
        if (got == TS_SUCCESS) TSHandleMLocRelease(b, TS_NULL_MLOC, h);
    }
    if (hook == H_LOG && d) txn_done(txnp, d);
    TSHttpTxnReenable(txnp, failed ? TS_EVENT_HTTP_ERROR : TS_EVENT_HTTP_CONTINUE);
    return 0;
}

/* ---- scripts: loading, reloading ---- */

typedef struct script_file {
    char path[4096];
    time_t mtime;
} script_file;

static script_file *files;
static int nfiles;

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 8192, n = 0;
    char *p = malloc(cap);
    size_t got;
    while (p && (got = fread(p + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            char *q = realloc(p, cap *= 2);
            if (!q) free(p);
            p = q;
        }
    }
    fclose(f);
    *len = n;
    return p;
}

/* Load (or reload) one script; a failure keeps the version that runs (hs_load
 * publishes nothing then) and says why. */
static int load_script(script_file *sf, const char *why) { /* why: "loaded", "reloaded" */
    struct stat st;
    if (stat(sf->path, &st) == 0) sf->mtime = st.st_mtime;
    size_t len = 0;
    char *src = read_file(sf->path, &len);
    if (!src) {
        TSError("[%s] cannot read %s", PLUGIN, sf->path);
        return -1;
    }
    hs_error err;
    int rc = hs_load(host, sf->path, src, len, &err);
    free(src);
    if (rc != 0) {
        TSError("[%s] %s %s failed%s: %s", PLUGIN, strcmp(why, "loaded") ? "reloading" : "loading", sf->path,
                strcmp(why, "loaded") ? ", keeping the running version" : "", err.message);
        return -1;
    }
    TSNote("[%s] %s %s (%s)", PLUGIN, why, sf->path, hs_engine());
    return 0;
}

static void reload(int only_changed) {
    for (int i = 0; i < nfiles; i++) {
        struct stat st;
        if (only_changed && (stat(files[i].path, &st) != 0 || st.st_mtime == files[i].mtime)) continue;
        load_script(&files[i], "reloaded");
    }
    add_hooks();
}

/* `traffic_ctl plugin msg hostscript reload` */
static int on_message(TSCont contp, TSEvent event, void *edata) {
    (void)contp;
    if (event != TS_EVENT_LIFECYCLE_MSG) return 0;
    const TSPluginMsg *m = edata;
    if (m && m->tag && !strcmp(m->tag, PLUGIN) && m->data_size >= 6 && !memcmp(m->data, "reload", 6))
        reload(0);
    return 0;
}

static int on_watch(TSCont contp, TSEvent event, void *edata) {
    (void)contp;
    (void)event;
    (void)edata;
    reload(1);
    return 0;
}

static TSHRTime watch_ms;

/* Scheduling on the task pool before its threads exist may be lost: start from here. */
static int start_watch(TSCont contp, TSEvent event, void *edata) {
    (void)contp;
    (void)event;
    (void)edata;
    TSContScheduleEveryOnPool(TSContCreate(on_watch, TSMutexCreate()), watch_ms, TS_THREAD_POOL_TASK);
    return 0;
}

/* ---- start-up ---- */

static int parse_size(const char *s, size_t *out) {
    char *end;
    double v = strtod(s, &end);
    if (end == s || v < 0) return -1;
    switch (*end) {
    case 'k': case 'K': v *= 1024, end++; break;
    case 'm': case 'M': v *= 1024 * 1024, end++; break;
    case 'g': case 'G': v *= 1024.0 * 1024 * 1024, end++; break;
    default: break;
    }
    if (*end) return -1;
    *out = (size_t)v;
    return 0;
}

EXPORT void TSPluginInit(int argc, const char *argv[]) {
    TSPluginRegistrationInfo info = {PLUGIN, "hostscript", "hostscript@localhost"};
    if (TSPluginRegister(&info) != TS_SUCCESS) {
        TSError("[%s] plugin registration failed", PLUGIN);
        return;
    }
    static const char *hook_names[NHOOKS];
    for (int hk = 0; hk < NHOOKS; hk++) hook_names[hk] = hooks[hk].name;
    hs_config cfg = {0};
    cfg.hooks = hook_names;
    cfg.nhooks = NHOOKS;
    double watch = 0;
    cfg.sandbox = 1;
    cfg.state_pool = 0;
    hs_shared_spec shared[16];
    char *shared_names[16];
    int nshared = 0;
    const char *scripts[64];
    int nscripts = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--time-limit") && i + 1 < argc) {
            cfg.time_limit = atof(argv[++i]);
        } else if (!strcmp(a, "--fail-closed")) {
            fail_closed = 1;
        } else if (!strcmp(a, "--watch") && i + 1 < argc) {
            watch = atof(argv[++i]);
        } else if (!strcmp(a, "--memory-limit") && i + 1 < argc) {
            if (parse_size(argv[++i], &cfg.memory_limit) != 0) {
                TSError("[%s] --memory-limit: not a size: %s", PLUGIN, argv[i]);
                return;
            }
        } else if (!strcmp(a, "--shared") && i + 1 < argc) {
            const char *spec = argv[++i], *eq = strchr(spec, '=');
            if (!eq || nshared == 16) {
                TSError("[%s] --shared NAME=SIZE, not %s", PLUGIN, spec);
                return;
            }
            shared_names[nshared] = TSstrndup(spec, eq - spec);
            memset(&shared[nshared], 0, sizeof shared[nshared]);
            shared[nshared].name = shared_names[nshared];
            if (!strncmp(eq + 1, "redis://", 8)) shared[nshared].url = eq + 1;
            else if (parse_size(eq + 1, &shared[nshared].capacity) != 0) {
                TSError("[%s] --shared %s: not a size or a redis:// URL", PLUGIN, spec);
                return;
            }
            nshared++;
        } else if (a[0] == '-' && a[1] == '-') {
            TSError("[%s] unknown option %s", PLUGIN, a);
            return;
        } else if (nscripts < 64) {
            scripts[nscripts++] = a;
        }
    }
    cfg.shared = shared;
    cfg.nshared = nshared;
    hs_error err;
    host = hs_host_new(&cfg, &err);
    if (!host) {
        TSError("[%s] %s", PLUGIN, err.message);
        return;
    }
    files = calloc(nscripts ? nscripts : 1, sizeof *files);
    for (int i = 0; files && i < nscripts; i++) {
        if (scripts[i][0] == '/') snprintf(files[i].path, sizeof files[i].path, "%s", scripts[i]);
        else snprintf(files[i].path, sizeof files[i].path, "%s/%s", TSConfigDirGet(), scripts[i]);
        load_script(&files[i], "loaded");
        nfiles++;
    }
    if (TSUserArgIndexReserve(TS_USER_ARGS_TXN, PLUGIN, "hostscript transaction", &txn_arg) != TS_SUCCESS) {
        TSError("[%s] no transaction argument slot", PLUGIN);
        return;
    }
    stat_fires = TSStatCreate("plugin.hostscript.fires", TS_RECORDDATATYPE_INT, TS_STAT_NON_PERSISTENT,
                              TS_STAT_SYNC_SUM);
    stat_errors = TSStatCreate("plugin.hostscript.errors", TS_RECORDDATATYPE_INT, TS_STAT_NON_PERSISTENT,
                               TS_STAT_SYNC_SUM);
    hooks_mu = TSMutexCreate();
    hook_cont = TSContCreate(on_hook, NULL);
    respond_cont = TSContCreate(on_responded, NULL);
    add_hooks();
    TSLifecycleHookAdd(TS_LIFECYCLE_MSG_HOOK, TSContCreate(on_message, NULL));
    if (watch > 0) { /* poll the scripts' modification times, once the task threads run */
        watch_ms = (TSHRTime)(watch * 1000);
        TSLifecycleHookAdd(TS_LIFECYCLE_TASK_THREADS_READY_HOOK, TSContCreate(start_watch, NULL));
    }
}
