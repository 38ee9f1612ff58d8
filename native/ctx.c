/*
 * ctx.c — txn.ctx between fires: a Lua table of plain data serialized into the C
 * transaction, so the next hook can decode it in another thread's state.
 *
 * Format (little-endian; hostscript/_ctx.c reads and writes it for Python too):
 *   'f' | 't'                  false | true
 *   'i' int64                  integer (LuaJIT: a number with an exact integer value)
 *   'd' double                 other numbers
 *   's' u32 len, bytes         string
 *   'T' u32 npairs, (key value) * npairs      table; keys are strings, numbers, booleans
 * Anything else (functions, userdata, threads, cycles, nesting beyond HS_CTX_DEPTH,
 * more than HS_CTX_MAX bytes) is refused with the path to the offending value.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "core.h"

#define HS_CTX_DEPTH 32

/* The encoder keeps no path while it works (formatting one per key cost more than
 * the encoding): keys[d] is the stack index of the key being encoded at depth d,
 * and only an error turns them into "txn.ctx.a[2]". */
typedef struct enc {
    lua_State *L;
    hs_buf *out;
    char *err;
    size_t errlen;
    int keys[HS_CTX_DEPTH + 1];
} enc;

static int put_u32(hs_buf *b, uint32_t v) { return hs_buf_put(b, &v, 4); }

static int enc_fail(enc *e, int depth, const char *fmt, const char *arg) {
    char path[512] = "";
    size_t off = 0;
    lua_State *L = e->L;
    for (int d = 0; d < depth && off < sizeof path; d++) {
        int k = e->keys[d];
        if (lua_type(L, k) == LUA_TSTRING)
            off += snprintf(path + off, sizeof path - off, ".%s", lua_tostring(L, k));
        else if (lua_type(L, k) == LUA_TNUMBER)
            off += snprintf(path + off, sizeof path - off, "[%.14g]", (double)lua_tonumber(L, k));
        else
            off += snprintf(path + off, sizeof path - off, "[%s]", lua_toboolean(L, k) ? "true" : "false");
    }
    char msg[256];
    snprintf(msg, sizeof msg, fmt, arg);
    snprintf(e->err, e->errlen, "txn.ctx%s %s", path, msg);
    return -1;
}

static int enc_value(enc *e, int idx, int depth, int is_key);

static int enc_table(enc *e, int idx, int depth) {
    lua_State *L = e->L;
    if (depth >= HS_CTX_DEPTH)
        return enc_fail(e, depth, "nests tables deeper than %s (or refers to itself); ctx keeps "
                                  "plain data only", "32");
    if (e->out->len > HS_CTX_MAX)
        return enc_fail(e, depth, "is larger than %s (a table stored many times over?)", "8 MiB");
    if (hs_buf_put(e->out, "T", 1) || put_u32(e->out, 0)) goto nomem;
    size_t countpos = e->out->len - 4;
    uint32_t n = 0;
    if (!lua_checkstack(L, 4)) goto nomem;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        int k = lua_gettop(L) - 1, v = k + 1;
        e->keys[depth] = k;
        int kt = lua_type(L, k);
        if (kt != LUA_TSTRING && kt != LUA_TNUMBER && kt != LUA_TBOOLEAN)
            return enc_fail(e, depth, "has a %s key; ctx keys must be strings, numbers or booleans",
                            luaL_typename(L, k));
        if (enc_value(e, k, depth + 1, 1) || enc_value(e, v, depth + 1, 0)) return -1;
        if (e->out->len > HS_CTX_MAX) /* a table shared many times over expands as a tree */
            return enc_fail(e, depth, "makes txn.ctx larger than %s", "8 MiB");
        n++;
        lua_pop(L, 1);
    }
    memcpy(e->out->p + countpos, &n, 4);
    return 0;
nomem:
    snprintf(e->err, e->errlen, "out of memory saving txn.ctx");
    return -1;
}

static int enc_value(enc *e, int idx, int depth, int is_key) {
    lua_State *L = e->L;
    hs_buf *b = e->out;
    int rc;
    switch (lua_type(L, idx)) {
    case LUA_TBOOLEAN:
        rc = hs_buf_put(b, lua_toboolean(L, idx) ? "t" : "f", 1);
        break;
    case LUA_TNUMBER: {
        lua_Number d = lua_tonumber(L, idx);
#ifdef HS_ENGINE_LUAJIT /* numbers are doubles: integral ones go as integers, but not -0 */
        int as_int = d == floor(d) && fabs(d) < 9007199254740992.0 && !(d == 0 && signbit(d));
        int64_t i = as_int ? (int64_t)d : 0;
#else
        int as_int = hs_isinteger(L, idx);
        int64_t i = as_int ? (int64_t)lua_tointeger(L, idx) : 0;
#endif
        if (as_int) {
            rc = hs_buf_put(b, "i", 1) || hs_buf_put(b, &i, 8);
        } else {
            double v = (double)d;
            rc = hs_buf_put(b, "d", 1) || hs_buf_put(b, &v, 8);
        }
        break;
    }
    case LUA_TSTRING: {
        size_t n;
        const char *s = lua_tolstring(L, idx, &n);
        if (n > HS_CTX_MAX || b->len > HS_CTX_MAX - n)
            return enc_fail(e, depth, "makes txn.ctx larger than %s", "8 MiB");
        rc = hs_buf_put(b, "s", 1) || put_u32(b, (uint32_t)n) || hs_buf_put(b, s, n);
        break;
    }
    case LUA_TTABLE:
        if (!is_key && lua_getmetatable(L, idx)) {
            lua_pop(L, 1);
            return enc_fail(e, depth, "is a table with a metatable (a headers proxy or an object)%s; "
                                      "ctx keeps plain data only (nil, boolean, number, string, "
                                      "tables of these)", "");
        }
        if (!is_key) return enc_table(e, hs_absindex(L, idx), depth);
        /* fallthrough */
    default:
        return enc_fail(e, depth, "holds a %s; ctx keeps plain data only (nil, boolean, number, "
                                  "string, tables of these)", luaL_typename(L, idx));
    }
    if (rc) snprintf(e->err, e->errlen, "out of memory saving txn.ctx");
    return rc ? -1 : 0;
}

int hs_ctx_encode(lua_State *L, int idx, hs_buf *out, char *err, size_t errlen) {
    enc e = {L, out, err, errlen, {0}};
    if (!lua_istable(L, idx)) {
        snprintf(err, errlen, "txn.ctx must be a table, not %s", luaL_typename(L, idx));
        return -1;
    }
    if (lua_getmetatable(L, idx)) {
        lua_pop(L, 1);
        snprintf(err, errlen, "txn.ctx is a table with a metatable; ctx keeps plain data only");
        return -1;
    }
    int top = lua_gettop(L);
    int rc = enc_table(&e, hs_absindex(L, idx), 0);
    lua_settop(L, top);
    return rc;
}

typedef struct dec {
    const char *p, *end;
} dec;

static int dec_value(lua_State *L, dec *d, int depth) {
    if (d->p >= d->end || depth > HS_CTX_DEPTH + 1) return -1;
    char tag = *d->p++;
    switch (tag) {
    case 'f':
    case 't':
        lua_pushboolean(L, tag == 't');
        return 0;
    case 'i': {
        int64_t i;
        if (d->end - d->p < 8) return -1;
        memcpy(&i, d->p, 8);
        d->p += 8;
#ifdef HS_ENGINE_LUAJIT /* a double holds integers up to 2^53 exactly; refuse, not round */
        if (i > 9007199254740992LL || i < -9007199254740992LL) return -2;
        lua_pushnumber(L, (lua_Number)i);
#else
        lua_pushinteger(L, (lua_Integer)i);
#endif
        return 0;
    }
    case 'd': {
        double v;
        if (d->end - d->p < 8) return -1;
        memcpy(&v, d->p, 8);
        d->p += 8;
        lua_pushnumber(L, v);
        return 0;
    }
    case 's': {
        uint32_t n;
        if (d->end - d->p < 4) return -1;
        memcpy(&n, d->p, 4);
        d->p += 4;
        if ((size_t)(d->end - d->p) < n) return -1;
        lua_pushlstring(L, d->p, n);
        d->p += n;
        return 0;
    }
    case 'T': {
        uint32_t n;
        if (d->end - d->p < 4) return -1;
        memcpy(&n, d->p, 4);
        d->p += 4;
        if (!lua_checkstack(L, 4)) return -1;
        lua_createtable(L, 0, (int)(n < 1024 ? n : 1024));
        for (uint32_t i = 0; i < n; i++) {
            int rc = dec_value(L, d, depth + 1);
            if (rc || (rc = dec_value(L, d, depth + 1))) return rc;
            lua_rawset(L, -3);
        }
        return 0;
    }
    default:
        return -1;
    }
}

int hs_ctx_decode(lua_State *L, const char *p, size_t len) {
    if (len == 0) {
        lua_newtable(L);
        return 0;
    }
    dec d = {p, p + len};
    int top = lua_gettop(L);
    int rc = dec_value(L, &d, 0);
    if (rc != 0 || !lua_istable(L, -1)) {
        lua_settop(L, top);
        return rc ? rc : -1;
    }
    return 0;
}
