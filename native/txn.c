/*
 * txn.c — the transaction: one request's method, uri, headers, response and ctx,
 * owned by the host (not by any Lua state), so consecutive hooks of a request may
 * fire on different threads.
 *
 * Headers are a case-insensitive multi-map kept as an array of (name, value)
 * offsets into one arena: a host hands them over as a single packed buffer
 * ("name\0value\0..."), Lua looks them up lazily on access, and a host reads
 * changes back in one packed buffer. Replaced values leave garbage in the arena,
 * reclaimed by compaction once it outweighs the live bytes.
 */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core.h"

/* ---- byte buffers ---- */

int hs_buf_reserve(hs_buf *b, size_t extra) {
    if (b->len + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + extra) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

int hs_buf_put(hs_buf *b, const void *p, size_t n) {
    if (hs_buf_reserve(b, n)) return -1;
    if (n) memcpy(b->p + b->len, p, n);
    b->len += n;
    return 0;
}

int hs_buf_writer(lua_State *L, const void *p, size_t sz, void *ud) {
    (void)L;
    return hs_buf_put(ud, p, sz);
}

void hs_buf_free(hs_buf *b) {
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* ---- header validation (RFC 9110 field names are tokens; values have no CR/LF/NUL) ---- */

int hs_hdr_valid_name(const char *p, size_t n) {
    static const char *extra = "!#$%&'*+-.^_`|~";
    if (n == 0 || n > UINT32_MAX / 2) return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              strchr(extra, c)) || c == 0)
            return 0;
    }
    return 1;
}

int hs_hdr_valid_value(const char *p, size_t n) {
    if (n > UINT32_MAX / 2) return 0;
    for (size_t i = 0; i < n; i++)
        if (p[i] == '\r' || p[i] == '\n' || p[i] == '\0') return 0;
    return 1;
}

/* ---- header multi-map ---- */

static void hdrs_clear(hs_hdrs *hs) {
    hs->arena.len = 0;
    hs->n = 0;
    hs->garbage = 0;
}

static void hdrs_free(hs_hdrs *hs) {
    hs_buf_free(&hs->arena);
    free(hs->e);
}

static int hdrs_grow(hs_hdrs *hs) {
    if (hs->n < hs->cap) return 0;
    size_t cap = hs->cap ? hs->cap * 2 : 16;
    hs_hdr *e = realloc(hs->e, cap * sizeof *e);
    if (!e) return -1;
    hs->e = e;
    hs->cap = cap;
    return 0;
}

static void hdrs_compact(hs_hdrs *hs) {
    if (hs->garbage < 4096 || hs->garbage < hs->arena.len / 2) return;
    hs_buf nb = {0};
    if (hs_buf_reserve(&nb, hs->arena.len - hs->garbage)) return;
    for (size_t i = 0; i < hs->n; i++) {
        hs_hdr *h = &hs->e[i];
        uint32_t noff = (uint32_t)nb.len;
        hs_buf_put(&nb, hs->arena.p + h->noff, h->nlen);
        uint32_t voff = (uint32_t)nb.len;
        hs_buf_put(&nb, hs->arena.p + h->voff, h->vlen);
        h->noff = noff;
        h->voff = voff;
    }
    hs_buf_free(&hs->arena);
    hs->arena = nb;
    hs->garbage = 0;
}

long hs_hdrs_find(const hs_hdrs *hs, const char *name, size_t nlen, size_t from) {
    for (size_t i = from; i < hs->n; i++)
        if (hs->e[i].nlen == nlen && !strncasecmp(hs->arena.p + hs->e[i].noff, name, nlen))
            return (long)i;
    return -1;
}

static int arena_put(hs_hdrs *hs, const char *p, size_t n, uint32_t *off) {
    *off = (uint32_t)hs->arena.len;
    return hs_buf_put(&hs->arena, p, n);
}

int hs_hdrs_add(hs_hdrs *hs, const char *name, size_t nlen, const char *v, size_t vlen) {
    hs_hdr h = {0, (uint32_t)nlen, 0, (uint32_t)vlen};
    if (hdrs_grow(hs) || arena_put(hs, name, nlen, &h.noff) || arena_put(hs, v, vlen, &h.voff))
        return -1;
    hs->e[hs->n++] = h;
    return 0;
}

static void hdrs_delete_from(hs_hdrs *hs, const char *name, size_t nlen, size_t from) {
    size_t j = from;
    for (size_t i = from; i < hs->n; i++) {
        hs_hdr *h = &hs->e[i];
        if (h->nlen == nlen && !strncasecmp(hs->arena.p + h->noff, name, nlen)) {
            hs->garbage += h->nlen + h->vlen;
            continue;
        }
        hs->e[j++] = *h;
    }
    hs->n = j;
}

int hs_hdrs_set(hs_hdrs *hs, const char *name, size_t nlen, const char *v, size_t vlen) {
    long i = hs_hdrs_find(hs, name, nlen, 0);
    if (i < 0) return hs_hdrs_add(hs, name, nlen, v, vlen);
    /* replace the first in place (keeps header order), drop the others */
    uint32_t voff;
    if (arena_put(hs, v, vlen, &voff)) return -1;
    hs->garbage += hs->e[i].vlen;
    hs->e[i].voff = voff;
    hs->e[i].vlen = (uint32_t)vlen;
    hdrs_delete_from(hs, name, nlen, (size_t)i + 1);
    hdrs_compact(hs);
    return 0;
}

void hs_hdrs_remove(hs_hdrs *hs, const char *name, size_t nlen) {
    hdrs_delete_from(hs, name, nlen, 0);
    hdrs_compact(hs);
}

/* ---- the public transaction API ---- */

hs_txn *hs_txn_new(void) { return calloc(1, sizeof(hs_txn)); }

void hs_txn_free(hs_txn *t) {
    if (!t) return;
    hs_buf_free(&t->method);
    hs_buf_free(&t->uri);
    hs_buf_free(&t->body);
    hs_buf_free(&t->ctx);
    hs_buf_free(&t->pack);
    hdrs_free(&t->hdr[0]);
    hdrs_free(&t->hdr[1]);
    free(t);
}

static hs_buf *field(hs_txn *t, int f) {
    switch (f) {
    case HS_F_METHOD: return &t->method;
    case HS_F_URI: return &t->uri;
    case HS_F_BODY: return &t->body;
    default: return NULL;
    }
}

int hs_txn_set(hs_txn *t, int f, const char *v, size_t len) {
    hs_buf *b = field(t, f);
    if (!b) return -1;
    b->len = 0;
    return hs_buf_put(b, v, len);
}

const char *hs_txn_get(const hs_txn *t, int f, size_t *len) {
    const hs_buf *b = field((hs_txn *)t, f);
    *len = b ? b->len : 0;
    return b && b->p ? b->p : "";
}

void hs_txn_set_status(hs_txn *t, int status) { t->status = status; }
int hs_txn_status(const hs_txn *t) { return t->status; }

int hs_txn_set_headers(hs_txn *t, int which, const char *packed, size_t len) {
    if (which != HS_REQ && which != HS_RESP) return -1;
    hs_hdrs *hs = &t->hdr[which];
    hdrs_clear(hs);
    if (len == 0) return 0;
    if (hs_buf_put(&hs->arena, packed, len)) return -1;
    const char *base = hs->arena.p, *p = base, *end = base + len;
    while (p < end) {
        const char *name = p, *nz = memchr(p, 0, (size_t)(end - p));
        if (!nz) goto bad;
        const char *val = nz + 1;
        const char *vz = val < end ? memchr(val, 0, (size_t)(end - val)) : NULL;
        const char *vend = vz ? vz : end;
        if (hdrs_grow(hs)) goto bad;
        hs_hdr h = {(uint32_t)(name - base), (uint32_t)(nz - name), (uint32_t)(val - base),
                    (uint32_t)(vend - val)};
        hs->e[hs->n++] = h;
        p = vend + 1;
    }
    return 0;
bad:
    hdrs_clear(hs);
    return -1;
}

const char *hs_txn_headers(hs_txn *t, int which, size_t *len) {
    hs_hdrs *hs = &t->hdr[which & 1];
    t->pack.len = 0;
    for (size_t i = 0; i < hs->n; i++) {
        if (i) hs_buf_put(&t->pack, "", 1);
        hs_buf_put(&t->pack, hs->arena.p + hs->e[i].noff, hs->e[i].nlen);
        hs_buf_put(&t->pack, "", 1);
        hs_buf_put(&t->pack, hs->arena.p + hs->e[i].voff, hs->e[i].vlen);
    }
    *len = t->pack.len;
    return t->pack.p ? t->pack.p : "";
}

int hs_txn_add_header(hs_txn *t, int which, const char *name, const char *value) {
    size_t nlen = strlen(name), vlen = strlen(value);
    if ((which != HS_REQ && which != HS_RESP) || !hs_hdr_valid_name(name, nlen) ||
        !hs_hdr_valid_value(value, vlen))
        return -1;
    return hs_hdrs_add(&t->hdr[which], name, nlen, value, vlen);
}

const char *hs_txn_header(const hs_txn *t, int which, const char *name, size_t *len) {
    const hs_hdrs *hs = &t->hdr[which & 1];
    long i = hs_hdrs_find(hs, name, strlen(name), 0);
    if (i < 0) return NULL;
    *len = hs->e[i].vlen;
    return hs->arena.p + hs->e[i].voff;
}

const char *hs_txn_ctx(const hs_txn *t, size_t *len) {
    *len = t->ctx.len;
    return t->ctx.p;
}

int hs_txn_set_ctx(hs_txn *t, const char *data, size_t len) {
    t->ctx.len = 0;
    return hs_buf_put(&t->ctx, data, len);
}

int hs_txn_load(hs_txn *t, unsigned what, const char *method, size_t mlen, const char *uri,
                size_t ulen, int status, const char *body, size_t blen, const char *req,
                size_t reqlen, const char *resp, size_t resplen, const char *ctx, size_t ctxlen) {
    int rc = 0;
    if (what & HS_CH_METHOD) rc |= hs_txn_set(t, HS_F_METHOD, method, mlen);
    if (what & HS_CH_URI) rc |= hs_txn_set(t, HS_F_URI, uri, ulen);
    if (what & HS_CH_STATUS) t->status = status;
    if (what & HS_CH_BODY) rc |= hs_txn_set(t, HS_F_BODY, body, blen);
    if (what & HS_CH_REQ_HEADERS) rc |= hs_txn_set_headers(t, HS_REQ, req, reqlen);
    if (what & HS_CH_RESP_HEADERS) rc |= hs_txn_set_headers(t, HS_RESP, resp, resplen);
    if (what & HS_CH_CTX) rc |= hs_txn_set_ctx(t, ctx, ctxlen);
    return rc ? -1 : 0;
}

const char *hs_txn_field(hs_txn *t, int field, size_t *len) {
    switch (field) {
    case HS_T_METHOD: return hs_txn_get(t, HS_F_METHOD, len);
    case HS_T_URI: return hs_txn_get(t, HS_F_URI, len);
    case HS_T_BODY: return hs_txn_get(t, HS_F_BODY, len);
    case HS_T_REQ_HEADERS: return hs_txn_headers(t, HS_REQ, len);
    case HS_T_RESP_HEADERS: return hs_txn_headers(t, HS_RESP, len);
    case HS_T_CTX: *len = t->ctx.len; return t->ctx.p ? t->ctx.p : "";
    default: *len = 0; return "";
    }
}
