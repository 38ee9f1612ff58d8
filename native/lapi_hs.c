/*
 * lapi_hs.c — what a handler sees: the `hs` table (DONE, log, now) and the `txn`
 * object with its req/resp/headers proxies, plus the message handler that turns a
 * Lua error into a message and traceback.
 *
 * The txn object and its proxies are built once per state and reused by every
 * fire: a fire only points S->txn at the C transaction, so calling a handler costs
 * no allocation. Reads go straight to the C transaction (headers are looked up
 * lazily, on access); writes mark what changed (hs_fire reports those bits).
 * Using a saved txn after its hook returned is an error, not a stale read.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "core.h"

const char hs_done_sentinel = 'D';

#define STATE(L) ((hs_state *)lua_touserdata((L), lua_upvalueindex(1)))

static hs_txn *active_txn(lua_State *L, hs_state *S) {
    if (!S->txn) luaL_error(L, "txn is only valid during the hook call it was passed to");
    return S->txn;
}

static void check_phase(lua_State *L, hs_state *S, const char *api, unsigned forbidden) {
    if (S->hook >= 0 && (S->host->hookflags[S->hook] & forbidden))
        luaL_error(L, "%s is not available in hook %s", api, S->host->hooks[S->hook]);
}

/* ---- message handler ---- */

int hs_lapi_errh(lua_State *L) {
    hs_state *S = STATE(L);
    S->in_errh = 1;
    if (!lua_checkstack(L, LUA_MINSTACK)) { /* a Lua stack overflow: no room to build more */
        snprintf(S->err.message, sizeof S->err.message, "%s",
                 lua_type(L, 1) == LUA_TSTRING ? lua_tostring(L, 1) : "stack overflow");
        snprintf(S->err.traceback, sizeof S->err.traceback, "(no traceback: the Lua stack is full)");
        S->in_errh = 0;
        return 1;
    }
    if (S->abort == HS_ERR_TIMEOUT) {
        snprintf(S->err.message, sizeof S->err.message, "time limit exceeded");
    } else if (lua_type(L, 1) == LUA_TSTRING || lua_type(L, 1) == LUA_TNUMBER) {
        snprintf(S->err.message, sizeof S->err.message, "%s", lua_tostring(L, 1));
    } else if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) {
        snprintf(S->err.message, sizeof S->err.message, "%s", lua_tostring(L, -1));
        lua_pop(L, 1);
    } else {
        snprintf(S->err.message, sizeof S->err.message, "(error object is a %s value)",
                 luaL_typename(L, 1));
    }
    luaL_traceback(L, L, NULL, 1);
    snprintf(S->err.traceback, sizeof S->err.traceback, "%s", lua_tostring(L, -1));
    lua_pop(L, 1);
    S->in_errh = 0;
    lua_settop(L, 1);
    return 1;
}

/* ---- hs.log ---- */

static int l_log(lua_State *L) {
    hs_state *S = STATE(L);
    int level = (int)lua_tointeger(L, lua_upvalueindex(2));
    int n = lua_gettop(L);
    luaL_checkstack(L, 2 * n + 2, "too many arguments to log");
    for (int i = 1; i <= n; i++) { /* tostring(arg), " ", ... then one concat */
        if (i > 1) lua_pushliteral(L, " ");
        lua_getglobal(L, "tostring");
        lua_pushvalue(L, i);
        lua_call(L, 1, 1);
        if (!lua_isstring(L, -1)) return luaL_error(L, "'tostring' must return a string");
    }
    if (n > 1) lua_concat(L, 2 * n - 1);
    size_t len = 0;
    const char *msg = n ? lua_tolstring(L, -1, &len) : "";
    hs_log_put(S, level, S->cur_name ? S->cur_name : "", msg, len);
    return 0;
}

static int l_now(lua_State *L) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec * 1e-9);
    return 1;
}

/* ---- request / response fields ---- */

static void push_buf(lua_State *L, const hs_buf *b) { lua_pushlstring(L, b->p ? b->p : "", b->len); }

/* The transaction's storage is malloc'd, outside the Lua heap; with a memory limit
 * it counts too: a handler may not make a transaction hold more than the limit. */
static void txn_room(lua_State *L, hs_state *S, const hs_txn *t, size_t extra) {
    size_t limit = S->host->memory_limit, have = hs_txn_size(t);
    if (!limit || (extra <= limit && have <= limit - extra)) return;
    S->mem_refused = 1; /* reported as the memory limit */
    char n[32]; /* lua_pushfstring knows no %zu */
    snprintf(n, sizeof n, "%zu", limit);
    luaL_error(L, "memory limit exceeded: the transaction would hold more than %s bytes", n);
}

/* Store the string at idx in B after VALID accepted it (NULL: anything goes). */
static int set_buf(lua_State *L, hs_state *S, hs_buf *b, int idx, int (*valid)(const char *, size_t),
                   const char *what) {
    size_t n;
    const char *v = luaL_checklstring(L, idx, &n);
    if (valid && !valid(v, n)) return luaL_error(L, "invalid %s", what);
    txn_room(L, S, S->txn, n);
    if (hs_buf_set(b, v, n) != 0) return luaL_error(L, "not enough memory");
    return 0;
}

/* Key K (length KN, from lua_tolstring) is the literal LIT: a length test first, so
 * that a field access costs a compare, not a strcmp per candidate. */
#define KEY_IS(k, kn, lit) ((k) && (kn) == sizeof(lit) - 1 && !memcmp((k), (lit), sizeof(lit) - 1))

static int req_index(lua_State *L) {
    hs_state *S = STATE(L);
    hs_txn *t = active_txn(L, S);
    size_t kn;
    const char *k = lua_tolstring(L, 2, &kn);
    if (KEY_IS(k, kn, "method")) hs_txn_need_line(t), push_buf(L, &t->method);
    else if (KEY_IS(k, kn, "uri")) hs_txn_need_line(t), push_buf(L, &t->uri);
    else if (KEY_IS(k, kn, "headers")) lua_pushvalue(L, lua_upvalueindex(2));
    else lua_pushnil(L);
    return 1;
}

static int req_newindex(lua_State *L) {
    hs_state *S = STATE(L);
    hs_txn *t = active_txn(L, S);
    size_t kn;
    const char *k = lua_tolstring(L, 2, &kn);
    hs_txn_need_line(t); /* the other of the two keeps the host's value */
    if (KEY_IS(k, kn, "method")) {
        set_buf(L, S, &t->method, 3, hs_valid_token, "method (an HTTP token: letters, digits, !#$%&'*+-.^_`|~)");
        t->changed |= HS_CH_METHOD;
    } else if (KEY_IS(k, kn, "uri")) {
        set_buf(L, S, &t->uri, 3, hs_valid_uri, "uri (no spaces or control characters)");
        t->changed |= HS_CH_URI;
    } else {
        return luaL_error(L, "txn.req.%s cannot be assigned (method and uri can; headers are "
                             "set one by one: txn.req.headers[name] = value)",
                          k ? k : "?");
    }
    return 0;
}

static int check_status(lua_State *L, int idx) {
    lua_Number n = luaL_checknumber(L, idx);
    if (!(n >= 100 && n <= 999) || n != (lua_Number)(int)n)
        luaL_argerror(L, idx, "status must be an integer from 100 to 999");
    return (int)n;
}

static int resp_index(lua_State *L) {
    hs_state *S = STATE(L);
    hs_txn *t = active_txn(L, S);
    size_t kn;
    const char *k = lua_tolstring(L, 2, &kn);
    if (KEY_IS(k, kn, "status")) {
        if (t->status) lua_pushinteger(L, t->status);
        else lua_pushnil(L);
    } else if (KEY_IS(k, kn, "body")) {
        push_buf(L, &t->body);
    } else if (KEY_IS(k, kn, "headers")) {
        lua_pushvalue(L, lua_upvalueindex(2));
    } else {
        lua_pushnil(L);
    }
    return 1;
}

static int resp_newindex(lua_State *L) {
    hs_state *S = STATE(L);
    hs_txn *t = active_txn(L, S);
    size_t kn;
    const char *k = lua_tolstring(L, 2, &kn);
    if (KEY_IS(k, kn, "status")) {
        t->status = check_status(L, 3);
        t->changed |= HS_CH_STATUS;
    } else if (KEY_IS(k, kn, "body")) {
        set_buf(L, S, &t->body, 3, NULL, "body");
        t->changed |= HS_CH_BODY;
    } else {
        return luaL_error(L, "txn.resp.%s cannot be assigned (status and body can; headers are "
                             "set one by one: txn.resp.headers[name] = value)",
                          k ? k : "?");
    }
    return 0;
}

/* ---- headers: upvalue 1 = state, 2 = HS_REQ/HS_RESP, 3 = methods table ---- */

#define WHICH(L) ((int)lua_tointeger((L), lua_upvalueindex(2)))

static const char *check_name(lua_State *L, int idx, size_t *n) {
    const char *k = luaL_checklstring(L, idx, n);
    if (!hs_valid_token(k, *n)) luaL_error(L, "invalid header name '%s'", k);
    return k;
}

static const char *check_value(lua_State *L, int idx, size_t *n) {
    if (lua_type(L, idx) != LUA_TSTRING && lua_type(L, idx) != LUA_TNUMBER)
        luaL_error(L, "header value must be a string or number, not %s", luaL_typename(L, idx));
    const char *v = lua_tolstring(L, idx, n);
    if (!hs_valid_field_value(v, *n)) luaL_error(L, "invalid header value (control characters)");
    return v;
}

static void mark_headers(hs_txn *t, int which) {
    t->changed |= which == HS_REQ ? HS_CH_REQ_HEADERS : HS_CH_RESP_HEADERS;
}

static int push_first(lua_State *L, hs_txn *t, int which, const char *k, size_t n) {
    if (t->unfetched & (1u << which)) { /* one field asked: the host may answer it alone */
        const char *v;
        size_t vn;
        int r = hs_valid_token(k, n) ? hs_txn_peek(t, which, k, n, &v, &vn) : 0;
        if (r == 1) lua_pushlstring(L, v, vn);
        else if (r == 0) lua_pushnil(L);
        if (r >= 0) return 1;
    }
    hs_txn_need(t, which);
    hs_hdrs *hs = &t->hdr[which];
    long i = hs_hdrs_find(hs, k, n, 0);
    if (i < 0) lua_pushnil(L);
    else lua_pushlstring(L, hs_hdr_value(hs, (size_t)i), hs->e[i].vlen);
    return 1;
}

static int hdr_index(lua_State *L) {
    hs_state *S = STATE(L);
    lua_pushvalue(L, 2);
    lua_rawget(L, lua_upvalueindex(3));
    if (!lua_isnil(L, -1)) return 1;
    hs_txn *t = active_txn(L, S);
    size_t n;
    const char *k = luaL_checklstring(L, 2, &n);
    return push_first(L, t, WHICH(L), k, n);
}

/* Set (replace) NAME to the value(s) at idx: string/number, list of them, or nil. */
/* An edit of a set the host has not filled yet: journaled (hs_txn.unfetched). */
static void journal(lua_State *L, hs_state *S, hs_txn *t, int which, char op, const char *k, size_t kn,
                    const char *v, size_t vn) {
    txn_room(L, S, t, kn + vn + 3); /* the journal counts as the transaction's memory */
    int rc = hs_txn_journal(t, which, op, k, kn, v, vn);
    if (rc == -2) luaL_error(L, "invalid header name or value (NUL)");
    if (rc) luaL_error(L, "not enough memory");
    mark_headers(t, which);
}

static void set_header(lua_State *L, hs_state *S, hs_txn *t, int which, const char *k, size_t kn,
                       int idx) {
    hs_hdrs *hs = &t->hdr[which];
    size_t vn;
    if (t->unfetched & (1u << which)) {
        if (lua_isnil(L, idx)) {
            journal(L, S, t, which, 'r', k, kn, "", 0);
        } else if (lua_istable(L, idx)) {
            size_t len = hs_rawlen(L, idx);
            for (size_t i = 1; i <= len; i++) { /* validate all before changing anything */
                lua_rawgeti(L, idx, (int)i);
                check_value(L, -1, &vn);
                lua_pop(L, 1);
            }
            journal(L, S, t, which, 'r', k, kn, "", 0);
            for (size_t i = 1; i <= len; i++) {
                lua_rawgeti(L, idx, (int)i);
                const char *v = check_value(L, -1, &vn);
                journal(L, S, t, which, 'a', k, kn, v, vn);
                lua_pop(L, 1);
            }
        } else {
            const char *v = check_value(L, idx, &vn);
            journal(L, S, t, which, 's', k, kn, v, vn);
        }
        return;
    }
    if (lua_isnil(L, idx)) {
        hs_hdrs_remove(hs, k, kn);
    } else if (lua_istable(L, idx)) {
        size_t len = hs_rawlen(L, idx), total = 0;
        for (size_t i = 1; i <= len; i++) { /* validate all before changing anything */
            lua_rawgeti(L, idx, (int)i);
            check_value(L, -1, &vn);
            total += kn + vn + sizeof(hs_hdr);
            lua_pop(L, 1);
        }
        txn_room(L, S, t, total);
        hs_hdrs_remove(hs, k, kn);
        for (size_t i = 1; i <= len; i++) {
            lua_rawgeti(L, idx, (int)i);
            const char *v = check_value(L, -1, &vn);
            if (hs_hdrs_add(hs, k, kn, v, vn)) luaL_error(L, "not enough memory");
            lua_pop(L, 1);
        }
    } else {
        const char *v = check_value(L, idx, &vn);
        txn_room(L, S, t, kn + vn + sizeof(hs_hdr));
        if (hs_hdrs_set(hs, k, kn, v, vn)) luaL_error(L, "not enough memory");
    }
    mark_headers(t, which);
}

static int hdr_newindex(lua_State *L) {
    hs_state *S = STATE(L);
    hs_txn *t = active_txn(L, S);
    size_t kn;
    const char *k = check_name(L, 2, &kn);
    set_header(L, S, t, WHICH(L), k, kn, 3);
    return 0;
}

static int hdr_get(lua_State *L) {
    hs_state *S = STATE(L);
    hs_txn *t = active_txn(L, S);
    size_t n;
    const char *k = luaL_checklstring(L, 2, &n);
    return push_first(L, t, WHICH(L), k, n);
}

static int hdr_get_all(lua_State *L) {
    hs_state *S = STATE(L);
    hs_txn *t = active_txn(L, S);
    size_t n;
    const char *k = luaL_checklstring(L, 2, &n);
    hs_txn_need(t, WHICH(L));
    hs_hdrs *hs = &t->hdr[WHICH(L)];
    lua_newtable(L);
    int j = 0;
    for (long i = hs_hdrs_find(hs, k, n, 0); i >= 0; i = hs_hdrs_find(hs, k, n, i + 1)) {
        lua_pushlstring(L, hs_hdr_value(hs, (size_t)i), hs->e[i].vlen);
        lua_rawseti(L, -2, ++j);
    }
    return 1;
}

static int hdr_set(lua_State *L) {
    hs_state *S = STATE(L);
    hs_txn *t = active_txn(L, S);
    size_t kn;
    const char *k = check_name(L, 2, &kn);
    lua_settop(L, 3);
    set_header(L, S, t, WHICH(L), k, kn, 3);
    return 0;
}

static int hdr_add(lua_State *L) {
    hs_state *S = STATE(L);
    hs_txn *t = active_txn(L, S);
    size_t kn, vn;
    const char *k = check_name(L, 2, &kn);
    const char *v = check_value(L, 3, &vn);
    if (t->unfetched & (1u << WHICH(L))) {
        journal(L, S, t, WHICH(L), 'a', k, kn, v, vn);
        return 0;
    }
    txn_room(L, S, t, kn + vn + sizeof(hs_hdr));
    if (hs_hdrs_add(&t->hdr[WHICH(L)], k, kn, v, vn)) return luaL_error(L, "not enough memory");
    mark_headers(t, WHICH(L));
    return 0;
}

static int hdr_remove(lua_State *L) {
    hs_state *S = STATE(L);
    hs_txn *t = active_txn(L, S);
    size_t kn;
    const char *k = luaL_checklstring(L, 2, &kn);
    if (!hs_valid_token(k, kn)) return 0; /* no field has that name: nothing to remove */
    if (t->unfetched & (1u << WHICH(L))) {
        journal(L, S, t, WHICH(L), 'r', k, kn, "", 0);
        return 0;
    }
    hs_hdrs_remove(&t->hdr[WHICH(L)], k, kn);
    mark_headers(t, WHICH(L));
    return 0;
}

/* for name, value in headers:each() do ... end — upvalue 3: next index */
static int hdr_each_step(lua_State *L) {
    hs_state *S = STATE(L);
    hs_txn *t = active_txn(L, S);
    hs_txn_need(t, WHICH(L));
    hs_hdrs *hs = &t->hdr[WHICH(L)];
    lua_Integer i = lua_tointeger(L, lua_upvalueindex(3));
    if ((size_t)i >= hs->n) return 0;
    lua_pushinteger(L, i + 1);
    lua_replace(L, lua_upvalueindex(3));
    lua_pushlstring(L, hs_hdr_name(hs, (size_t)i), hs->e[i].nlen);
    lua_pushlstring(L, hs_hdr_value(hs, (size_t)i), hs->e[i].vlen);
    return 2;
}

static int hdr_each(lua_State *L) {
    hs_state *S = STATE(L);
    hs_txn_need(active_txn(L, S), WHICH(L));
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_pushvalue(L, lua_upvalueindex(2));
    lua_pushinteger(L, 0);
    lua_pushcclosure(L, hdr_each_step, 3);
    return 1;
}

static const luaL_Reg hdr_methods[] = {
    {"get", hdr_get}, {"get_all", hdr_get_all}, {"set", hdr_set}, {"add", hdr_add},
    {"remove", hdr_remove}, {"each", hdr_each}, {NULL, NULL}};

/* Mark the metatable on top: the sandbox's rawset refuses its table. These objects
 * live as long as the state, so a raw field stored in one would show in every later
 * request's handlers. */
static void mark_readonly(lua_State *L) {
    lua_pushlightuserdata(L, (void *)&hs_readonly_key);
    lua_pushboolean(L, 1);
    lua_rawset(L, -3);
}

/* Pushes a headers proxy for WHICH. */
static void new_headers(lua_State *L, hs_state *S, int which) {
    lua_newtable(L); /* proxy */
    lua_newtable(L); /* metatable */
    lua_newtable(L); /* methods */
    int methods = lua_gettop(L);
    for (const luaL_Reg *r = hdr_methods; r->name; r++) {
        lua_pushlightuserdata(L, S);
        lua_pushinteger(L, which);
        lua_pushcclosure(L, r->func, 2);
        lua_setfield(L, methods, r->name);
    }
    lua_pushlightuserdata(L, S);
    lua_pushinteger(L, which);
    lua_pushvalue(L, methods);
    lua_pushcclosure(L, hdr_index, 3);
    lua_setfield(L, -3, "__index");
    lua_pushlightuserdata(L, S);
    lua_pushinteger(L, which);
    lua_pushcclosure(L, hdr_newindex, 2);
    lua_setfield(L, -3, "__newindex");
    lua_pushliteral(L, "headers");
    lua_setfield(L, -3, "__metatable");
    lua_pushvalue(L, -2); /* the metatable, on top for mark_readonly */
    mark_readonly(L);
    lua_pop(L, 1);
    lua_pop(L, 1);
    lua_setmetatable(L, -2);
}

/* Pushes a req/resp table: empty, every field (headers too) through its metamethods,
 * so nothing can be stored in it. Upvalues of __index: state, headers proxy. */
static void new_message(lua_State *L, hs_state *S, int which, lua_CFunction idx, lua_CFunction nidx) {
    lua_newtable(L);
    lua_newtable(L);
    lua_pushlightuserdata(L, S);
    new_headers(L, S, which);
    lua_pushcclosure(L, idx, 2);
    lua_setfield(L, -2, "__index");
    lua_pushlightuserdata(L, S);
    lua_pushcclosure(L, nidx, 1);
    lua_setfield(L, -2, "__newindex");
    mark_readonly(L);
    lua_setmetatable(L, -2);
}

/* ---- txn ---- */

/* Validate a header table {name = value | {values}} at idx without changing
 * anything; the bytes it would add to the transaction. */
static size_t check_header_table(lua_State *L, int idx) {
    size_t total = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        size_t n, kn;
        if (lua_type(L, -2) != LUA_TSTRING)
            luaL_error(L, "header names must be strings, not %s", luaL_typename(L, -2));
        check_name(L, -2, &kn);
        if (lua_istable(L, -1)) {
            size_t len = hs_rawlen(L, -1);
            for (size_t i = 1; i <= len; i++) {
                lua_rawgeti(L, -1, (int)i);
                check_value(L, -1, &n);
                total += kn + n + sizeof(hs_hdr);
                lua_pop(L, 1);
            }
        } else {
            check_value(L, -1, &n);
            total += kn + n + sizeof(hs_hdr);
        }
        lua_pop(L, 1);
    }
    return total;
}

static int txn_respond(lua_State *L) {
    hs_state *S = STATE(L);
    hs_txn *t = active_txn(L, S);
    check_phase(L, S, "txn:respond", HS_HOOK_OBSERVE_ONLY);
    /* check everything first: a refused respond changes nothing */
    int status = check_status(L, 2);
    size_t blen = 0;
    const char *body = lua_isnoneornil(L, 3) ? "" : luaL_checklstring(L, 3, &blen);
    int has_headers = !lua_isnoneornil(L, 4);
    size_t hbytes = 0;
    if (has_headers) {
        luaL_checktype(L, 4, LUA_TTABLE);
        hbytes = check_header_table(L, 4);
    }
    txn_room(L, S, t, blen + hbytes);
    if (hs_buf_set(&t->body, body, blen)) return luaL_error(L, "not enough memory");
    if (has_headers) {
        lua_pushnil(L);
        while (lua_next(L, 4)) {
            size_t kn;
            const char *k = lua_tolstring(L, -2, &kn);
            set_header(L, S, t, HS_RESP, k, kn, lua_gettop(L));
            lua_pop(L, 1);
        }
    }
    t->status = status;
    t->responded = 1;
    t->changed |= HS_CH_STATUS | HS_CH_BODY | HS_CH_RESP_HEADERS;
    return 0;
}

/* txn:set_cache_key(s): the secondary part of the response cache key (the analogue
 * of Traffic Server's cache generation); the host reads it after the fire. */
static int txn_set_cache_key(lua_State *L) {
    hs_state *S = STATE(L);
    hs_txn *t = active_txn(L, S);
    check_phase(L, S, "txn:set_cache_key", HS_HOOK_OBSERVE_ONLY);
    size_t n;
    const char *k = luaL_checklstring(L, 2, &n);
    if (n > HS_CACHE_KEY_MAX)
        return luaL_error(L, "txn:set_cache_key: the key is %d bytes, more than %d", (int)n,
                          HS_CACHE_KEY_MAX);
    txn_room(L, S, t, n);
    if (hs_buf_set(&t->cache_key, k, n)) return luaL_error(L, "not enough memory");
    t->changed |= HS_CH_CACHE_KEY;
    return 0;
}

/* txn.ctx on first access in a fire: the C transaction's ctx, decoded; txn.cache_key
 * on every access (nil when none was set). */
static int txn_fields_index(lua_State *L) {
    hs_state *S = STATE(L);
    size_t kn;
    const char *k = lua_tolstring(L, 2, &kn);
    if (KEY_IS(k, kn, "cache_key")) {
        hs_txn *t = active_txn(L, S);
        if (!t->cache_key.len) return 0;
        lua_pushlstring(L, t->cache_key.p, t->cache_key.len);
        return 1;
    }
    if (!KEY_IS(k, kn, "ctx")) return 0;
    hs_txn *t = active_txn(L, S);
    int rc = hs_ctx_decode(L, t->ctx.p, t->ctx.len);
    if (rc == -2)
        return luaL_error(L, "txn.ctx holds an integer beyond 2^53, which %s cannot represent exactly",
                          HS_ENGINE_NAME);
    if (rc != 0) return luaL_error(L, "corrupt txn.ctx");
    lua_rawgeti(L, LUA_REGISTRYINDEX, S->txn_ref);
    lua_pushliteral(L, "ctx");
    lua_pushvalue(L, -3);
    lua_rawset(L, -3);
    lua_pop(L, 1);
    S->ctx_live = 1;
    return 1;
}

static int txn_newindex(lua_State *L) {
    hs_state *S = STATE(L);
    size_t kn;
    const char *k = lua_tolstring(L, 2, &kn);
    active_txn(L, S);
    if (!KEY_IS(k, kn, "ctx"))
        return luaL_error(L, "txn.%s cannot be assigned (keep per-request data in txn.ctx)",
                          k ? k : "?");
    luaL_checktype(L, 3, LUA_TTABLE);
    if (lua_getmetatable(L, 3))
        return luaL_error(L, "txn.ctx must be a plain table (it is saved as data: a metatable "
                             "would be lost)");
    lua_rawset(L, 1);
    S->ctx_live = 1;
    return 0;
}

static void new_txn(lua_State *L, hs_state *S) {
    lua_newtable(L); /* txn: only ctx is ever stored in it */
    lua_newtable(L); /* fields, txn's __index */
    new_message(L, S, HS_REQ, req_index, req_newindex);
    lua_setfield(L, -2, "req");
    new_message(L, S, HS_RESP, resp_index, resp_newindex);
    lua_setfield(L, -2, "resp");
    lua_pushlightuserdata(L, S);
    lua_pushcclosure(L, txn_respond, 1);
    lua_setfield(L, -2, "respond");
    lua_pushlightuserdata(L, S);
    lua_pushcclosure(L, txn_set_cache_key, 1);
    lua_setfield(L, -2, "set_cache_key");
    lua_newtable(L); /* fields' metatable: ctx is made on demand */
    lua_pushlightuserdata(L, S);
    lua_pushcclosure(L, txn_fields_index, 1);
    lua_setfield(L, -2, "__index");
    lua_setmetatable(L, -2);
    lua_newtable(L); /* txn's metatable */
    lua_insert(L, -2);
    lua_setfield(L, -2, "__index");
    lua_pushlightuserdata(L, S);
    lua_pushcclosure(L, txn_newindex, 1);
    lua_setfield(L, -2, "__newindex");
    lua_pushliteral(L, "txn");
    lua_setfield(L, -2, "__metatable");
    mark_readonly(L);
    lua_setmetatable(L, -2);
    S->txn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

int hs_lapi_open(hs_state *S) {
    lua_State *L = S->L;
    new_txn(L, S);
    lua_newtable(L); /* hs */
    lua_pushlightuserdata(L, (void *)&hs_done_sentinel);
    lua_setfield(L, -2, "DONE");
    lua_pushcfunction(L, l_now);
    lua_setfield(L, -2, "now");
    lua_pushstring(L, HS_ENGINE_NAME);
    lua_setfield(L, -2, "engine");
    static const struct { const char *name; int level; } levels[] = {
        {"debug", 10}, {"info", 20}, {"warn", 30}, {"error", 40}};
    lua_newtable(L);
    for (size_t i = 0; i < sizeof levels / sizeof *levels; i++) {
        lua_pushlightuserdata(L, S);
        lua_pushinteger(L, levels[i].level);
        lua_pushcclosure(L, l_log, 2);
        lua_setfield(L, -2, levels[i].name);
    }
    lua_setfield(L, -2, "log");
    hs_lapi_shared_open(S); /* hs.shared (lapi_shared.c) */
    hs_lapi_redis_open(S);  /* hs.redis (lapi_redis.c) */
    hs_lapi_register_open(S); /* hs.register, hs.unregister (lapi_register.c) */
    return 0;
}
