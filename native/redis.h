/*
 * redis.h — Redis endpoints of a host: a URL's settings, a pool of connections
 * and the round trip (no Lua here; shared_redis.c and lapi_redis.c build on it).
 *
 * An endpoint is opened from a URL when its host is created; it connects lazily.
 * A caller takes a connection from the pool for one round trip and gives it back,
 * so there are as many connections as threads talking to Redis at once, each
 * reused across calls. A connection that failed (timeout, reset, protocol error,
 * a reply over the bound) is closed, never reused: its next reply could belong to
 * the call that gave up. While connecting fails the endpoint backs off (50 ms,
 * doubling to 1 s): calls in that time fail at once with the last reason.
 *
 * Every wait is bounded by the endpoint's timeout and by the calling thread's
 * wait deadline (hs_wait_deadline_ns: a fire's time limit), whichever comes first.
 * Error messages begin with "redis: ".
 */
#ifndef HS_REDIS_H
#define HS_REDIS_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"

typedef struct hs_redis hs_redis;
struct redisReply;

#define HS_REDIS_DEFAULT_TIMEOUT 1.0        /* seconds */
#define HS_REDIS_DEFAULT_MAX_REPLY (64 << 20) /* bytes read for one round trip */

/* The calling thread's deadline for waits on the network (0: none); set around a
 * call by the Lua bindings from the fire's time limit (limits.c). */
extern _Thread_local uint64_t hs_wait_deadline_ns;

/* Parse URL (redis://[[user]:password@]host[:port][/db][?prefix=P&timeout=S&
 * connect_timeout=S&max_reply=BYTES]); DEFAULT_PREFIX applies when the URL names
 * none. NULL with MSG filled when the URL is bad (nothing is connected yet). */
hs_redis *hs_redis_open(const char *url, const char *default_prefix, char *msg, size_t msglen);
void hs_redis_close(hs_redis *r); /* NULL is fine; no call may be running */
const char *hs_redis_prefix(const hs_redis *r, size_t *len);
void hs_redis_limits(const hs_redis *r, size_t *max_reply); /* bytes of one round trip */
uint64_t hs_redis_timeout_ns(const hs_redis *r);

/* Append one command (ARGC arguments) in the Redis protocol to OUT; -1 no memory. */
int hs_redis_format(hs_buf *out, int argc, const char *const *argv, const size_t *argvlen);

/* Send the NCMDS commands formatted in CMDS and read their replies into REPLIES
 * (each freed by the caller with hs_redis_free_reply). 0, or -1 with ERR filled
 * ("redis: ...") and no reply kept. Error replies of the server are replies. */
int hs_redis_exec(hs_redis *r, const char *cmds, size_t len, int ncmds, struct redisReply **replies,
                  char *err, size_t errlen);
void hs_redis_free_reply(struct redisReply *reply);

typedef struct hs_redis_counters {
    uint64_t calls, errors, timeouts, reconnects, wait_ns;
} hs_redis_counters;
void hs_redis_stats(hs_redis *r, hs_redis_counters *out);

#endif
