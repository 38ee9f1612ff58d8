/*
 * lapi_shared.c — hs.shared: the host's shared dictionaries (shared.c) as Lua
 * objects, with the methods and results of OpenResty's ngx.shared.DICT:
 *
 *   local d = hs.shared.meta            -- or hs.shared["my-dict"]; nil when undeclared
 *   d:get(k)            -> value, flags (flags only when not 0) | nil
 *   d:get_stale(k)      -> value, flags | nil, stale
 *   d:set(k, v, ttl, flags), d:safe_set, d:add, d:safe_add, d:replace
 *                       -> true, nil, forcible | false, err, forcible
 *   d:delete(k)         -> true
 *   d:incr(k, n, init, init_ttl) -> new value, nil, forcible | nil, err
 *   d:ttl(k)            -> seconds (0: no expiry) | nil, "not found"
 *   d:expire(k, ttl)    -> true | false, "not found"
 *   d:get_keys(max)     -> {keys} (max 1024 by default, 0: all)
 *   d:flush_all(), d:flush_expired(max) -> count, d:capacity(), d:free_space()
 *
 * A Redis-backed dictionary (shared_redis.c) answers the same way; a failed round
 * trip is nil (false for the stores), "redis: <reason>"; capacity and free_space
 * are nil, "redis: no capacity". Before a call on it, the host's lock is released.
 *
 * A bad key (not a string, empty, over 65535 bytes) or value (a table, a
 * function...) is answered with nil and a message, as ngx does; a bad number
 * argument (ttl, flags, max, incr's increment or init) raises an error, as ngx
 * raises for a bad exptime.
 *
 * No Lua error may be raised while a dictionary's lock is held, so the hs_shared_*
 * calls — which take and release the lock themselves and never call Lua — come
 * after every check and allocation that can raise, and their results are pushed
 * only once they returned. A value or key list larger than the buffer on the C
 * stack is read into a userdata allocated beforehand from the state's allocator,
 * so the memory limit applies to it and a refusal leaves nothing behind.
 *
 * hs.shared and each dictionary object are userdata with locked metatables: no
 * script can store a field in them or reach the methods table, so no script can
 * change what another one calls. The objects are built once per state.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "core.h"
#include "shared.h"

#define INLINE_VALUE 256 /* a value up to this size is read into a C stack buffer */
#define INLINE_KEYS 1024
#define DEFAULT_MAX_KEYS 1024

typedef struct dict_ud {
    hs_shared *d;
} dict_ud;

/* Upvalue 1 of every method is the set of this state's dictionary objects: self
 * must be one of them. Checking the metatable is not enough: without the sandbox,
 * debug.setmetatable puts it on any userdata (hs.DONE, io.stdout...), whose
 * memory would then be read as a dictionary. */
static hs_shared *check_dict(lua_State *L) {
    lua_pushvalue(L, 1);
    lua_rawget(L, lua_upvalueindex(1));
    int ok = lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (!ok)
        luaL_error(L, "a shared dictionary's methods are called with ':' (hs.shared.NAME:get(key))");
    hs_shared *d = ((dict_ud *)lua_touserdata(L, 1))->d;
    if (d->ops->blocking) hs_state_before_wait(L); /* Redis: the host's lock goes first */
    return d;
}

/* nil, MSG */
static int fail(lua_State *L, const char *msg) {
    lua_pushnil(L);
    lua_pushstring(L, msg);
    return 2;
}

/* The key at idx 2, or NULL with *err set (empty and long keys are left to shared.c). */
static const char *get_key(lua_State *L, size_t *len, const char **err) {
    int t = lua_type(L, 2);
    if (t == LUA_TSTRING) return lua_tolstring(L, 2, len);
    *err = t == LUA_TNIL || t == LUA_TNONE ? "nil key" : "bad key type (a string is expected)";
    return NULL;
}

#define KEY(L, k, klen)                               \
    size_t klen;                                      \
    const char *key_err_ = NULL;                      \
    const char *k = get_key((L), &klen, &key_err_);   \
    if (!k) return fail((L), key_err_)

/* The value at idx into V (flags 0); -1 for a type a dictionary cannot hold. */
static int get_value(lua_State *L, int idx, hs_value *v) {
    memset(v, 0, sizeof *v);
    switch (lua_type(L, idx)) {
    case LUA_TNONE:
    case LUA_TNIL: v->type = HS_VAL_NIL; return 0;
    case LUA_TBOOLEAN:
        v->type = HS_VAL_BOOLEAN;
        v->i = lua_toboolean(L, idx);
        return 0;
    case LUA_TNUMBER:
        if (hs_isinteger(L, idx)) {
            v->type = HS_VAL_INTEGER;
            v->i = (int64_t)lua_tointeger(L, idx);
        } else {
            v->type = HS_VAL_NUMBER;
            v->n = (double)lua_tonumber(L, idx);
#ifdef HS_ENGINE_LUAJIT
            /* LuaJIT has no integers: an integral number (within 2^53, not -0) is
             * stored as one, so Lua 5.4, Python and Redis read what Lua 5.4 would
             * have written, and a counter stays exact and INCRBY-able */
            if (v->n == floor(v->n) && fabs(v->n) <= 9007199254740992.0 &&
                !(v->n == 0 && signbit(v->n))) {
                v->type = HS_VAL_INTEGER;
                v->i = (int64_t)v->n;
            }
#endif
        }
        return 0;
    case LUA_TSTRING:
        v->type = HS_VAL_STRING;
        v->s = lua_tolstring(L, idx, &v->len);
        return 0;
    default: return -1;
    }
}

/* Push V; 0 (nothing pushed) for an integer this engine cannot represent exactly. */
static int push_value(lua_State *L, const hs_value *v) {
    switch (v->type) {
    case HS_VAL_BOOLEAN: lua_pushboolean(L, (int)v->i); break;
    case HS_VAL_INTEGER:
#ifdef HS_ENGINE_LUAJIT
        if (v->i > ((int64_t)1 << 53) || v->i < -((int64_t)1 << 53)) return 0;
        lua_pushnumber(L, (lua_Number)v->i);
#else
        lua_pushinteger(L, (lua_Integer)v->i);
#endif
        break;
    case HS_VAL_NUMBER: lua_pushnumber(L, (lua_Number)v->n); break;
    case HS_VAL_STRING: lua_pushlstring(L, v->s, v->len); break;
    default: lua_pushnil(L); break;
    }
    return 1;
}

static const char too_big_int[] =
    "the value is an integer beyond 2^53, which " HS_ENGINE_NAME " cannot represent exactly";

/* Seconds at idx: 0 when absent (unless REQUIRED); raises unless a number >= 0. */
static double get_ttl(lua_State *L, int idx, const char *what, int required) {
    if (!required && lua_isnoneornil(L, idx)) return 0;
    if (lua_type(L, idx) != LUA_TNUMBER)
        luaL_error(L, "bad %s: a number of seconds expected (0: no expiry), got %s", what,
                   luaL_typename(L, idx));
    double t = (double)lua_tonumber(L, idx);
    if (!(t >= 0) || !isfinite(t))
        luaL_error(L, "bad %s: %f (a number of seconds >= 0 expected; 0: no expiry)", what, t);
    return t;
}

/* An integer argument from 0 to 2^32-1 at idx, DEF when absent; raises otherwise. */
static uint32_t get_u32(lua_State *L, int idx, const char *what, uint32_t def) {
    if (lua_isnoneornil(L, idx)) return def;
    if (lua_type(L, idx) != LUA_TNUMBER)
        luaL_error(L, "bad %s: a number expected, got %s", what, luaL_typename(L, idx));
    double n = (double)lua_tonumber(L, idx);
    if (!(n >= 0 && n <= 4294967295.0) || n != floor(n))
        luaL_error(L, "bad %s: an integer from 0 to 2^32-1 expected", what);
    return (uint32_t)n;
}

static int max_arg(lua_State *L, int idx, uint32_t def) {
    uint32_t n = get_u32(L, idx, "max", def);
    return n > INT32_MAX ? 0 : (int)n; /* beyond int: as good as all */
}

/* ---- reading ---- */

static int new_buffer(lua_State *L) {
    lua_newuserdata(L, (size_t)lua_tonumber(L, 1));
    return 1;
}

/* get and get_stale: upvalue 2 is 1 for get_stale. */
static int l_get(lua_State *L) {
    hs_shared *d = check_dict(L);
    int with_stale = (int)lua_tointeger(L, lua_upvalueindex(2));
    KEY(L, key, klen);
    char stack[INLINE_VALUE], *buf = stack;
    size_t cap = sizeof stack;
    hs_value v;
    int stale = 0, rc, top = lua_gettop(L);
    while ((rc = hs_shared_get(d, key, klen, &v, buf, cap, with_stale ? &stale : NULL)) ==
           HS_SHARED_BUFFER) {
        lua_settop(L, top); /* a buffer too small from an earlier try */
        cap = v.len;
        lua_pushcfunction(L, new_buffer); /* may fail (memory limit): no lock is held, */
        lua_pushnumber(L, (lua_Number)cap);
        if (lua_pcall(L, 1, 1, 0)) {      /* and what Redis's backend kept goes too */
            hs_shared_redis_forget();
            lua_error(L);
        }
        buf = lua_touserdata(L, -1);
    }
    if (rc == HS_SHARED_NOT_FOUND) {
        lua_pushnil(L);
        return 1;
    }
    if (rc != HS_SHARED_OK) return fail(L, hs_shared_strerror(rc));
    if (!push_value(L, &v)) return fail(L, too_big_int);
    if (!with_stale && !v.flags) return 1;
    if (v.flags) lua_pushinteger(L, (lua_Integer)v.flags);
    else lua_pushnil(L);
    if (!with_stale) return 2;
    lua_pushboolean(L, stale);
    return 3;
}

static int l_ttl(lua_State *L) {
    hs_shared *d = check_dict(L);
    KEY(L, key, klen);
    double ttl;
    int rc = hs_shared_ttl(d, key, klen, &ttl);
    if (rc != HS_SHARED_OK) return fail(L, hs_shared_strerror(rc));
    lua_pushnumber(L, (lua_Number)ttl);
    return 1;
}

static int l_get_keys(lua_State *L) {
    hs_shared *d = check_dict(L);
    int max = max_arg(L, 2, DEFAULT_MAX_KEYS);
    char stack[INLINE_KEYS], *buf = stack;
    size_t cap = sizeof stack, need;
    int count, top = lua_gettop(L);
    while ((need = hs_shared_keys(d, max, buf, cap, &count)) > cap || count < 0) {
        if (count < 0) return fail(L, hs_shared_strerror(HS_SHARED_BACKEND));
        lua_settop(L, top);
        cap = need + need / 8 + 64; /* room for a few keys more by the next try */
        buf = lua_newuserdata(L, cap); /* may raise (memory limit): no lock is held */
    }
    lua_createtable(L, count, 0);
    size_t pos = 0;
    for (int i = 1; i <= count; i++) {
        uint32_t len;
        memcpy(&len, buf + pos, sizeof len);
        lua_pushlstring(L, buf + pos + sizeof len, len);
        lua_rawseti(L, -2, i);
        pos += sizeof len + len;
    }
    return 1;
}

/* capacity and free_space: upvalue 2 is 1 for free_space. Redis has no capacity
 * of its own: nil and a message say so. */
static int l_capacity(lua_State *L) {
    hs_shared_info info;
    hs_shared_stats(check_dict(L), &info);
    if (info.backend != HS_SHARED_MEMORY) return fail(L, "redis: no capacity (Redis's maxmemory rules)");
    lua_pushinteger(L, (lua_Integer)(lua_tointeger(L, lua_upvalueindex(2)) ? info.free_space
                                                                          : info.capacity));
    return 1;
}

/* ---- writing ---- */

/* set, safe_set, add, safe_add, replace: upvalue 2 is the HS_STORE_* mode. */
static int l_store(lua_State *L) {
    hs_shared *d = check_dict(L);
    int mode = (int)lua_tointeger(L, lua_upvalueindex(2));
    KEY(L, key, klen);
    hs_value v;
    if (get_value(L, 3, &v)) return fail(L, "bad value type");
    double ttl = get_ttl(L, 4, "ttl", 0);
    v.flags = get_u32(L, 5, "flags", 0);
    int forcible = 0;
    int rc = hs_shared_store(d, mode, key, klen, &v, ttl, &forcible);
    if (rc == HS_SHARED_EMPTY_KEY || rc == HS_SHARED_KEY_TOO_LONG || rc == HS_SHARED_BAD_VALUE)
        return fail(L, hs_shared_strerror(rc));
    lua_pushboolean(L, rc == HS_SHARED_OK);
    if (rc == HS_SHARED_OK) lua_pushnil(L);
    else lua_pushstring(L, hs_shared_strerror(rc));
    lua_pushboolean(L, forcible);
    return 3;
}

static int l_delete(lua_State *L) {
    hs_shared *d = check_dict(L);
    KEY(L, key, klen);
    int rc = hs_shared_delete(d, key, klen);
    if (rc != HS_SHARED_OK && rc != HS_SHARED_NOT_FOUND) return fail(L, hs_shared_strerror(rc));
    lua_pushboolean(L, 1);
    return 1;
}

static void get_number(lua_State *L, int idx, const char *what, hs_value *v) {
    if (lua_type(L, idx) != LUA_TNUMBER)
        luaL_error(L, "bad %s: a number expected, got %s", what, luaL_typename(L, idx));
    get_value(L, idx, v);
}

static int l_incr(lua_State *L) {
    hs_shared *d = check_dict(L);
    KEY(L, key, klen);
    hs_value delta, init, out;
    get_number(L, 3, "increment", &delta);
    int has_init = !lua_isnoneornil(L, 4);
    if (has_init) get_number(L, 4, "init", &init);
    else if (!lua_isnoneornil(L, 5)) luaL_error(L, "bad init_ttl: it applies to init, which is missing");
    double init_ttl = get_ttl(L, 5, "init_ttl", 0);
    int forcible = 0;
    int rc = hs_shared_incr(d, key, klen, &delta, has_init ? &init : NULL, init_ttl, &out, &forcible);
    if (rc != HS_SHARED_OK) return fail(L, hs_shared_strerror(rc));
    if (!push_value(L, &out)) return fail(L, too_big_int);
    lua_pushnil(L);
    lua_pushboolean(L, forcible);
    return 3;
}

static int l_expire(lua_State *L) {
    hs_shared *d = check_dict(L);
    KEY(L, key, klen);
    double ttl = get_ttl(L, 3, "ttl", 1);
    int rc = hs_shared_expire(d, key, klen, ttl);
    if (rc == HS_SHARED_OK) {
        lua_pushboolean(L, 1);
        return 1;
    }
    if (rc != HS_SHARED_NOT_FOUND) return fail(L, hs_shared_strerror(rc));
    lua_pushboolean(L, 0);
    lua_pushstring(L, hs_shared_strerror(rc));
    return 2;
}

static int l_flush_all(lua_State *L) {
    int rc = hs_shared_flush_all(check_dict(L));
    return rc == HS_SHARED_OK ? 0 : fail(L, hs_shared_strerror(rc));
}

static int l_flush_expired(lua_State *L) {
    hs_shared *d = check_dict(L);
    int max = max_arg(L, 2, 0);
    lua_pushinteger(L, hs_shared_flush_expired(d, max));
    return 1;
}

static int l_tostring(lua_State *L) {
    hs_shared *d = check_dict(L);
    lua_pushfstring(L, "shared dictionary '%s'", hs_shared_name(d));
    return 1;
}

/* ---- the objects ---- */

static int readonly_newindex(lua_State *L) {
    const char *k = lua_tostring(L, 2);
    return luaL_error(L, "cannot assign '%s': hs.shared and its dictionaries are read-only",
                      k ? k : "?");
}

static const struct {
    const char *name;
    lua_CFunction fn;
    int arg; /* upvalue 2 */
} methods[] = {
    {"get", l_get, 0},
    {"get_stale", l_get, 1},
    {"set", l_store, HS_STORE_SET},
    {"safe_set", l_store, HS_STORE_SAFE_SET},
    {"add", l_store, HS_STORE_ADD},
    {"safe_add", l_store, HS_STORE_SAFE_ADD},
    {"replace", l_store, HS_STORE_REPLACE},
    {"delete", l_delete, 0},
    {"incr", l_incr, 0},
    {"ttl", l_ttl, 0},
    {"expire", l_expire, 0},
    {"get_keys", l_get_keys, 0},
    {"flush_all", l_flush_all, 0},
    {"flush_expired", l_flush_expired, 0},
    {"capacity", l_capacity, 0},
    {"free_space", l_capacity, 1},
};

void hs_lapi_shared_open(hs_state *S) {
    lua_State *L = S->L;
    int hs = lua_gettop(L);
    lua_newtable(L); /* the set of dictionary objects: the methods' upvalue 1 */
    int genuine = lua_gettop(L);
    lua_newtable(L); /* the dictionaries' metatable */
    int mt = lua_gettop(L);
    lua_createtable(L, 0, (int)(sizeof methods / sizeof *methods));
    for (size_t i = 0; i < sizeof methods / sizeof *methods; i++) {
        lua_pushvalue(L, genuine);
        lua_pushinteger(L, methods[i].arg);
        lua_pushcclosure(L, methods[i].fn, 2);
        lua_setfield(L, -2, methods[i].name);
    }
    lua_setfield(L, mt, "__index");
    lua_pushcfunction(L, readonly_newindex);
    lua_setfield(L, mt, "__newindex");
    lua_pushvalue(L, genuine);
    lua_pushcclosure(L, l_tostring, 1);
    lua_setfield(L, mt, "__tostring");
    lua_pushliteral(L, "shared dictionary");
    lua_setfield(L, mt, "__metatable");

    lua_createtable(L, 0, S->host->nshared); /* name -> dictionary object */
    for (int i = 0; i < S->host->nshared; i++) {
        dict_ud *u = lua_newuserdata(L, sizeof *u);
        u->d = S->host->shared[i];
        lua_pushvalue(L, mt);
        lua_setmetatable(L, -2);
        lua_pushvalue(L, -1);
        lua_pushboolean(L, 1);
        lua_rawset(L, genuine);
        lua_setfield(L, -2, hs_shared_name(u->d));
    }
    lua_newuserdata(L, 1); /* hs.shared */
    lua_createtable(L, 0, 3);
    lua_pushvalue(L, -3);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, readonly_newindex);
    lua_setfield(L, -2, "__newindex");
    lua_pushliteral(L, "hs.shared");
    lua_setfield(L, -2, "__metatable");
    lua_setmetatable(L, -2);
    lua_setfield(L, hs, "shared");
    lua_settop(L, hs);
}
