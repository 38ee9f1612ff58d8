/*
 * shared.c — the front of the shared dictionaries: checking hs_config.shared,
 * choosing a backend by URL (shared_mem.c, or shared_redis.c for redis://), checking the arguments of every public hs_shared_*
 * call before the backend sees them, and the error messages. No Lua, no lock: the
 * backend (shared_mem.c for url NULL) makes each operation atomic.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shared.h"

/* The backend for URL; NULL when there is none (yet) for it. */
static const hs_shared_ops *backend_for(const char *url) {
    if (!url) return &hs_shared_mem_ops;
    if (!strncmp(url, "redis://", 8)) return &hs_shared_redis_ops;
    return NULL;
}

int hs_shared_check_specs(const hs_shared_spec *specs, int n, char *msg, size_t msglen) {
    if (n < 0 || (n > 0 && !specs)) {
        snprintf(msg, msglen, "shared dictionaries: nshared is %d but the list is missing", n);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        const hs_shared_spec *s = &specs[i];
        if (!s->name || !*s->name) {
            snprintf(msg, msglen, "a shared dictionary needs a name (the %dth has none)", i + 1);
            return -1;
        }
        if (strlen(s->name) > HS_SHARED_NAME_MAX) {
            snprintf(msg, msglen, "shared dictionary name '%.64s...' is longer than %d bytes",
                     s->name, HS_SHARED_NAME_MAX);
            return -1;
        }
        for (int j = 0; j < i; j++)
            if (!strcmp(s->name, specs[j].name)) {
                snprintf(msg, msglen, "shared dictionary '%s' declared twice", s->name);
                return -1;
            }
        if (!s->url && s->capacity < HS_SHARED_MIN_CAPACITY) {
            snprintf(msg, msglen,
                     "shared dictionary '%s': capacity %zu bytes is below the minimum of %d",
                     s->name, s->capacity, HS_SHARED_MIN_CAPACITY);
            return -1;
        }
        if (!backend_for(s->url)) {
            snprintf(msg, msglen,
                     "shared dictionary '%s': no backend for '%.200s' (a redis:// URL, or "
                     "no url for a dictionary in this process)",
                     s->name, s->url);
            return -1;
        }
    }
    return 0;
}

hs_shared *hs_shared_open(const hs_shared_spec *spec, char *msg, size_t msglen) {
    const hs_shared_ops *ops = backend_for(spec->url);
    hs_shared *d = calloc(1, sizeof *d);
    if (!d) {
        snprintf(msg, msglen, "out of memory creating shared dictionary '%s'", spec->name);
        return NULL;
    }
    d->ops = ops;
    snprintf(d->name, sizeof d->name, "%s", spec->name);
    if (!(d->b = ops->open(spec, msg, msglen))) {
        free(d);
        return NULL;
    }
    return d;
}

void hs_shared_close(hs_shared *d) {
    if (!d) return;
    d->ops->close(d->b);
    free(d);
}

const char *hs_shared_name(const hs_shared *d) { return d->name; }

const char *hs_shared_strerror(int code) {
    switch (code) {
    case HS_SHARED_OK: return "ok";
    case HS_SHARED_NOT_FOUND: return "not found";
    case HS_SHARED_EXISTS: return "exists";
    case HS_SHARED_NO_MEMORY: return "no memory";
    case HS_SHARED_NOT_NUMBER: return "not a number";
    case HS_SHARED_OVERFLOW: return "integer overflow";
    case HS_SHARED_EMPTY_KEY: return "empty key";
    case HS_SHARED_KEY_TOO_LONG: return "key too long";
    case HS_SHARED_BAD_VALUE: return "bad value type";
    case HS_SHARED_BAD_TTL: return "bad ttl";
    case HS_SHARED_BUFFER: return "buffer too small";
    case HS_SHARED_BACKEND: return *hs_shared_backend_error() ? hs_shared_backend_error() : "backend error";
    default: return "unknown error";
    }
}

/* ---- argument checks, then the backend ---- */

static int check_key(const char *key, size_t klen) {
    if (!key || !klen) return HS_SHARED_EMPTY_KEY;
    if (klen > HS_SHARED_KEY_MAX) return HS_SHARED_KEY_TOO_LONG;
    return HS_SHARED_OK;
}

static int check_ttl(double ttl) { return ttl >= 0 && isfinite(ttl) ? HS_SHARED_OK : HS_SHARED_BAD_TTL; }

static int check_value(const hs_value *v) {
    if (!v) return HS_SHARED_BAD_VALUE;
    switch (v->type) {
    case HS_VAL_NIL:
    case HS_VAL_INTEGER:
    case HS_VAL_NUMBER: return HS_SHARED_OK;
    case HS_VAL_BOOLEAN: return v->i == 0 || v->i == 1 ? HS_SHARED_OK : HS_SHARED_BAD_VALUE;
    case HS_VAL_STRING: return v->s || !v->len ? HS_SHARED_OK : HS_SHARED_BAD_VALUE;
    default: return HS_SHARED_BAD_VALUE;
    }
}

static int is_number(const hs_value *v) {
    return v && (v->type == HS_VAL_INTEGER || v->type == HS_VAL_NUMBER);
}

#define CHECK(expr)                        \
    do {                                   \
        int rc_ = (expr);                  \
        if (rc_ != HS_SHARED_OK) return rc_; \
    } while (0)

int hs_shared_get(hs_shared *d, const char *key, size_t klen, hs_value *out, char *buf, size_t cap,
                  int *stale) {
    memset(out, 0, sizeof *out);
    if (stale) *stale = 0;
    if (!buf) cap = 0; /* a NULL buffer only asks for the length, as hs_shared_keys */
    CHECK(check_key(key, klen));
    return d->ops->get(d->b, key, klen, out, buf, cap, stale);
}

int hs_shared_store(hs_shared *d, int mode, const char *key, size_t klen, const hs_value *v,
                    double ttl, int *forcible) {
    int ignored;
    if (!forcible) forcible = &ignored;
    *forcible = 0;
    CHECK(check_key(key, klen));
    CHECK(check_value(v));
    CHECK(check_ttl(ttl));
    if (mode < HS_STORE_SET || mode > HS_STORE_REPLACE) return HS_SHARED_BAD_VALUE;
    return d->ops->store(d->b, mode, key, klen, v, ttl, forcible);
}

int hs_shared_delete(hs_shared *d, const char *key, size_t klen) {
    CHECK(check_key(key, klen));
    return d->ops->del(d->b, key, klen);
}

int hs_shared_incr(hs_shared *d, const char *key, size_t klen, const hs_value *delta,
                   const hs_value *init, double init_ttl, hs_value *out, int *forcible) {
    int ignored;
    if (!forcible) forcible = &ignored;
    *forcible = 0;
    memset(out, 0, sizeof *out);
    CHECK(check_key(key, klen));
    if (!is_number(delta) || (init && !is_number(init))) return HS_SHARED_BAD_VALUE;
    CHECK(check_ttl(init_ttl));
    return d->ops->incr(d->b, key, klen, delta, init, init_ttl, out, forcible);
}

int hs_shared_ttl(hs_shared *d, const char *key, size_t klen, double *ttl) {
    *ttl = 0;
    CHECK(check_key(key, klen));
    return d->ops->ttl(d->b, key, klen, ttl);
}

int hs_shared_expire(hs_shared *d, const char *key, size_t klen, double ttl) {
    CHECK(check_key(key, klen));
    CHECK(check_ttl(ttl));
    return d->ops->expire(d->b, key, klen, ttl);
}

size_t hs_shared_keys(hs_shared *d, int max, char *buf, size_t cap, int *count) {
    int ignored;
    if (!count) count = &ignored;
    *count = 0;
    if (!buf) cap = 0;
    return d->ops->keys(d->b, max, buf, cap, count);
}

int hs_shared_flush_all(hs_shared *d) { return d->ops->flush_all(d->b); }

int hs_shared_flush_expired(hs_shared *d, int max) { return d->ops->flush_expired(d->b, max); }

void hs_shared_stats(hs_shared *d, hs_shared_info *out) {
    memset(out, 0, sizeof *out);
    d->ops->stats(d->b, out);
}
