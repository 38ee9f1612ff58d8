/*
 * lapi_redis.c — hs.redis: a Redis client for handlers, on the endpoints of the
 * host's Redis-backed shared dictionaries (redis.c):
 *
 *   local r = hs.redis("keys")     -- the endpoint of hs.shared.keys; raises if none
 *   r.prefix                       -- that dictionary's key prefix
 *   r:call("HSETNX", k, f, v)      -> reply | nil (a nil reply) | nil, err
 *   r:pipeline(function(p) p:call(...) ... end) -> {reply, ...; n = count} | nil, err
 *
 * Replies: integer -> integer (LuaJIT: number), bulk and status -> string, nil ->
 * nil, array -> table (nil elements -> false), error -> nil, "<server message>"
 * from call and {err = "<server message>"} in a pipeline's list. A failed round
 * trip is nil, "redis: <reason>". Arguments are strings or numbers (an integral
 * number is sent as an integer); a command that would change the pooled
 * connection's state or administer the server is refused with an error.
 *
 * The host's lock is released before a round trip (hs_state_before_wait), whose
 * wait is also bounded by the fire's time limit. A command's arguments are all
 * checked before a byte of it is queued (a pipeline never holds half a command),
 * and formatted into C memory bounded by the endpoint's max_reply, owned by the
 * call or by the pipeline's userdata; replies are converted to Lua values in
 * protected mode and freed whatever happens. Nothing is kept per thread.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <hiredis/hiredis.h>

#include "core.h"
#include "redis.h"
#include "shared.h"

typedef struct client_ud {
    hs_redis *r;
} client_ud;

typedef struct pipe_ud {
    hs_redis *r;
    hs_buf cmds;
    int n;
    int closed; /* sent, or its function failed: no more calls */
} pipe_ud;

/* Commands that change the state of a pooled connection (its database, its
 * protocol, a transaction or subscription left open, its replies turned off) or
 * administer the server. */
static const char *const refused[] = {
    "ACL",      "AUTH",        "BGREWRITEAOF", "BGSAVE",    "CLIENT",   "CLUSTER",    "CONFIG",
    "DEBUG",    "DISCARD",     "EXEC",         "FAILOVER",  "FLUSHALL", "FLUSHDB",    "HELLO",
    "MODULE",   "MONITOR",     "MULTI",        "PSUBSCRIBE", "PSYNC",   "PUNSUBSCRIBE", "QUIT",
    "REPLICAOF", "RESET",      "SAVE",         "SELECT",    "SHUTDOWN", "SLAVEOF",    "SSUBSCRIBE",
    "SUBSCRIBE", "SUNSUBSCRIBE", "SYNC",       "UNSUBSCRIBE", "UNWATCH", "WATCH",
};

static void check_command(lua_State *L, int idx) {
    if (lua_type(L, idx) != LUA_TSTRING)
        luaL_error(L, "bad command: a string expected (r:call(\"GET\", key)), got %s",
                   luaL_typename(L, idx));
    size_t n;
    const char *cmd = lua_tolstring(L, idx, &n);
    if (!n) luaL_error(L, "bad command: empty");
    for (size_t i = 0; i < sizeof refused / sizeof *refused; i++)
        if (strlen(refused[i]) == n && !strncasecmp(refused[i], cmd, n))
            luaL_error(L, "hs.redis: %s is not allowed (it would change the shared connection's "
                       "state or administer the server)", refused[i]);
}

/* Argument I's bytes (a number formatted into NUM); NULL when it is neither a
 * string nor a number. */
static const char *arg_bytes(lua_State *L, int i, char num[48], size_t *len) {
    int t = lua_type(L, i);
    if (t == LUA_TSTRING) return lua_tolstring(L, i, len);
    if (t != LUA_TNUMBER) return NULL;
    if (hs_isinteger(L, i)) {
        *len = (size_t)snprintf(num, 48, "%lld", (long long)lua_tointeger(L, i));
    } else {
        double d = (double)lua_tonumber(L, i);
        if (d == floor(d) && fabs(d) < 9.2e18) *len = (size_t)snprintf(num, 48, "%lld", (long long)d);
        else *len = (size_t)snprintf(num, 48, "%.17g", d);
    }
    return num;
}

/* Check the arguments FIRST..LAST: their types, and that OUT with them stays within
 * MAX bytes. Raises before anything is written, so a command is never half queued. */
static void check_args(lua_State *L, int first, int last, const hs_buf *out, size_t max) {
    size_t total = out->len + 32;
    for (int i = first; i <= last; i++) {
        char num[48];
        size_t len;
        if (!arg_bytes(L, i, num, &len))
            luaL_error(L, "bad argument #%d to a Redis command (a string or number expected, got %s)",
                       i - first + 1, luaL_typename(L, i));
        total += len + 32;
        if (total > max) {
            char limit[32];
            snprintf(limit, sizeof limit, "%zu", max);
            luaL_error(L, "hs.redis: the commands are larger than max_reply (%s bytes)", limit);
        }
    }
}

/* Append the (checked) arguments FIRST..LAST as one command to OUT: 0, or -1 with
 * no memory and OUT as it was. */
static int append_command(lua_State *L, int first, int last, hs_buf *out) {
    size_t was = out->len;
    char head[48];
    int n = snprintf(head, sizeof head, "*%d\r\n", last - first + 1);
    int nomem = hs_buf_put(out, head, (size_t)n);
    for (int i = first; i <= last && !nomem; i++) {
        char num[48];
        size_t len;
        const char *s = arg_bytes(L, i, num, &len);
        n = snprintf(head, sizeof head, "$%zu\r\n", len);
        nomem = hs_buf_put(out, head, (size_t)n) || hs_buf_put(out, s, len) || hs_buf_put(out, "\r\n", 2);
    }
    if (nomem) out->len = was;
    return nomem ? -1 : 0;
}

/* ---- replies to Lua values ---- */

static void push_reply(lua_State *L, const redisReply *r, int in_list) {
    switch (r->type) {
    case REDIS_REPLY_INTEGER:
#ifdef HS_ENGINE_LUAJIT
        lua_pushnumber(L, (lua_Number)r->integer);
#else
        lua_pushinteger(L, (lua_Integer)r->integer);
#endif
        break;
    case REDIS_REPLY_STRING:
    case REDIS_REPLY_STATUS: lua_pushlstring(L, r->str, r->len); break;
    case REDIS_REPLY_ARRAY:
        luaL_checkstack(L, 4, "reply nested too deeply");
        lua_createtable(L, (int)r->elements, 0);
        for (size_t i = 0; i < r->elements; i++) {
            push_reply(L, r->element[i], 1);
            lua_rawseti(L, -2, (int)i + 1);
        }
        break;
    case REDIS_REPLY_ERROR:
        if (in_list) { /* {err = message} */
            lua_createtable(L, 0, 1);
            lua_pushlstring(L, r->str, r->len);
            lua_setfield(L, -2, "err");
        } else {
            lua_pushlstring(L, r->str, r->len);
        }
        break;
    default: /* nil */
        if (in_list) lua_pushboolean(L, 0);
        else lua_pushnil(L);
        break;
    }
}

typedef struct convert_arg {
    redisReply **replies;
    int n;
    int list; /* a pipeline's list, or one call's results */
} convert_arg;

static int l_convert(lua_State *L) {
    convert_arg *a = lua_touserdata(L, 1);
    if (a->list) {
        lua_createtable(L, a->n, 1);
        for (int i = 0; i < a->n; i++) {
            push_reply(L, a->replies[i], 1);
            lua_rawseti(L, -2, i + 1);
        }
        lua_pushinteger(L, a->n);
        lua_setfield(L, -2, "n");
        return 1;
    }
    const redisReply *r = a->replies[0];
    if (r->type == REDIS_REPLY_ERROR) {
        lua_pushnil(L);
        push_reply(L, r, 0);
        return 2;
    }
    push_reply(L, r, 0);
    return 1;
}

/* Send CMDS (N commands) and push the results; the replies, and OWNED (a buffer
 * of the caller's, may be NULL), are freed in any case. */
static int exec_and_push(lua_State *L, hs_redis *r, const hs_buf *cmds, int n, int list,
                         hs_buf *owned) {
    redisReply **replies = malloc((size_t)(n ? n : 1) * sizeof *replies);
    if (!replies) {
        if (owned) hs_buf_free(owned);
        return luaL_error(L, "not enough memory");
    }
    char err[256];
    hs_state_before_wait(L);
    int failed = hs_redis_exec(r, cmds->p, cmds->len, n, replies, err, sizeof err);
    if (owned) hs_buf_free(owned);
    if (failed) {
        free(replies);
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    convert_arg a = {replies, n, list};
    int top = lua_gettop(L);
    lua_pushcfunction(L, l_convert);
    lua_pushlightuserdata(L, &a);
    int rc = lua_pcall(L, 1, LUA_MULTRET, 0);
    for (int i = 0; i < n; i++) hs_redis_free_reply(replies[i]);
    free(replies);
    if (rc) lua_error(L); /* the error (memory...) on top, nothing left to free */
    return lua_gettop(L) - top;
}

/* ---- the objects ---- */

/* Upvalue 1 of the methods: the set of this state's genuine objects. */
static void *check_object(lua_State *L, int idx, const char *how) {
    lua_pushvalue(L, idx);
    lua_rawget(L, lua_upvalueindex(1));
    int ok = lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (!ok) luaL_error(L, "%s", how);
    return lua_touserdata(L, idx);
}

static int l_call(lua_State *L) {
    client_ud *c = check_object(L, 1, "hs.redis methods are called with ':' (r:call(\"GET\", key))");
    if (lua_gettop(L) < 2) return luaL_error(L, "r:call needs a command (r:call(\"GET\", key))");
    check_command(L, 2);
    size_t max;
    hs_redis_limits(c->r, &max);
    hs_buf cmd = {0};
    check_args(L, 2, lua_gettop(L), &cmd, max); /* raises before the buffer exists */
    if (append_command(L, 2, lua_gettop(L), &cmd)) return luaL_error(L, "not enough memory");
    int n = exec_and_push(L, c->r, &cmd, 1, 0, &cmd); /* frees CMD, also when it raises */
    return n;
}

static int l_pipe_gc(lua_State *L) {
    pipe_ud *p = lua_touserdata(L, 1);
    hs_buf_free(&p->cmds);
    return 0;
}

static int l_pipe_call(lua_State *L) {
    pipe_ud *p = check_object(L, 1, "a pipeline's methods are called with ':' (p:call(\"GET\", key))");
    if (p->closed) return luaL_error(L, "this pipeline was sent already: call p:call inside its function");
    if (lua_gettop(L) < 2) return luaL_error(L, "p:call needs a command (p:call(\"GET\", key))");
    check_command(L, 2);
    size_t max;
    hs_redis_limits(p->r, &max);
    if (p->n == INT32_MAX) return luaL_error(L, "too many commands in one pipeline");
    check_args(L, 2, lua_gettop(L), &p->cmds, max);
    if (append_command(L, 2, lua_gettop(L), &p->cmds)) return luaL_error(L, "not enough memory");
    p->n++;
    return 0;
}

static int l_pipeline(lua_State *L) {
    client_ud *c = check_object(L, 1, "hs.redis methods are called with ':' (r:pipeline(fn))");
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_settop(L, 2);
    pipe_ud *p = lua_newuserdata(L, sizeof *p); /* 3 */
    memset(p, 0, sizeof *p);
    p->r = c->r;
    lua_pushvalue(L, lua_upvalueindex(2)); /* the pipelines' metatable */
    lua_setmetatable(L, 3);
    lua_pushvalue(L, 3);
    lua_pushboolean(L, 1);
    lua_rawset(L, lua_upvalueindex(1)); /* genuine (the set is weak-keyed) */
    lua_pushvalue(L, 2);
    lua_pushvalue(L, 3);
    p->closed = 0;
    int rc = lua_pcall(L, 1, 0, 0);
    p->closed = 1;
    if (rc) {
        hs_buf_free(&p->cmds);
        return lua_error(L);
    }
    if (!p->n) {
        lua_createtable(L, 0, 1);
        lua_pushinteger(L, 0);
        lua_setfield(L, -2, "n");
        return 1;
    }
    return exec_and_push(L, p->r, &p->cmds, p->n, 1, &p->cmds);
}

static int l_client_index(lua_State *L) {
    client_ud *c = lua_touserdata(L, 1);
    const char *k = lua_tostring(L, 2);
    if (k && !strcmp(k, "prefix")) {
        size_t n;
        const char *p = hs_redis_prefix(c->r, &n);
        lua_pushlstring(L, p, n);
        return 1;
    }
    lua_pushvalue(L, 2);
    lua_rawget(L, lua_upvalueindex(1)); /* the methods */
    return 1;
}

static int readonly_newindex(lua_State *L) {
    return luaL_error(L, "hs.redis connections are read-only");
}

static int l_redis(lua_State *L) {
    const char *name = luaL_checkstring(L, 1);
    lua_pushvalue(L, 1);
    lua_rawget(L, lua_upvalueindex(1));
    if (lua_isnil(L, -1))
        return luaL_error(L, "hs.redis: no Redis connection named '%s' (a shared dictionary "
                          "declared with a redis:// URL names one)", name);
    return 1;
}

static void new_metatable(lua_State *L, const char *name) {
    lua_createtable(L, 0, 4);
    lua_pushstring(L, name);
    lua_setfield(L, -2, "__metatable");
    lua_pushcfunction(L, readonly_newindex);
    lua_setfield(L, -2, "__newindex");
}

void hs_lapi_redis_open(hs_state *S) {
    lua_State *L = S->L;
    int hs = lua_gettop(L);
    lua_newtable(L); /* the genuine objects, weak-keyed (pipelines come and go) */
    int genuine = lua_gettop(L);
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "k");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, genuine);

    new_metatable(L, "redis pipeline"); /* pipelines */
    int pmt = lua_gettop(L);
    lua_createtable(L, 0, 1);
    lua_pushvalue(L, genuine);
    lua_pushcclosure(L, l_pipe_call, 1);
    lua_setfield(L, -2, "call");
    lua_setfield(L, pmt, "__index");
    lua_pushcfunction(L, l_pipe_gc);
    lua_setfield(L, pmt, "__gc");

    new_metatable(L, "redis connection"); /* clients */
    int cmt = lua_gettop(L);
    lua_createtable(L, 0, 2);
    lua_pushvalue(L, genuine);
    lua_pushcclosure(L, l_call, 1);
    lua_setfield(L, -2, "call");
    lua_pushvalue(L, genuine);
    lua_pushvalue(L, pmt);
    lua_pushcclosure(L, l_pipeline, 2);
    lua_setfield(L, -2, "pipeline");
    lua_pushcclosure(L, l_client_index, 1);
    lua_setfield(L, cmt, "__index");

    lua_newtable(L); /* name -> client */
    int byname = lua_gettop(L);
    for (int i = 0; i < S->host->nshared; i++) {
        hs_redis *r = hs_shared_redis(S->host->shared[i]);
        if (!r) continue;
        client_ud *u = lua_newuserdata(L, sizeof *u);
        u->r = r;
        lua_pushvalue(L, cmt);
        lua_setmetatable(L, -2);
        lua_pushvalue(L, -1);
        lua_pushboolean(L, 1);
        lua_rawset(L, genuine);
        lua_setfield(L, byname, hs_shared_name(S->host->shared[i]));
    }
    lua_pushvalue(L, byname);
    lua_pushcclosure(L, l_redis, 1);
    lua_setfield(L, hs, "redis");
    lua_settop(L, hs);
}
