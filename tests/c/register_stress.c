/*
 * register_stress.c — hs.register / hs.unregister from 8 threads at once, without
 * Python, for the sanitizer builds (tests/test_sanitizers.py; docs/register.md):
 *
 *   8 threads fire read_request then send_response on one host, each on its own
 *   transaction. 4 of them register and unregister classes from read_request all
 *   the time: classes k0..k7, which any of the 4 may register, replace or remove,
 *   and own<i>, which only thread i touches. A class's methods carry upvalues of
 *   every kind that crosses threads — numbers, strings, a table of plain data, a
 *   helper function shared by all classes, an upvalue two functions share — and
 *   check them in Lua (an error fails the fire); its send_response writes a header
 *   the C side checks byte for byte.
 *   A loader thread meanwhile loads new versions of the script (a reload keeps the
 *   classes), unloads it (removing them) and loads it again, unloads single
 *   classes, and loads and unloads a second script that registers a class while
 *   its chunk runs.
 *
 * Checks: no fire fails; every x-k<n> / x-own<n> / x-audit header reads exactly
 * as its class writes it; a thread that registered own<i> sees it in its very next
 * fire (the send_response of the same transaction) and, after unregistering it,
 * sees it no more (unless the script was unloaded meanwhile: an epoch counter
 * brackets the loader's unloads); at the end, hs_scripts lists each name once, every
 * "<script>#<name>" belongs to a loaded script, the run-time ones are the classes
 * the script can register and their count is hs_stats.registered; then a last
 * registration from this thread, hs_unload of it, and of the script, leave nothing.
 *
 * Usage: register_stress MILLISECONDS [replace] (how long the 8 threads run; with
 * "replace", the 8 threads all register k0 in every fire, nothing else: each fire
 * replaces the class another just published, the shortest way to a published class
 * freed under a fire that still uses it).
 * Prints "ok fires=F registrations=R checks=C" and exits 0 when every check held.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hostscript.h"

#define THREADS 8
#define REGISTERING 4 /* threads 0..3 register */
#define SHARED_NAMES 8 /* k0..k7 */

static hs_host *H;
static atomic_int stop;
static atomic_long bad, checks, fires;
/* "replace" mode: the 8 threads all register k0, every fire (each one
 * replaces the class another thread just published), and the loader stays idle */
static int replace_only;
/* odd while the loader unloads reg.lua: a thread whose check spans a change skips it */
static atomic_long epoch;
static atomic_int version;

#define FAIL(...)                                                                                  \
    do {                                                                                           \
        fprintf(stderr, __VA_ARGS__);                                                              \
        fputc('\n', stderr);                                                                       \
        atomic_fetch_add(&bad, 1);                                                                 \
    } while (0)

/* reg.lua, version %d: read_request registers make(n, name) as NAME on x-op: reg,
 * unregisters NAME on x-op: unreg, and says which version ran (x-v). */
static const char reg_fmt[] =
    "local VERSION = 'v%d'\n"
    "local function put(h, k, v) h[k] = v end -- a helper every class shares\n"
    "local Base = {}\n"
    "function Base:fmt(num, str, tbl)\n"
    "  return string.format('%%.1f|%%s|%%d|%%d|%%s', num, str, tbl.n, tbl.list[3], VERSION)\n"
    "end\n"
    "local function make(n, name)\n"
    "  local num, str = n + 0.5, 's' .. n\n"
    "  local tbl = { n = n, list = { 1, 2, n }, name = 't' .. n, deep = { { { n } } } }\n"
    "  local hits = 0\n"
    "  local function bump() hits = hits + 1 end -- shares the upvalue hits with the method\n"
    "  local K = setmetatable({ data = { n = n, again = nil } }, { __index = Base })\n"
    "  K.data.again = K.data -- a cycle\n"
    "  function K:on_send_response(txn)\n"
    "    local before = hits\n"
    "    bump()\n"
    "    if hits ~= before + 1 then error('upvalue hits is not shared') end\n"
    "    if str ~= 's' .. n or tbl.list[3] ~= n or tbl.deep[1][1][1] ~= n or tbl.name ~= 't' .. n\n"
    "       or self.data.n ~= n or self.data.again ~= self.data then\n"
    "      error('the data of ' .. name .. ' is not what was registered')\n"
    "    end\n"
    "    put(txn.resp.headers, 'x-' .. name, self:fmt(num, str, tbl))\n"
    "  end\n"
    "  return K\n"
    "end\n"
    "local C = {}\n"
    "function C:on_read_request(txn)\n"
    "  local h = txn.req.headers\n"
    "  local op, name = h['x-op'], h['x-name']\n"
    "  if op == 'reg' then\n"
    "    txn.resp.headers['x-full'] = hs.register(make(tonumber(h['x-n']), name), { name = name })\n"
    "  elseif op == 'unreg' then\n"
    "    txn.resp.headers['x-existed'] = tostring(hs.unregister(name))\n"
    "  end\n"
    "  txn.resp.headers['x-v'] = VERSION\n"
    "end\n"
    "return C\n";

/* other.lua: registers a class while its chunk runs */
static const char other_src[] =
    "local Audit = {}\n"
    "local tag = 'audit'\n"
    "function Audit:on_send_response(txn) txn.resp.headers['x-audit'] = tag end\n"
    "hs.register(Audit, { name = 'audit', order = -5 })\n"
    "return { on_read_request = function(self, txn) end }\n";

static unsigned rnd(unsigned *s) {
    *s = *s * 1103515245u + 12345u;
    return (*s >> 16) & 0x7fff;
}

static void pause_us(long us) {
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

static int load_reg(void) {
    char src[sizeof reg_fmt + 32];
    int v = atomic_fetch_add(&version, 1) + 1;
    int n = snprintf(src, sizeof src, reg_fmt, v);
    hs_error err;
    if (hs_load(H, "reg.lua", src, (size_t)n, &err) != 0) {
        FAIL("load reg.lua v%d: %s", v, err.message);
        return -1;
    }
    return 0;
}

static const char *header(hs_txn *t, int which, const char *name, char *buf, size_t cap) {
    size_t n;
    const char *v = hs_txn_header(t, which, name, &n);
    if (!v || n >= cap) return NULL;
    memcpy(buf, v, n);
    buf[n] = 0;
    return buf;
}

/* Every class header of the response reads as its class writes it. */
static void check_headers(hs_txn *t) {
    size_t len;
    /* "name\0value\0name\0value": NUL between the fields, none after the last */
    const char *p = hs_txn_headers(t, HS_RESP, &len), *end = p + len;
    while (p < end) {
        char name[64], value[256];
        const char *z = memchr(p, 0, (size_t)(end - p));
        snprintf(name, sizeof name, "%.*s", (int)(z - p), p);
        p = z + 1;
        z = memchr(p, 0, (size_t)(end - p));
        if (!z) z = end;
        snprintf(value, sizeof value, "%.*s", (int)(z - p), p);
        p = z + 1;
        int n;
        char tail[32];
        if (!strcmp(name, "x-audit")) {
            if (strcmp(value, "audit")) FAIL("x-audit: %s", value);
        } else if ((sscanf(name, "x-k%d%31s", &n, tail) == 1 && n >= 0 && n < SHARED_NAMES) ||
                   (sscanf(name, "x-own%d%31s", &n, tail) == 1 && n >= 0 && n < REGISTERING)) {
            int m = name[2] == 'k' ? n : 100 + n;
            char want[96];
            int w = snprintf(want, sizeof want, "%d.5|s%d|%d|%d|v", m, m, m, m);
            if (strncmp(value, want, (size_t)w) || atoi(value + w) < 1 ||
                atoi(value + w) > atomic_load(&version))
                FAIL("%s: %s (expected %s<version>)", name, value, want);
        } else if (!strncmp(name, "x-", 2) && strcmp(name, "x-v") && strcmp(name, "x-full") &&
                   strcmp(name, "x-existed")) {
            FAIL("unexpected header %s: %s", name, value);
        }
    }
}

/* Fire HOOK on T; 0 when it failed (counted). */
static int fire(hs_txn *t, int hook, int *result) {
    int r = hs_fire(H, hook, t);
    atomic_fetch_add(&fires, 1);
    if (result) *result = r;
    if ((r & 3) == HS_ERROR) {
        hs_error e;
        hs_last_error(H, &e);
        FAIL("fire %s failed: %s", hook ? "send_response" : "read_request", e.message);
        return 0;
    }
    return 1;
}

static void *worker(void *arg) {
    long id = (long)arg;
    unsigned seed = (unsigned)id * 7919u + 17u;
    int own_registered = 0;
    hs_txn *t = hs_txn_new();
    char buf[128], own[16], want_full[32];
    snprintf(own, sizeof own, "own%ld", id);
    snprintf(want_full, sizeof want_full, "reg.lua#own%ld", id);
    while (!atomic_load(&stop)) {
        hs_txn_reset(t);
        hs_txn_add_header(t, HS_REQ, "Host", "x");
        int mine = 0; /* 1: this fire registers own<id>, 2: unregisters it */
        if (replace_only) { /* all 8 threads */
            hs_txn_add_header(t, HS_REQ, "x-op", "reg");
            hs_txn_add_header(t, HS_REQ, "x-name", "k0");
            hs_txn_add_header(t, HS_REQ, "x-n", "0");
        } else if (id < REGISTERING) {
            unsigned r = rnd(&seed) % 4;
            char n[16];
            if (r == 0) { /* own<id>: registered and unregistered in turn */
                mine = own_registered ? 2 : 1;
                hs_txn_add_header(t, HS_REQ, "x-op", mine == 1 ? "reg" : "unreg");
                hs_txn_add_header(t, HS_REQ, "x-name", own);
                snprintf(n, sizeof n, "%ld", 100 + id);
            } else { /* k0..k7: any of the 4 threads registers, replaces, removes */
                unsigned k = rnd(&seed) % SHARED_NAMES;
                char name[16];
                snprintf(name, sizeof name, "k%u", k);
                hs_txn_add_header(t, HS_REQ, "x-op", r == 3 ? "unreg" : "reg");
                hs_txn_add_header(t, HS_REQ, "x-name", name);
                snprintf(n, sizeof n, "%u", k);
            }
            hs_txn_add_header(t, HS_REQ, "x-n", n);
        }
        long e1 = atomic_load(&epoch);
        int r;
        if (!fire(t, 0, &r)) continue;
        int ran = header(t, HS_RESP, "x-v", buf, sizeof buf) != NULL; /* reg.lua was loaded */
        if (ran && mine == 1) {
            if (!header(t, HS_RESP, "x-full", buf, sizeof buf) || strcmp(buf, want_full))
                FAIL("hs.register returned %s, not %s", header(t, HS_RESP, "x-full", buf, sizeof buf),
                     want_full);
            if (!((r >> 2) & HS_CH_PROGRAM)) FAIL("registering %s published no program", own);
        }
        if (!fire(t, 1, NULL)) continue;
        long e2 = atomic_load(&epoch);
        check_headers(t);
        snprintf(buf, sizeof buf, "x-%s", own);
        size_t len;
        int seen = hs_txn_header(t, HS_RESP, buf, &len) != NULL;
        if (mine == 1 && ran) {
            own_registered = 1;
            if (e1 == e2 && !(e1 & 1)) { /* no unload of reg.lua meanwhile */
                atomic_fetch_add(&checks, 1);
                if (!seen) FAIL("thread %ld: %s registered, not run by the next fire", id, own);
            }
        } else if (mine == 2) {
            own_registered = 0;
            atomic_fetch_add(&checks, 1);
            if (seen)
                FAIL("thread %ld: %s unregistered (reg.lua %s, hs.unregister said %s, epoch %ld -> %ld), "
                     "still run by the next fire", id, own, ran ? "ran" : "was not loaded",
                     header(t, HS_RESP, "x-existed", buf, sizeof buf), e1, e2);
        }
    }
    hs_txn_free(t);
    return NULL;
}

static void *loader(void *arg) {
    (void)arg;
    unsigned seed = 4242;
    while (!replace_only && !atomic_load(&stop)) {
        pause_us(2000 + (long)(rnd(&seed) % 3000));
        unsigned r = rnd(&seed) % 10;
        if (r < 5) {
            load_reg(); /* a new version: the run-time classes stay */
        } else if (r == 5) {
            atomic_fetch_add(&epoch, 1);
            if (hs_unload(H, "reg.lua") != 0) FAIL("unload reg.lua failed");
            atomic_fetch_add(&epoch, 1);
            pause_us(500);
            load_reg();
        } else if (r == 6) {
            char name[32];
            snprintf(name, sizeof name, "reg.lua#k%u", rnd(&seed) % SHARED_NAMES);
            hs_unload(H, name); /* -1 when it is not registered now */
        } else if (r == 7) {
            hs_error err;
            if (hs_load(H, "other.lua", other_src, sizeof other_src - 1, &err) != 0)
                FAIL("load other.lua: %s", err.message);
        } else {
            hs_unload(H, "other.lua"); /* -1 when it is not loaded */
        }
    }
    return NULL;
}

/* The names hs_scripts lists, into NAMES (at most MAX); how many. */
static int list_names(char *buf, size_t cap, const char **names, int max) {
    size_t need = hs_scripts(H, buf, cap);
    if (need > cap) {
        FAIL("hs_scripts needs %zu bytes", need);
        return 0;
    }
    int n = 0;
    for (size_t at = 0; at < need && n < max; at += strlen(buf + at) + 1) names[n++] = buf + at;
    return n;
}

static int listed(const char **names, int n, const char *name) {
    int c = 0;
    for (int i = 0; i < n; i++) c += !strcmp(names[i], name);
    return c;
}

/* The program's names hang together: each once, each class under a loaded script,
 * the run-time ones among those reg.lua registers, as many as stats.registered. */
static void check_program(void) {
    char buf[8192];
    const char *names[256];
    int n = list_names(buf, sizeof buf, names, 256);
    int runtime = 0;
    for (int i = 0; i < n; i++) {
        if (listed(names, n, names[i]) != 1) FAIL("%s listed %d times", names[i], listed(names, n, names[i]));
        const char *hash = strchr(names[i], '#');
        if (!hash) continue;
        char script[64];
        snprintf(script, sizeof script, "%.*s", (int)(hash - names[i]), names[i]);
        if (!listed(names, n, script)) FAIL("%s is listed, %s is not loaded", names[i], script);
        int k;
        char tail[32];
        if (!strcmp(names[i], "other.lua#audit")) continue;
        runtime++;
        if (!(!strcmp(script, "reg.lua") &&
              ((sscanf(hash, "#k%d%31s", &k, tail) == 1 && k >= 0 && k < SHARED_NAMES) ||
               (sscanf(hash, "#own%d%31s", &k, tail) == 1 && k >= 0 && k < REGISTERING))))
            FAIL("%s: not a class reg.lua registers", names[i]);
    }
    hs_stats st;
    hs_host_stats(H, &st, NULL);
    if ((int)st.registered != runtime)
        FAIL("stats.registered %llu, the program lists %d run-time classes",
             (unsigned long long)st.registered, runtime);
}

int main(int argc, char **argv) {
    long ms = argc > 1 ? atol(argv[1]) : 1500;
    replace_only = argc > 2 && !strcmp(argv[2], "replace");
    const char *hooks[] = {"read_request", "send_response"};
    hs_config cfg = {.hooks = hooks, .nhooks = 2, .time_limit = 2.0, .memory_limit = 64 << 20,
                     .sandbox = 1, .state_pool = 2};
    hs_error err;
    H = hs_host_new(&cfg, &err);
    if (!H) {
        fprintf(stderr, "%s\n", err.message);
        return 1;
    }
    if (load_reg() != 0) return 1;
    pthread_t th[THREADS], ld;
    for (long i = 0; i < THREADS; i++) pthread_create(&th[i], NULL, worker, (void *)i);
    pthread_create(&ld, NULL, loader, NULL);
    pause_us(ms * 1000);
    atomic_store(&stop, 1);
    for (int i = 0; i < THREADS; i++) pthread_join(th[i], NULL);
    pthread_join(ld, NULL);

    /* the end state, with nothing running */
    char buf[8192];
    const char *names[256];
    int n = list_names(buf, sizeof buf, names, 256);
    if (!listed(names, n, "reg.lua")) load_reg();
    check_program();

    /* one more registration, from this thread, then unload it and the script */
    hs_txn *t = hs_txn_new();
    hs_txn_add_header(t, HS_REQ, "x-op", "reg");
    hs_txn_add_header(t, HS_REQ, "x-name", "k7");
    hs_txn_add_header(t, HS_REQ, "x-n", "7");
    if (fire(t, 0, NULL) && fire(t, 1, NULL)) {
        check_headers(t);
        size_t len;
        if (!hs_txn_header(t, HS_RESP, "x-k7", &len)) FAIL("k7 registered, not run by the next fire");
    }
    n = list_names(buf, sizeof buf, names, 256);
    if (!listed(names, n, "reg.lua#k7")) FAIL("reg.lua#k7 registered, not listed");
    if (hs_unload(H, "reg.lua#k7") != 0) FAIL("hs_unload reg.lua#k7 failed");
    n = list_names(buf, sizeof buf, names, 256);
    if (listed(names, n, "reg.lua#k7")) FAIL("reg.lua#k7 unloaded, still listed");
    check_program();
    if (hs_unload(H, "reg.lua") != 0) FAIL("hs_unload reg.lua failed");
    n = list_names(buf, sizeof buf, names, 256);
    for (int i = 0; i < n; i++)
        if (!strncmp(names[i], "reg.lua", 7)) FAIL("%s listed after reg.lua was unloaded", names[i]);
    hs_txn_reset(t);
    if (fire(t, 0, NULL) && fire(t, 1, NULL)) check_headers(t);
    size_t len;
    if (hs_txn_header(t, HS_RESP, "x-k7", &len)) FAIL("a class of reg.lua runs after its unload");
    hs_txn_free(t);

    hs_stats st;
    hs_host_stats(H, &st, NULL);
    if (st.registered != 0) FAIL("stats.registered %llu with no script that registers",
                                 (unsigned long long)st.registered);
    hs_host_free(H);
    long b = atomic_load(&bad);
    if (b) {
        printf("FAILED checks=%ld failures=%ld\n", atomic_load(&checks), b);
        return 1;
    }
    printf("ok fires=%ld registrations=%llu checks=%ld\n", atomic_load(&fires),
           (unsigned long long)st.registrations, atomic_load(&checks));
    return 0;
}
