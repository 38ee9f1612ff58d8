/*
 * txn.h — the transaction's storage: what the core (lapi_hs.c, dispatch.c) and a
 * binding that wraps transactions itself (hostscript/_bridge) read and write
 * directly. No Lua here, so a binding compiles txn.c once for both engines and
 * one transaction object serves either.
 *
 * Every way in validates: header names are tokens, header values hold no control
 * character but tab, the method is a token, the URI holds no control character or space.
 * Nothing is stored half-way: a refused edit leaves the transaction as it was.
 */
#ifndef HS_TXN_H
#define HS_TXN_H

#include <stdatomic.h>
#include <stddef.h>
#include <string.h>

#include "buf.h"
#include "hostscript.h"

typedef struct hs_hdr {
    size_t noff, nlen, voff, vlen; /* offsets into the arena */
} hs_hdr;

/* A case-insensitive multi-map of header fields, in order: entries point into one
 * arena of names and values; replaced values leave garbage there, reclaimed by
 * compaction once it outweighs the live bytes. */
typedef struct hs_hdrs {
    hs_buf arena;
    hs_hdr *e;
    size_t n, cap;
    size_t garbage; /* arena bytes no entry refers to */
} hs_hdrs;

struct hs_txn {
    hs_buf method, uri, body, ctx; /* ctx: txn.ctx serialized (ctx.c) */
    hs_buf cache_key;              /* txn:set_cache_key; empty: none */
    int status;                    /* 0: not set */
    hs_hdrs hdr[2];                /* HS_REQ, HS_RESP */
    hs_buf pack;                   /* scratch for hs_txn_headers */
    unsigned changed;              /* HS_CH_* bits of the fire in progress */
    /* A host may leave a header set empty until a handler touches it (the Traffic
     * Server plugin): bit WHICH of UNFETCHED set, FETCH(t, WHICH, FETCH_UD) fills
     * hdr[WHICH] on the first read (hs_txn_need); edits made before any read are kept
     * in JOURNAL[WHICH] instead ('s' set, 'a' add, 'r' remove; name NUL value NUL)
     * for the host to apply to its own copy, and replayed if a read comes later.
     * LOOKUP (optional) answers a read of one field from the host's copy without
     * filling the set: 1 with *V, *VLEN (valid until the handler's next call into
     * the host) when NAME is there, 0 when it is not, -1 to fetch instead.
     * Bit HS_TXN_LINE of UNFETCHED leaves METHOD and URI to FETCH(t, HS_TXN_LINE,
     * FETCH_UD) the same way, on the first read or write of either from Lua. */
    void (*fetch)(hs_txn *t, int which, void *ud);
    int (*lookup)(hs_txn *t, int which, const char *name, size_t nlen, void *ud, const char **v, size_t *vlen);
    void *fetch_ud;
    unsigned unfetched;
    hs_buf journal[2];
    int responded;                 /* txn:respond ran in the fire in progress */
    atomic_int busy;               /* a fire runs on it: a second one is refused */
};

/* txn.ctx is at most this many bytes, however it was made (Lua, Python, C). */
#define HS_CTX_MAX (8u << 20)

/* Results of the checked edits below. */
enum { HS_TXN_OK = 0, HS_TXN_NOMEM = -1, HS_TXN_BAD_NAME = -2, HS_TXN_BAD_VALUE = -3 };

int hs_valid_token(const char *p, size_t n);       /* header name, method */
int hs_valid_field_value(const char *p, size_t n); /* header value */
int hs_valid_uri(const char *p, size_t n);         /* request target */
int hs_valid_status(int status);                   /* 0 (unset) or 100..999 */

/* Header names compare case-insensitively in ASCII (strncasecmp would follow the
 * locale: a Turkish one folds 'I' differently). */
static inline int hs_name_eq(const char *a, const char *b, size_t n) {
    for (size_t i = 0; i < n; i++) {
        unsigned char x = (unsigned char)a[i], y = (unsigned char)b[i];
        if (x != y && (x | 0x20) != (y | 0x20)) return 0;
        if (x != y && !((x | 0x20) >= 'a' && (x | 0x20) <= 'z')) return 0;
    }
    return 1;
}

static inline const char *hs_hdr_name(const hs_hdrs *hs, size_t i) { return hs->arena.p + hs->e[i].noff; }
static inline const char *hs_hdr_value(const hs_hdrs *hs, size_t i) { return hs->arena.p + hs->e[i].voff; }

/* Bytes the transaction holds (what a memory limit counts it as). */
static inline size_t hs_txn_size(const hs_txn *t) {
    return t->method.len + t->uri.len + t->body.len + t->ctx.len + t->cache_key.len + t->hdr[0].arena.len +
           t->hdr[1].arena.len + (t->hdr[0].n + t->hdr[1].n) * sizeof(hs_hdr) + t->journal[0].len +
           t->journal[1].len;
}

/* Fill hdr[WHICH] now (it was left to fetch) and replay the edits journaled meanwhile. */
void hs_txn_fetch(hs_txn *t, int which);
static inline void hs_txn_need(hs_txn *t, int which) {
    if (t->unfetched & (1u << which)) hs_txn_fetch(t, which);
}
/* The request line (method, uri) in hs_txn.unfetched: not copied in until used. */
#define HS_TXN_LINE 2
static inline void hs_txn_need_line(hs_txn *t) {
    if (t->unfetched & (1u << HS_TXN_LINE)) {
        t->unfetched &= ~(1u << HS_TXN_LINE);
        if (t->fetch) t->fetch(t, HS_TXN_LINE, t->fetch_ud);
    }
}
/* The first value of NAME in unfetched set WHICH, as the journal and the host's
 * LOOKUP make it, without fetching: 1 with *V and *VLEN, 0 absent, -1 fetch instead. */
int hs_txn_peek(hs_txn *t, int which, const char *name, size_t nlen, const char **v, size_t *vlen);
/* Journal an edit of an unfetched set (see hs_txn.unfetched); the caller validated
 * name and value: 0, -1 out of memory, -2 a NUL in either (nothing journaled). */
int hs_txn_journal(hs_txn *t, int which, char op, const char *name, size_t nlen, const char *v, size_t vlen);
/* The journal record at *OFF of J (op, name, value) and *OFF moved past it; 0 at the end. */
static inline int hs_journal_next(const hs_buf *j, size_t *off, char *op, const char **name, size_t *nlen,
                                  const char **v, size_t *vlen) {
    /* bounded by LEN: a record cut short ends the journal instead of reading past it */
    if (*off >= j->len) return 0;
    const char *end = j->p + j->len, *p = j->p + *off + 1;
    const char *nend = p < end ? memchr(p, 0, (size_t)(end - p)) : NULL;
    const char *vend = nend ? memchr(nend + 1, 0, (size_t)(end - nend - 1)) : NULL;
    if (!vend) return 0;
    *op = j->p[*off];
    *name = p;
    *nlen = (size_t)(nend - p);
    *v = nend + 1;
    *vlen = (size_t)(vend - *v);
    *off = (size_t)(vend + 1 - j->p);
    return 1;
}
long hs_hdrs_find(const hs_hdrs *hs, const char *name, size_t nlen, size_t from);
/* Unchecked edits: the caller validated name and value. 0 ok, -1 no memory. */
int hs_hdrs_add(hs_hdrs *hs, const char *name, size_t nlen, const char *v, size_t vlen);
int hs_hdrs_set(hs_hdrs *hs, const char *name, size_t nlen, const char *v, size_t vlen);
void hs_hdrs_remove(hs_hdrs *hs, const char *name, size_t nlen);
void hs_hdrs_clear(hs_hdrs *hs);
void hs_hdrs_free(hs_hdrs *hs);
/* Checked append: HS_TXN_OK or HS_TXN_BAD_NAME / BAD_VALUE / NOMEM. */
int hs_hdrs_add_checked(hs_hdrs *hs, const char *name, size_t nlen, const char *v, size_t vlen);
/* Replace HS with the fields of a raw header block ("Name: value" lines ending in
 * CRLF or LF, up to an optional empty line). On failure HS is unchanged and WHY
 * (when not NULL) says which line was refused. */
int hs_hdrs_parse(hs_hdrs *hs, const char *block, size_t len, char *why, size_t whylen);
/* Move SRC's contents into DST (whose old contents are freed); SRC ends empty. */
void hs_hdrs_move(hs_hdrs *dst, hs_hdrs *src);

#endif
