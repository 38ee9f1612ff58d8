/*
 * shared_mem.c — the in-process shared dictionary (the backend for url NULL): a
 * hash table and an LRU list under one mutex per dictionary. No Lua.
 *
 * Each entry is one malloc'd block: its links, its hash, expiry, flags, type and
 * number, then the key bytes and a string value's bytes. An entry counts
 * HS_SHARED_ENTRY_OVERHEAD + key + string bytes against the capacity; `used` is
 * their sum and never passes the capacity. The hash is SipHash-1-3 with a random
 * key per dictionary, since keys often come from requests.
 *
 * The lock is held for the operation only, and nothing under it can fail in a way
 * that leaves it held: no Lua, no callback. New entries are allocated before the
 * lock is taken, and entries removed under it are freed after it is released.
 *
 * Time is CLOCK_MONOTONIC in nanoseconds; `expires` 0 means never. Expired
 * entries stay (get with STALE sees them) until room is made (expired entries are
 * reclaimed first, looking at most ROOM_SCAN entries from the LRU end, then live
 * ones are evicted, least recently used first, unless the mode is "safe"), until
 * flush_expired, or until a write replaces them.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "shared.h"

#define ROOM_SCAN 16     /* entries looked at for expired ones before evicting live ones: a
                            * full dictionary of live entries pays this on every write */
#define MIN_BUCKETS 16

typedef struct entry entry;
struct entry {
    entry *chain;         /* next in its bucket; next garbage once unlinked */
    entry *newer, *older; /* the LRU list */
    uint64_t hash;
    uint64_t expires;     /* CLOCK_MONOTONIC ns; 0: never */
    size_t vlen;          /* string bytes after the key */
    uint32_t klen, flags;
    int type;             /* HS_VAL_* (never NIL) */
    union {
        int64_t i; /* integer, boolean */
        double n;
    } num;
    char data[];          /* key, then a string value */
};

/* the entry and its bucket slot, at a load factor of at most 1, fit the overhead counted */
_Static_assert(sizeof(entry) + 2 * sizeof(void *) <= HS_SHARED_ENTRY_OVERHEAD,
               "HS_SHARED_ENTRY_OVERHEAD is too small for an entry");

typedef struct memdict {
    pthread_mutex_t mu;
    size_t capacity, used;  /* used: the cost of every entry held */
    uint64_t count, evictions;
    entry **buckets;
    size_t mask;            /* buckets - 1, a power of two minus one */
    entry *newest, *oldest; /* LRU ends */
    uint64_t k0, k1;        /* hash key */
} memdict;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t expiry(uint64_t now, double ttl) {
    if (ttl <= 0) return 0;
    double ns = ttl * 1e9;
    if (ns < 1) ns = 1;
    if (ns >= (double)(UINT64_MAX - now)) return UINT64_MAX;
    return now + (uint64_t)ns;
}

static int expired(const entry *e, uint64_t now) { return e->expires && e->expires <= now; }

static size_t cost_of(size_t klen, size_t vlen) { return HS_SHARED_ENTRY_OVERHEAD + klen + vlen; }
static size_t cost(const entry *e) { return cost_of(e->klen, e->vlen); }

/* ---- SipHash-1-3 ---- */

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                       \
    do {                                                                               \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                      \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                         \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                         \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                      \
    } while (0)

static uint64_t hash_key(const memdict *d, const char *key, size_t len) {
    const unsigned char *p = (const unsigned char *)key;
    uint64_t v0 = d->k0 ^ 0x736f6d6570736575ULL, v1 = d->k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = d->k0 ^ 0x6c7967656e657261ULL, v3 = d->k1 ^ 0x7465646279746573ULL;
    const unsigned char *end = p + (len & ~(size_t)7);
    for (; p != end; p += 8) {
        uint64_t m;
        memcpy(&m, p, 8);
        v3 ^= m;
        SIPROUND;
        v0 ^= m;
    }
    uint64_t b = (uint64_t)len << 56;
    for (size_t i = 0; i < (len & 7); i++) b |= (uint64_t)p[i] << (8 * i);
    v3 ^= b;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

/* ---- the table and the LRU list (all under d->mu) ---- */

static entry *find(memdict *d, const char *key, size_t klen, uint64_t h) {
    for (entry *e = d->buckets[h & d->mask]; e; e = e->chain)
        if (e->hash == h && e->klen == klen && !memcmp(e->data, key, klen)) return e;
    return NULL;
}

static void lru_unlink(memdict *d, entry *e) {
    if (e->newer) e->newer->older = e->older;
    else d->newest = e->older;
    if (e->older) e->older->newer = e->newer;
    else d->oldest = e->newer;
    e->newer = e->older = NULL;
}

static void lru_push(memdict *d, entry *e) {
    e->newer = NULL;
    e->older = d->newest;
    if (d->newest) d->newest->newer = e;
    else d->oldest = e;
    d->newest = e;
}

static void touch(memdict *d, entry *e) {
    if (d->newest == e) return;
    lru_unlink(d, e);
    lru_push(d, e);
}

/* Take E out of the table and the list onto *GARBAGE (freed after the lock). */
static void discard(memdict *d, entry *e, entry **garbage) {
    entry **pp = &d->buckets[e->hash & d->mask];
    while (*pp != e) pp = &(*pp)->chain;
    *pp = e->chain;
    lru_unlink(d, e);
    d->used -= cost(e);
    d->count--;
    e->chain = *garbage;
    *garbage = e;
}

/* Double the buckets when the table is full; on no memory, chains just get longer. */
static void grow(memdict *d) {
    size_t n = (d->mask + 1) * 2;
    entry **nb = calloc(n, sizeof *nb);
    if (!nb) return;
    for (size_t i = 0; i <= d->mask; i++)
        for (entry *e = d->buckets[i], *next; e; e = next) {
            next = e->chain;
            e->chain = nb[e->hash & (n - 1)];
            nb[e->hash & (n - 1)] = e;
        }
    free(d->buckets);
    d->buckets = nb;
    d->mask = n - 1;
}

static void link_entry(memdict *d, entry *e) {
    if (d->count >= d->mask + 1) grow(d);
    entry **b = &d->buckets[e->hash & d->mask];
    e->chain = *b;
    *b = e;
    lru_push(d, e);
    d->used += cost(e);
    d->count++;
}

/* Make room for NEED bytes, counting KEEP (the entry about to be replaced, may be
 * NULL) as free and never removing it: expired entries first, then (unless SAFE)
 * live ones from the LRU end, which sets *forcible. */
static int make_room(memdict *d, size_t need, entry *keep, int safe, uint64_t now, int *forcible,
                     entry **garbage) {
    if (need > d->capacity) return HS_SHARED_NO_MEMORY;
    size_t spare = keep ? cost(keep) : 0;
#define ROOM() (d->capacity - d->used + spare)
    int seen = 0;
    for (entry *e = d->oldest, *next; e && ROOM() < need && seen < ROOM_SCAN; e = next, seen++) {
        next = e->newer;
        if (e != keep && expired(e, now)) discard(d, e, garbage);
    }
    while (ROOM() < need) {
        entry *e = d->oldest == keep ? keep->newer : d->oldest;
        if (!e) return HS_SHARED_NO_MEMORY; /* cannot happen: need <= capacity */
        if (!expired(e, now)) {
            if (safe) return HS_SHARED_NO_MEMORY;
            *forcible = 1;
            d->evictions++;
        }
        discard(d, e, garbage);
    }
#undef ROOM
    return HS_SHARED_OK;
}

static void free_list(entry *e) {
    while (e) {
        entry *next = e->chain;
        free(e);
        e = next;
    }
}

static entry *new_entry(memdict *d, const char *key, size_t klen, size_t vlen) {
    entry *e = malloc(sizeof *e + klen + vlen);
    if (!e) return NULL;
    memset(e, 0, sizeof *e);
    e->hash = hash_key(d, key, klen);
    e->klen = (uint32_t)klen;
    e->vlen = vlen;
    memcpy(e->data, key, klen);
    return e;
}

static void read_value(const entry *e, hs_value *out) {
    out->type = e->type;
    out->flags = e->flags;
    if (e->type == HS_VAL_NUMBER) out->n = e->num.n;
    else if (e->type != HS_VAL_STRING) out->i = e->num.i;
}

/* ---- the operations ---- */

static void *mem_open(const hs_shared_spec *spec, char *msg, size_t msglen) {
    memdict *d = calloc(1, sizeof *d);
    if (d) d->buckets = calloc(MIN_BUCKETS, sizeof *d->buckets);
    if (!d || !d->buckets) {
        free(d);
        snprintf(msg, msglen, "out of memory creating shared dictionary '%s'", spec->name);
        return NULL;
    }
    d->mask = MIN_BUCKETS - 1;
    d->capacity = spec->capacity;
    uint64_t k[2];
    if (getrandom(k, sizeof k, GRND_NONBLOCK) != (ssize_t)sizeof k) {
        k[0] = now_ns() ^ (uint64_t)(uintptr_t)d;
        k[1] = (uint64_t)(uintptr_t)&k ^ (k[0] << 17);
    }
    d->k0 = k[0];
    d->k1 = k[1];
    pthread_mutex_init(&d->mu, NULL);
    return d;
}

static void mem_close(void *b) {
    memdict *d = b;
    for (entry *e = d->newest, *next; e; e = next) {
        next = e->older;
        free(e);
    }
    free(d->buckets);
    pthread_mutex_destroy(&d->mu);
    free(d);
}

static int mem_get(void *b, const char *key, size_t klen, hs_value *out, char *buf, size_t cap,
                   int *stale) {
    memdict *d = b;
    uint64_t h = hash_key(d, key, klen);
    int rc = HS_SHARED_OK;
    pthread_mutex_lock(&d->mu);
    entry *e = find(d, key, klen, h);
    int old = e && expired(e, now_ns());
    if (!e || (old && !stale)) {
        rc = HS_SHARED_NOT_FOUND;
    } else {
        read_value(e, out);
        if (e->type == HS_VAL_STRING) {
            out->len = e->vlen;
            if (e->vlen > cap) {
                rc = HS_SHARED_BUFFER;
            } else {
                if (e->vlen) memcpy(buf, e->data + e->klen, e->vlen);
                out->s = buf ? buf : "";
            }
        }
        if (stale) *stale = old;
        if (!old) touch(d, e);
    }
    pthread_mutex_unlock(&d->mu);
    return rc;
}

static int mem_store(void *b, int mode, const char *key, size_t klen, const hs_value *v, double ttl,
                     int *forcible) {
    memdict *d = b;
    size_t vlen = v->type == HS_VAL_STRING ? v->len : 0;
    entry *n = NULL, *garbage = NULL;
    if (v->type != HS_VAL_NIL) {
        /* vlen first: a length near SIZE_MAX would wrap the cost (and the malloc) */
        if (vlen > d->capacity || cost_of(klen, vlen) > d->capacity) return HS_SHARED_NO_MEMORY;
        if (!(n = new_entry(d, key, klen, vlen))) return HS_SHARED_NO_MEMORY;
        n->type = v->type;
        n->flags = v->flags;
        if (v->type == HS_VAL_NUMBER) n->num.n = v->n;
        else if (v->type != HS_VAL_STRING) n->num.i = v->i;
        else if (vlen) memcpy(n->data + klen, v->s, vlen);
    }
    int safe = mode == HS_STORE_SAFE_SET || mode == HS_STORE_SAFE_ADD;
    int rc = HS_SHARED_OK;
    uint64_t h = n ? n->hash : hash_key(d, key, klen);
    pthread_mutex_lock(&d->mu);
    uint64_t now = now_ns();
    entry *e = find(d, key, klen, h);
    int live = e && !expired(e, now);
    if ((mode == HS_STORE_ADD || mode == HS_STORE_SAFE_ADD) && live) {
        rc = HS_SHARED_EXISTS;
    } else if (mode == HS_STORE_REPLACE && !live) {
        rc = HS_SHARED_NOT_FOUND;
    } else if (!n) { /* nil: delete */
        if (e) discard(d, e, &garbage);
    } else {
        n->expires = expiry(now, ttl);
        rc = make_room(d, cost(n), e, safe, now, forcible, &garbage);
        if (rc == HS_SHARED_OK) {
            if (e) discard(d, e, &garbage);
            link_entry(d, n);
            n = NULL;
        }
    }
    pthread_mutex_unlock(&d->mu);
    free(n);
    free_list(garbage);
    return rc;
}

static int mem_del(void *b, const char *key, size_t klen) {
    memdict *d = b;
    uint64_t h = hash_key(d, key, klen);
    entry *garbage = NULL;
    int rc = HS_SHARED_NOT_FOUND;
    pthread_mutex_lock(&d->mu);
    entry *e = find(d, key, klen, h);
    if (e) {
        if (!expired(e, now_ns())) rc = HS_SHARED_OK;
        discard(d, e, &garbage);
    }
    pthread_mutex_unlock(&d->mu);
    free_list(garbage);
    return rc;
}

/* A + DELTA into OUT: an integer when both are integers (HS_SHARED_OVERFLOW past
 * int64), else a double. */
static int add_numbers(int atype, int64_t ai, double an, const hs_value *delta, hs_value *out) {
    if (atype == HS_VAL_INTEGER && delta->type == HS_VAL_INTEGER) {
        if (__builtin_add_overflow(ai, delta->i, &out->i)) return HS_SHARED_OVERFLOW;
        out->type = HS_VAL_INTEGER;
        return HS_SHARED_OK;
    }
    double a = atype == HS_VAL_INTEGER ? (double)ai : an;
    out->n = a + (delta->type == HS_VAL_INTEGER ? (double)delta->i : delta->n);
    out->type = HS_VAL_NUMBER;
    return HS_SHARED_OK;
}

static int mem_incr(void *b, const char *key, size_t klen, const hs_value *delta,
                    const hs_value *init, double init_ttl, hs_value *out, int *forcible) {
    memdict *d = b;
    entry *spare = NULL, *garbage = NULL;
    uint64_t h = hash_key(d, key, klen);
    int rc;
    pthread_mutex_lock(&d->mu);
    for (;;) {
        uint64_t now = now_ns();
        entry *e = find(d, key, klen, h);
        if (e && !expired(e, now)) {
            if (e->type != HS_VAL_INTEGER && e->type != HS_VAL_NUMBER) {
                rc = HS_SHARED_NOT_NUMBER;
            } else if ((rc = add_numbers(e->type, e->num.i, e->num.n, delta, out)) == HS_SHARED_OK) {
                e->type = out->type;
                if (out->type == HS_VAL_INTEGER) e->num.i = out->i;
                else e->num.n = out->n;
                out->flags = e->flags;
                touch(d, e);
            }
            break;
        }
        if (!init) {
            rc = HS_SHARED_NOT_FOUND;
            break;
        }
        if ((rc = add_numbers(init->type, init->i, init->n, delta, out)) != HS_SHARED_OK) break;
        if (!spare) { /* allocate outside the lock, then look again */
            pthread_mutex_unlock(&d->mu);
            if (cost_of(klen, 0) > d->capacity) return HS_SHARED_NO_MEMORY;
            if (!(spare = new_entry(d, key, klen, 0))) return HS_SHARED_NO_MEMORY;
            pthread_mutex_lock(&d->mu);
            continue;
        }
        spare->type = out->type;
        if (out->type == HS_VAL_INTEGER) spare->num.i = out->i;
        else spare->num.n = out->n;
        spare->expires = expiry(now, init_ttl);
        rc = make_room(d, cost(spare), e, 0, now, forcible, &garbage);
        if (rc == HS_SHARED_OK) {
            if (e) discard(d, e, &garbage);
            link_entry(d, spare);
            spare = NULL;
        }
        break;
    }
    pthread_mutex_unlock(&d->mu);
    free(spare);
    free_list(garbage);
    return rc;
}

/* The TTL of a live KEY: read into *GET, or (GET NULL) set to SET seconds. */
static int live_ttl(memdict *d, const char *key, size_t klen, double *get, double set) {
    uint64_t h = hash_key(d, key, klen);
    int rc = HS_SHARED_NOT_FOUND;
    pthread_mutex_lock(&d->mu);
    uint64_t now = now_ns();
    entry *e = find(d, key, klen, h);
    if (e && !expired(e, now)) {
        if (get) *get = e->expires ? (double)(e->expires - now) * 1e-9 : 0;
        else e->expires = expiry(now, set);
        rc = HS_SHARED_OK;
    }
    pthread_mutex_unlock(&d->mu);
    return rc;
}

static int mem_ttl(void *b, const char *key, size_t klen, double *ttl) {
    return live_ttl(b, key, klen, ttl, 0);
}

static int mem_expire(void *b, const char *key, size_t klen, double ttl) {
    return live_ttl(b, key, klen, NULL, ttl);
}

static size_t mem_keys(void *b, int max, char *buf, size_t cap, int *count) {
    memdict *d = b;
    size_t need = 0;
    int n = 0, full = 0;
    pthread_mutex_lock(&d->mu);
    uint64_t now = now_ns();
    for (entry *e = d->newest; e && (max <= 0 || n < max); e = e->older) {
        if (expired(e, now)) continue;
        size_t item = sizeof(uint32_t) + e->klen;
        if (!full && need + item <= cap) {
            uint32_t len = e->klen;
            memcpy(buf + need, &len, sizeof len);
            memcpy(buf + need + sizeof len, e->data, e->klen);
            (*count)++;
        } else {
            full = 1;
        }
        need += item;
        n++;
    }
    pthread_mutex_unlock(&d->mu);
    return need;
}

static int mem_flush_all(void *b) {
    memdict *d = b;
    pthread_mutex_lock(&d->mu);
    uint64_t now = now_ns();
    for (entry *e = d->newest; e; e = e->older)
        if (!expired(e, now)) e->expires = now;
    pthread_mutex_unlock(&d->mu);
    return HS_SHARED_OK;
}

static int mem_flush_expired(void *b, int max) {
    memdict *d = b;
    entry *garbage = NULL;
    int n = 0;
    pthread_mutex_lock(&d->mu);
    uint64_t now = now_ns();
    for (entry *e = d->oldest, *next; e && (max <= 0 || n < max); e = next) {
        next = e->newer;
        if (expired(e, now)) {
            discard(d, e, &garbage);
            n++;
        }
    }
    pthread_mutex_unlock(&d->mu);
    free_list(garbage);
    return n;
}

static void mem_stats(void *b, hs_shared_info *out) {
    memdict *d = b;
    pthread_mutex_lock(&d->mu);
    out->backend = HS_SHARED_MEMORY;
    out->capacity = d->capacity;
    out->free_space = d->capacity - d->used;
    out->keys = d->count;
    out->evictions = d->evictions;
    pthread_mutex_unlock(&d->mu);
}

const hs_shared_ops hs_shared_mem_ops = {
    .kind = "memory",
    .open = mem_open,
    .close = mem_close,
    .get = mem_get,
    .store = mem_store,
    .del = mem_del,
    .incr = mem_incr,
    .ttl = mem_ttl,
    .expire = mem_expire,
    .keys = mem_keys,
    .flush_all = mem_flush_all,
    .flush_expired = mem_flush_expired,
    .stats = mem_stats,
};
