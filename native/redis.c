/*
 * redis.c — a Redis endpoint: its URL, its pool of connections, the back-off
 * while Redis is unreachable, and one round trip of pipelined commands with
 * every wait bounded (redis.h says what a caller gets).
 *
 * hiredis connects (redisConnectWithTimeout) and parses replies (the context's
 * redisReader); the writes and reads are ours, non-blocking with poll(), so a
 * call never waits longer than its budget and never reads more than max_reply
 * bytes. The pool's mutex is held only to take or give back a connection.
 */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <stdarg.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <hiredis/hiredis.h>

#include "core.h"
#include "redis.h"

#define BACKOFF_MIN_NS 50000000ull   /* 50 ms */
#define BACKOFF_MAX_NS 1000000000ull /* 1 s */
#define IDLE_MAX 64                   /* connections kept in the pool at most */
#define READ_CHUNK 16384

_Thread_local uint64_t hs_wait_deadline_ns;

typedef struct conn {
    redisContext *c;
    struct conn *next;
} conn;

struct hs_redis {
    char *host, *user, *password, *prefix;
    size_t prefix_len;
    int port, db;
    uint64_t timeout_ns, connect_timeout_ns;
    size_t max_reply;

    pthread_mutex_t mu; /* guards what follows */
    conn *idle;
    int nidle;
    uint64_t retry_at_ns, backoff_ns;
    int broken;         /* a connection failed since the last one opened */
    char last_error[160];

    _Atomic uint64_t calls, errors, timeouts, reconnects, wait_ns;
};

/* ---- the URL ---- */

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* A percent-decoded copy of S[0..n); NULL when malformed or out of memory. */
static char *decode(const char *s, size_t n, size_t *outlen) {
    char *out = malloc(n + 1), *o = out;
    if (!out) return NULL;
    for (size_t i = 0; i < n; i++) {
        if (s[i] != '%') {
            *o++ = s[i];
            continue;
        }
        int hi = i + 2 < n ? hexval((unsigned char)s[i + 1]) : -1;
        int lo = i + 2 < n ? hexval((unsigned char)s[i + 2]) : -1;
        if (hi < 0 || lo < 0) {
            free(out);
            return NULL;
        }
        *o++ = (char)(hi * 16 + lo);
        i += 2;
    }
    *o = 0;
    if (outlen) *outlen = (size_t)(o - out);
    return out;
}

static int parse_seconds(const char *v, size_t n, uint64_t *out) {
    char tmp[32], *end;
    if (!n || n >= sizeof tmp) return -1;
    memcpy(tmp, v, n);
    tmp[n] = 0;
    double s = strtod(tmp, &end);
    if (*end || !(s > 0) || !isfinite(s) || s > 3600) return -1;
    *out = (uint64_t)(s * 1e9);
    return 0;
}

static int parse_uint(const char *v, size_t n, unsigned long long max, unsigned long long *out) {
    if (!n || n > 20) return -1;
    unsigned long long x = 0;
    for (size_t i = 0; i < n; i++) {
        if (v[i] < '0' || v[i] > '9') return -1;
        if (x > (max - (unsigned)(v[i] - '0')) / 10) return -1;
        x = x * 10 + (unsigned)(v[i] - '0');
    }
    *out = x;
    return 0;
}

#define BAD(...)                                 \
    do {                                         \
        snprintf(msg, msglen, __VA_ARGS__);      \
        hs_redis_close(r);                       \
        return NULL;                             \
    } while (0)

hs_redis *hs_redis_open(const char *url, const char *default_prefix, char *msg, size_t msglen) {
    static const char scheme[] = "redis://";
    hs_redis *r = calloc(1, sizeof *r);
    if (!r) {
        snprintf(msg, msglen, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&r->mu, NULL);
    r->port = 6379;
    r->timeout_ns = r->connect_timeout_ns = (uint64_t)(HS_REDIS_DEFAULT_TIMEOUT * 1e9);
    r->max_reply = HS_REDIS_DEFAULT_MAX_REPLY;
    r->backoff_ns = BACKOFF_MIN_NS;
    if (strncmp(url, scheme, sizeof scheme - 1))
        BAD("'%.200s' is not a redis:// URL (redis://[[user]:password@]host[:port][/db][?prefix=...])", url);
    const char *p = url + sizeof scheme - 1;
    const char *end = p + strcspn(p, "/?#");
    if (*end == '#') BAD("'%.200s': a fragment (#) has no meaning here", url);
    /* [[user]:password@]host[:port] in p..end */
    const char *at = memchr(p, '@', (size_t)(end - p));
    if (at) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        if (!colon) BAD("'%.200s': the part before '@' must be [user]:password", url);
        if (colon > p && !(r->user = decode(p, (size_t)(colon - p), NULL)))
            BAD("'%.200s': bad percent-encoding in the user name", url);
        if (!(r->password = decode(colon + 1, (size_t)(at - colon - 1), NULL)))
            BAD("'%.200s': bad percent-encoding in the password", url);
        p = at + 1;
    }
    const char *hend = end, *portp = NULL;
    if (*p == '[') { /* [ipv6] */
        const char *close = memchr(p, ']', (size_t)(end - p));
        if (!close) BAD("'%.200s': an IPv6 address needs its closing ']'", url);
        if (close + 1 < end) {
            if (close[1] != ':') BAD("'%.200s': ':port' expected after ']'", url);
            portp = close + 2;
        }
        r->host = strndup(p + 1, (size_t)(close - p - 1));
    } else {
        const char *colon = memchr(p, ':', (size_t)(end - p));
        if (colon) {
            portp = colon + 1;
            hend = colon;
        }
        r->host = strndup(p, (size_t)(hend - p));
    }
    if (!r->host) BAD("out of memory");
    if (!*r->host) BAD("'%.200s' names no host", url);
    if (portp) {
        unsigned long long port;
        if (parse_uint(portp, (size_t)(end - portp), 65535, &port) || port == 0)
            BAD("'%.200s': the port must be a number from 1 to 65535", url);
        r->port = (int)port;
    }
    p = end;
    if (*p == '/') { /* /db */
        p++;
        const char *dend = p + strcspn(p, "?#");
        if (dend > p) {
            unsigned long long db;
            if (parse_uint(p, (size_t)(dend - p), INT_MAX, &db))
                BAD("'%.200s': the database must be a number", url);
            r->db = (int)db;
        }
        p = dend;
    }
    if (*p == '#') BAD("'%.200s': a fragment (#) has no meaning here", url);
    if (*p == '?') p++;
    while (*p) { /* name=value&... */
        const char *amp = p + strcspn(p, "&#");
        if (*amp == '#') BAD("'%.200s': a fragment (#) has no meaning here", url);
        const char *eq = memchr(p, '=', (size_t)(amp - p));
        if (!eq) BAD("'%.200s': option '%.*s' needs a value (name=value)", url, (int)(amp - p), p);
        size_t nlen = (size_t)(eq - p), vlen = (size_t)(amp - eq - 1);
        const char *v = eq + 1;
        if (nlen == 6 && !memcmp(p, "prefix", 6)) {
            free(r->prefix);
            if (!(r->prefix = decode(v, vlen, &r->prefix_len)))
                BAD("'%.200s': bad percent-encoding in the prefix", url);
        } else if (nlen == 7 && !memcmp(p, "timeout", 7)) {
            if (parse_seconds(v, vlen, &r->timeout_ns))
                BAD("'%.200s': timeout must be a number of seconds, > 0 and <= 3600", url);
        } else if (nlen == 15 && !memcmp(p, "connect_timeout", 15)) {
            if (parse_seconds(v, vlen, &r->connect_timeout_ns))
                BAD("'%.200s': connect_timeout must be a number of seconds, > 0 and <= 3600", url);
        } else if (nlen == 9 && !memcmp(p, "max_reply", 9)) {
            unsigned long long n;
            if (parse_uint(v, vlen, (unsigned long long)1 << 40, &n) || n < 1024)
                BAD("'%.200s': max_reply must be a number of bytes, at least 1024", url);
            r->max_reply = (size_t)n;
        } else {
            BAD("'%.200s': unknown option '%.*s' (prefix, timeout, connect_timeout, max_reply)", url,
                (int)nlen, p);
        }
        p = *amp ? amp + 1 : amp;
    }
    if (!r->prefix) {
        r->prefix_len = strlen(default_prefix);
        if (!(r->prefix = strdup(default_prefix))) BAD("out of memory");
    }
    if (!r->prefix_len)
        BAD("'%.200s': the prefix must not be empty (flush_all deletes every key under it)", url);
    return r;
}

static void conn_free(conn *k) {
    if (!k) return;
    redisFree(k->c);
    free(k);
}

void hs_redis_close(hs_redis *r) {
    if (!r) return;
    for (conn *k = r->idle, *next; k; k = next) {
        next = k->next;
        conn_free(k);
    }
    free(r->host);
    free(r->user);
    free(r->password);
    free(r->prefix);
    pthread_mutex_destroy(&r->mu);
    free(r);
}

const char *hs_redis_prefix(const hs_redis *r, size_t *len) {
    *len = r->prefix_len;
    return r->prefix;
}

void hs_redis_limits(const hs_redis *r, size_t *max_reply) { *max_reply = r->max_reply; }

/* ---- the protocol ---- */

int hs_redis_format(hs_buf *out, int argc, const char *const *argv, const size_t *argvlen) {
    char head[32];
    int n = snprintf(head, sizeof head, "*%d\r\n", argc);
    if (hs_buf_put(out, head, (size_t)n)) return -1;
    for (int i = 0; i < argc; i++) {
        n = snprintf(head, sizeof head, "$%zu\r\n", argvlen[i]);
        if (hs_buf_put(out, head, (size_t)n) || hs_buf_put(out, argv[i], argvlen[i]) ||
            hs_buf_put(out, "\r\n", 2))
            return -1;
    }
    return 0;
}

void hs_redis_free_reply(struct redisReply *reply) {
    if (reply) freeReplyObject(reply);
}

/* An array header may not promise more elements than the bytes allowed could hold
 * (each takes 4 bytes at least): hiredis allocates the element vector from it. */
static _Thread_local size_t tl_max_elements;
static void *(*default_array)(const redisReadTask *, int);
static redisReplyObjectFunctions bounded_fns;
static pthread_once_t fns_once = PTHREAD_ONCE_INIT;

static void *bounded_array(const redisReadTask *task, int elements) {
    if (elements < 0 || (size_t)elements > tl_max_elements) return NULL;
    return default_array(task, elements);
}

static void init_fns(void) { /* hiredis's functions, but for arrays */
    redisReader *rd = redisReaderCreate();
    if (!rd) abort();
    bounded_fns = *rd->fn;
    default_array = rd->fn->createArray;
    bounded_fns.createArray = bounded_array;
    redisReaderFree(rd);
}

/* ---- waiting ---- */

typedef struct call {
    hs_redis *r;
    uint64_t deadline; /* absolute, ns */
    int timed_out;
    char *err;
    size_t errlen;
} call;

static int failf(call *k, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int failf(call *k, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(k->err, k->errlen, "redis: ");
    if (n >= 0 && (size_t)n < k->errlen) vsnprintf(k->err + n, k->errlen - (size_t)n, fmt, ap);
    va_end(ap);
    return -1;
}

/* Wait until FD is ready for EVENTS or the call's deadline: 0, or -1 (err set). */
static int wait_fd(call *k, int fd, short events) {
    for (;;) {
        uint64_t now = hs_now_ns();
        if (now >= k->deadline) {
            k->timed_out = 1;
            return failf(k, "timeout");
        }
        uint64_t left_ms = (k->deadline - now + 999999) / 1000000;
        struct pollfd pfd = {.fd = fd, .events = events};
        int n = poll(&pfd, 1, left_ms > INT_MAX ? INT_MAX : (int)left_ms);
        if (n > 0) return 0; /* readable, writable, or an error the next call reports */
        if (n < 0 && errno != EINTR) return failf(k, "poll: %s", strerror(errno));
    }
}

static int send_all(call *k, redisContext *c, const char *p, size_t len) {
    while (len) {
        ssize_t n = send(c->fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            p += n;
            len -= (size_t)n;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (wait_fd(k, c->fd, POLLOUT)) return -1;
        } else if (n < 0 && errno != EINTR) {
            return failf(k, "%s", strerror(errno));
        }
    }
    return 0;
}

static int read_replies(call *k, redisContext *c, int ncmds, redisReply **replies) {
    char chunk[READ_CHUNK];
    size_t total = 0;
    tl_max_elements = k->r->max_reply / 4;
    for (int i = 0; i < ncmds;) {
        void *reply = NULL;
        if (redisReaderGetReply(c->reader, &reply) != REDIS_OK) {
            if (c->reader->err == REDIS_ERR_OOM) return failf(k, "reply too large");
            return failf(k, "protocol error: %s", c->reader->errstr);
        }
        if (reply) {
            replies[i++] = reply;
            continue;
        }
        ssize_t n = recv(c->fd, chunk, sizeof chunk, MSG_DONTWAIT);
        if (n > 0) {
            total += (size_t)n;
            if (total > k->r->max_reply) return failf(k, "reply too large");
            if (redisReaderFeed(c->reader, chunk, (size_t)n) != REDIS_OK)
                return failf(k, "protocol error: %s", c->reader->errstr);
        } else if (n == 0) {
            return failf(k, "connection closed by the server");
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            if (wait_fd(k, c->fd, POLLIN)) return -1;
        } else if (errno != EINTR) {
            return failf(k, "%s", strerror(errno));
        }
    }
    if (c->reader->pos < c->reader->len) /* more than was asked: the next call would read it */
        return failf(k, "protocol error: more replies than commands");
    return 0;
}

/* An idle connection the server closed (it restarted, or its timeout ran out) has
 * something to read — its end of file: do not use it. */
static int gone(const conn *k) {
    struct pollfd pfd = {.fd = k->c->fd, .events = POLLIN};
    return poll(&pfd, 1, 0) != 0;
}

/* One round trip on connection C; replies owned by the caller on success. */
static int round_trip(call *k, redisContext *c, const char *cmds, size_t len, int ncmds,
                      redisReply **replies) {
    memset(replies, 0, (size_t)ncmds * sizeof *replies);
    if (send_all(k, c, cmds, len) == 0 && read_replies(k, c, ncmds, replies) == 0) return 0;
    for (int i = 0; i < ncmds; i++) hs_redis_free_reply(replies[i]);
    return -1;
}

/* ---- connections ---- */

static uint64_t deadline_for(uint64_t now, uint64_t budget) {
    uint64_t d = now + budget;
    if (hs_wait_deadline_ns && hs_wait_deadline_ns < d) d = hs_wait_deadline_ns;
    return d;
}

/* AUTH and SELECT on a new connection, as the URL asks. */
static int handshake(call *k, redisContext *c) {
    hs_buf cmd = {0};
    int n = 0;
    if (k->r->password) {
        const char *argv[3] = {"AUTH", k->r->user, k->r->password};
        size_t lens[3] = {4, k->r->user ? strlen(k->r->user) : 0, strlen(k->r->password)};
        if (!k->r->user) {
            argv[1] = argv[2];
            lens[1] = lens[2];
        }
        if (hs_redis_format(&cmd, k->r->user ? 3 : 2, argv, lens)) goto nomem;
        n++;
    }
    if (k->r->db) {
        char db[16];
        const char *argv[2] = {"SELECT", db};
        size_t lens[2] = {6, (size_t)snprintf(db, sizeof db, "%d", k->r->db)};
        if (hs_redis_format(&cmd, 2, argv, lens)) goto nomem;
        n++;
    }
    int rc = 0;
    if (n) {
        redisReply *replies[2];
        rc = round_trip(k, c, cmd.p, cmd.len, n, replies);
        if (rc == 0) {
            for (int i = 0; i < n; i++) {
                if (rc == 0 && replies[i]->type == REDIS_REPLY_ERROR) rc = failf(k, "%s", replies[i]->str);
                hs_redis_free_reply(replies[i]);
            }
        }
    }
    hs_buf_free(&cmd);
    return rc;
nomem:
    hs_buf_free(&cmd);
    return failf(k, "out of memory");
}

static conn *connect_new(call *k) {
    hs_redis *r = k->r;
    uint64_t now = hs_now_ns();
    uint64_t d = deadline_for(now, r->connect_timeout_ns);
    if (d <= now) {
        k->timed_out = 1;
        failf(k, "timeout");
        return NULL;
    }
    uint64_t budget = d - now;
    struct timeval tv = {.tv_sec = (time_t)(budget / 1000000000u),
                         .tv_usec = (suseconds_t)(budget % 1000000000u / 1000)};
    redisContext *c = redisConnectWithTimeout(r->host, r->port, tv);
    if (!c) {
        failf(k, "out of memory");
        return NULL;
    }
    if (c->err) {
        failf(k, "%s:%d: %s", r->host, r->port, c->errstr);
        if (strstr(c->errstr, "timed out")) k->timed_out = 1;
        redisFree(c);
        return NULL;
    }
    pthread_once(&fns_once, init_fns);
    c->reader->fn = &bounded_fns;
    uint64_t saved = k->deadline;
    k->deadline = d;
    int rc = handshake(k, c);
    k->deadline = saved;
    conn *out = rc ? NULL : calloc(1, sizeof *out);
    if (!out) {
        if (!rc) failf(k, "out of memory");
        redisFree(c);
        return NULL;
    }
    out->c = c;
    return out;
}

/* A connection from the pool, or a new one; NULL with the error set. */
static conn *take(call *k) {
    hs_redis *r = k->r;
    pthread_mutex_lock(&r->mu);
    conn *got;
    while ((got = r->idle)) {
        r->idle = got->next;
        r->nidle--;
        if (!gone(got)) {
            pthread_mutex_unlock(&r->mu);
            return got;
        }
        r->broken = 1; /* the connection that replaces it is a reconnect */
        pthread_mutex_unlock(&r->mu);
        conn_free(got);
        pthread_mutex_lock(&r->mu);
    }
    if (r->retry_at_ns && hs_now_ns() < r->retry_at_ns) {
        failf(k, "%s (reconnecting)", r->last_error);
        pthread_mutex_unlock(&r->mu);
        return NULL;
    }
    pthread_mutex_unlock(&r->mu);
    got = connect_new(k);
    pthread_mutex_lock(&r->mu);
    if (got) {
        if (r->broken) atomic_fetch_add_explicit(&r->reconnects, 1, memory_order_relaxed);
        r->broken = 0;
        r->retry_at_ns = 0;
        r->backoff_ns = BACKOFF_MIN_NS;
    } else {
        const char *reason = k->err + (strncmp(k->err, "redis: ", 7) ? 0 : 7);
        snprintf(r->last_error, sizeof r->last_error, "%s", reason);
        r->retry_at_ns = hs_now_ns() + r->backoff_ns;
        r->backoff_ns = r->backoff_ns * 2 > BACKOFF_MAX_NS ? BACKOFF_MAX_NS : r->backoff_ns * 2;
        r->broken = 1;
    }
    pthread_mutex_unlock(&r->mu);
    return got;
}

static void give_back(hs_redis *r, conn *k, int failed) {
    pthread_mutex_lock(&r->mu);
    if (failed) {
        r->broken = 1;
    } else if (r->nidle < IDLE_MAX) {
        k->next = r->idle;
        r->idle = k;
        r->nidle++;
        k = NULL;
    }
    pthread_mutex_unlock(&r->mu);
    conn_free(k);
}

int hs_redis_exec(hs_redis *r, const char *cmds, size_t len, int ncmds, redisReply **replies,
                  char *err, size_t errlen) {
    uint64_t start = hs_now_ns();
    call k = {.r = r, .deadline = deadline_for(start, r->timeout_ns), .err = err, .errlen = errlen};
    atomic_fetch_add_explicit(&r->calls, 1, memory_order_relaxed);
    int rc = -1;
    conn *c = take(&k);
    if (c) {
        rc = round_trip(&k, c->c, cmds, len, ncmds, replies);
        give_back(r, c, rc != 0);
    }
    if (rc) {
        atomic_fetch_add_explicit(&r->errors, 1, memory_order_relaxed);
        if (k.timed_out) atomic_fetch_add_explicit(&r->timeouts, 1, memory_order_relaxed);
    }
    atomic_fetch_add_explicit(&r->wait_ns, hs_now_ns() - start, memory_order_relaxed);
    return rc;
}

void hs_redis_stats(hs_redis *r, hs_redis_counters *out) {
    out->calls = atomic_load_explicit(&r->calls, memory_order_relaxed);
    out->errors = atomic_load_explicit(&r->errors, memory_order_relaxed);
    out->timeouts = atomic_load_explicit(&r->timeouts, memory_order_relaxed);
    out->reconnects = atomic_load_explicit(&r->reconnects, memory_order_relaxed);
    out->wait_ns = atomic_load_explicit(&r->wait_ns, memory_order_relaxed);
}
