/*
 * class_codec.c — a handler class as bytes: how a class registered at run time on
 * one thread (hs.register inside a fire) is rebuilt in every other thread's state.
 *
 * The class is serialized once, at registration, and the bytes are published in
 * the program like a script's bytecode; each state rebuilds the class once per
 * program version. What crosses:
 *   - the class table and everything reachable from it through fields and
 *     metatables (its "own" tables and functions), shared references and cycles kept;
 *   - Lua functions as bytecode (lua_dump: only the core dumps), their upvalues
 *     by value, upvalues shared between functions joined again on the other side;
 *   - an upvalue that is a table outside the class: plain data only (nil,
 *     booleans, numbers, strings, tables of these) — a table holding a function,
 *     a coroutine or a userdata is refused, since its copy would silently stop
 *     being the object the rest of the script shares;
 *   - library values (string.format, hs.log, hs.shared.NAME...) and modules from
 *     require (and their fields) by name, looked up again in the receiving state;
 *   - the script environment: the class gets a fresh one in each state.
 * Anything else is a registration error naming its path ("counter.on_x upvalue
 * 'co' is a coroutine"). Bounded: HS_CLASS_DEPTH levels, HS_CLASS_MAX bytes, the
 * fire's time limit (checked every few values); the caller charges the bytes to
 * the state's heap.
 *
 * Format (host byte order: the bytes never leave the process):
 *   'n' | 'f' | 't'              nil, false, true
 *   'i' int64 | 'd' double       numbers
 *   's' u32 len, bytes           string
 *   'T' (key value)* '.' meta    table (next object id); meta a value, 'n' for none
 *   'F' u32 len, bytecode, u8 n, upvalue * n      Lua function (next object id);
 *        upvalue: a value, or 'j' u32 id u8 i: the upvalue i of function id
 *   'R' u32 id                   an object already rebuilt
 *   'E'                          the class's environment
 *   'L' u32 len, name            a library value by path ("string.format"), or a
 *                                module "@mod" / one of its fields "@mod:field"
 */
#include <stdio.h>
#include <string.h>

#include "core.h"

#define HS_CLASS_DEPTH 64
#define HS_CLASS_MAX (4u << 20)
#define CHECK_EVERY 256 /* values between two time-limit checks */

typedef struct enc {
    hs_state *S;
    lua_State *L;
    hs_buf *out;
    int seen, own, names, cells; /* stack indexes of the working tables (see hs_class_encode) */
    uint32_t next_id;
    unsigned steps;
    char *msg;
    size_t msglen;
    char path[512];
    size_t plen;
} enc;

static void put(enc *e, const void *p, size_t n) {
    if (hs_buf_put(e->out, p, n) != 0) luaL_error(e->L, "not enough memory");
}

static void put_tag(enc *e, char tag) { put(e, &tag, 1); }

static void put_u32(enc *e, uint32_t v) { put(e, &v, 4); }

static int dump_writer(lua_State *L, const void *p, size_t sz, void *ud) {
    (void)L;
    enc *e = ud;
    return e->out->len + sz > HS_CLASS_MAX || hs_buf_put(e->out, p, sz) != 0;
}

/* ---- the path of the value being encoded, for error messages ---- */

static size_t path_push(enc *e, const char *fmt, const char *arg) {
    size_t at = e->plen;
    if (at < sizeof e->path) {
        int n = snprintf(e->path + at, sizeof e->path - at, fmt, arg);
        e->plen = n < 0 ? at : at + (size_t)n < sizeof e->path ? at + (size_t)n : sizeof e->path - 1;
    }
    return at;
}

static void path_key(enc *e, int k) {
    lua_State *L = e->L;
    char num[64];
    if (lua_type(L, k) == LUA_TSTRING) {
        const char *s = lua_tostring(L, k);
        int ident = (*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || *s == '_';
        for (const char *p = s; ident && *p; p++)
            ident = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '_';
        path_push(e, ident ? ".%s" : "[\"%.40s\"]", s);
    } else if (lua_type(L, k) == LUA_TNUMBER) {
        snprintf(num, sizeof num, "%.14g", (double)lua_tonumber(L, k));
        path_push(e, "[%s]", num);
    } else {
        path_push(e, "[<%s key>]", luaL_typename(L, k));
    }
}

static int fail(enc *e, const char *what) {
    snprintf(e->msg, e->msglen, "%.*s %s", (int)e->plen, e->path, what);
    return -1;
}

/* ---- what is known before encoding ---- */

static int is_script_env(lua_State *L, hs_state *S, int idx) {
    idx = hs_absindex(L, idx);
    if (!lua_istable(L, idx)) return 0;
    lua_rawgeti(L, LUA_REGISTRYINDEX, S->env_ref); /* the globals, or the environments' metatable */
    int yes = 0;
    if (!S->host->sandbox) {
        yes = lua_rawequal(L, -1, idx);
    } else if (lua_getmetatable(L, idx)) {
        yes = lua_rawequal(L, -1, -2);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return yes;
}

/* names[v] = PATH for the library values reachable from the table or userdata at
 * IDX (its fields, and those of a metatable's __index table: the read-only views
 * and hs.shared), DEPTH levels down; the first path found wins. */
static void name_fields(lua_State *L, int names, int idx, const char *prefix, int depth) {
    idx = hs_absindex(L, idx);
    for (int pass = 0; pass < 2; pass++) {
        int t = idx;
        if (pass == 1) {
            if (!lua_getmetatable(L, idx)) return;
            lua_getfield(L, -1, "__index");
            lua_remove(L, -2);
            if (!lua_istable(L, -1)) {
                lua_pop(L, 1);
                return;
            }
            t = lua_gettop(L);
        } else if (!lua_istable(L, idx)) {
            continue;
        }
        lua_pushnil(L);
        while (lua_next(L, t)) {
            int vt = lua_type(L, -1);
            if (lua_type(L, -2) == LUA_TSTRING &&
                (vt == LUA_TTABLE || vt == LUA_TFUNCTION || vt == LUA_TUSERDATA)) {
                lua_pushvalue(L, -1);
                lua_rawget(L, names);
                int known = !lua_isnil(L, -1);
                lua_pop(L, 1);
                if (!known) {
                    if (*prefix) lua_pushfstring(L, "%s.%s", prefix, lua_tostring(L, -2));
                    else lua_pushvalue(L, -2);
                    lua_pushvalue(L, -2);
                    lua_pushvalue(L, -2);
                    lua_rawset(L, names);
                    if (depth > 1) name_fields(L, names, -2, lua_tostring(L, -1), depth - 1);
                    lua_pop(L, 1);
                }
            }
            lua_pop(L, 1);
        }
        if (pass == 1) lua_pop(L, 1);
    }
}

static int count_modules(lua_State *L, hs_state *S) {
    int n = 0;
    lua_rawgeti(L, LUA_REGISTRYINDEX, S->loaded_ref);
    lua_pushnil(L);
    while (lua_next(L, -2)) lua_pop(L, 1), n++;
    lua_pop(L, 1);
    return n;
}

/* The library values and loaded modules of S, by name: pushes the names table. In
 * the sandbox the libraries are read-only, so the table is kept in the state until
 * a module is loaded; without it, globals may change and it is made each time. */
static void push_names(lua_State *L, hs_state *S) {
    int nmods = count_modules(L, S);
    if (S->host->sandbox && S->names_ref && S->names_nmods == nmods) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, S->names_ref);
        return;
    }
    lua_newtable(L);
    int names = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, S->loaded_ref); /* modules first: "@mod", "@mod:field" */
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        if (lua_type(L, -2) == LUA_TSTRING && (lua_istable(L, -1) || lua_isfunction(L, -1))) {
            lua_pushvalue(L, -1);
            lua_pushfstring(L, "@%s", lua_tostring(L, -3));
            lua_rawset(L, names);
            if (lua_istable(L, -1)) {
                lua_pushnil(L);
                while (lua_next(L, -2)) {
                    if (lua_type(L, -2) == LUA_TSTRING && lua_isfunction(L, -1)) {
                        lua_pushvalue(L, -1);
                        lua_rawget(L, names);
                        if (lua_isnil(L, -1)) {
                            lua_pushvalue(L, -2);
                            lua_pushfstring(L, "@%s:%s", lua_tostring(L, -6), lua_tostring(L, -4));
                            lua_rawset(L, names);
                        }
                        lua_pop(L, 1);
                    }
                    lua_pop(L, 1);
                }
            }
        }
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, S->env_ref); /* the globals, or the sandbox's */
    if (S->host->sandbox) {
        lua_getfield(L, -1, "__index");
        lua_remove(L, -2);
    }
    name_fields(L, names, -1, "", 3);
    lua_pop(L, 1);
    if (!S->host->sandbox) return;
    if (!S->names_ref) {
        lua_pushvalue(L, names);
        S->names_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    } else {
        lua_pushvalue(L, names);
        lua_rawseti(L, LUA_REGISTRYINDEX, S->names_ref);
    }
    S->names_nmods = nmods;
}

/* Mark in OWN the tables and functions reachable from the value at IDX through
 * fields and metatables (not upvalues): the class's own objects. */
static void mark_own(enc *e, int idx, int depth) {
    lua_State *L = e->L;
    idx = hs_absindex(L, idx);
    if (++e->steps % CHECK_EVERY == 0) hs_engine_checkin(L); /* per key and value: a wide table too */
    int t = lua_type(L, idx);
    if ((t != LUA_TTABLE && t != LUA_TFUNCTION) || depth > HS_CLASS_DEPTH) return;
    lua_pushvalue(L, idx);
    lua_rawget(L, e->names);
    int named = !lua_isnil(L, -1);
    lua_pushvalue(L, idx);
    lua_rawget(L, e->own);
    named |= !lua_isnil(L, -1);
    lua_pop(L, 2);
    if (named || is_script_env(L, e->S, idx)) return;
    lua_pushvalue(L, idx);
    lua_pushboolean(L, 1);
    lua_rawset(L, e->own);
    if (t != LUA_TTABLE) return;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        mark_own(e, -2, depth + 1);
        mark_own(e, -1, depth + 1);
        lua_pop(L, 1);
    }
    if (lua_getmetatable(L, idx)) {
        mark_own(e, -1, depth + 1);
        lua_pop(L, 1);
    }
}

/* ---- encoding ---- */

static int enc_value(enc *e, int idx, int depth, int plain);

static int enc_table(enc *e, int idx, int depth) {
    lua_State *L = e->L;
    lua_pushvalue(L, idx);
    lua_rawget(L, e->own);
    int plain = lua_isnil(L, -1); /* reached through an upvalue only */
    lua_pop(L, 1);
    put_tag(e, 'T');
    lua_pushvalue(L, idx);
    lua_pushinteger(L, (lua_Integer)e->next_id++);
    lua_rawset(L, e->seen);
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        size_t at = e->plen;
        path_key(e, -2);
        if (enc_value(e, -2, depth + 1, plain) != 0 || enc_value(e, -1, depth + 1, plain) != 0) {
            lua_pop(L, 2);
            return -1;
        }
        e->plen = at;
        e->path[at] = 0;
        lua_pop(L, 1);
    }
    put_tag(e, '.');
    if (!lua_getmetatable(L, idx)) {
        put_tag(e, 'n');
        return 0;
    }
    if (plain) {
        lua_pop(L, 1);
        return fail(e, "is a table with a metatable: tables in upvalues cross threads as plain data only");
    }
    size_t at = path_push(e, "%s", " (metatable)");
    int rc = enc_value(e, -1, depth + 1, 0);
    e->plen = at;
    e->path[at] = 0;
    lua_pop(L, 1);
    return rc;
}

static int enc_function(enc *e, int idx, int depth) {
    lua_State *L = e->L;
    if (lua_iscfunction(L, idx))
        return fail(e, "is a C function that is not a library function: it cannot cross threads");
    uint32_t id = e->next_id++;
    lua_pushvalue(L, idx);
    lua_pushinteger(L, (lua_Integer)id);
    lua_rawset(L, e->seen);
    put_tag(e, 'F');
    size_t lenat = e->out->len;
    put_u32(e, 0);
    lua_pushvalue(L, idx);
    int rc = hs_dump(L, dump_writer, e);
    lua_pop(L, 1);
    if (rc != 0) {
        if (e->out->len + 64 > HS_CLASS_MAX) return fail(e, "makes the class larger than 4 MiB");
        return luaL_error(L, "not enough memory");
    }
    uint32_t len = (uint32_t)(e->out->len - lenat - 4);
    memcpy(e->out->p + lenat, &len, 4);
    int n = 0;
    while (lua_getupvalue(L, idx, n + 1)) {
        lua_pop(L, 1);
        n++;
    }
    uint8_t nups = (uint8_t)n;
    put(e, &nups, 1);
    for (int i = 1; i <= n; i++) {
        lua_pushlightuserdata(L, lua_upvalueid(L, idx, i));
        lua_pushvalue(L, -1);
        lua_rawget(L, e->cells);
        if (!lua_isnil(L, -1)) { /* a cell another function already sent: join it */
            lua_Integer cell = lua_tointeger(L, -1);
            lua_pop(L, 2);
            put_tag(e, 'j');
            put_u32(e, (uint32_t)(cell >> 8));
            uint8_t k = (uint8_t)(cell & 0xff);
            put(e, &k, 1);
            continue;
        }
        lua_pop(L, 1);
        lua_pushinteger(L, ((lua_Integer)id << 8) | i);
        lua_rawset(L, e->cells);
        const char *name = lua_getupvalue(L, idx, i);
        size_t at = path_push(e, " upvalue '%s'", name && *name ? name : "?");
        rc = enc_value(e, -1, depth + 1, 0);
        lua_pop(L, 1);
        if (rc != 0) return -1;
        e->plen = at;
        e->path[at] = 0;
    }
#ifdef HS_ENGINE_LUAJIT
    lua_getfenv(L, idx);
    int env = is_script_env(L, e->S, -1);
    lua_pop(L, 1);
    if (!env) return fail(e, "runs in an environment of its own (load with an env): it cannot cross threads");
#endif
    return 0;
}

static int enc_value(enc *e, int idx, int depth, int plain) {
    lua_State *L = e->L;
    idx = hs_absindex(L, idx);
    if (++e->steps % CHECK_EVERY == 0) hs_engine_checkin(L);
    if (e->out->len > HS_CLASS_MAX) return fail(e, "makes the class larger than 4 MiB");
    if (depth > HS_CLASS_DEPTH) return fail(e, "nests deeper than 64 levels");
    int t = lua_type(L, idx);
    switch (t) {
    case LUA_TNIL: put_tag(e, 'n'); return 0;
    case LUA_TBOOLEAN: put_tag(e, lua_toboolean(L, idx) ? 't' : 'f'); return 0;
    case LUA_TNUMBER:
        if (hs_isinteger(L, idx)) {
            int64_t i = (int64_t)lua_tointeger(L, idx);
            put_tag(e, 'i');
            put(e, &i, 8);
        } else {
            double d = (double)lua_tonumber(L, idx);
            put_tag(e, 'd');
            put(e, &d, 8);
        }
        return 0;
    case LUA_TSTRING: {
        size_t n;
        const char *s = lua_tolstring(L, idx, &n);
        if (n > HS_CLASS_MAX - e->out->len) return fail(e, "makes the class larger than 4 MiB");
        put_tag(e, 's');
        put_u32(e, (uint32_t)n);
        put(e, s, n);
        return 0;
    }
    default: break;
    }
    lua_pushvalue(L, idx);
    lua_rawget(L, e->names);
    if (!lua_isnil(L, -1)) { /* a library value or a module: by name */
        size_t n;
        const char *s = lua_tolstring(L, -1, &n);
        put_tag(e, 'L');
        put_u32(e, (uint32_t)n);
        put(e, s, n);
        lua_pop(L, 1);
        return 0;
    }
    lua_pop(L, 1);
    if (is_script_env(L, e->S, idx)) {
        put_tag(e, 'E');
        return 0;
    }
    lua_pushvalue(L, idx);
    lua_rawget(L, e->seen);
    if (!lua_isnil(L, -1)) {
        uint32_t id = (uint32_t)lua_tointeger(L, -1);
        lua_pop(L, 1);
        put_tag(e, 'R');
        put_u32(e, id);
        return 0;
    }
    lua_pop(L, 1);
    switch (t) {
    case LUA_TTABLE: return enc_table(e, idx, depth);
    case LUA_TFUNCTION:
        if (plain) { /* a function of the class itself may be referred to from data */
            lua_pushvalue(L, idx);
            lua_rawget(L, e->own);
            int own = !lua_isnil(L, -1);
            lua_pop(L, 1);
            if (!own)
                return fail(e, "is a function inside a table of upvalue data: tables in upvalues "
                               "cross threads as plain data only");
        }
        return enc_function(e, idx, depth);
    case LUA_TTHREAD: return fail(e, "is a coroutine: it cannot cross threads");
    default: {
        char what[96];
        snprintf(what, sizeof what, "is a %s: only data, functions and library values cross threads",
                 luaL_typename(L, idx));
        return fail(e, what);
    }
    }
}

int hs_class_encode(hs_state *S, lua_State *L, int idx, const char *name, hs_buf *out, char *msg,
                    size_t msglen) {
    idx = hs_absindex(L, idx);
    int top = lua_gettop(L);
    luaL_checkstack(L, 6 * HS_CLASS_DEPTH + 32, "class nests too deep");
    enc e = {0};
    e.S = S;
    e.L = L;
    e.out = out;
    e.msg = msg;
    e.msglen = msglen;
    lua_newtable(L);
    e.seen = lua_gettop(L);
    lua_newtable(L);
    e.own = lua_gettop(L);
    lua_newtable(L);
    e.cells = lua_gettop(L);
    push_names(L, S);
    e.names = lua_gettop(L);
    e.next_id = 1;
    path_push(&e, "%s", name);
    mark_own(&e, idx, 0);
    int rc = enc_value(&e, idx, 0, 0);
    lua_settop(L, top);
    if (rc == 0 && out->len > HS_CLASS_MAX) { /* the last value may have taken it past */
        e.plen = 0;
        path_push(&e, "%s", name);
        return fail(&e, "makes the class larger than 4 MiB");
    }
    return rc;
}

/* ---- decoding ---- */

typedef struct dec {
    hs_state *S;
    lua_State *L;
    const char *p, *end, *name;
    int objs, env;
    uint32_t n;
    unsigned steps;
} dec;

static void need(dec *d, size_t n) {
    if ((size_t)(d->end - d->p) < n)
        luaL_error(d->L, "%s: the serialized class is corrupt", d->name);
}

static uint32_t get_u32(dec *d) {
    uint32_t v;
    need(d, 4);
    memcpy(&v, d->p, 4);
    d->p += 4;
    return v;
}

static char get_tag(dec *d) {
    need(d, 1);
    return *d->p++;
}

/* Push the library value or module named by the LEN bytes at S. */
static void push_named(dec *d, const char *s, size_t len) {
    lua_State *L = d->L;
    char path[512];
    if (len >= sizeof path) luaL_error(L, "%s: library name too long", d->name);
    memcpy(path, s, len);
    path[len] = 0;
    if (path[0] == '@') {
        char *field = strchr(path, ':');
        if (field) *field++ = 0;
        lua_getfield(L, d->env, "require");
        lua_pushstring(L, path + 1);
        lua_call(L, 1, 1);
        if (field) {
            lua_getfield(L, -1, field);
            lua_remove(L, -2);
        }
        return;
    }
    lua_pushvalue(L, d->env);
    for (char *part = path, *dot; part; part = dot) {
        if ((dot = strchr(part, '.'))) *dot++ = 0;
        lua_getfield(L, -1, part);
        lua_remove(L, -2);
    }
    if (lua_isnil(L, -1)) luaL_error(L, "%s: library value '%s' is missing in this state", d->name, path);
}

static void dec_value(dec *d);

static void dec_function(dec *d) {
    lua_State *L = d->L;
    uint32_t len = get_u32(d);
    need(d, len);
    char chunk[300];
    snprintf(chunk, sizeof chunk, "=%s", d->name);
    if (luaL_loadbufferx(L, d->p, len, chunk, "b") != 0) lua_error(L);
    d->p += len;
    int f = lua_gettop(L);
    lua_pushvalue(L, f);
    lua_rawseti(L, d->objs, (int)++d->n);
    need(d, 1);
    int n = (uint8_t)*d->p++;
    for (int i = 1; i <= n; i++) {
        if (d->p < d->end && *d->p == 'j') {
            d->p++;
            uint32_t id = get_u32(d);
            need(d, 1);
            int k = (uint8_t)*d->p++;
            lua_rawgeti(L, d->objs, (int)id);
            if (!lua_isfunction(L, -1)) luaL_error(L, "%s: the serialized class is corrupt", d->name);
            lua_upvaluejoin(L, f, i, -1, k);
            lua_pop(L, 1);
            continue;
        }
        dec_value(d);
        if (!lua_setupvalue(L, f, i)) lua_pop(L, 1);
    }
#ifdef HS_ENGINE_LUAJIT
    lua_pushvalue(L, d->env);
    lua_setfenv(L, f);
#endif
}

static void dec_value(dec *d) {
    lua_State *L = d->L;
    if (++d->steps % CHECK_EVERY == 0) hs_engine_checkin(L);
    luaL_checkstack(L, 8, "class nests too deep");
    switch (get_tag(d)) {
    case 'n': lua_pushnil(L); return;
    case 'f': lua_pushboolean(L, 0); return;
    case 't': lua_pushboolean(L, 1); return;
    case 'i': {
        int64_t i;
        need(d, 8);
        memcpy(&i, d->p, 8);
        d->p += 8;
        lua_pushinteger(L, (lua_Integer)i);
        return;
    }
    case 'd': {
        double x;
        need(d, 8);
        memcpy(&x, d->p, 8);
        d->p += 8;
        lua_pushnumber(L, x);
        return;
    }
    case 's': {
        uint32_t n = get_u32(d);
        need(d, n);
        lua_pushlstring(L, d->p, n);
        d->p += n;
        return;
    }
    case 'L': {
        uint32_t n = get_u32(d);
        need(d, n);
        push_named(d, d->p, n);
        d->p += n;
        return;
    }
    case 'E': lua_pushvalue(L, d->env); return;
    case 'R': {
        uint32_t id = get_u32(d);
        if (id == 0 || id > d->n) luaL_error(L, "%s: the serialized class is corrupt", d->name);
        lua_rawgeti(L, d->objs, (int)id);
        return;
    }
    case 'T': {
        lua_newtable(L);
        int t = lua_gettop(L);
        lua_pushvalue(L, t);
        lua_rawseti(L, d->objs, (int)++d->n);
        while (d->p < d->end && *d->p != '.') {
            dec_value(d);
            dec_value(d);
            if (lua_isnil(L, -2)) luaL_error(L, "%s: the serialized class is corrupt", d->name);
            lua_rawset(L, t);
        }
        get_tag(d); /* '.' */
        dec_value(d);
        if (lua_istable(L, -1)) lua_setmetatable(L, t);
        else lua_pop(L, 1);
        return;
    }
    case 'F': dec_function(d); return;
    default: luaL_error(L, "%s: the serialized class is corrupt", d->name);
    }
}

void hs_class_decode(hs_state *S, lua_State *L, const char *name, const char *p, size_t len) {
    dec d = {S, L, p, p + len, name, 0, 0, 0, 0};
    lua_newtable(L);
    d.objs = lua_gettop(L);
    hs_sandbox_push_env(S, L);
    d.env = lua_gettop(L);
    dec_value(&d);
    if (d.p != d.end || !lua_istable(L, -1)) luaL_error(L, "%s: the serialized class is corrupt", name);
    lua_replace(L, d.objs);
    lua_settop(L, d.objs);
}
