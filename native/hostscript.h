/*
 * hostscript.h — the public C interface of libhostscript.
 *
 * A host declares its hook points, loads Lua handler scripts (compiled once,
 * published as an immutable program) and fires hooks from any thread; each
 * thread runs Lua in its own private state. Nothing here needs Python.
 *
 * Threading: hs_fire may be called from any number of threads at once, each
 * with its own transaction. hs_load/hs_unload may run concurrently with fires.
 * hs_host_free must be called once no thread is inside hs_fire.
 */
#ifndef HOSTSCRIPT_H
#define HOSTSCRIPT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct hs_host hs_host;
typedef struct hs_txn hs_txn;

/* Outcome of a fire: the low 2 bits of hs_fire's result. */
enum { HS_CONTINUE = 0, HS_DONE = 1, HS_ERROR = 2 };

/* What a fire changed in its transaction: hs_fire's result >> 2. */
enum {
    HS_CH_REQ_HEADERS = 1 << 0,
    HS_CH_RESP_HEADERS = 1 << 1,
    HS_CH_METHOD = 1 << 2,
    HS_CH_URI = 1 << 3,
    HS_CH_STATUS = 1 << 4,
    HS_CH_BODY = 1 << 5,
    HS_CH_CTX = 1 << 6,
    HS_CH_LOGS = 1 << 7, /* log records are waiting: hs_logs() */
    HS_CH_CACHE_KEY = 1 << 8,
    HS_CH_PROGRAM = 1 << 9 /* the fire published a new program (hs.register, hs.unregister) */
};

/* Kinds of error reported in hs_error.kind. */
enum {
    HS_ERR_NONE = 0,
    HS_ERR_SYNTAX,  /* load: the source does not compile */
    HS_ERR_SCRIPT,  /* load: the chunk failed or returned no valid class */
    HS_ERR_RUNTIME, /* fire: the handler raised an error */
    HS_ERR_TIMEOUT, /* fire: the time limit stopped the handler */
    HS_ERR_MEMORY,  /* the state's memory limit was reached */
    HS_ERR_CTX,     /* fire: txn.ctx holds a value that is not plain data */
    HS_ERR_USAGE    /* bad argument from the host (unknown hook, closed host...) */
};

typedef struct hs_error {
    int kind;             /* HS_ERR_* */
    int line;             /* line in the script, 0 when unknown */
    char script[256];     /* script name, "" when none */
    char hook[64];        /* hook name, "" for load errors */
    char message[1024];   /* "name:line: message" as Lua reports it */
    char traceback[4096]; /* Lua traceback, "" when none */
} hs_error;

/* A shared dictionary of the host (see "Shared dictionaries" below for the rest). */
typedef struct hs_shared_spec {
    const char *name;   /* 1..64 bytes (HS_SHARED_NAME_MAX), unique in the host */
    size_t capacity;    /* bytes, >= 8192 (HS_SHARED_MIN_CAPACITY); unused with a url */
    const char *url;    /* NULL: in this process; "redis://...": in Redis (see below) */
} hs_shared_spec;

typedef struct hs_config {
    const char *const *hooks;   /* hook names a script may handle (on_<name>) */
    int nhooks;                 /* 1..64 */
    double time_limit;          /* seconds of Lua per fire; <= 0: unlimited */
    size_t memory_limit;        /* bytes of Lua heap per thread state; 0: unlimited */
    int sandbox;                /* 1: safe stdlib only and strict globals */
    const char *const *lua_path; /* directories searched by require for NAME.lua */
    int nlua_path;
    int state_pool;             /* idle states kept for new threads when theirs end; 0: none */
    const hs_shared_spec *shared; /* shared dictionaries (hs.shared.NAME) */
    int nshared;
    int max_registrations;      /* classes handlers may register at run time (hs.register in a
                                   fire) that a program holds at once: 0 means
                                   HS_REGISTRATIONS_DEFAULT; < 0 turns run-time registration off */
} hs_config;
enum { HS_REGISTRATIONS_DEFAULT = 64 };

/* Per-hook latency: buckets[i] counts the fires whose handlers ran in at most
 * hs_latency_bounds_ns()[i] and more than the bound before (i < 11), buckets[11]
 * the slower ones. A fire of a hook no script handles runs nothing and is in none. */
enum { HS_LATENCY_BUCKETS = 12 };
typedef struct hs_hook_stats {
    uint64_t fires, errors, total_ns;
    uint64_t buckets[12]; /* HS_LATENCY_BUCKETS */
} hs_hook_stats;
/* The upper bounds of buckets 0..10, in ns: 10 us, 25 us, 50 us, 100 us, 250 us,
 * 500 us, 1 ms, 2.5 ms, 5 ms, 10 ms, 100 ms. */
const uint64_t *hs_latency_bounds_ns(void);

typedef struct hs_stats {
    uint64_t fires, errors, timeouts, memory_errors;
    uint64_t rehydrations;  /* scripts loaded from bytecode into thread states */
    uint64_t releases;      /* fires that ran long enough to release the host's lock */
    uint64_t compilations;  /* scripts and modules compiled from source */
    uint64_t states;        /* Lua states alive (the pooled ones included) */
    uint64_t heap_bytes;    /* Lua heap over all live states */
    uint64_t heap_max;      /* largest heap of one live state */
    uint64_t generation;    /* program version */
    uint64_t pooled;        /* idle states in the pool now (hs_config.state_pool) */
    uint64_t pool_hits;     /* new threads that took a pooled state instead of creating one */
    uint64_t registered;    /* classes registered at run time in the published program */
    uint64_t registrations, unregistrations; /* run-time ones published since the host began */
    uint64_t registrations_refused; /* past max_registrations when published */
} hs_stats;

/* Host: create with a config (copied), free when no fire is running. NULL + err on bad config. */
hs_host *hs_host_new(const hs_config *cfg, hs_error *err);
void hs_host_free(hs_host *h);
/* Index of a declared hook, -1 when undeclared. */
int hs_hook_index(const hs_host *h, const char *name);
/* The engine compiled into this library: "lua54" or "luajit"; and its version string. */
const char *hs_engine(void);
const char *hs_engine_version(void);

/* Load (or replace) script NAME from Lua source text; 0 ok, -1 with err filled.
 * A failure leaves the published program unchanged. */
int hs_load(hs_host *h, const char *name, const char *src, size_t len, hs_error *err);
/* Remove script NAME (with the classes its handlers registered at run time), or
 * one class registered at run time, "<script>#<name>"; 0 ok, -1 when there is none. */
int hs_unload(hs_host *h, const char *name);
/* Names in program order, NUL-separated, into buf; returns the bytes needed: each
 * script, followed by the classes its chunk registers ("<script>#<name>"), and
 * the classes handlers registered at run time. */
size_t hs_scripts(hs_host *h, char *buf, size_t cap);
/* The program's version: it changes with every load, unload and run-time
 * registration (one atomic read). */
uint64_t hs_generation(hs_host *h);
/* The hooks some script of the published program handles: bit i for hook index i.
 * A host skips firing the others (a fire of an unhandled hook does nothing). */
uint64_t hs_hooks_handled(hs_host *h);
/* Log records written while the last hs_load ran the chunk (same packing as hs_logs). */
const char *hs_load_logs(hs_host *h, size_t *len);

/* Fire HOOK for TXN in the calling thread's state. Result: outcome | changes << 2.
 * On HS_ERROR, hs_last_error() gives the details. */
int hs_fire(hs_host *h, int hook, hs_txn *txn);
/* Error of the calling thread's last failed fire. */
void hs_last_error(hs_host *h, hs_error *out);
/* Log records of the calling thread's last fire, packed: level u8, script-name length
 * u16, name, message length u32, message (lengths little-endian). Levels as Python
 * logging: 10 debug, 20 info, 30 warn, 40 error. */
const char *hs_logs(hs_host *h, size_t *len);

/* Let the host release a lock it holds around hs_fire (Python's GIL) while Lua runs
 * long: RELEASE is called on the firing thread, at most once per fire, before the
 * handlers of a hook whose recent fires took longer than LONG_SECONDS on this
 * thread, or from the time-limit hook once a fire passes LONG_SECONDS. The host
 * takes its lock back after hs_fire returns. Short fires never call it. */
void hs_host_set_release(hs_host *h, void (*release)(void), double long_seconds);

/* Counters summed over live and ended states; hooks gets nhooks entries (may be NULL). */
void hs_host_stats(hs_host *h, hs_stats *out, hs_hook_stats *hooks);

/* Transaction: request, response and ctx of one request. It may move between
 * threads (and engines) between fires; a fire on a transaction that another fire
 * is running on is refused (HS_ERR_USAGE). Every setter validates: header names
 * and the method are tokens, header values hold no control character but tab,
 * the URI no space or control character, a status is 0 (unset) or 100..999. A
 * refused call returns -1 and changes nothing. */
enum { HS_REQ = 0, HS_RESP = 1 };
enum { HS_F_METHOD = 0, HS_F_URI = 1, HS_F_BODY = 2, HS_F_CACHE_KEY = 3 };
/* HS_F_CACHE_KEY: the secondary part of the cache key a handler set with
 * txn:set_cache_key (any bytes, at most HS_CACHE_KEY_MAX; empty: none set). */
enum { HS_CACHE_KEY_MAX = 65536 };
hs_txn *hs_txn_new(void);
void hs_txn_free(hs_txn *t);
/* Empty every field, keeping the memory: one transaction per connection, reused. */
void hs_txn_reset(hs_txn *t);
int hs_txn_set(hs_txn *t, int field, const char *v, size_t len); /* 0 ok, -1 invalid or no memory */
const char *hs_txn_get(const hs_txn *t, int field, size_t *len);
int hs_txn_set_status(hs_txn *t, int status);
int hs_txn_status(const hs_txn *t);
/* Replace all headers of HS_REQ/HS_RESP from "name\0value\0name\0value" (len bytes). */
int hs_txn_set_headers(hs_txn *t, int which, const char *packed, size_t len);
/* Replace all headers from a raw header block: "Name: value" lines ending in CRLF
 * (or LF), up to an optional empty line; obsolete line folding is refused. */
int hs_txn_parse_headers(hs_txn *t, int which, const char *block, size_t len);
/* The headers packed as above; valid until the transaction next changes. */
const char *hs_txn_headers(hs_txn *t, int which, size_t *len);
/* Append one header; 0 ok, -1 invalid or no memory. */
int hs_txn_add_header(hs_txn *t, int which, const char *name, const char *value);
/* First value of a header, case-insensitive; NULL when absent. The value is LEN bytes,
 * not NUL-terminated, valid until the transaction next changes. */
const char *hs_txn_header(const hs_txn *t, int which, const char *name, size_t *len);
/* txn.ctx serialized (see ctx.c for the format); len 0 when empty. */
const char *hs_txn_ctx(const hs_txn *t, size_t *len);
/* Replace txn.ctx with data previously read by hs_txn_ctx (same engine or not). */
int hs_txn_set_ctx(hs_txn *t, const char *data, size_t len);

/* ---- Shared dictionaries: hs.shared.NAME in Lua, Host.shared[NAME] in Python ----
 *
 * Key-value stores every thread (every state) of a host sees, with the semantics
 * of OpenResty's ngx.shared.DICT: typed values, user flags, TTLs, LRU eviction
 * when full. Declared in hs_config.shared, created by hs_host_new, freed with the
 * host. Every call is atomic and may come from any thread; each dictionary has a
 * lock of its own, held for the call only.
 *
 * Capacity counts, per entry, the key, the string value and HS_SHARED_ENTRY_OVERHEAD.
 * When a set/add/incr needs room, expired entries go first, then the least
 * recently used ones (*forcible is set); the "safe" modes never evict a live entry
 * and fail with HS_SHARED_NO_MEMORY instead. An entry larger than the capacity
 * always fails with HS_SHARED_NO_MEMORY. Expired entries are invisible to reads
 * but for hs_shared_get with STALE, until reclaimed (by room-making and
 * hs_shared_flush_expired). TTLs run on CLOCK_MONOTONIC; a ttl of 0 never expires.
 *
 * A dictionary whose url is "redis://[[user]:password@]host[:port][/db][?prefix=P&
 * timeout=S&connect_timeout=S&max_reply=BYTES]" lives in Redis instead, under the
 * keys P..key (P defaults to "hs:NAME:"): every process and machine naming the
 * same URL shares it. The same calls, one round trip each, atomic in Redis. Where
 * Redis differs: no capacity (hs_shared_info says 0), never *forcible (Redis
 * evicts by its own maxmemory policy; its OOM refusal is HS_SHARED_NO_MEMORY),
 * no stale reads (Redis drops what expired), flush_all deletes the prefix's keys,
 * flush_expired has nothing to do, keys come in no particular order. A failed
 * round trip (Redis down, slower than the timeout, 1 s by default) is
 * HS_SHARED_BACKEND. A call waits on the network: the host's lock is released
 * first when a Lua handler makes it. */
enum {
    HS_SHARED_NAME_MAX = 64,        /* bytes of a dictionary name */
    HS_SHARED_KEY_MAX = 65535,      /* bytes of a key */
    HS_SHARED_MIN_CAPACITY = 8192,  /* bytes */
    HS_SHARED_ENTRY_OVERHEAD = 96   /* bytes counted per entry besides key and value */
};

typedef struct hs_shared hs_shared;

/* Value types; HS_VAL_NIL in a store deletes the key. */
enum { HS_VAL_NIL = 0, HS_VAL_BOOLEAN, HS_VAL_INTEGER, HS_VAL_NUMBER, HS_VAL_STRING };

typedef struct hs_value {
    int type;           /* HS_VAL_* */
    uint32_t flags;     /* user flags, stored with the value */
    int64_t i;          /* HS_VAL_INTEGER; HS_VAL_BOOLEAN: 0 or 1 */
    double n;           /* HS_VAL_NUMBER */
    const char *s;      /* HS_VAL_STRING: LEN bytes, binary-safe */
    size_t len;
} hs_value;

/* Results of the hs_shared_* calls; hs_shared_strerror gives the message. */
enum {
    HS_SHARED_OK = 0,
    HS_SHARED_NOT_FOUND,    /* "not found": absent or expired */
    HS_SHARED_EXISTS,       /* "exists": add on a live key */
    HS_SHARED_NO_MEMORY,    /* "no memory": no room without evicting (safe modes), or too big */
    HS_SHARED_NOT_NUMBER,   /* "not a number": incr on a value that is not one */
    HS_SHARED_OVERFLOW,     /* "integer overflow": incr past the int64 range */
    HS_SHARED_EMPTY_KEY,    /* "empty key" */
    HS_SHARED_KEY_TOO_LONG, /* "key too long": over HS_SHARED_KEY_MAX bytes */
    HS_SHARED_BAD_VALUE,    /* "bad value type" */
    HS_SHARED_BAD_TTL,      /* "bad ttl": negative or not finite */
    HS_SHARED_BUFFER,       /* the caller's buffer is too small: retry with the size given */
    HS_SHARED_BACKEND       /* the backend failed (Redis down, timeout...): hs_shared_strerror
                               gives the calling thread's last such message, "redis: ..." */
};

/* Modes of hs_shared_store. */
enum { HS_STORE_SET = 0, HS_STORE_SAFE_SET, HS_STORE_ADD, HS_STORE_SAFE_ADD, HS_STORE_REPLACE };

enum { HS_SHARED_MEMORY = 0, HS_SHARED_REDIS = 1 }; /* backends */

typedef struct hs_shared_info {
    int backend;         /* HS_SHARED_MEMORY or HS_SHARED_REDIS */
    size_t capacity;     /* bytes (0 in Redis: it has none of its own) */
    size_t free_space;   /* capacity minus what the entries count (0 in Redis) */
    uint64_t keys;       /* entries held, expired ones not yet reclaimed included (0 in Redis) */
    uint64_t evictions;  /* live entries evicted to make room, since creation (0 in Redis) */
    /* Redis only: round trips, failed ones, of which timeouts, connections opened
     * after a failure, and the time spent in round trips */
    uint64_t calls, errors, timeouts, reconnects, wait_ns;
} hs_shared_info;

/* The dictionary NAME of host H; NULL when H declares none of that name. Valid
 * until hs_host_free. */
hs_shared *hs_host_shared(hs_host *h, const char *name);
const char *hs_shared_name(const hs_shared *d);
const char *hs_shared_strerror(int code);

/* Read KEY into OUT (type, flags, value). A string is copied into BUF (CAP bytes)
 * and out->s points at it; when it is longer than CAP, nothing is copied, out->len
 * says how long it is and the result is HS_SHARED_BUFFER: call again with a larger
 * buffer. With STALE NULL an expired entry is HS_SHARED_NOT_FOUND; otherwise it is
 * returned (until reclaimed) and *stale says whether it expired. */
int hs_shared_get(hs_shared *d, const char *key, size_t klen, hs_value *out, char *buf, size_t cap,
                  int *stale);
/* Store V (its flags too) under KEY for TTL seconds (0: no expiry) as MODE says:
 * SET always, ADD only when absent or expired (else HS_SHARED_EXISTS), REPLACE only
 * when present (else HS_SHARED_NOT_FOUND), the SAFE_ ones without evicting live
 * entries. *forcible (may be NULL) is set to 1 when live entries were evicted. */
int hs_shared_store(hs_shared *d, int mode, const char *key, size_t klen, const hs_value *v,
                    double ttl, int *forcible);
/* Remove KEY: HS_SHARED_OK, or HS_SHARED_NOT_FOUND when it was absent (or expired). */
int hs_shared_delete(hs_shared *d, const char *key, size_t klen);
/* Add DELTA (HS_VAL_INTEGER or HS_VAL_NUMBER) to the number under KEY: an integer
 * sum when both are integers, else a double. When KEY is absent or expired and
 * INIT is not NULL, store INIT + DELTA with INIT_TTL and no flags (this may evict:
 * *forcible); with INIT NULL that is HS_SHARED_NOT_FOUND. The TTL and flags of an
 * existing entry are kept. The new value is written to OUT. */
int hs_shared_incr(hs_shared *d, const char *key, size_t klen, const hs_value *delta,
                   const hs_value *init, double init_ttl, hs_value *out, int *forcible);
/* Seconds KEY has left (0: no expiry); HS_SHARED_NOT_FOUND when absent or expired. */
int hs_shared_ttl(hs_shared *d, const char *key, size_t klen, double *ttl);
/* Give a live KEY a new TTL (0: none). */
int hs_shared_expire(hs_shared *d, const char *key, size_t klen, double ttl);
/* Live keys, most recently used first, at most MAX (<= 0: all), packed into BUF as
 * a uint32_t length (native byte order) then the key's bytes, each. Returns the
 * bytes the whole list needs: when that is over CAP, BUF holds only the keys that
 * fit — call again with a larger buffer. *count gets the number of keys listed. */
size_t hs_shared_keys(hs_shared *d, int max, char *buf, size_t cap, int *count);
/* (In Redis, a failure makes it return 0 with *count -1: HS_SHARED_BACKEND.) */
/* Mark every entry expired (hs_shared_get with STALE still sees them until reclaimed);
 * HS_SHARED_OK, or HS_SHARED_BACKEND. */
int hs_shared_flush_all(hs_shared *d);
/* Reclaim expired entries, at most MAX (<= 0: all); returns how many. */
int hs_shared_flush_expired(hs_shared *d, int max);
void hs_shared_stats(hs_shared *d, hs_shared_info *out);

#ifdef __cplusplus
}
#endif
#endif
