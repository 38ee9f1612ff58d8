/*
 * dispatch.c — hs_fire, the hot path.
 *
 * A fire touches only the calling thread's state, one atomic load of the host's
 * program generation, and the transaction: no lock, no allocation in the common
 * case. When the generation moved, the state rehydrates first (rehydrate.c); a thread
 * therefore runs one program for a whole fire, never half of a reload.
 *
 * Handlers of the hook run in load order as Class:on_<hook>(txn), each through
 * lua_pcall with the message handler that records message and traceback. The
 * first error, `return hs.DONE` or txn:respond() ends the hook. Afterwards txn.ctx,
 * if the fire touched it, is serialized back into the transaction (ctx.c).
 *
 * A transaction is marked busy for the length of a fire (txn.h): a second fire on
 * it, from another thread, is refused instead of racing the first.
 *
 * Classes a handler registers (hs.register) are published when the fire is over,
 * if that handler returned without error: the fire itself runs on one program.
 */
#include <stdio.h>
#include <string.h>

#include "core.h"

#define BUMP(x) atomic_store_explicit(&(x), atomic_load_explicit(&(x), memory_order_relaxed) + 1, \
                                      memory_order_relaxed)
#define ADD(x, n) atomic_store_explicit(&(x), atomic_load_explicit(&(x), memory_order_relaxed) + (n), \
                                        memory_order_relaxed)

typedef struct ctx_save {
    hs_txn *t;
    hs_error *err;
} ctx_save;

/* Serialize txn.ctx back into the transaction; 0 ok, -1 with the error filled.
 * Runs protected (save_ctx below): encoding may need stack or memory. */
static int save_ctx_body(hs_state *S, void *arg) {
    ctx_save *cs = arg;
    hs_txn *t = cs->t;
    lua_State *L = S->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, S->txn_ref);
    lua_pushliteral(L, "ctx");
    lua_rawget(L, -2);
    hs_buf *out = &S->ctxbuf;
    char err[512];
    out->len = 0;
    int rc = hs_ctx_encode(L, -1, out, err, sizeof err);
    lua_pop(L, 1);
    lua_pushliteral(L, "ctx");
    lua_pushnil(L);
    lua_rawset(L, -3);
    lua_pop(L, 1);
    if (rc == 0 && hs_txn_set_ctx(t, out->p, out->len) != 0)
        snprintf(err, sizeof err, "out of memory saving txn.ctx"), rc = -1;
    if (out->cap > (64 << 10)) hs_buf_free(out); /* don't keep a huge one around */
    if (rc != 0) {
        hs_error_set(cs->err, HS_ERR_CTX, S->cur_name, "", "%s", err);
        return -1;
    }
    t->changed |= HS_CH_CTX;
    return 0;
}

/* 0 ok; -1 with ERR filled (non-plain data, or a raised error such as out of memory). */
static int save_ctx(hs_state *S, hs_txn *t, hs_error *err) {
    S->ctx_live = 0;
    ctx_save cs = {t, err};
    if (hs_protected(S, save_ctx_body, &cs, err, S->cur_name ? S->cur_name : "") == 0) return 0;
    snprintf(err->hook, sizeof err->hook, "%s", S->host->hooks[S->hook]);
    return -1;
}

static int run_handlers(hs_state *S, int hook, hs_txn *t, uint64_t start) {
    lua_State *L = S->L;
    hs_hookcache *hc = &S->hooks[hook];
    int status = HS_CONTINUE;
    int base = lua_gettop(L);
    S->txn = t;
    S->hook = hook;
    S->in_errh = 0; /* a handler error inside the message handler may have left it set */
    S->in_module = S->in_new = 0; /* (as may an error in a module's chunk or a trial new()) */
    t->responded = 0;
    hs_state_deadline(S, start);
    if (S->host->release && !S->released) { /* not yet (rehydration may have) */
        S->release_at_ns = start + S->host->long_ns; /* checked by the time-limit hook */
        if (S->recent_ns[hook] > S->host->long_ns) hs_state_release_host(S); /* runs long here */
    }
    for (int i = 0; i < hc->n; i++) {
        hs_handler *it = &hc->items[i];
        S->cur_script = S->slots[it->slot].script;
        S->cur_name = S->cur_script->classes[it->cls].name;
        size_t regs = S->regs.len ? hs_register_count(S) : 0;
        S->err.message[0] = S->err.traceback[0] = 0; /* Lua 5.4 runs no handler out of memory */
        lua_rawgeti(L, LUA_REGISTRYINDEX, it->fn_ref);
        lua_rawgeti(L, LUA_REGISTRYINDEX, it->self_ref);
        lua_pushvalue(L, HS_STACK_TXN);
        int rc = lua_pcall(L, 2, 1, HS_STACK_ERRH);
        if (rc != 0) {
            hs_register_truncate(S, regs); /* a failed handler registers nothing */
            hs_error_from_lua(S, &S->err, rc, S->cur_name, 1);
            snprintf(S->err.hook, sizeof S->err.hook, "%s", S->host->hooks[hook]);
            if (S->err.kind == HS_ERR_TIMEOUT) BUMP(S->c.timeouts);
            if (S->err.kind == HS_ERR_MEMORY) BUMP(S->c.memory_errors);
            status = HS_ERROR;
            break;
        }
        if (S->mem_over) { /* LuaJIT went past its limit and returned before a safe point */
            hs_register_truncate(S, regs);
            hs_error_set(&S->err, HS_ERR_MEMORY, S->cur_name, S->host->hooks[hook],
                         "%s: memory limit exceeded (when the handler returned)", S->cur_name);
            BUMP(S->c.memory_errors);
            status = HS_ERROR;
            break;
        }
        int done = t->responded || lua_touserdata(L, -1) == (void *)&hs_done_sentinel;
        lua_pop(L, 1);
        if (done) {
            status = HS_DONE;
            break;
        }
    }
    hs_error ctx_err;
    /* saved even after a handler error; that error stays the one reported */
    if (S->ctx_live && save_ctx(S, t, &ctx_err) != 0 && status != HS_ERROR) {
        S->err = ctx_err;
        status = HS_ERROR;
    }
    lua_settop(L, base);
    if (status == HS_ERROR && S->err.kind == HS_ERR_MEMORY) /* back under the limit for the next */
        lua_gc(L, LUA_GCCOLLECT, 0);
    hs_state_end_deadline(S);
    S->release_at_ns = 0;
    S->txn = NULL;
    S->hook = -1;
    S->cur_name = NULL;
    S->cur_script = NULL;
    return status;
}

static const uint64_t latency_bounds[HS_LATENCY_BUCKETS - 1] = {
    10000, 25000, 50000, 100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000, 100000000};

const uint64_t *hs_latency_bounds_ns(void) { return latency_bounds; }

/* The latency bucket of a fire that took NS. */
static int latency_bucket(uint64_t ns) {
    int b = 0;
    while (b < HS_LATENCY_BUCKETS - 1 && ns > latency_bounds[b]) b++;
    return b;
}

int hs_fire(hs_host *h, int hook, hs_txn *t) {
    hs_error *cerr;
    hs_state *S = hs_thread_state(h, &cerr);
    if (!S) return HS_ERROR;
    if (hook < 0 || hook >= h->nhooks) {
        hs_error_set(&S->err, HS_ERR_USAGE, "", "", "no hook with index %d", hook);
        return HS_ERROR;
    }
    if (!t) {
        hs_error_set(&S->err, HS_ERR_USAGE, "", h->hooks[hook], "no transaction to fire on");
        return HS_ERROR;
    }
    if (atomic_exchange_explicit(&t->busy, 1, memory_order_acquire)) {
        hs_error_set(&S->err, HS_ERR_USAGE, "", h->hooks[hook],
                     "the transaction is in use: another fire is running on it");
        return HS_ERROR;
    }
    if (hs_limits_enter(S, &S->err) != 0) {
        snprintf(S->err.hook, sizeof S->err.hook, "%s", h->hooks[hook]);
        atomic_store_explicit(&t->busy, 0, memory_order_release);
        return HS_ERROR;
    }
    t->changed = 0;
    if (S->logs.len) S->logs.len = 0;
    S->logs_dropped = 0;
    BUMP(S->c.fires);
    BUMP(S->c.hook_fires[hook]);
    uint64_t start = 0;
    int status;
    S->released = 0;
    if (S->gen != atomic_load_explicit(&h->gen, memory_order_acquire)) {
        start = hs_now_ns(); /* rehydration counts in the hook's time */
        /* a chunk or new() may run long (or wait on Redis): the GIL may go then too */
        if (h->release) S->release_at_ns = start + h->long_ns;
        if (hs_state_rehydrate(S) != 0) {
            snprintf(S->err.hook, sizeof S->err.hook, "%s", h->hooks[hook]);
            status = HS_ERROR;
            goto done;
        }
    }
    if (S->hooks[hook].n == 0) { /* nothing to run, nothing worth timing */
        S->cstack_floor = 0;
        S->release_at_ns = 0;
        atomic_store_explicit(&t->busy, 0, memory_order_release);
        return HS_CONTINUE | (S->logs.len ? HS_CH_LOGS << 2 : 0);
    }
    if (!start) start = hs_now_ns();
    status = run_handlers(S, hook, t, start);
done:;
    if (S->regs.len && hs_register_publish(S)) /* what its handlers (un)registered, now it is over */
        t->changed |= HS_CH_PROGRAM;
    S->release_at_ns = 0; /* (a failed rehydration leaves it set) */
    if (S->logs_dropped) hs_log_dropped(S);
    uint64_t took = hs_now_ns() - start;
    if (h->release) /* what the next fire of this hook expects (run_handlers) */
        S->recent_ns[hook] += ((int64_t)took - (int64_t)S->recent_ns[hook]) / 8;
    ADD(S->c.hook_ns[hook], took);
    BUMP(S->c.hook_buckets[hook][latency_bucket(took)]);
    if (status == HS_ERROR) {
        BUMP(S->c.errors);
        BUMP(S->c.hook_errors[hook]);
    }
    unsigned changed = t->changed | (S->logs.len ? HS_CH_LOGS : 0);
    S->cstack_floor = 0; /* only this thread's fire may compare against it */
    atomic_store_explicit(&t->busy, 0, memory_order_release); /* the last touch of t */
    return status | (int)(changed << 2);
}
