"""The rows of the comparison, one function each: set up the contestants, measure
them interleaved (timing.py), turn the medians into a Row with its targets.

R1 request flow, R1b the request object alone, R2 a no-op fire on a reused request,
R3 a ThreadingHTTPServer, R4 the first fire on a new thread; C: hs_fire against a
bare lua_pcall; T1/T2 thread scaling; M1/M2 memory; P1-P3 ``hostscript serve``
under wrk (proxy_wrk.py); D1/D2 shared dictionaries in Redis against redis-benchmark
(redis_ops.py); G1-G4 handler classes registered at run time (register.py). A1-A4
(ATS_ROWS, ``hostscript bench --ats``): hostscript inside Traffic Server against
Traffic Server alone, header_rewrite and ts_lua (ats.py).
"""
from __future__ import annotations

import contextlib
import functools
import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from . import contestants as cs
from . import ats, http_server, native, new_threads, proxy_wrk, redis_ops, register, scaling
from .report import Check, Row, ratio
from .timing import Call, Samples, interleave, interleaved_calls, per_call_ns
from .workloads import EMPTY, FLOW, METHOD, REQUEST_HEADERS, URI, big_workload, cpu_workload

ARGS = (METHOD, URI, REQUEST_HEADERS)
STATE_POOL = 16      # R4's pool size (the default of Host(state_pool=...))
RSS_FLAT_KIB = 2048  # RSS growth over the thread churn still called "flat"


@dataclass(frozen=True)
class Counts:
    """How much work each measurement does; quick() is the smoke test's."""

    round_ns: float          # one contestant's round in the per-call rows
    rounds: int
    http_connections: int
    http_rounds: int
    c_iterations: int
    c_rounds: int
    phase_ns: float          # one phase (1 or 2 threads) of a scaling round
    scaling_rounds: int
    first_fire_rounds: int
    churn_threads: int
    churn_warmup: int
    proxy: proxy_wrk.Plan    # P1-P3: wrk runs
    redis: redis_ops.Plan    # D1-D2: the Redis contestants
    registrations: int       # G2-G3: replacements of a run-time class
    ats: ats.Plan = ats.Plan()  # A1-A4: wrk through Traffic Server (engines: with_engines)

    @classmethod
    def full(cls) -> "Counts":
        return cls(round_ns=100e6, rounds=7, http_connections=2000, http_rounds=5,
                   c_iterations=1_000_000, c_rounds=7, phase_ns=150e6, scaling_rounds=5,
                   first_fire_rounds=21, churn_threads=10_000, churn_warmup=300,
                   proxy=proxy_wrk.Plan(seconds=5, rounds=3, warmup=1, concurrent=False),
                   redis=redis_ops.Plan(rounds=5), registrations=300, ats=ats.Plan())

    @classmethod
    def quick(cls) -> "Counts":
        return cls(round_ns=2e6, rounds=2, http_connections=40, http_rounds=1,
                   c_iterations=20_000, c_rounds=2, phase_ns=10e6, scaling_rounds=1,
                   first_fire_rounds=3, churn_threads=200, churn_warmup=20,
                   proxy=proxy_wrk.Plan(seconds=1, rounds=1, warmup=0, concurrent=True,
                                        connections=4),
                   redis=redis_ops.Plan.quick(), registrations=5, ats=ats.Plan.quick())

    def with_engines(self, engines: Sequence[str]) -> "Counts":
        """The same counts, the ATS rows measuring hostscript on ENGINES (one measurement
        for all of them: every engine's rows read it)."""
        return dataclasses.replace(self, ats=self.ats.for_engines(engines))


def medians(samples: Dict[str, Samples]) -> Dict[str, float]:
    return {name: s.median for name, s in samples.items()}


def all_rounds(samples: Dict[str, Samples]) -> Dict[str, List[float]]:
    return {name: s.rounds for name, s in samples.items()}


def notes(*parts: str) -> str:
    """A row's note: the non-empty PARTS, joined."""
    return "; ".join(p for p in parts if p)


def lupa_note(engine: str) -> str:
    missing = cs.lupa_unavailable(engine)
    return f"lupa n/a: {missing}" if missing else ""


# ---------------------------------------------------------------- R1, R1b, R2

def request_flow_row(engine: str, counts: Counts) -> Row:
    """R1: serve one request — build it from 10 header pairs, fire read_request,
    send_response and log, read the response headers back."""
    contestants = cs.contestants(engine, FLOW)
    try:
        samples = interleaved_calls({name: Call(c.serve, ARGS) for name, c in contestants.items()},
                                    counts.rounds, counts.round_ns)
    finally:
        cs.close_all(contestants)
    med = medians(samples)
    hs, py, lupa = med["hostscript"], med["python"], med.get("lupa")
    return Row(engine, "request-flow", "R1 request flow (per request)", "ns", hs,
               {"python": py, "lupa": lupa},
               [Check("hostscript / python", ratio(hs, py), "<=", 1.0),
                Check("lupa / hostscript", ratio(lupa, hs), ">=", 2.0,
                      na=cs.lupa_unavailable(engine) or "")],
               lupa_note(engine), all_rounds(samples))


def build_request_row(engine: str, counts: Counts) -> Row:
    """R1b: the request object alone, from the same 10 header pairs."""
    contestants = cs.contestants(engine, FLOW)
    try:
        calls = {"hostscript": Call(contestants["hostscript"].new_request, ARGS),
                 "python dict": Call(cs.header_dict, ARGS),
                 "python request": Call(contestants["python"].new_request, ARGS)}
        if "lupa" in contestants:
            calls["lupa"] = Call(contestants["lupa"].new_request, ARGS)
        samples = interleaved_calls(calls, counts.rounds, counts.round_ns)
    finally:
        cs.close_all(contestants)
    med = medians(samples)
    hs = med.pop("hostscript")
    return Row(engine, "build-request", "R1b Transaction from 10 header pairs", "ns", hs,
               {**med, "lupa": med.get("lupa")},
               [Check("Transaction / python dict", ratio(hs, med["python dict"]), "<=", 2.0)],
               lupa_note(engine), all_rounds(samples))


def noop_fire_row(engine: str, counts: Counts) -> Row:
    """R2: one fire of a hook whose handler does nothing (FLOW's log) on a request made
    once and reused: hostscript has nothing to convert, so neither do the others."""
    contestants = cs.contestants(engine, FLOW)
    try:
        calls = {}
        for name, c in contestants.items():
            request, fire = c.new_request(*ARGS), c.fire_function()
            fire("log", request)  # one fire before timing: nothing lazy is left to set up
            calls[name] = Call(fire, ("log", request))
        samples = interleaved_calls(calls, counts.rounds, counts.round_ns)
    finally:
        cs.close_all(contestants)
    med = medians(samples)
    hs, py, lupa = med["hostscript"], med["python"], med.get("lupa")
    return Row(engine, "noop-fire", "R2 no-op fire on a reused transaction", "ns", hs,
               {"python": py, "lupa": lupa},
               [Check("hostscript / python", ratio(hs, py), "<=", 1.0),
                Check("lupa / hostscript", ratio(lupa, hs))],
               lupa_note(engine), all_rounds(samples))


# ---------------------------------------------------------------- R3

def http_server_row(engine: str, counts: Counts) -> Row:
    """R3: requests per second of ThreadingHTTPServer with hooks against without."""
    contestants = cs.contestants(engine, FLOW)
    serves = {"no hooks": cs.no_hooks, **{name: c.serve for name, c in contestants.items()}}
    servers: Dict[str, http_server.RunningServer] = {}
    try:
        for name, serve in serves.items():
            servers[name] = http_server.RunningServer(serve)
            got = http_server.response_headers(servers[name].address).get("x-served-by")
            if got != (None if name == "no hooks" else "bench.local"):
                raise RuntimeError(f"HTTP server with {name}: x-served-by is {got!r}")
            http_server.requests_per_second(servers[name].address, max(10, counts.http_connections // 20))
        samples = interleave({name: functools.partial(http_server.requests_per_second, s.address,
                                                      counts.http_connections)
                              for name, s in servers.items()}, counts.http_rounds)
    finally:
        for s in servers.values():
            s.close()
        cs.close_all(contestants)
    med = medians(samples)
    hs, none = med.pop("hostscript"), med["no hooks"]
    return Row(engine, "http-server",
               f"R3 ThreadingHTTPServer, {counts.http_connections} connections", "rps", hs,
               {**med, "lupa": med.get("lupa")},
               [Check("with hostscript / no hooks (req/s)", ratio(hs, none), ">=", 0.9)],
               notes(f"{http_server.CLIENT_THREADS} client threads, one request per connection",
                     lupa_note(engine)), all_rounds(samples))


# ---------------------------------------------------------------- R4

def first_fire_row(engine: str, counts: Counts) -> Row:
    """R4: the first fire on a new thread with the 200-line script loaded, with and
    without a state pool, against host.load of the same script."""
    big = big_workload()
    with contextlib.ExitStack() as stack:

        def hostscript(state_pool: int) -> cs.HostscriptContestant:
            c = new_threads.hostscript_with_pool(engine, big, state_pool)
            stack.callback(c.close)
            return c

        loader, unpooled = hostscript(0), hostscript(0)
        measures: Dict[str, Callable[[], float]] = {
            "host.load": lambda: new_threads.load_ns(loader.host, big.lua, "big.lua"),
            "no pool": lambda: new_threads.first_fire_ns(unpooled.host)}
        pooled = hostscript(STATE_POOL)
        measures["state pool"] = lambda: new_threads.first_fire_ns(pooled.host)
        if not cs.lupa_unavailable(engine):
            lupa = cs.LupaContestant(engine, big)
            measures["lupa new runtime"] = lambda: new_threads.lupa_first_fire_ns(lupa)
        hits_before = new_threads.pool_hits(pooled.host)
        samples = interleave(measures, counts.first_fire_rounds)
        hits = new_threads.pool_hits(pooled.host) - hits_before
    med = medians(samples)
    load, first = med["host.load"], med["no pool"]
    pooled_ns = med.get("state pool")
    pool_note = f"state pool of {STATE_POOL}: {hits} pool hits in {counts.first_fire_rounds} first fires"
    return Row(engine, "first-fire", "R4 first fire on a new thread (200 lines)", "ns", first,
               {"with state pool": pooled_ns, "host.load": load,
                "lupa new runtime": med.get("lupa new runtime")},
               [Check("pooled first fire / host.load", ratio(pooled_ns, load), "<=", 0.05),
                Check("first fire without pool / host.load", ratio(first, load))],
               notes(pool_note, lupa_note(engine)), all_rounds(samples))


# ---------------------------------------------------------------- C

def c_row(engine: str, counts: Counts) -> Row:
    """C: hs_fire of a no-op handler against a bare lua_pcall, both in C."""
    title = "C no-op hs_fire vs bare lua_pcall"
    try:
        pcall_ns, fire_ns = native.run_fire_bench(engine, counts.c_iterations, counts.c_rounds)
    except (native.Unavailable, RuntimeError) as exc:  # no source tree or compiler; a failed build
        return Row(engine, "c-fire", title, "ns", None, {"lua_pcall": None},
                   [Check("hs_fire / lua_pcall", None, "<=", 1.3, na=str(exc)[-600:])],
                   f"n/a: {str(exc)[-600:]}")
    return Row(engine, "c-fire", title, "ns", fire_ns, {"lua_pcall": pcall_ns},
               [Check("hs_fire / lua_pcall", fire_ns / pcall_ns, "<=", 1.3)])


# ---------------------------------------------------------------- T1, T2

def scaling_short_row(engine: str, counts: Counts) -> Row:
    """T1: 2 threads / 1 serving R1's request flow."""
    contestants = cs.contestants(engine, FLOW)
    try:
        samples = scaling.scaling_ratios({name: scaling.serve_runner(c) for name, c in contestants.items()},
                                         counts.phase_ns, counts.scaling_rounds)
    finally:
        cs.close_all(contestants)
    med = medians(samples)
    hs = med["hostscript"]
    return Row(engine, "scaling-short", "T1 2 threads / 1: request flow", "x", hs,
               {"python": med["python"], "lupa": med.get("lupa")},
               [Check("2 threads / 1 thread", hs, ">=", 1.0)], lupa_note(engine), all_rounds(samples))


def scaling_cpu_row(engine: str, counts: Counts) -> Row:
    """T2: 2 threads / 1 serving requests whose read_request computes for ~1 ms; the
    GIL-free control shows what the shared machine gave two threads just then."""
    lua_loops, py_loops = calibrated_lua_loops(engine), calibrated_python_loops()
    contestants = cs.contestants(engine, cpu_workload(lua_loops, py_loops))
    try:
        runners: Dict[str, scaling.MakeRunner] = {name: scaling.serve_runner(c)
                                                  for name, c in contestants.items()}
        runners["machine (GIL-free C)"] = scaling.gil_free_runner
        samples = scaling.scaling_ratios(runners, counts.phase_ns, counts.scaling_rounds)
    finally:
        cs.close_all(contestants)
    med = medians(samples)
    hs = med.pop("hostscript")
    return Row(engine, "scaling-cpu", "T2 2 threads / 1: CPU-bound (~1 ms)", "x", hs,
               {**med, "lupa": med.get("lupa")},
               [Check("2 threads / 1 thread", hs, ">=", 1.9),
                Check("hostscript / machine scaling", ratio(hs, med["machine (GIL-free C)"]))],
               notes(f"Lua loop of {lua_loops} iterations, Python loop of {py_loops} (~1 ms per "
                     "request each)", lupa_note(engine)), all_rounds(samples))


def calibrated_lua_loops(engine: str) -> int:
    """Iterations of cpu_lua's loop that make one hostscript request take ~1 ms."""

    def request_ns(loops: int) -> float:
        hs = cs.HostscriptContestant(engine, cpu_workload(loops, 1))
        try:
            return min(per_call_ns(hs.serve, ARGS, 3) for _ in range(5))
        finally:
            hs.close()

    return scaling.calibrate_loops(request_ns, 1e6, 50_000)


def calibrated_python_loops() -> int:
    """Iterations of cpu_python's loop that make one python request take ~1 ms."""

    def request_ns(loops: int) -> float:
        py = cs.PythonContestant(cpu_workload(1, loops))
        return min(per_call_ns(py.serve, ARGS, 3) for _ in range(5))

    return scaling.calibrate_loops(request_ns, 1e6, 20_000)


# ---------------------------------------------------------------- M1, M2

def heap_row(engine: str, counts: Counts) -> Row:
    """M1: Lua heap of one thread's state with the 200-line script, after one request."""
    big = big_workload()
    hs = cs.HostscriptContestant(engine, big)
    empty = cs.HostscriptContestant(engine, EMPTY)
    try:
        heap_max, heap_avg = new_threads.heap_per_state_bytes(hs)
        empty_max, _ = new_threads.heap_per_state_bytes(empty)
    finally:
        hs.close()
        empty.close()
    lupa = None if cs.lupa_unavailable(engine) else \
        new_threads.lupa_heap_bytes(cs.LupaContestant(engine, big)) / 1024
    return Row(engine, "heap-per-state", "M1 Lua heap per state (200 lines)", "KiB", heap_max / 1024,
               {"state, no script": empty_max / 1024, "lupa runtime": lupa},
               [Check("heap per state (KiB)", heap_max / 1024, "<=", 64)],
               notes(f"heap_bytes/states = {heap_avg / 1024:.1f} KiB", lupa_note(engine)))


def rss_row(engine: str, counts: Counts) -> Row:
    """M2: process RSS across short-lived threads that each serve one R1 request."""
    contestants = cs.contestants(engine, FLOW)
    try:
        growth = {name: new_threads.rss_growth_bytes(functools.partial(c.serve, *ARGS),
                                                     counts.churn_threads, counts.churn_warmup) / 1024
                  for name, c in contestants.items()}
    finally:
        cs.close_all(contestants)
    hs = growth.pop("hostscript")
    return Row(engine, "rss-churn", f"M2 RSS growth, {counts.churn_threads} threads", "KiB", hs,
               {"python": growth["python"], "lupa": growth.get("lupa")},
               [Check("RSS growth (KiB)", hs, "<=", RSS_FLAT_KIB)],
               notes(f"flat means growth <= {RSS_FLAT_KIB} KiB", lupa_note(engine)))


# ---------------------------------------------------------------- P1, P2, P3

PROXY_TARGET = 0.9  # scripts / no scripts, requests per second


def _proxy_measurement(engine: str, counts: Counts) -> "proxy_wrk.Measurement | str":
    """The engine's wrk measurement (one for the three rows), or why there is none."""
    try:
        return proxy_wrk.measured(engine, counts.proxy)
    except proxy_wrk.Unavailable as exc:
        return str(exc)


def _latency_note(m: "proxy_wrk.Measurement", names: List[str]) -> str:
    return "p50/p99: " + ", ".join(f"{n} {m.p50(n):.2f}/{m.p99(n):.2f} ms" for n in names)


def _proxy_row(engine: str, counts: Counts, key: str, title: str, kind: str,
               baselines: List[str]) -> Row:
    """P1 (misses) or P2 (hits): the proxy with the example scripts against the same
    proxy without scripts (and BASELINES, contestants of proxy_wrk), requests per
    second under wrk."""
    m = _proxy_measurement(engine, counts)
    label = "scripts / no scripts (req/s)"
    if isinstance(m, str):
        return Row(engine, key, title, "rps", None, {name: None for name in baselines},
                   [Check(label, None, ">=", PROXY_TARGET, na=m)], f"n/a: {m}")
    names = [f"{name}, {kind}" for name in ["scripts"] + baselines]  # contestants of proxy_wrk
    rps = {name.rpartition(",")[0]: m.rps(name) for name in names}
    checks = [Check(label, ratio(rps["scripts"], rps["no scripts"]), ">=", PROXY_TARGET)]
    if "origin alone" in rps:
        checks.append(Check("origin alone / no scripts (req/s)",
                            ratio(rps["origin alone"], rps["no scripts"])))
    return Row(engine, key, title, "rps", rps.pop("scripts"), rps, checks,
               notes(_latency_note(m, names), m.setup()),
               {n: m.rps_rounds(n) for n in names},
               {"contestants": m.summary(names), "setup": m.setup()})


def proxy_miss_row(engine: str, counts: Counts) -> Row:
    """P1: cache misses (the origin answers no-store): every request goes upstream."""
    return _proxy_row(engine, counts, "proxy-miss", "P1 hostscript serve under wrk: cache misses",
                      "miss", ["no scripts", "origin alone"])


def proxy_hit_row(engine: str, counts: Counts) -> Row:
    """P2: cache hits (max-age and Key): every request is answered from the cache."""
    return _proxy_row(engine, counts, "proxy-hit", "P2 hostscript serve under wrk: cache hits",
                      "hit", ["no scripts"])


def proxy_hit_miss_row(engine: str, counts: Counts) -> Row:
    """P3: what the cache buys — hits / misses in requests per second, per proxy."""
    m = _proxy_measurement(engine, counts)
    title, label = "P3 hostscript serve: cache hits / misses", "hits / misses, scripts (req/s)"
    if isinstance(m, str):
        return Row(engine, "proxy-hit-miss", title, "x", None, {"no scripts": None},
                   [Check(label, None, ">=", 1.0, na=m)], f"n/a: {m}")

    def per_round(proxy: str) -> List[float]:
        return [h / s for h, s in zip(m.rps_rounds(f"{proxy}, hit"), m.rps_rounds(f"{proxy}, miss"))]

    scripts = ratio(m.rps("scripts, hit"), m.rps("scripts, miss"))
    plain = ratio(m.rps("no scripts, hit"), m.rps("no scripts, miss"))
    return Row(engine, "proxy-hit-miss", title, "x", scripts, {"no scripts": plain},
               [Check(label, scripts, ">=", 1.0), Check("hits / misses, no scripts (req/s)", plain)],
               "ratios of the medians of P1 and P2; a hit must at least not cost more than a miss",
               {"scripts": per_round("scripts"), "no scripts": per_round("no scripts")})


# ---------------------------------------------------------------- D1, D2

def _redis_measurement(engine: str, counts: Counts) -> "Dict | str":
    """The engine's Redis measurement (one for both rows), or why there is none."""
    try:
        return redis_ops.measured(engine, counts.redis.for_rows())
    except (redis_ops.Unavailable, RuntimeError) as exc:  # no redis-server...; a failed contestant
        return str(exc)[-600:]


def _redis_row(engine: str, counts: Counts, key: str, title: str, group: str, floor: str) -> Row:
    """D1/D2: per-request latency of a fire whose handler makes one call on a
    Redis-backed dictionary, from C threads, against redis-benchmark's at the same
    concurrency (-c N); the in-process dictionary and Python threads for scale."""
    m = _redis_measurement(engine, counts)
    plan = counts.redis.for_rows()
    threads = plan.threads
    label = "C redis / redis-benchmark {} ({} thr., latency)"
    if isinstance(m, str):
        return Row(engine, key, title, "ns", None, {floor: None},
                   [Check(label.format(floor.split()[-1], n), None, "<=", redis_ops.TARGET, na=m)
                    for n in threads], f"n/a: {m}")
    lat = functools.partial(redis_ops.latency_ns, m)
    n1 = threads[0]
    baselines = {f"{name} ({n1} thr.)": lat(n1, group, name)
                 for name in (floor, "C memory", "Python redis")}
    checks = []
    for n in threads:
        checks.append(Check(label.format(floor.split()[-1], n), ratio(lat(n, group, "C redis"), lat(n, group, floor)),
                            "<=", redis_ops.TARGET))
        checks.append(Check(f"Python redis / {floor} ({n} thr.)",
                            ratio(lat(n, group, "Python redis"), lat(n, group, floor))))
    pipe = m["figures"].get(n1, {}).get("16 INCRs")
    if group == "incr" and pipe:
        checks.append(Check(f"16 r:call / r:pipeline of 16 INCRs (C, {n1} thr.)",
                            ratio(lat(n1, "16 INCRs", "C 16 calls"), lat(n1, "16 INCRs", "C pipeline of 16"))))
    return Row(engine, key, title, "ns", lat(n1, group, "C redis"), baselines, checks,
               notes(f"value: C threads, {n1} thread(s); ratios of latencies at the same concurrency, "
                     f"medians of {plan.rounds} interleaved rounds",
                     "python benchmarks/redis_ops.py for every contestant and the CPU per operation"),
               {f"{name} ({n} thr.)": [r["rate"] for r in rounds] for n in threads
                for name, rounds in m["figures"][n][group].items()})


def redis_incr_row(engine: str, counts: Counts) -> Row:
    """D1: hs.shared.red:incr("n", 1, 0) (one INCRBY) against redis-benchmark's INCR."""
    return _redis_row(engine, counts, "redis-incr", "D1 shared incr in Redis (per request)", "incr",
                      "redis-benchmark INCR")


def redis_get_row(engine: str, counts: Counts) -> Row:
    """D2: hs.shared.red:get (one GET) against redis-benchmark's GET of the same key."""
    return _redis_row(engine, counts, "redis-get", "D2 shared get in Redis (per request)", "get",
                      "redis-benchmark GET")


# ---------------------------------------------------------------- G1-G4

REGISTER_FIRST_TARGET = 3.0   # first request after a registration / a request, other thread
REGISTER_TAIL_TARGET = 2.0    # latency p90 / median
REGISTER_PER_CALL_TARGET = 1.5  # ts_mruby's per-call rebuild / ours


def register_steady_row(engine: str, counts: Counts) -> Row:
    """G1: a request whose three hooks a class registered at run time handles,
    against the same class loaded by host.load; 2 × rounds + 1 rounds (a ≤ 5 %
    target on a shared machine wants more than the other rows' 7)."""
    samples = register.steady(engine, 2 * counts.rounds + 1, counts.round_ns)
    med = medians(samples)
    reg, load = med["registered"], med["loaded"]
    return Row(engine, "register-steady", "G1 run-time class: request flow (per request)", "ns", reg,
               {"same class by host.load": load},
               [Check("registered / host.load", ratio(reg, load), "<=", 1.05)],
               "read_request, send_request, send_response handled by the class; a response header read back",
               all_rounds(samples))


_propagations: Dict[tuple, register.Propagation] = {}


def _propagation(engine: str, counts: Counts) -> register.Propagation:
    """The engine's propagation measurement (one for G2 and G3)."""
    key = (engine, counts.registrations)
    if key not in _propagations:
        _propagations[key] = register.propagation(engine, counts.registrations)
    return _propagations[key]


def register_first_row(engine: str, counts: Counts) -> Row:
    """G2: thread B's first request after thread A replaced the class (B rebuilds it:
    decode, new(), the hook cache), against B's next request (unchanged program)."""
    p = _propagation(engine, counts)
    first, unchanged = p.median("first"), p.median("next")
    reg, plain = p.median("registering"), p.median("plain")
    return Row(engine, "register-first", "G2 first request after a registration, other thread", "ns", first,
               {"next request (unchanged program)": unchanged, "registering fire (A)": reg,
                "same fire, no registration (A)": plain},
               [Check("first / next request", ratio(first, unchanged), "<=", REGISTER_FIRST_TARGET),
                Check("registering fire / same fire without", ratio(reg, plain))],
               f"medians over {len(p.first)} of {len(p.latency)} registrations (the other "
               f"{p.straddled} began before A's fire returned); classes rebuilt per registration, "
               f"A and B: {p.rebuilds_per_registration:.2f}",
               {"first": p.first, "next": p.next, "registering": p.registering, "plain": p.plain})


def register_latency_row(engine: str, counts: Counts) -> Row:
    """G3: from the start of A's registering fire to the end of B's first request that
    ran the new class, B serving requests in a loop; median and p90."""
    p = _propagation(engine, counts)
    med, p90 = p.median("latency"), p.p("latency", 0.9)
    return Row(engine, "register-latency", "G3 registration to first run on another thread", "ns", med,
               {"p90": p90, "registering fire (A)": p.median("registering"),
                "first request (B)": p.median("first")},
               [Check("p90 / median", ratio(p90, med), "<=", REGISTER_TAIL_TARGET)],
               f"{len(p.latency)} replacements of one name, B polling with requests "
               "(Python threads: the GIL's hand-over is in the figure)",
               {"latency": p.latency})


def register_per_request_row(engine: str, counts: Counts) -> Row:
    """G4: ts_mruby's design emulated — the class rebuilt from its serialized form
    before every request — against ours (rebuilt once per version)."""
    r = register.per_request(engine, counts.rounds, counts.round_ns)
    med = medians(r.samples)
    ours, per_call = med["once per version"], med["rehydrate per request"]
    return Row(engine, "register-per-request", "G4 rebuild per request (ts_mruby) vs once per version",
               "ns", ours, {"rebuilt every request": per_call, "full collection of the state": r.collect_ns},
               [Check("rebuilt every request / once per version", ratio(per_call, ours), ">=",
                      REGISTER_PER_CALL_TARGET)],
               "thread A re-registers the class (or fires without registering) before each request "
               f"of thread B, which alone is timed; classes rebuilt per request, A and B: {r.rebuilds:.2f}",
               all_rounds(r.samples))


# In the order they run and are reported.
ROWS: List[Callable[[str, Counts], Row]] = [
    request_flow_row, build_request_row, noop_fire_row, http_server_row, first_fire_row, c_row,
    scaling_short_row, scaling_cpu_row, heap_row, rss_row, proxy_miss_row, proxy_hit_row,
    proxy_hit_miss_row, redis_incr_row, redis_get_row, register_steady_row, register_first_row,
    register_latency_row, register_per_request_row]


# ---------------------------------------------------------------- A1-A4 (hostscript bench --ats)

ATS_RPS_TARGET = 0.95      # ATS + hostscript / ATS alone, requests per second
ATS_CPU_TARGET_US = 3.0    # traffic_server CPU per request added by hostscript
ATS_RSS_TARGET_KIB = 2048  # traffic_server RSS added by hostscript with one script
ATS_PEERS = [ats.HEADER_REWRITE, ats.TS_LUA_NAME]


def _ats_measurement(counts: Counts) -> "ats.Measurement | str":
    """The measurement every engine's A rows read (one run, every contestant), or why
    there is none."""
    try:
        return ats.measured(counts.ats)
    except ats.Unavailable as exc:
        return str(exc)


def _ats_na(engine: str, key: str, title: str, unit: str, label: str, op: str,
            target: Optional[float], why: str) -> Row:
    return Row(engine, key, title, unit, None, {name: None for name in [ats.ALONE] + ATS_PEERS},
               [Check(label, None, op, target, na=why)], f"n/a: {why}")


def ats_throughput_row(engine: str, counts: Counts) -> Row:
    """A1: requests per second through Traffic Server with hostscript doing the three
    header edits, against Traffic Server alone (and header_rewrite, ts_lua, the origin)."""
    key, title, label = "ats-throughput", "A1 Traffic Server + hostscript: req/s", "hostscript / ATS alone (req/s)"
    m = _ats_measurement(counts)
    if isinstance(m, str):
        return _ats_na(engine, key, title, "rps", label, ">=", ATS_RPS_TARGET, m)
    hs = ats.hostscript_name(engine)
    names = [ats.ALONE] + ATS_PEERS + [ats.ORIGIN_ALONE]
    checks = [Check(label, ratio(m.rps(hs), m.rps(ats.ALONE)), ">=", ATS_RPS_TARGET)]
    checks += [Check(f"{n.removeprefix('ATS + ')} / ATS alone (req/s)", ratio(m.rps(n), m.rps(ats.ALONE)))
               for n in ATS_PEERS + [ats.ORIGIN_ALONE]]
    shown = names[:-1] + [hs, ats.ORIGIN_ALONE]
    return Row(engine, key, title, "rps", m.rps(hs), {n: m.rps(n) for n in names}, checks,
               notes(m.plan.describe(), f"load average {m.loadavg[0]:.2f} at the end" if m.loadavg else ""),
               {n: [s.rps for s in m.rounds[n]] for n in shown},
               {"contestants": {n: {"rps": m.rps(n), "p50_ms": m.med(n, "p50_ms"), "p99_ms": m.p99(n)}
                                for n in shown},
                "ats": m.to_json()})


def ats_cpu_row(engine: str, counts: Counts) -> Row:
    """A2: traffic_server CPU per request (utime + stime over the requests wrk counted)
    that hostscript adds to Traffic Server alone's; header_rewrite's and ts_lua's."""
    key, title, label = "ats-cpu", "A2 Traffic Server + hostscript: added CPU per request", \
        "hostscript added CPU (us)"
    m = _ats_measurement(counts)
    if isinstance(m, str):
        return _ats_na(engine, key, title, "ns", label, "<=", ATS_CPU_TARGET_US, m)
    hs = ats.hostscript_name(engine)
    checks = [Check(label, m.added_cpu_us(hs), "<=", ATS_CPU_TARGET_US)]
    checks += [Check(f"{n.removeprefix('ATS + ')} added CPU (us)", m.added_cpu_us(n)) for n in ATS_PEERS]
    baselines = {f"{ats.ALONE} (absolute)": m.cpu_us(ats.ALONE) * 1e3,
                 **{f"{n} (added)": m.added_cpu_us(n) * 1e3 for n in ATS_PEERS}}
    return Row(engine, key, title, "ns", m.added_cpu_us(hs) * 1e3, baselines, checks,
               "traffic_server utime + stime across each wrk run / requests, median of the rounds, "
               f"minus ATS alone's; nginx's: {m.med(hs, 'origin_cpu_us'):.1f} us per request",
               {n: [s.cpu_us * 1e3 for s in m.rounds[n]] for n in [ats.ALONE] + ATS_PEERS + [hs]})


def ats_latency_row(engine: str, counts: Counts) -> Row:
    """A3: p99 latency under wrk through each contestant (information: no target)."""
    key, title = "ats-p99", "A3 Traffic Server + hostscript: p99 latency"
    m = _ats_measurement(counts)
    if isinstance(m, str):
        return _ats_na(engine, key, title, "ns", "hostscript / ATS alone (p99)", "", None, m)
    hs = ats.hostscript_name(engine)
    checks = [Check(f"{n.removeprefix('ATS + ')} / ATS alone (p99)", ratio(m.p99(n), m.p99(ats.ALONE)))
              for n in [hs] + ATS_PEERS]
    return Row(engine, key, title, "ns", m.p99(hs) * 1e6,
               {n: m.p99(n) * 1e6 for n in [ats.ALONE] + ATS_PEERS}, checks,
               f"wrk --latency, {m.plan.connections} connections: p99 is queueing, it moves with req/s",
               {n: [s.p99_ms * 1e6 for s in m.rounds[n]] for n in [ats.ALONE] + ATS_PEERS + [hs]})


def ats_rss_row(engine: str, counts: Counts) -> Row:
    """A4: traffic_server RSS after the warm-up, hostscript with its one script against
    Traffic Server alone (and header_rewrite, ts_lua)."""
    key, title, label = "ats-rss", "A4 Traffic Server + hostscript: RSS after warm-up", \
        "hostscript - ATS alone (KiB)"
    m = _ats_measurement(counts)
    if isinstance(m, str):
        return _ats_na(engine, key, title, "KiB", label, "<=", ATS_RSS_TARGET_KIB, m)
    hs = ats.hostscript_name(engine)
    rss = m.rss_kib
    checks = [Check(label, rss[hs] - rss[ats.ALONE], "<=", ATS_RSS_TARGET_KIB)]
    checks += [Check(f"{n.removeprefix('ATS + ')} - ATS alone (KiB)", rss[n] - rss[ats.ALONE]) for n in ATS_PEERS]
    return Row(engine, key, title, "KiB", rss[hs], {n: rss[n] for n in [ats.ALONE] + ATS_PEERS}, checks,
               f"VmRSS after {m.plan.warmup:g} s of wrk; after the rounds: " +
               ", ".join(f"{n} {m.rss_end_kib[n] / 1024:.1f} MiB" for n in [ats.ALONE, hs]))


# `hostscript bench --ats`: in this order, per engine (one measurement for all of them).
ATS_ROWS: List[Callable[[str, Counts], Row]] = [ats_throughput_row, ats_cpu_row, ats_latency_row, ats_rss_row]
