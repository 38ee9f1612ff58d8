/*
 * limits.c — everything that bounds what a handler may take: memory (the counting
 * allocator), time (the deadline, checked by an instruction-count hook and by the
 * check-ins of long C loops), the GIL release of long fires, and the C stack.
 *
 * Memory: the allocator refuses what would pass the state's limit — except on
 * LuaJIT, whose out-of-memory path is fragile under a limiting allocator (a loop
 * that keeps catching the error crashes the interpreter): there, allocations up to
 * HS_MEM_HEADROOM over the limit are granted and the limit is raised as an error at
 * the next safe point (the count hook, a check-in), one pcall cannot catch; only a
 * single allocation beyond that headroom is refused outright.
 *
 * The count hook never runs inside a C function, so the engines' own library code
 * is patched (tools/patches/, applied by tools/build-lua.sh) to call
 * hs_engine_checkin() from its long loops — pattern matching and string.rep on
 * both engines, table.move and table.concat on Lua 5.4 (LuaJIT's table.move is Lua
 * code the hook sees) — which does what the hook does: release the host's
 * lock once the fire runs long, raise "time limit exceeded" past the deadline.
 *
 * C code calling back into Lua (gsub with a function, sort comparators,
 * metamethods run by C, the parser's nesting) recurses on the C stack of whatever
 * thread fires, and a Python server's threads may have small stacks. The patched
 * engines call hs_engine_cstack() on each such call; it refuses to go deeper than
 * HS_CSTACK_MARGIN above the end of the thread's real stack, so a script gets
 * "C stack overflow" where it would have crashed the process.
 */
#define _GNU_SOURCE /* pthread_getattr_np */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"
#include "redis.h"

/* ---- counting allocator ---- */

void *hs_limits_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    hs_state *S = ud;
    size_t old = ptr ? osize : 0;
    size_t heap = atomic_load_explicit(&S->heap, memory_order_relaxed);
    if (nsize == 0) {
        free(ptr);
        atomic_store_explicit(&S->heap, heap - old, memory_order_relaxed);
        return NULL;
    }
    if (S->heap_limit && nsize > old) {
        size_t limit = S->heap_limit + (S->in_errh ? HS_ERRH_SLACK : 0);
        if (heap + (nsize - old) > limit) {
            if (!hs_soft_memory_limit || heap + (nsize - old) > limit + HS_MEM_HEADROOM(limit)) {
                S->mem_refused = 1;
                return NULL;
            }
            S->mem_over = 1; /* granted: the limit error comes at the next safe point */
        }
    }
    void *p = realloc(ptr, nsize);
    if (p) atomic_store_explicit(&S->heap, heap - old + nsize, memory_order_relaxed);
    return p;
}

/* ---- time limit ---- */

static void count_hook(lua_State *L, lua_Debug *ar);

/* What the count hook and the engines' check-ins do: raise the memory limit a
 * LuaJIT state went past, let the host's other threads go on once the fire runs
 * long, raise the time limit past the deadline. */
static void check_limits(lua_State *L, hs_state *S) {
    if (S->mem_over || S->abort == HS_ERR_MEMORY) { /* a soft memory limit passed (LuaJIT) */
        if (!S->abort) {
            S->abort = HS_ERR_MEMORY;
            lua_sethook(L, count_hook, LUA_MASKCOUNT, 1);
        }
        luaL_error(L, "memory limit exceeded");
    }
    if (!S->release_at_ns && !S->deadline_ns) return;
    uint64_t now = hs_now_ns();
    if (S->release_at_ns && now >= S->release_at_ns) hs_state_release_host(S);
    if (!S->deadline_ns) return;
    if (!S->abort && now < S->deadline_ns) return;
    if (!S->abort) {
        /* From now on fail at every instruction, so no pcall loop can outlast us. */
        S->abort = HS_ERR_TIMEOUT;
        lua_sethook(L, count_hook, LUA_MASKCOUNT, 1);
    }
    luaL_error(L, "time limit exceeded");
}

/* The hs_state of L; NULL for a state the core did not make (a C host may create
 * its own next to ours: the patched engine calls in for those too). */
static hs_state *state_of(lua_State *L) {
    void *ud;
    return lua_getallocf(L, &ud) == hs_limits_alloc ? ud : NULL;
}

static void count_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    check_limits(L, state_of(L)); /* the hook is only set on the core's states */
}

void hs_limits_install(hs_state *S) {
    if (S->host->time_limit > 0 || (hs_soft_memory_limit && S->host->memory_limit))
        lua_sethook(S->L, count_hook, LUA_MASKCOUNT, HS_HOOK_COUNT);
}

/* The fire runs long: let the host's other threads go on (hostscript.h). */
void hs_state_release_host(hs_state *S) {
    S->release_at_ns = 0;
    S->released = 1;
    S->host->release();
    atomic_store_explicit(&S->c.releases,
                          atomic_load_explicit(&S->c.releases, memory_order_relaxed) + 1,
                          memory_order_relaxed);
}

void hs_state_before_wait(lua_State *L) {
    hs_state *S = state_of(L);
    if (!S) return;
    if (S->release_at_ns) hs_state_release_host(S);
    /* the wait ends a tenth of the time limit before the fire's deadline: a handler
     * told "redis: timeout" still has time for its fallback */
    uint64_t reserve = (uint64_t)(S->host->time_limit * 1e8);
    hs_wait_deadline_ns = !S->deadline_ns ? 0
                          : S->deadline_ns > reserve + 1 ? S->deadline_ns - reserve : 1;
}

void hs_state_deadline(hs_state *S, uint64_t start_ns) {
    if (S->host->time_limit <= 0) return;
    S->deadline_ns = start_ns + (uint64_t)(S->host->time_limit * 1e9);
}

void hs_state_end_deadline(hs_state *S) {
    S->deadline_ns = 0;
    hs_wait_deadline_ns = 0;
    S->mem_over = 0;
    if (S->abort) {
        S->abort = 0;
        lua_sethook(S->L, count_hook, LUA_MASKCOUNT, HS_HOOK_COUNT);
    }
    S->mem_refused = 0;
}


/* ---- check-ins from the patched engine libraries ---- */

void hs_engine_checkin(lua_State *L) {
    hs_state *S = state_of(L);
    if (S) check_limits(L, S);
}

/* ---- the C stack ---- */

static __thread uintptr_t thread_floor; /* lowest usable address of this thread's stack + margin */

static uintptr_t sp(void) { return (uintptr_t)__builtin_frame_address(0); }

static uintptr_t stack_floor(void) {
    if (thread_floor) return thread_floor;
    pthread_attr_t attr;
    void *addr = NULL;
    size_t size = 0;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
        pthread_attr_getstack(&attr, &addr, &size);
        pthread_attr_destroy(&attr);
    }
    /* unknown: assume the smallest stack we support, below the current frame */
    uintptr_t low = addr ? (uintptr_t)addr : sp() - HS_CSTACK_MIN;
    thread_floor = low + HS_CSTACK_MARGIN;
    return thread_floor;
}

int hs_limits_enter(hs_state *S, hs_error *err) {
    uintptr_t floor = stack_floor(), here = sp();
    if (here < floor + HS_CSTACK_MARGIN) {
        hs_error_set(err, HS_ERR_USAGE, "", "", "too little C stack left on this thread to run Lua "
                     "safely (%lu KiB; at least %d KiB are needed)",
                     (unsigned long)((here > floor ? here - floor : 0) + HS_CSTACK_MARGIN) >> 10,
                     (2 * HS_CSTACK_MARGIN) >> 10);
        return -1;
    }
    S->cstack_floor = floor;
    return 0;
}

/* 0: go on. 1: raise "C stack overflow" — once: the error handlers that run then
 * get HS_CSTACK_ERRROOM more. 2: past that room too: the engine throws without
 * calling a handler. */
int hs_engine_cstack(lua_State *L) {
    hs_state *S = state_of(L);
    if (!S || !S->cstack_floor) return 0;
    uintptr_t here = sp();
    if (here >= S->cstack_floor) {
        if (S->cstack_tripped) S->cstack_tripped = 0;
        return 0;
    }
    if (!S->cstack_tripped) {
        S->cstack_tripped = 1;
        return 1;
    }
    return here >= S->cstack_floor - HS_CSTACK_ERRROOM ? 0 : 2;
}
