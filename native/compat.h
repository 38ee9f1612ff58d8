/*
 * compat.h — every difference between Lua 5.4 and LuaJIT 2.1 that the core
 * relies on, in one place. The core is compiled twice from the same sources:
 * with HS_ENGINE_LUAJIT defined for LuaJIT, without it for Lua 5.4.
 */
#ifndef HS_COMPAT_H
#define HS_COMPAT_H

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#ifdef HS_ENGINE_LUAJIT
#include <luajit.h>
#define HS_ENGINE_NAME "luajit"
#define HS_ENGINE_VERSION LUAJIT_VERSION

/* LuaJIT's lua_dump keeps debug info (needed for line numbers in tracebacks). */
#define hs_dump(L, w, ud) lua_dump((L), (w), (ud))
#define hs_rawlen(L, i) lua_objlen((L), (i))
/* The memory limit is raised at safe points, not by refusing allocations (limits.c). */
#define hs_soft_memory_limit 1
#define hs_isinteger(L, i) 0
#ifndef lua_pushglobaltable
#define lua_pushglobaltable(L) lua_pushvalue((L), LUA_GLOBALSINDEX)
#endif

/* Set the environment of the function at absolute index idx to the table on top (popped). */
static inline void hs_setenv(lua_State *L, int idx) { lua_setfenv(L, idx); }

static inline void hs_openlib(lua_State *L, const char *name, lua_CFunction f) {
    lua_pushcfunction(L, f);
    lua_pushstring(L, name);
    lua_call(L, 1, 0);
}

/* Opening the jit library is what turns LuaJIT's compiler on (scripts do not see
 * it in the sandbox). A state with a limit runs on the interpreter only: a count
 * hook is not run inside compiled traces (the time limit must hold for loops LuaJIT
 * would compile), and compiled code that runs out of memory twice under a limiting
 * allocator crashes LuaJIT 2.1 (seen with plain LuaJIT too). Returns whether the
 * compiler is on. */
static inline int hs_engine_setup(lua_State *L, int limited) {
    hs_openlib(L, LUA_JITLIBNAME, luaopen_jit);
    if (limited) luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
    lua_getglobal(L, "jit");
    lua_getfield(L, -1, "status");
    lua_call(L, 0, 1);
    int on = lua_toboolean(L, -1);
    lua_pop(L, 2);
    return on;
}

#else /* Lua 5.4 */
#define HS_ENGINE_NAME "lua54"
#define HS_ENGINE_VERSION LUA_RELEASE

#define hs_dump(L, w, ud) lua_dump((L), (w), (ud), 0)
#define hs_soft_memory_limit 0
#define hs_rawlen(L, i) lua_rawlen((L), (i))
#define hs_isinteger(L, i) lua_isinteger((L), (i))

static inline void hs_setenv(lua_State *L, int idx) {
    /* A main chunk's first upvalue is _ENV. */
    if (!lua_setupvalue(L, idx, 1)) lua_pop(L, 1);
}

static inline void hs_openlib(lua_State *L, const char *name, lua_CFunction f) {
    luaL_requiref(L, name, f, 1);
    lua_pop(L, 1);
}

static inline int hs_engine_setup(lua_State *L, int limited) {
    (void)L;
    (void)limited;
    return 0;
}
#endif

#define hs_absindex(L, i) ((i) > 0 || (i) <= LUA_REGISTRYINDEX ? (i) : lua_gettop(L) + (i) + 1)

#endif
