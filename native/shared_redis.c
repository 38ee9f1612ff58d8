/*
 * shared_redis.c — the Redis backend of the shared dictionaries (url redis://...):
 * the operations of shared.h as Redis commands on the keys PREFIX..key of one
 * endpoint (redis.c), each one round trip.
 *
 * Values keep their type across processes. An integer without flags is stored as
 * its decimal digits, so INCRBY (and redis-cli) work on it; every other value is
 * tagged: a NUL byte, the type ('s' string, 'i' integer, 'n' number, 'b' boolean),
 * the flags in decimal, ':', then the payload (the bytes, the decimal digits, %.17g,
 * or 0/1). A value no dictionary wrote reads as an integer when it is canonical
 * decimal digits within int64, else as a string.
 *
 * What Redis gives atomically is used as such: add = SET NX, replace = SET XX, a
 * TTL is PX milliseconds, incr(k, n, 0) of an integer is INCRBY; any other incr
 * (without init, with another init or an init_ttl, numbers that are not integers,
 * a tagged value) is one server-side script. What Redis does not have is answered
 * in a documented way: no capacity (0 here, nil/None above), never forcible (Redis
 * evicts under its own maxmemory policy; its OOM refusal is "no memory"), no stale
 * reads (Redis drops what expired), flush_all deletes the prefix's keys, and
 * flush_expired has nothing to do.
 */
#include <inttypes.h>
#include <stdatomic.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <hiredis/hiredis.h>

#include "core.h"
#include "redis.h"
#include "shared.h"

#define SCAN_COUNT "1000"

typedef struct rdict {
    hs_redis *r;
    uint64_t id; /* unique in the process: tl_kept tells dictionaries apart by it */
} rdict;

/* The server-side incr: KEYS[1]; ARGV: delta, delta kind ('i'/'n'), encoded init
 * ('' none), init ttl in ms ('0' none). Replies {0, kind, digits} | {1} not found |
 * {2} not a number | {3} overflow. Redis runs Lua 5.1 (doubles): integers go
 * through INCRBY, which is exact; a tagged integer (one with flags) is added in
 * doubles and refused when an operand or the sum reaches 2^53. */
static const char incr_script[] =
    "local k, d, dk, init, ttl = KEYS[1], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])\n"
    "local created = false\n"
    "local function refuse(code)\n" /* an init that cannot be incremented is not kept */
    "  if created then redis.call('DEL', k) end\n"
    "  return {code}\n"
    "end\n"
    "local v = redis.call('GET', k)\n"
    "if not v then\n"
    "  if init == '' then return {1} end\n"
    "  if ttl > 0 then redis.call('SET', k, init, 'PX', ttl) else redis.call('SET', k, init) end\n"
    "  v = init\n"
    "  created = true\n"
    "end\n"
    "if string.byte(v, 1) == 0 then\n"
    "  local t, flags, p = string.match(v, '^%z([in])(%d+):(.*)$')\n"
    "  if not t or not tonumber(p) then return refuse(2) end\n"
    "  local kind = (t == 'i' and dk == 'i') and 'i' or 'n'\n"
    "  if kind == 'i' and (math.abs(tonumber(p)) >= 9007199254740992 or\n"
    "                      math.abs(tonumber(d)) >= 9007199254740992) then return refuse(3) end\n"
    "  local x = tonumber(p) + tonumber(d)\n"
    "  local s\n"
    "  if kind == 'i' then\n"
    "    if x >= 9007199254740992 or x <= -9007199254740992 then return refuse(3) end\n"
    "    s = string.format('%d', x)\n"
    "  else s = string.format('%.17g', x) end\n"
    "  redis.call('SET', k, '\\0' .. kind .. flags .. ':' .. s, 'KEEPTTL')\n"
    "  return {0, kind, s}\n"
    "end\n"
    "if not string.match(v, '^%-?%d+$') then return refuse(2) end\n"
    "if dk == 'i' then\n"
    "  local r = redis.pcall('INCRBY', k, d)\n"
    "  if type(r) == 'table' and r.err then\n"
    "    if string.find(r.err, 'overflow', 1, true) then return refuse(3) end\n"
    "    return refuse(2)\n"
    "  end\n"
    "  return {0, 'i', redis.call('GET', k)}\n"
    "end\n"
    "local s = string.format('%.17g', tonumber(v) + tonumber(d))\n"
    "redis.call('SET', k, '\\0n0:' .. s, 'KEEPTTL')\n"
    "return {0, 'n', s}\n";

/* ---- errors: the message of the thread's last HS_SHARED_BACKEND ---- */

static _Thread_local char tl_error[256];

const char *hs_shared_backend_error(void) { return tl_error; }

static int backend_error(const char *msg) {
    snprintf(tl_error, sizeof tl_error, "%s", msg);
    return HS_SHARED_BACKEND;
}

/* ---- one command ---- */

typedef struct cmd {
    int argc;
    const char *argv[8];
    size_t len[8];
    char *keybuf; /* prefix..key, malloc'd */
} cmd;

static void arg(cmd *c, const char *s, size_t n) {
    c->argv[c->argc] = s;
    c->len[c->argc++] = n;
}

static void arg_s(cmd *c, const char *s) { arg(c, s, strlen(s)); }

/* The prefixed key as an argument; -1 no memory. */
static int arg_key(cmd *c, hs_redis *r, const char *key, size_t klen) {
    size_t plen;
    const char *prefix = hs_redis_prefix(r, &plen);
    if (!(c->keybuf = malloc(plen + klen))) return -1;
    memcpy(c->keybuf, prefix, plen);
    memcpy(c->keybuf + plen, key, klen);
    arg(c, c->keybuf, plen + klen);
    return 0;
}

/* Run the commands; each reply in OUT. HS_SHARED_OK, or HS_SHARED_BACKEND with
 * the thread's message set. The commands' key buffers are freed. */
static int run(hs_redis *r, cmd *cmds, int n, redisReply **out) {
    hs_buf buf = {0};
    int rc = HS_SHARED_OK;
    hs_shared_redis_forget(); /* a reply kept for a get's retry is stale after any other call */
    for (int i = 0; i < n; i++)
        if (hs_redis_format(&buf, cmds[i].argc, cmds[i].argv, cmds[i].len))
            rc = backend_error("redis: out of memory");
    for (int i = 0; i < n; i++) free(cmds[i].keybuf);
    if (rc == HS_SHARED_OK) {
        char err[sizeof tl_error];
        if (hs_redis_exec(r, buf.p, buf.len, n, out, err, sizeof err)) rc = backend_error(err);
    }
    hs_buf_free(&buf);
    return rc;
}

static int run1(hs_redis *r, cmd *c, redisReply **out) { return run(r, c, 1, out); }

/* CMD KEY (the prefixed key), one round trip: HS_SHARED_OK with *REP, or the error. */
static int on_key(hs_redis *r, const char *name, const char *key, size_t klen, redisReply **rep) {
    cmd c = {0};
    arg_s(&c, name);
    if (arg_key(&c, r, key, klen)) return backend_error("redis: out of memory");
    return run1(r, &c, rep);
}

/* An error reply as a result code: Redis's OOM refusal is "no memory". */
static int reply_error(redisReply *rep) {
    if (!strncmp(rep->str, "OOM ", 4)) return HS_SHARED_NO_MEMORY;
    char msg[sizeof tl_error];
    snprintf(msg, sizeof msg, "redis: %s", rep->str);
    return backend_error(msg);
}

/* ---- values ---- */

/* Canonical decimal digits within int64 (what INCRBY writes). */
static int parse_int(const char *s, size_t n, int64_t *out) {
    if (!n || n > 20) return 0;
    size_t i = s[0] == '-';
    if (i == n || (s[i] == '0' && (n - i > 1 || i))) return 0; /* "", "-", "01", "-0" */
    uint64_t x = 0, limit = i ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
    for (; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return 0;
        unsigned d = (unsigned)(s[i] - '0');
        if (x > (limit - d) / 10) return 0;
        x = x * 10 + d;
    }
    *out = s[0] == '-' ? (int64_t)(0 - x) : (int64_t)x;
    return 1;
}

/* V encoded into BUF (for scalars) or pointing at V's string: the bytes to store. */
typedef struct encoded {
    char head[48]; /* the tag and flags, or all of a scalar */
    size_t hlen;
    const char *tail; /* a string's bytes after the head */
    size_t tlen;
    char *joined; /* head + tail, malloc'd, when both are present */
} encoded;

static int encode(const hs_value *v, encoded *e) {
    memset(e, 0, sizeof *e);
    char type;
    char payload[40] = "";
    switch (v->type) {
    case HS_VAL_INTEGER:
        if (!v->flags) {
            e->hlen = (size_t)snprintf(e->head, sizeof e->head, "%" PRId64, v->i);
            return 0;
        }
        type = 'i';
        snprintf(payload, sizeof payload, "%" PRId64, v->i);
        break;
    case HS_VAL_NUMBER:
        type = 'n';
        snprintf(payload, sizeof payload, "%.17g", v->n);
        break;
    case HS_VAL_BOOLEAN:
        type = 'b';
        payload[0] = v->i ? '1' : '0';
        payload[1] = 0;
        break;
    default:
        type = 's';
        break;
    }
    e->head[0] = 0;
    e->hlen = 1 + (size_t)snprintf(e->head + 1, sizeof e->head - 1, "%c%" PRIu32 ":%s", type,
                                   v->flags, payload);
    if (type != 's' || !v->len) return 0;
    if (!(e->joined = malloc(e->hlen + v->len))) return -1;
    memcpy(e->joined, e->head, e->hlen);
    memcpy(e->joined + e->hlen, v->s, v->len);
    e->tail = e->joined;
    e->tlen = e->hlen + v->len;
    return 0;
}

static const char *enc_bytes(const encoded *e, size_t *n) {
    if (e->joined) {
        *n = e->tlen;
        return e->joined;
    }
    *n = e->hlen;
    return e->head;
}

/* Decode S (N bytes) into OUT; a string's payload is copied into BUF when it fits
 * CAP (else HS_SHARED_BUFFER with out->len set). */
static int decode_value(const char *s, size_t n, hs_value *out, char *buf, size_t cap) {
    memset(out, 0, sizeof *out);
    const char *payload = s;
    size_t plen = n;
    char type = 0;
    if (n >= 3 && s[0] == 0 && strchr("sinb", s[1]) && s[1]) {
        const char *colon = memchr(s + 2, ':', n - 2);
        uint64_t flags = 0;
        const char *p = s + 2;
        int ok = colon && colon > p;
        for (; ok && p < colon; p++) {
            if (*p < '0' || *p > '9' || flags > UINT32_MAX / 10) ok = 0;
            else flags = flags * 10 + (uint64_t)(*p - '0');
        }
        if (ok && flags <= UINT32_MAX) {
            type = s[1];
            out->flags = (uint32_t)flags;
            payload = colon + 1;
            plen = n - (size_t)(payload - s);
        }
    }
    char tmp[48];
    if (type == 'i' || type == 'n' || type == 'b') {
        if (plen >= sizeof tmp) type = 's';
        else {
            memcpy(tmp, payload, plen);
            tmp[plen] = 0;
        }
    }
    if (type == 'i' && parse_int(payload, plen, &out->i)) {
        out->type = HS_VAL_INTEGER;
        return HS_SHARED_OK;
    }
    if (type == 'n') {
        char *end;
        out->n = strtod(tmp, &end);
        if (plen && !*end) {
            out->type = HS_VAL_NUMBER;
            return HS_SHARED_OK;
        }
    }
    if (type == 'b' && plen == 1 && (payload[0] == '0' || payload[0] == '1')) {
        out->type = HS_VAL_BOOLEAN;
        out->i = payload[0] == '1';
        return HS_SHARED_OK;
    }
    if (!type && parse_int(s, n, &out->i)) {
        out->type = HS_VAL_INTEGER;
        return HS_SHARED_OK;
    }
    if (type != 's') { /* not ours, or malformed: the bytes as they are */
        out->flags = 0;
        payload = s;
        plen = n;
    }
    out->type = HS_VAL_STRING;
    out->len = plen;
    if (plen > cap) return HS_SHARED_BUFFER;
    if (plen) memcpy(buf, payload, plen);
    out->s = buf ? buf : "";
    return HS_SHARED_OK;
}

/* PX milliseconds for TTL seconds (> 0): at least 1. */
static void ttl_ms(double ttl, char *out, size_t n) {
    double ms = ceil(ttl * 1000);
    if (ms < 1) ms = 1;
    if (ms > 9.2e18) ms = 9.2e18;
    snprintf(out, n, "%.0f", ms);
}

/* ---- a value too long for the caller's buffer: kept for the retry ---- */

static _Atomic uint64_t last_id;

#define KEPT_NS 50000000ull /* a kept reply serves a retry within 50 ms, never a later get */

static _Thread_local struct {
    uint64_t id, at_ns;
    char *key;
    size_t klen;
    redisReply *reply;
} tl_kept;

static void drop_kept(void) {
    hs_redis_free_reply(tl_kept.reply);
    free(tl_kept.key);
    memset(&tl_kept, 0, sizeof tl_kept);
}

/* The calling thread's kept reply goes (its caller will not retry). */
void hs_shared_redis_forget(void) {
    if (tl_kept.reply) drop_kept();
}

/* A thread that ends holding a kept reply (its caller never retried) frees it. */
static pthread_key_t kept_key;
static pthread_once_t kept_once = PTHREAD_ONCE_INIT;
static void kept_at_exit(void *unused) {
    (void)unused;
    drop_kept();
}
static void kept_key_init(void) { pthread_key_create(&kept_key, kept_at_exit); }

/* ---- the operations ---- */

static void *r_open(const hs_shared_spec *spec, char *msg, size_t msglen) {
    /* hs:NAME: with ':' and '%' of the name percent-encoded: "a" and "a:b" share nothing */
    char prefix[3 * HS_SHARED_NAME_MAX + 8], *o = prefix + 3;
    memcpy(prefix, "hs:", 3);
    for (const char *c = spec->name; *c; c++) {
        if (*c == ':' || *c == '%') o += sprintf(o, "%%%02X", (unsigned char)*c);
        else *o++ = *c;
    }
    *o++ = ':';
    *o = 0;
    char inner[512];
    hs_redis *r = hs_redis_open(spec->url, prefix, inner, sizeof inner);
    if (!r) {
        snprintf(msg, msglen, "shared dictionary '%s': %s", spec->name, inner);
        return NULL;
    }
    rdict *d = calloc(1, sizeof *d);
    if (!d) {
        hs_redis_close(r);
        snprintf(msg, msglen, "out of memory creating shared dictionary '%s'", spec->name);
        return NULL;
    }
    d->r = r;
    d->id = atomic_fetch_add(&last_id, 1) + 1;
    return d;
}

static void r_close(void *b) {
    rdict *d = b;
    if (tl_kept.id == d->id) drop_kept(); /* other threads' are dropped by their next get */
    hs_redis_close(d->r);
    free(d);
}

static int r_get(void *b, const char *key, size_t klen, hs_value *out, char *buf, size_t cap,
                 int *stale) {
    rdict *d = b;
    redisReply *rep = NULL;
    if (tl_kept.id == d->id && tl_kept.klen == klen && !memcmp(tl_kept.key, key, klen) &&
        hs_now_ns() - tl_kept.at_ns < KEPT_NS) {
        rep = tl_kept.reply; /* the retry with a larger buffer: no second round trip */
        tl_kept.reply = NULL;
    }
    drop_kept();
    if (!rep) {
        int rc = on_key(d->r, "GET", key, klen, &rep);
        if (rc) return rc;
    }
    int rc;
    if (rep->type == REDIS_REPLY_NIL) rc = HS_SHARED_NOT_FOUND;
    else if (rep->type == REDIS_REPLY_ERROR) rc = reply_error(rep);
    else if (rep->type != REDIS_REPLY_STRING) rc = backend_error("redis: unexpected reply to GET");
    else rc = decode_value(rep->str, rep->len, out, buf, cap);
    if (stale) *stale = 0;
    if (rc == HS_SHARED_BUFFER && (tl_kept.key = malloc(klen ? klen : 1))) {
        memcpy(tl_kept.key, key, klen);
        tl_kept.klen = klen;
        tl_kept.id = d->id;
        tl_kept.at_ns = hs_now_ns();
        tl_kept.reply = rep;
        pthread_once(&kept_once, kept_key_init);
        pthread_setspecific(kept_key, &tl_kept); /* non-NULL: the destructor runs */
        return rc;
    }
    hs_redis_free_reply(rep);
    return rc;
}

static int r_del(void *b, const char *key, size_t klen) {
    rdict *d = b;
    redisReply *rep;
    int rc = on_key(d->r, "DEL", key, klen, &rep);
    if (rc) return rc;
    if (rep->type == REDIS_REPLY_ERROR) rc = reply_error(rep);
    else rc = rep->type == REDIS_REPLY_INTEGER && rep->integer > 0 ? HS_SHARED_OK : HS_SHARED_NOT_FOUND;
    hs_redis_free_reply(rep);
    return rc;
}

static int r_store(void *b, int mode, const char *key, size_t klen, const hs_value *v, double ttl,
                   int *forcible) {
    rdict *d = b;
    *forcible = 0;
    if (v->type == HS_VAL_NIL) {
        if (mode == HS_STORE_ADD || mode == HS_STORE_SAFE_ADD) return HS_SHARED_OK;
        int rc = r_del(b, key, klen);
        if (mode == HS_STORE_REPLACE) return rc;
        return rc == HS_SHARED_NOT_FOUND ? HS_SHARED_OK : rc;
    }
    encoded e;
    if (encode(v, &e)) return backend_error("redis: out of memory");
    cmd c = {0};
    char ms[32];
    size_t n;
    arg_s(&c, "SET");
    if (arg_key(&c, d->r, key, klen)) {
        free(e.joined);
        return backend_error("redis: out of memory");
    }
    const char *bytes = enc_bytes(&e, &n);
    arg(&c, bytes, n);
    if (ttl > 0) {
        ttl_ms(ttl, ms, sizeof ms);
        arg_s(&c, "PX");
        arg_s(&c, ms);
    }
    if (mode == HS_STORE_ADD || mode == HS_STORE_SAFE_ADD) arg_s(&c, "NX");
    if (mode == HS_STORE_REPLACE) arg_s(&c, "XX");
    redisReply *rep;
    int rc = run1(d->r, &c, &rep);
    free(e.joined);
    if (rc) return rc;
    if (rep->type == REDIS_REPLY_ERROR) rc = reply_error(rep);
    else if (rep->type == REDIS_REPLY_NIL) rc = mode == HS_STORE_REPLACE ? HS_SHARED_NOT_FOUND : HS_SHARED_EXISTS;
    else rc = HS_SHARED_OK;
    hs_redis_free_reply(rep);
    return rc;
}

/* The value of a number argument as the script reads it. */
static void number_arg(const hs_value *v, char *out, size_t n, const char **kind) {
    if (v->type == HS_VAL_INTEGER) {
        snprintf(out, n, "%" PRId64, v->i);
        *kind = "i";
    } else {
        snprintf(out, n, "%.17g", v->n);
        *kind = "n";
    }
}

/* incr(k, n, 0) with an integer n — the counter idiom — is a plain INCRBY (an absent
 * key counts from 0, as init 0 says): HS_SHARED_OK, OVERFLOW, or -1 when the value
 * is not a plain integer (a tagged one, a string) and the script must decide. */
static int incr_plain(rdict *d, const char *key, size_t klen, const hs_value *delta, hs_value *out) {
    char n[32];
    cmd c = {0};
    redisReply *rep;
    snprintf(n, sizeof n, "%" PRId64, delta->i);
    arg_s(&c, "INCRBY");
    if (arg_key(&c, d->r, key, klen)) return backend_error("redis: out of memory");
    arg_s(&c, n);
    int rc = run1(d->r, &c, &rep);
    if (rc) return rc;
    if (rep->type == REDIS_REPLY_INTEGER) {
        memset(out, 0, sizeof *out);
        out->type = HS_VAL_INTEGER;
        out->i = (int64_t)rep->integer;
    } else if (rep->type == REDIS_REPLY_ERROR && strstr(rep->str, "overflow")) {
        rc = HS_SHARED_OVERFLOW;
    } else if (rep->type == REDIS_REPLY_ERROR && strstr(rep->str, "not an integer")) {
        rc = -1;
    } else {
        rc = rep->type == REDIS_REPLY_ERROR ? reply_error(rep)
                                            : backend_error("redis: unexpected reply to INCRBY");
    }
    hs_redis_free_reply(rep);
    return rc;
}

static int r_incr(void *b, const char *key, size_t klen, const hs_value *delta, const hs_value *init,
                  double init_ttl, hs_value *out, int *forcible) {
    rdict *d = b;
    *forcible = 0;
    if (delta->type == HS_VAL_INTEGER && init && init->type == HS_VAL_INTEGER && init->i == 0 &&
        init_ttl == 0) {
        int rc = incr_plain(d, key, klen, delta, out);
        if (rc != -1) return rc;
    }
    char dbuf[40], ms[32] = "0";
    const char *dkind;
    number_arg(delta, dbuf, sizeof dbuf, &dkind);
    encoded e = {0};
    size_t ilen = 0;
    const char *ibytes = "";
    if (init) {
        hs_value iv = *init;
        iv.flags = 0;
        encode(&iv, &e); /* a number: never allocates */
        ibytes = enc_bytes(&e, &ilen);
        if (init_ttl > 0) ttl_ms(init_ttl, ms, sizeof ms);
    }
    /* EVAL, not EVALSHA: the counter idiom went to INCRBY above, and what is left is
     * rare enough that sending the script is simpler than keeping its SHA loaded */
    cmd c = {0};
    redisReply *rep;
    arg_s(&c, "EVAL");
    arg(&c, incr_script, sizeof incr_script - 1);
    arg_s(&c, "1");
    if (arg_key(&c, d->r, key, klen)) return backend_error("redis: out of memory");
    arg_s(&c, dbuf);
    arg_s(&c, dkind);
    arg(&c, ibytes, ilen);
    arg_s(&c, ms);
    int rc = run1(d->r, &c, &rep);
    if (rc) return rc;
    if (rep->type == REDIS_REPLY_ERROR) rc = reply_error(rep);
    else if (rep->type != REDIS_REPLY_ARRAY || rep->elements < 1 ||
             rep->element[0]->type != REDIS_REPLY_INTEGER)
        rc = backend_error("redis: unexpected reply to the incr script");
    else if (rep->element[0]->integer == 1) rc = HS_SHARED_NOT_FOUND;
    else if (rep->element[0]->integer == 2) rc = HS_SHARED_NOT_NUMBER;
    else if (rep->element[0]->integer == 3) rc = HS_SHARED_OVERFLOW;
    else if (rep->elements != 3 || rep->element[1]->type != REDIS_REPLY_STRING ||
             rep->element[2]->type != REDIS_REPLY_STRING)
        rc = backend_error("redis: unexpected reply to the incr script");
    else {
        const redisReply *s = rep->element[2];
        char num[48];
        rc = HS_SHARED_OK;
        memset(out, 0, sizeof *out);
        if (rep->element[1]->str[0] == 'i') {
            if (parse_int(s->str, s->len, &out->i)) out->type = HS_VAL_INTEGER;
            else rc = HS_SHARED_NOT_NUMBER;
        } else if (s->len < sizeof num) {
            memcpy(num, s->str, s->len);
            num[s->len] = 0;
            out->type = HS_VAL_NUMBER;
            out->n = strtod(num, NULL);
        } else {
            rc = HS_SHARED_NOT_NUMBER;
        }
    }
    hs_redis_free_reply(rep);
    return rc;
}

static int r_ttl(void *b, const char *key, size_t klen, double *ttl) {
    rdict *d = b;
    redisReply *rep;
    int rc = on_key(d->r, "PTTL", key, klen, &rep);
    if (rc) return rc;
    if (rep->type == REDIS_REPLY_ERROR) rc = reply_error(rep);
    else if (rep->type != REDIS_REPLY_INTEGER) rc = backend_error("redis: unexpected reply to PTTL");
    else if (rep->integer == -2) rc = HS_SHARED_NOT_FOUND;
    else if (rep->integer < 0) *ttl = 0; /* -1: no expiry */
    else *ttl = rep->integer ? (double)rep->integer / 1000.0 : 0.001; /* its last millisecond: not 0 */
    hs_redis_free_reply(rep);
    return rc;
}

static int r_expire(void *b, const char *key, size_t klen, double ttl) {
    rdict *d = b;
    cmd c[2] = {{0}, {0}};
    redisReply *reps[2];
    char ms[32];
    int n = 1;
    if (ttl > 0) {
        arg_s(&c[0], "PEXPIRE");
        if (arg_key(&c[0], d->r, key, klen)) return backend_error("redis: out of memory");
        ttl_ms(ttl, ms, sizeof ms);
        arg_s(&c[0], ms);
    } else { /* PERSIST answers 0 for a key without a TTL too: ask EXISTS first */
        n = 2;
        arg_s(&c[0], "EXISTS");
        arg_s(&c[1], "PERSIST");
        if (arg_key(&c[0], d->r, key, klen) || arg_key(&c[1], d->r, key, klen)) {
            free(c[0].keybuf);
            return backend_error("redis: out of memory");
        }
    }
    int rc = run(d->r, c, n, reps);
    if (rc) return rc;
    if (reps[0]->type == REDIS_REPLY_ERROR) rc = reply_error(reps[0]);
    else rc = reps[0]->type == REDIS_REPLY_INTEGER && reps[0]->integer > 0 ? HS_SHARED_OK
                                                                            : HS_SHARED_NOT_FOUND;
    for (int i = 0; i < n; i++) hs_redis_free_reply(reps[i]);
    return rc;
}

/* SCAN MATCH pattern for the prefix: its glob characters escaped. */
static char *match_pattern(hs_redis *r) {
    size_t plen;
    const char *prefix = hs_redis_prefix(r, &plen);
    char *out = malloc(plen * 2 + 2), *o = out;
    if (!out) return NULL;
    for (size_t i = 0; i < plen; i++) {
        if (strchr("*?[]\\^-", prefix[i]) && prefix[i]) *o++ = '\\';
        *o++ = prefix[i];
    }
    *o++ = '*';
    *o = 0;
    return out;
}

/* Visit the prefix's keys with SCAN; VISIT gets each batch's reply array and
 * returns 1 to stop. HS_SHARED_OK or the backend error. */
static int scan(rdict *d, int (*visit)(rdict *, redisReply *, void *), void *arg_) {
    char *pattern = match_pattern(d->r);
    if (!pattern) return backend_error("redis: out of memory");
    char cursor[32] = "0";
    int rc = HS_SHARED_OK;
    uint64_t until = hs_now_ns() + 10 * hs_redis_timeout_ns(d->r); /* a SCAN that never ends */
    do {
        if (hs_now_ns() >= until) {
            rc = backend_error("redis: timeout (SCAN did not finish)");
            break;
        }
        cmd c = {0};
        redisReply *rep;
        arg_s(&c, "SCAN");
        arg_s(&c, cursor);
        arg_s(&c, "MATCH");
        arg_s(&c, pattern);
        arg_s(&c, "COUNT");
        arg_s(&c, SCAN_COUNT);
        if ((rc = run1(d->r, &c, &rep))) break;
        if (rep->type == REDIS_REPLY_ERROR) rc = reply_error(rep);
        else if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 2 ||
                 rep->element[0]->type != REDIS_REPLY_STRING || rep->element[0]->len >= sizeof cursor ||
                 rep->element[1]->type != REDIS_REPLY_ARRAY)
            rc = backend_error("redis: unexpected reply to SCAN");
        if (rc) {
            hs_redis_free_reply(rep);
            break;
        }
        memcpy(cursor, rep->element[0]->str, rep->element[0]->len);
        cursor[rep->element[0]->len] = 0;
        int stop = visit(d, rep->element[1], arg_);
        hs_redis_free_reply(rep);
        if (stop < 0) rc = HS_SHARED_BACKEND; /* the visitor set the message */
        if (stop) break;
    } while (strcmp(cursor, "0"));
    free(pattern);
    return rc;
}

typedef struct keys_arg {
    int max, count;
    char *buf;
    size_t cap, need;
} keys_arg;

static int visit_keys(rdict *d, redisReply *batch, void *p) {
    keys_arg *a = p;
    size_t plen;
    hs_redis_prefix(d->r, &plen);
    for (size_t i = 0; i < batch->elements; i++) {
        if (a->max > 0 && a->count >= a->max) return 1;
        const redisReply *k = batch->element[i];
        if (k->type != REDIS_REPLY_STRING || k->len <= plen) continue;
        uint32_t len = (uint32_t)(k->len - plen);
        size_t rec = sizeof len + len;
        if (a->need + rec <= a->cap) {
            memcpy(a->buf + a->need, &len, sizeof len);
            memcpy(a->buf + a->need + sizeof len, k->str + plen, len);
            a->count++;
        }
        a->need += rec;
    }
    return a->max > 0 && a->count >= a->max;
}

static size_t r_keys(void *b, int max, char *buf, size_t cap, int *count) {
    keys_arg a = {.max = max, .buf = buf, .cap = cap};
    int rc = scan(b, visit_keys, &a);
    *count = rc ? -1 : a.count;
    return rc ? 0 : a.need;
}

/* UNLINK the keys of one SCAN batch, in one command. */
static int visit_unlink(rdict *d, redisReply *batch, void *p) {
    (void)p;
    size_t n = batch->elements + 1;
    if (n == 1) return 0;
    const char **argv = malloc(n * sizeof *argv);
    size_t *lens = malloc(n * sizeof *lens);
    hs_buf buf = {0};
    redisReply *rep = NULL;
    char err[sizeof tl_error];
    int rc = 0;
    if (argv && lens) {
        argv[0] = "UNLINK";
        lens[0] = 6;
        for (size_t i = 1; i < n; i++) { /* SCAN answers strings; anything else as "" */
            const redisReply *k = batch->element[i - 1];
            int str = k->type == REDIS_REPLY_STRING;
            argv[i] = str ? k->str : "";
            lens[i] = str ? k->len : 0;
        }
    }
    if (!argv || !lens || n > INT_MAX || hs_redis_format(&buf, (int)n, argv, lens))
        rc = backend_error("redis: out of memory");
    else if (hs_redis_exec(d->r, buf.p, buf.len, 1, &rep, err, sizeof err)) rc = backend_error(err);
    else if (rep->type == REDIS_REPLY_ERROR) rc = reply_error(rep);
    hs_redis_free_reply(rep);
    hs_buf_free(&buf);
    free(argv);
    free(lens);
    return rc ? -1 : 0;
}

static int r_flush_all(void *b) { return scan(b, visit_unlink, NULL); }

static int r_flush_expired(void *b, int max) {
    (void)b;
    (void)max;
    return 0; /* Redis reclaims expired keys itself */
}

static void r_stats(void *b, hs_shared_info *out) {
    rdict *d = b;
    hs_redis_counters c;
    hs_redis_stats(d->r, &c);
    out->backend = HS_SHARED_REDIS;
    out->calls = c.calls;
    out->errors = c.errors;
    out->timeouts = c.timeouts;
    out->reconnects = c.reconnects;
    out->wait_ns = c.wait_ns;
}

struct hs_redis *hs_shared_redis(hs_shared *s) {
    return s->ops == &hs_shared_redis_ops ? ((rdict *)s->b)->r : NULL;
}

const hs_shared_ops hs_shared_redis_ops = {
    .kind = "redis",
    .blocking = 1,
    .open = r_open,
    .close = r_close,
    .get = r_get,
    .store = r_store,
    .del = r_del,
    .incr = r_incr,
    .ttl = r_ttl,
    .expire = r_expire,
    .keys = r_keys,
    .flush_all = r_flush_all,
    .flush_expired = r_flush_expired,
    .stats = r_stats,
};
