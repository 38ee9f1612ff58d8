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
    HS_CH_CACHE_KEY = 1 << 8
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

typedef struct hs_config {
    const char *const *hooks;   /* hook names a script may handle (on_<name>) */
    int nhooks;                 /* 1..64 */
    double time_limit;          /* seconds of Lua per fire; <= 0: unlimited */
    size_t memory_limit;        /* bytes of Lua heap per thread state; 0: unlimited */
    int sandbox;                /* 1: safe stdlib only and strict globals */
    const char *const *lua_path; /* directories searched by require for NAME.lua */
    int nlua_path;
    int state_pool;             /* idle states kept for new threads when theirs end; 0: none */
} hs_config;

typedef struct hs_hook_stats {
    uint64_t fires, errors, total_ns;
} hs_hook_stats;

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
/* Remove script NAME; 0 ok, -1 when it is not loaded. */
int hs_unload(hs_host *h, const char *name);
/* Script names in load order, NUL-separated, into buf; returns the bytes needed. */
size_t hs_scripts(hs_host *h, char *buf, size_t cap);
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

#ifdef __cplusplus
}
#endif
#endif
