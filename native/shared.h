/*
 * shared.h — shared dictionaries behind one backend interface (no Lua here).
 *
 * An hs_shared is a name, a backend's operations (hs_shared_ops) and the backend's
 * own data. shared.c owns the front: the checks of hs_config.shared, opening a
 * dictionary by URL, checking every argument of the public hs_shared_* calls
 * (hostscript.h) before handing them to the backend, and the error messages. A
 * backend gets keys of 1..HS_SHARED_KEY_MAX bytes, valid value types and finite,
 * non-negative TTLs, and answers with HS_SHARED_* codes.
 *
 * Backends: shared_mem.c, the in-process dictionary (url NULL), and
 * shared_redis.c (url redis://..., on redis.c). Each backend makes every operation
 * atomic on its own; callers hold no lock around them. A backend that fails for a
 * reason of its own returns HS_SHARED_BACKEND with the calling thread's message
 * set (hs_shared_backend_error).
 */
#ifndef HS_SHARED_H
#define HS_SHARED_H

#include <stddef.h>
#include <stdint.h>

#include "hostscript.h"

typedef struct hs_shared_ops {
    const char *kind; /* "memory", "redis" */
    int blocking;     /* calls wait on the network: a Lua caller releases the host's lock first */
    /* the backend's data for SPEC; NULL with MSG filled when it cannot be made */
    void *(*open)(const hs_shared_spec *spec, char *msg, size_t msglen);
    void (*close)(void *b);
    int (*get)(void *b, const char *key, size_t klen, hs_value *out, char *buf, size_t cap,
               int *stale);
    int (*store)(void *b, int mode, const char *key, size_t klen, const hs_value *v, double ttl,
                 int *forcible);
    int (*del)(void *b, const char *key, size_t klen);
    int (*incr)(void *b, const char *key, size_t klen, const hs_value *delta, const hs_value *init,
                double init_ttl, hs_value *out, int *forcible);
    int (*ttl)(void *b, const char *key, size_t klen, double *ttl);
    int (*expire)(void *b, const char *key, size_t klen, double ttl);
    size_t (*keys)(void *b, int max, char *buf, size_t cap, int *count);
    int (*flush_all)(void *b);
    int (*flush_expired)(void *b, int max);
    void (*stats)(void *b, hs_shared_info *out);
} hs_shared_ops;

struct hs_shared {
    const hs_shared_ops *ops;
    void *b; /* the backend's data */
    char name[HS_SHARED_NAME_MAX + 1];
};

/* Check a host's dictionary specs (names, capacities, backends): 0, or -1 with MSG. */
int hs_shared_check_specs(const hs_shared_spec *specs, int n, char *msg, size_t msglen);
/* Open one dictionary (its spec already checked); NULL with MSG filled. */
hs_shared *hs_shared_open(const hs_shared_spec *spec, char *msg, size_t msglen);
void hs_shared_close(hs_shared *d); /* NULL is fine */

/* The in-process backend (shared_mem.c). */
extern const hs_shared_ops hs_shared_mem_ops;

/* The Redis backend (shared_redis.c); the endpoint of a Redis dictionary, NULL
 * for others; the message of the calling thread's last HS_SHARED_BACKEND. */
extern const hs_shared_ops hs_shared_redis_ops;
struct hs_redis *hs_shared_redis(hs_shared *d);
const char *hs_shared_backend_error(void);
/* Drop what the Redis backend kept for the calling thread's retry of a get (the
 * caller gave up: its buffer could not be allocated). */
void hs_shared_redis_forget(void);

#endif
