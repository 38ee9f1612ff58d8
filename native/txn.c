/*
 * txn.c — the transaction: one request's method, URI, headers, response and ctx.
 * Owned by the host program (a C server, or the Python binding), never by a Lua
 * state, so the hooks of one request may fire on different threads and engines.
 *
 * Storage and validation live in txn.h; this file implements them and the public
 * hs_txn_* calls of hostscript.h. Headers are kept as (name, value) offsets into
 * one arena per direction (txn.h), looked up case-insensitively on access — no
 * hashing, since a request has tens of fields, not thousands.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "txn.h"

/* ---- validation (RFC 9110: names and methods are tokens) ---- */

static const unsigned char tchar[256] = {
    ['!'] = 1, ['#'] = 1, ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1, ['*'] = 1, ['+'] = 1,
    ['-'] = 1, ['.'] = 1, ['^'] = 1, ['_'] = 1, ['`'] = 1, ['|'] = 1, ['~'] = 1,
    ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1, ['7'] = 1,
    ['8'] = 1, ['9'] = 1,
    ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1, ['F'] = 1, ['G'] = 1, ['H'] = 1,
    ['I'] = 1, ['J'] = 1, ['K'] = 1, ['L'] = 1, ['M'] = 1, ['N'] = 1, ['O'] = 1, ['P'] = 1,
    ['Q'] = 1, ['R'] = 1, ['S'] = 1, ['T'] = 1, ['U'] = 1, ['V'] = 1, ['W'] = 1, ['X'] = 1,
    ['Y'] = 1, ['Z'] = 1,
    ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1, ['e'] = 1, ['f'] = 1, ['g'] = 1, ['h'] = 1,
    ['i'] = 1, ['j'] = 1, ['k'] = 1, ['l'] = 1, ['m'] = 1, ['n'] = 1, ['o'] = 1, ['p'] = 1,
    ['q'] = 1, ['r'] = 1, ['s'] = 1, ['t'] = 1, ['u'] = 1, ['v'] = 1, ['w'] = 1, ['x'] = 1,
    ['y'] = 1, ['z'] = 1,
};

int hs_valid_token(const char *p, size_t n) {
    if (n == 0) return 0;
    for (size_t i = 0; i < n; i++)
        if (!tchar[(unsigned char)p[i]]) return 0;
    return 1;
}

/* RFC 9110 5.5: visible characters, spaces, tabs and obs-text; no other control
 * character (CR, LF and NUL above all: they would end or cut the field). */
int hs_valid_field_value(const char *p, size_t n) {
    /* Eight bytes at a time while none is below 0x20 or is 0x7f (the tests are exact
     * for "some byte is"); a word with one (a tab, maybe) is left to the byte loop. */
    const uint64_t ones = 0x0101010101010101ull, highs = 0x8080808080808080ull;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t x, del;
        memcpy(&x, p + i, 8);
        del = x ^ (ones * 0x7f);
        if (((x - ones * 0x20) & ~x & highs) | ((del - ones) & ~del & highs)) break;
    }
    for (; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if ((c < 0x20 && c != '\t') || c == 0x7f) return 0;
    }
    return 1;
}

/* A request target goes on the request line as is: a space or a control
 * character in it would let a handler write a second request (smuggling). */
int hs_valid_uri(const char *p, size_t n) {
    if (n == 0) return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c <= 0x20 || c == 0x7f) return 0;
    }
    return 1;
}

int hs_valid_status(int status) { return status == 0 || (status >= 100 && status <= 999); }

/* ---- header multi-map ---- */

void hs_hdrs_clear(hs_hdrs *hs) {
    hs->arena.len = 0;
    hs->n = 0;
    hs->garbage = 0;
}

void hs_hdrs_free(hs_hdrs *hs) {
    hs_buf_free(&hs->arena);
    free(hs->e);
    hs->e = NULL;
    hs->n = hs->cap = hs->garbage = 0;
}

void hs_hdrs_move(hs_hdrs *dst, hs_hdrs *src) {
    hs_hdrs_free(dst);
    *dst = *src;
    memset(src, 0, sizeof *src);
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
    if (hs_buf_reserve(&nb, hs->arena.len - hs->garbage)) return; /* keep the garbage */
    for (size_t i = 0; i < hs->n; i++) {
        hs_hdr *h = &hs->e[i];
        size_t noff = nb.len;
        hs_buf_put(&nb, hs->arena.p + h->noff, h->nlen); /* reserved: cannot fail */
        size_t voff = nb.len;
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
        if (hs->e[i].nlen == nlen && hs_name_eq(hs->arena.p + hs->e[i].noff, name, nlen))
            return (long)i;
    return -1;
}

int hs_hdrs_add(hs_hdrs *hs, const char *name, size_t nlen, const char *v, size_t vlen) {
    if (hdrs_grow(hs) || hs_buf_reserve(&hs->arena, nlen + vlen)) return -1;
    hs_hdr h = {hs->arena.len, nlen, hs->arena.len + nlen, vlen};
    hs_buf_put(&hs->arena, name, nlen); /* reserved above */
    hs_buf_put(&hs->arena, v, vlen);
    hs->e[hs->n++] = h;
    return 0;
}

int hs_hdrs_add_checked(hs_hdrs *hs, const char *name, size_t nlen, const char *v, size_t vlen) {
    if (!hs_valid_token(name, nlen)) return HS_TXN_BAD_NAME;
    if (!hs_valid_field_value(v, vlen)) return HS_TXN_BAD_VALUE;
    return hs_hdrs_add(hs, name, nlen, v, vlen) ? HS_TXN_NOMEM : HS_TXN_OK;
}

static void hdrs_delete_from(hs_hdrs *hs, const char *name, size_t nlen, size_t from) {
    size_t j = from;
    for (size_t i = from; i < hs->n; i++) {
        hs_hdr *h = &hs->e[i];
        if (h->nlen == nlen && hs_name_eq(hs->arena.p + h->noff, name, nlen)) {
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
    if (hs_buf_reserve(&hs->arena, vlen)) return -1;
    size_t voff = hs->arena.len;
    hs_buf_put(&hs->arena, v, vlen);
    hs->garbage += hs->e[i].vlen;
    hs->e[i].voff = voff;
    hs->e[i].vlen = vlen;
    hdrs_delete_from(hs, name, nlen, (size_t)i + 1);
    hdrs_compact(hs);
    return 0;
}

void hs_hdrs_remove(hs_hdrs *hs, const char *name, size_t nlen) {
    hdrs_delete_from(hs, name, nlen, 0);
    hdrs_compact(hs);
}

static int refuse(char *why, size_t whylen, size_t line, const char *what) {
    if (why) snprintf(why, whylen, "header block line %zu: %s", line, what);
    return -1;
}

int hs_hdrs_parse(hs_hdrs *hs, const char *block, size_t len, char *why, size_t whylen) {
    hs_hdrs out = {0};
    const char *p = block, *end = block + len;
    size_t line = 0;
    while (p < end) {
        line++;
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *eol = nl ? nl : end, *next = nl ? nl + 1 : end;
        if (eol > p && eol[-1] == '\r') eol--;
        if (eol == p) { /* the empty line ends the block */
            if (next != end) goto trailing;
            break;
        }
        if (*p == ' ' || *p == '\t') {
            hs_hdrs_free(&out);
            return refuse(why, whylen, line, "obsolete line folding (a line starting with "
                                             "whitespace) is not accepted");
        }
        const char *colon = memchr(p, ':', (size_t)(eol - p));
        if (!colon) {
            hs_hdrs_free(&out);
            return refuse(why, whylen, line, "no ':' after the field name");
        }
        const char *v = colon + 1, *vend = eol;
        while (v < vend && (*v == ' ' || *v == '\t')) v++;
        while (vend > v && (vend[-1] == ' ' || vend[-1] == '\t')) vend--;
        int rc = hs_hdrs_add_checked(&out, p, (size_t)(colon - p), v, (size_t)(vend - v));
        if (rc != HS_TXN_OK) {
            hs_hdrs_free(&out);
            return refuse(why, whylen, line,
                          rc == HS_TXN_BAD_NAME    ? "invalid field name (not a token)"
                          : rc == HS_TXN_BAD_VALUE ? "invalid field value (a control character)"
                                                   : "out of memory");
        }
        p = next;
    }
    hs_hdrs_move(hs, &out);
    return 0;
trailing:
    hs_hdrs_free(&out);
    return refuse(why, whylen, line, "data after the empty line that ends the header block");
}

/* ---- the public transaction API (hostscript.h) ---- */

hs_txn *hs_txn_new(void) { return calloc(1, sizeof(hs_txn)); }

int hs_txn_journal(hs_txn *t, int which, char op, const char *name, size_t nlen, const char *v, size_t vlen) {
    hs_buf *j = &t->journal[which & 1];
    /* the records are NUL-separated: a NUL in the name or value would be read back as
     * other records. Callers validate names and values (as for hs_hdrs_add); this keeps
     * the records whole whatever they pass. */
    if (memchr(name, 0, nlen) || (vlen && memchr(v, 0, vlen))) return -2;
    if (nlen > SIZE_MAX - 3 - vlen || hs_buf_reserve(j, nlen + vlen + 3)) return -1;
    char *p = j->p + j->len; /* op name NUL value NUL, in one piece */
    *p++ = op;
    memcpy(p, name, nlen);
    p[nlen] = 0;
    p += nlen + 1;
    if (vlen) memcpy(p, v, vlen);
    p[vlen] = 0;
    j->len += nlen + vlen + 3;
    return 0;
}

int hs_txn_peek(hs_txn *t, int which, const char *name, size_t nlen, const char **v, size_t *vlen) {
    which &= 1;
    if (!t->lookup) return -1;
    /* The journal's records of NAME, in order: 's' leaves one field of its value, 'r'
     * none, 'a' one more after those there were. What the host holds is asked only
     * if the journal leaves it unknown. */
    enum { UNKNOWN, VALUE, ABSENT } state = UNKNOWN;
    const char *val = NULL, *added = NULL, *jn, *jv;
    size_t vl = 0, addedl = 0, jnl, jvl, off = 0;
    char op;
    while (hs_journal_next(&t->journal[which], &off, &op, &jn, &jnl, &jv, &jvl)) {
        if (jnl != nlen || !hs_name_eq(jn, name, nlen)) continue;
        if (op == 's') state = VALUE, val = jv, vl = jvl;
        else if (op == 'r') state = ABSENT, added = NULL;
        else if (state == ABSENT) state = VALUE, val = jv, vl = jvl;
        else if (state == UNKNOWN && !added) added = jv, addedl = jvl;
    }
    if (state == UNKNOWN) {
        int r = t->lookup(t, which, name, nlen, t->fetch_ud, v, vlen);
        if (r != 0 || !added) return r;
        state = VALUE, val = added, vl = addedl;
    }
    if (state == ABSENT) return 0;
    *v = val;
    *vlen = vl;
    return 1;
}

void hs_txn_fetch(hs_txn *t, int which) {
    which &= 1;
    t->unfetched &= ~(1u << which);
    if (t->fetch) t->fetch(t, which, t->fetch_ud);
    hs_buf *j = &t->journal[which];
    hs_hdrs *hs = &t->hdr[which];
    char op;
    const char *name, *v;
    size_t nlen, vlen, off = 0;
    while (hs_journal_next(j, &off, &op, &name, &nlen, &v, &vlen)) { /* best effort: out of memory loses an edit */
        if (op == 's') hs_hdrs_set(hs, name, nlen, v, vlen);
        else if (op == 'a') hs_hdrs_add(hs, name, nlen, v, vlen);
        else hs_hdrs_remove(hs, name, nlen);
    }
    j->len = 0;
}

void hs_txn_free(hs_txn *t) {
    if (!t) return;
    hs_buf_free(&t->journal[0]);
    hs_buf_free(&t->journal[1]);
    hs_buf_free(&t->method);
    hs_buf_free(&t->uri);
    hs_buf_free(&t->body);
    hs_buf_free(&t->ctx);
    hs_buf_free(&t->cache_key);
    hs_buf_free(&t->pack);
    hs_hdrs_free(&t->hdr[0]);
    hs_hdrs_free(&t->hdr[1]);
    free(t);
}

void hs_txn_reset(hs_txn *t) {
    t->method.len = t->uri.len = t->body.len = t->ctx.len = t->cache_key.len = 0;
    t->journal[0].len = t->journal[1].len = 0;
    t->unfetched = 0;
    t->fetch = NULL;
    t->lookup = NULL;
    t->status = 0;
    hs_hdrs_clear(&t->hdr[0]);
    hs_hdrs_clear(&t->hdr[1]);
}

static hs_buf *field(hs_txn *t, int f) {
    switch (f) {
    case HS_F_METHOD: return &t->method;
    case HS_F_URI: return &t->uri;
    case HS_F_BODY: return &t->body;
    case HS_F_CACHE_KEY: return &t->cache_key;
    default: return NULL;
    }
}

int hs_txn_set(hs_txn *t, int f, const char *v, size_t len) {
    hs_buf *b = field(t, f);
    if (!b || (f == HS_F_METHOD && !hs_valid_token(v, len)) || (f == HS_F_URI && !hs_valid_uri(v, len)) ||
        (f == HS_F_CACHE_KEY && len > HS_CACHE_KEY_MAX))
        return -1;
    return hs_buf_set(b, v, len);
}

const char *hs_txn_get(const hs_txn *t, int f, size_t *len) {
    const hs_buf *b = field((hs_txn *)t, f);
    *len = b ? b->len : 0;
    return b && b->p ? b->p : "";
}

int hs_txn_set_status(hs_txn *t, int status) {
    if (!hs_valid_status(status)) return -1;
    t->status = status;
    return 0;
}

int hs_txn_status(const hs_txn *t) { return t->status; }

int hs_txn_set_headers(hs_txn *t, int which, const char *packed, size_t len) {
    if (which != HS_REQ && which != HS_RESP) return -1;
    hs_hdrs out = {0};
    const char *p = packed, *end = packed + len;
    while (p < end) {
        const char *nz = memchr(p, 0, (size_t)(end - p));
        if (!nz) goto bad;
        const char *val = nz + 1;
        const char *vz = val < end ? memchr(val, 0, (size_t)(end - val)) : NULL;
        const char *vend = vz ? vz : end;
        if (hs_hdrs_add_checked(&out, p, (size_t)(nz - p), val, (size_t)(vend - val)) != HS_TXN_OK)
            goto bad;
        p = vend + 1;
    }
    hs_hdrs_move(&t->hdr[which], &out);
    return 0;
bad:
    hs_hdrs_free(&out);
    return -1;
}

int hs_txn_parse_headers(hs_txn *t, int which, const char *block, size_t len) {
    if (which != HS_REQ && which != HS_RESP) return -1;
    return hs_hdrs_parse(&t->hdr[which], block, len, NULL, 0);
}

const char *hs_txn_headers(hs_txn *t, int which, size_t *len) {
    hs_hdrs *hs = &t->hdr[which & 1];
    t->pack.len = 0;
    for (size_t i = 0; i < hs->n; i++) {
        if ((i && hs_buf_put(&t->pack, "", 1)) || hs_buf_put(&t->pack, hs_hdr_name(hs, i), hs->e[i].nlen) ||
            hs_buf_put(&t->pack, "", 1) || hs_buf_put(&t->pack, hs_hdr_value(hs, i), hs->e[i].vlen)) {
            *len = 0;
            return NULL;
        }
    }
    *len = t->pack.len;
    return t->pack.p ? t->pack.p : "";
}

int hs_txn_add_header(hs_txn *t, int which, const char *name, const char *value) {
    if (which != HS_REQ && which != HS_RESP) return -1;
    return hs_hdrs_add_checked(&t->hdr[which], name, strlen(name), value, strlen(value)) ? -1 : 0;
}

const char *hs_txn_header(const hs_txn *t, int which, const char *name, size_t *len) {
    const hs_hdrs *hs = &t->hdr[which & 1];
    long i = hs_hdrs_find(hs, name, strlen(name), 0);
    if (i < 0) return NULL;
    *len = hs->e[i].vlen;
    return hs_hdr_value(hs, (size_t)i);
}

const char *hs_txn_ctx(const hs_txn *t, size_t *len) {
    *len = t->ctx.len;
    return t->ctx.p;
}

int hs_txn_set_ctx(hs_txn *t, const char *data, size_t len) { return hs_buf_set(&t->ctx, data, len); }
