/*
 * core.h — internal structures shared by the files of the core. Not installed.
 *
 * Ownership at a glance:
 *   hs_host   owns the config, the current program (one reference), the list of
 *             live states (some of them idle in its pool) and the append-only list
 *             of compiled modules.
 *   hs_prog   immutable once published; refcounted by the host and by every state
 *             that still runs it. Holds references to its hs_script entries.
 *   hs_script immutable compiled script (bytecode); refcounted by programs, so a
 *             reload of one script shares the others between old and new program.
 *   hs_state  serves one thread at a time, at most one per (thread, host); listed
 *             by its host and by its thread, refcounted by those listings, holding
 *             a reference on its host. host.c owns the rules (thread.c asks it for
 *             a state and gives it back): when its thread ends a state goes to the
 *             host's pool of idle states if there is room, and the next new thread
 *             takes it over; otherwise whoever ends first — the thread or the host
 *             — closes its Lua state (claimed flag), and the last listing frees it.
 *   hs_thread one per thread that fired (thread.c): its list of states.
 *   hs_shared a shared dictionary (shared.c): owned by its host, created with it
 *             and freed when the host is destroyed, after every state.
 */
#ifndef HS_CORE_H
#define HS_CORE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stddef.h>

#include "hostscript.h"
#include "buf.h"
#include "compat.h"
#include "txn.h"

#define HS_MAX_HOOKS 64
#define HS_HOOK_COUNT 1000          /* instructions between time-limit checks */
#define HS_ERRH_SLACK (256 << 10)   /* heap allowed over the limit while reporting an error */
#define HS_MEM_HEADROOM(limit) ((limit) / 4 + (1 << 20)) /* LuaJIT: granted past the limit until
                                                            the next safe point (limits.c) */
#define HS_LOGS_MAX (64 << 10)      /* log bytes kept per fire */
#define HS_CSTACK_MARGIN (48 << 10) /* C stack kept free below the deepest Lua may go */
#define HS_CSTACK_ERRROOM (16 << 10) /* ...of which error handlers may use this much */
#define HS_CSTACK_MIN (128 << 10)   /* the smallest thread stack supported */

enum { HS_HOOK_OBSERVE_ONLY = 1 }; /* hook flags: "log" may not answer the request */

/* A worker state keeps its message handler and txn object at the bottom of its
 * stack for its whole life, so a fire pushes them without a registry look-up. */
enum { HS_STACK_ERRH = 1, HS_STACK_TXN = 2 };

int hs_buf_writer(lua_State *L, const void *p, size_t sz, void *ud); /* lua_dump into an hs_buf (program.c) */

/* ---- program (program.c) ---- */
/* What a script entry of a program holds: a script's chunk, or a class a handler
 * registered at run time (hs.register inside a fire), serialized by class_codec.c. */
enum { HS_SCRIPT_CHUNK = 0, HS_SCRIPT_CLASS = 1 };

typedef struct hs_class {
    char *name;        /* the script's name for the class its chunk returns, else "<script>#<name>" */
    int order;         /* handlers of a hook run by ascending order, then program order */
    uint64_t hookmask; /* bit h: the class has on_<hooks[h]> */
} hs_class;

typedef struct hs_script {
    atomic_int refs;
    int kind;    /* HS_SCRIPT_* */
    char *name;  /* CHUNK: as loaded; CLASS: "<origin>#<name>" */
    char *origin; /* the chunk script the entry comes from (CHUNK: its own name) */
    char *bc;    /* CHUNK: bytecode of the chunk; CLASS: the serialized class */
    size_t bclen;
    uint64_t hookmask; /* union of the classes' masks */
    int nclasses;      /* CLASS: 1 */
    hs_class *classes; /* in registration order, the returned class last */
} hs_script;

typedef struct hs_module {
    char *name;
    char *bc;
    size_t bclen;
} hs_module;

typedef struct hs_prog {
    atomic_int refs;
    uint64_t gen;
    int nscripts;
    hs_script **scripts;
    int nmodules;
    hs_module **modules;
    int nregistered; /* CLASS entries */
} hs_prog;

/* One change to the program: set script NAME (replacing the entry of that name in
 * place, or appending; a CLASS entry only while its origin script is there), or
 * remove it (SCRIPT NULL; removing a chunk script removes the classes it
 * registered at run time too). */
typedef struct hs_prog_op {
    const char *name;
    hs_script *script;
    int result; /* out: HS_OP_* */
} hs_prog_op;
enum { HS_OP_DONE = 0, HS_OP_MISSING, HS_OP_LIMIT, HS_OP_TAKEN /* a class its script's chunk makes */ };

void hs_prog_release(hs_prog *p);
/* Apply OPS, in order, to the program published now and publish the result with
 * NEWMODS, under host->mu: a change made meanwhile by another thread is kept. A
 * new CLASS entry beyond REG_MAX CLASS entries (REG_MAX < 0: no bound) is not
 * added (HS_OP_LIMIT). 0: published, the program owns the references of the set
 * ops' scripts (released for an op not done); -1: out of memory, nothing changed. */
int hs_prog_publish(hs_host *h, hs_prog_op *ops, int nops, hs_module **newmods, int nnew, int reg_max);
int hs_prog_find(const hs_prog *p, const char *name); /* index of script NAME, -1 when absent */
/* A new script entry with one reference, no classes yet; NULL when out of memory. */
hs_script *hs_script_new(int kind, const char *name, const char *origin);
/* Add a class to S (names copied); 0, or -1 when out of memory. */
int hs_script_add_class(hs_script *s, const char *name, int order, uint64_t hookmask);
void hs_script_release(hs_script *s);
hs_prog *hs_prog_acquire(hs_host *h); /* current program, +1 reference */
const hs_module *hs_prog_module(const hs_prog *p, const char *name);

/* ---- per-thread state (state.c) ---- */
typedef struct hs_slot {
    hs_script *script; /* reference held */
    int *refs;         /* per class of the script: class ref, instance ref (2 * nclasses) */
} hs_slot;

typedef struct hs_handler {
    int fn_ref, self_ref, slot, cls;
} hs_handler;

typedef struct hs_hookcache {
    int n;
    hs_handler *items;
} hs_hookcache;

typedef struct hs_counters {
    _Atomic uint64_t fires, errors, timeouts, memory_errors, rehydrations, releases;
    _Atomic uint64_t hook_fires[HS_MAX_HOOKS], hook_errors[HS_MAX_HOOKS], hook_ns[HS_MAX_HOOKS];
    _Atomic uint64_t hook_buckets[HS_MAX_HOOKS][HS_LATENCY_BUCKETS]; /* hs_hook_stats.buckets */
} hs_counters;

typedef struct hs_state hs_state;
struct hs_state {
    hs_host *host; /* reference held */
    lua_State *L;
    hs_state *prev, *next; /* host's list of live states (host->mu) */
    atomic_int linked;     /* on the host's list (written under host->mu) */
    hs_state *pool_next;   /* host's pool of idle states, a subset of its list (host->mu) */
    hs_state *tnext;       /* its thread's list (thread->mu) */
    atomic_int refs;       /* the listings: the host's, and its thread's unless pooled */
    atomic_int claimed;    /* set by whoever closes the Lua state: thread end or host free */
    int scratch;           /* a load-time validation state, in no list */

    hs_prog *prog; /* reference held; NULL before the first rehydration */
    const hs_prog *modprog; /* while rehydrating: the program require looks in */
    uint64_t gen;
    int nslots;
    hs_slot *slots;
    hs_hookcache *hooks; /* nhooks entries */

    /* registry references made once at state creation */
    int env_ref, txn_ref, errh_ref, loaded_ref, trampoline_ref;

    /* the fire in progress */
    hs_txn *txn;
    int hook, ctx_live;
    const char *cur_name; /* script whose code runs now (for logs) */
    const hs_script *cur_script; /* the program entry whose handler runs now (hs.register) */
    int collecting;       /* while a chunk runs: registry ref of its hs.register list, else 0 */
    int in_module, in_new; /* a module's chunk / a registered class's trial new() runs */
    hs_buf regs;          /* hs_reg: run-time (un)registrations of this fire (lapi_register.c) */
    hs_buf codec;         /* scratch: a class being serialized (freed with the state) */
    int names_ref, names_nmods; /* class_codec.c's library names, and the modules then loaded */
    uint64_t deadline_ns; /* 0: no deadline */
    uint64_t release_at_ns; /* 0: nothing to release (any more) during this fire */
    int released;           /* the host's lock was released during this fire */
    uint64_t recent_ns[HS_MAX_HOOKS]; /* moving average of this state's fire time per hook */
    int abort;            /* HS_ERR_TIMEOUT once the limit fired: pcall cannot catch it */
    uintptr_t cstack_floor; /* C recursion stops above this address (limits.c); 0: unchecked */
    int cstack_tripped;     /* "C stack overflow" raised; its handlers run below the floor */

    /* memory accounting (counting allocator) */
    _Atomic size_t heap;
    size_t heap_limit;
    int in_errh, mem_refused;
    int mem_over; /* LuaJIT: past the limit within the headroom; raised at the next safe point */

    hs_error err;   /* last fire error of its thread (cleared when a new thread takes it) */
    hs_buf logs;    /* log records of the last fire */
    int logs_dropped; /* records refused since the last fire began (HS_LOGS_MAX) */
    hs_buf ctxbuf;  /* txn.ctx is encoded here, then copied: no allocation per fire */
    hs_buf pending; /* scratch only: modules compiled during this load (hs_module*) */
    hs_counters c;
};

hs_state *hs_state_new(hs_host *h, int scratch, hs_error *err);
void hs_state_close(hs_state *S);    /* scratch or unlisted: teardown + free */
void hs_state_teardown(hs_state *S); /* close the Lua state; the struct stays */
int hs_state_unref(hs_state *S);     /* drop one listing; 1 when it was the last */
void hs_state_destroy(hs_state *S);  /* free the struct (after the last listing) */

/* ---- which states a thread owns (thread.c) ---- */
/* This thread's state for H; its first fire takes one from the host's pool or creates it. */
hs_state *hs_thread_state(hs_host *h, hs_error **err);

/* ---- state.c ---- */
/* Run BODY in protected mode: a raised error (memory...) becomes -1 with ERR set. */
int hs_protected(hs_state *S, int (*body)(hs_state *, void *), void *arg, hs_error *err,
                 const char *script);
/* Run script NAME's chunk, on top of the stack, in a new environment; push an array
 * of its classes and their instances {class1, self1, class2, self2...} (those it
 * registered with hs.register in order, then the one it returned) and append an
 * hs_class for each to CLASSES (free them with hs_classes_free). 0, or -1 with ERR
 * set and nothing pushed. */
int hs_state_run_chunk(hs_state *S, const char *name, hs_buf *classes, hs_error *err);
void hs_classes_free(hs_buf *classes);
/* The class on top of the stack, named NAME: check it (hs_class_check) and make its
 * instance with new(); replaces it by class and instance (0), or pops it (-1, ERR
 * set; *MASK untouched). */
int hs_state_instantiate(hs_state *S, const char *name, uint64_t *mask, hs_error *err);
int hs_state_load(hs_state *S, const char *name, const char *buf, size_t len, int binary);
/* A fresh Lua state in place of S's (its program, classes and module data dropped);
 * 0, or -1 with ERR set and S without a Lua state. */
int hs_state_reopen(hs_state *S, hs_error *err);

/* ---- rehydrate.c ---- */
int hs_state_rehydrate(hs_state *S); /* 0 ok; -1 with S->err set */

/* ---- clock.c ---- */
uint64_t hs_now_ns(void);
void hs_clock_init(void);

/* ---- limits.c ---- */
void *hs_limits_alloc(void *ud, void *ptr, size_t osize, size_t nsize); /* the lua_Alloc, ud = S */
void hs_limits_install(hs_state *S); /* the count hook, when the host has a time limit */
/* Before running Lua on this thread: note where its C stack ends; -1 (ERR set) when
 * too little is left to run safely. */
int hs_limits_enter(hs_state *S, hs_error *err);
void hs_state_deadline(hs_state *S, uint64_t start_ns);
void hs_state_release_host(hs_state *S); /* call the host's release callback, once per fire */
/* A C function of L is about to wait (on the network): release the host's lock if
 * a fire holds it, and bound the wait by the fire's deadline less a tenth of the
 * time limit, left for the handler's fallback (hs_wait_deadline_ns). */
void hs_state_before_wait(lua_State *L);
void hs_state_end_deadline(hs_state *S);
/* Called by the patched engine libraries (tools/patches/). */
void hs_engine_checkin(lua_State *L);
int hs_engine_cstack(lua_State *L);

/* ---- errors.c ---- */
void hs_error_set(hs_error *e, int kind, const char *script, const char *hook, const char *fmt, ...);
void hs_error_from_lua(hs_state *S, hs_error *e, int rc, const char *script, int handled);

/* ---- sandbox and require (sandbox.c) ---- */
int hs_sandbox_open(hs_state *S); /* builds what script environments share (env_ref) */
/* Push a new chunk's environment: its own table in the sandbox, else the globals. */
void hs_sandbox_push_env(hs_state *S, lua_State *L);
extern const char hs_readonly_key; /* in a metatable: rawset refuses the table (sandbox.c) */

/* ---- Lua API: hs.shared (lapi_shared.c) ---- */
void hs_lapi_shared_open(hs_state *S); /* sets hs.shared in the hs table on top */

/* ---- Lua API: hs.register, hs.unregister (lapi_register.c) ---- */
void hs_lapi_register_open(hs_state *S); /* sets them in the hs table on top */
/* The (un)registrations pending in this fire; a handler that failed drops its own
 * with hs_register_truncate(S, the count before it ran). */
size_t hs_register_count(const hs_state *S);
void hs_register_truncate(hs_state *S, size_t n);
/* The fire is over: publish what its handlers registered and unregistered, as one
 * new program, and log each change; 1 when a program was published. */
int hs_register_publish(hs_state *S);
void hs_register_discard(hs_state *S); /* drop all pending ones (state teardown) */
/* Check that the table at IDX is a handler class of host H (every on_<x> a declared
 * hook, each a function): 0 with its hook mask in *MASK, or -1 with a message in
 * MSG. Runs metamethods (protected context, under a deadline). */
int hs_class_check(lua_State *L, hs_host *h, int idx, const char *name, uint64_t *mask, char *msg,
                   size_t msglen);

/* ---- serialized classes (class_codec.c) ---- */
/* Serialize the class at IDX (protected context, inside a fire of S): functions as
 * bytecode, their upvalues and the class's fields as data, library values and
 * required modules by name. 0, or -1 with a message naming the offending path in
 * MSG. Time and memory count against the fire; raises on their limits. */
int hs_class_encode(hs_state *S, lua_State *L, int idx, const char *name, hs_buf *out, char *msg,
                    size_t msglen);
/* Rebuild a serialized class on L (S's state or one of its coroutines) and push it
 * (protected context). */
void hs_class_decode(hs_state *S, lua_State *L, const char *name, const char *p, size_t len);

/* ---- Lua API: hs.redis (lapi_redis.c) ---- */
void hs_lapi_redis_open(hs_state *S); /* sets hs.redis in the hs table on top */

/* ---- Lua API: hs.*, txn (lapi_hs.c) ---- */
int hs_lapi_open(hs_state *S); /* leaves the hs table on the stack */
int hs_lapi_errh(lua_State *L);

/* ---- the fire's log records (logs.c) ---- */
/* Append a record of SCRIPT (levels as Python logging); dropped past HS_LOGS_MAX. */
void hs_log_put(hs_state *S, int level, const char *script, const char *msg, size_t len);
void hs_log_dropped(hs_state *S); /* one warning record for what hs_log_put dropped */
extern const char hs_done_sentinel;

/* ---- the embedded Lua library (generated from src/lua at build time) ---- */
typedef struct hs_lualib_entry {
    const char *name;
    const char *src;
    size_t len;
} hs_lualib_entry;
extern const hs_lualib_entry hs_lualib[]; /* ends with a NULL name */

/* ---- txn ctx codec (ctx.c) ---- */
int hs_ctx_encode(lua_State *L, int idx, hs_buf *out, char *err, size_t errlen);
int hs_ctx_decode(lua_State *L, const char *p, size_t len); /* pushes a table; 0 ok, -1 corrupt,
                                                            -2 an integer LuaJIT cannot hold */

/* ---- host (host.c) ---- */
struct hs_host {
    atomic_int refs; /* the host handle itself + each live or scratch state */
    uint64_t id;     /* unique in the process: thread.c's cache tells hosts apart by it */
    int nhooks;
    char **hooks;
    unsigned *hookflags;
    double time_limit;
    size_t memory_limit;
    int sandbox;
    char **lua_path;
    int nlua_path;

    pthread_mutex_t load_mu; /* serializes hs_load/hs_unload (compile outside mu) */
    pthread_mutex_t mu;      /* guards prog, states, pool, retired, modules, counters below */
    hs_prog *prog;
    _Atomic uint64_t gen; /* == prog->gen; read without the lock on every fire */
    hs_state *states;
    uint64_t nstates;     /* pooled ones included */
    int pool_max;         /* hs_config.state_pool: idle states kept at most */
    hs_state *pool;       /* idle states, most recently used first (thread.c) */
    uint64_t npooled, pool_hits;
    hs_counters retired; /* counters of states that ended */
    uint64_t compilations;
    void (*release)(void); /* hs_host_set_release: set before the first fire */
    uint64_t long_ns;
    hs_buf wrap_bc; /* the pcall wrappers, compiled by the first state (sandbox.c) */
    int wrap_tried; /* that first state tried (written before the host is shared) */
    hs_buf load_logs;
    hs_buf modules; /* hs_module*: every module compiled for this host, freed with it */
    int reg_max; /* CLASS entries hs.register may add at run time; -1: run-time registration off */
    uint64_t registrations, unregistrations, registrations_refused; /* counters (mu) */
    hs_shared **shared; /* the shared dictionaries (shared.c), freed with the host */
    int nshared;
};

void hs_host_unref(hs_host *h);
/* The listing of worker states (host.c), for thread.c: a new state listed by the
 * host and (refs 2) by the calling thread; the host's most recently pooled state
 * for a new thread (NULL: none); a state its thread has let go of (thread exit, or
 * found closed by hs_host_free) — pooled, or closed and dropped. */
hs_state *hs_host_new_state(hs_host *h, hs_error *err);
hs_state *hs_host_take_pooled(hs_host *h);
void hs_host_state_ended(hs_state *S);

#endif
