"""G rows: handler classes registered at run time (``hs.register`` inside a fire,
docs/register.md) — what a registration costs, how soon another thread runs it, and
what a request costs once it has.

The class is the same Lua source in every contestant: ``make(version)`` builds it (a
``read_request``, ``send_request`` and ``send_response`` handler, ``version`` an
upvalue string that crosses threads by value). The registrar script's ``on_admin``
registers ``make(x-version)`` as ``registrar.lua#c`` when the transaction carries
``x-version``; the loaded twin is the same ``make`` with ``return make("v1")``, loaded
by ``host.load`` next to the same registrar, so both programs hold two scripts and
the same handlers for the request's three hooks. ``admin`` is a hook of its own that
no request fires.

The unit is a request (``serve``): a ``Transaction`` from the 10 header pairs, fire
``read_request``, ``send_request``, ``send_response``, read ``x-version`` back from
the response.

- **steady** (G1): ``serve`` on a host whose class was registered at run time
  against ``serve`` on a host that loaded the same class, interleaved rounds.
- **propagation** (G2, G3): thread A registers a new version of the same name (a
  replacement) while thread B serves requests in a loop; per registration, B's first
  request that ran the new class (decode + ``new()`` + the hook cache rebuilt:
  G2, against B's next request, on the now unchanged program) and the time from A's
  fire returning to that request's end (G3, median and p90).
- **per request** (G4, ts_mruby's design emulated): ts_mruby dumped a registered
  handler's bytecode and read it back in the serving thread's state on every call.
  Here thread A re-registers the class before each of B's requests, so each request
  B serves rebuilds the class from its serialized form first; against the same
  two-thread loop where A's fire registers nothing. Only B's request is timed, in
  both: A's serializing and publishing (ts_mruby's dump) is reported separately
  (G2's registering fire).

    python benchmarks/register.py [--quick] [--engine E] [--rounds 7] [--registrations 300]
    python benchmarks/register.py --by-heap    # G2's first request as the heap grows
"""
from __future__ import annotations

import argparse
import gc
import os
import queue
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

if __name__ == "__main__" and __package__ in (None, ""):  # python benchmarks/register.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"

from hostscript import Host, Transaction  # noqa: E402

from .timing import Samples, calls_per_round, interleave  # noqa: E402
from .workloads import METHOD, REQUEST_HEADERS, URI  # noqa: E402

HOOKS = ("read_request", "send_request", "send_response", "admin")
NAME = "registrar.lua#c"

MAKE_LUA = """\
local function make(version)
  local C = {}

  function C:on_read_request(txn)
    local headers = txn.req.headers
    txn.resp.headers["x-served-by"] = headers["host"]
    txn.ctx.agent = headers["user-agent"]
  end

  function C:on_send_request(txn)
    txn.req.headers["x-class-version"] = version
  end

  function C:on_send_response(txn)
    txn.resp.headers["x-agent"] = txn.ctx.agent
    txn.resp.headers["x-version"] = version
  end

  return C
end
"""

REGISTRAR_LUA = MAKE_LUA + """
return {
  on_admin = function(self, txn)
    local headers = txn.req.headers
    local version = headers["x-version"]
    if version then
      hs.register(make(version), {name = "c"})
    end
    if headers["x-collect"] then
      collectgarbage("collect")
    end
  end,
}
"""

LOADED_LUA = MAKE_LUA + 'return make("v1")\n'

EXPECTED = {"x-served-by": "bench.local", "x-agent": dict(REQUEST_HEADERS)["User-Agent"],
            "x-version": "v1"}


def admin_txn(version: Optional[str], collect: bool = False) -> Transaction:
    headers = [("x-version", version)] if version else []
    return Transaction("POST", "/admin", headers=headers + ([("x-collect", "1")] if collect else []))


class Contestant:
    """A host with the registrar and the class, registered at run time (REGISTERED)
    or loaded from Python."""

    def __init__(self, engine: str, registered: bool) -> None:
        self.host = Host(HOOKS, engine=engine, on_error="raise")
        try:
            self.host.load(REGISTRAR_LUA, name="registrar.lua")
            if registered:
                self.register("v1")
            else:
                self.host.load(LOADED_LUA, name="c.lua")
            self.check("v1")
        except BaseException:
            self.host.close()
            raise

    def register(self, version: Optional[str], collect: bool = False) -> None:
        """One admin fire: registers make(VERSION) as registrar.lua#c, or nothing;
        COLLECT: and a full collection of this thread's state."""
        self.host.fire("admin", admin_txn(version, collect))

    def serve(self) -> Optional[str]:
        txn = Transaction(METHOD, URI, headers=REQUEST_HEADERS)
        fire = self.host.fire
        fire("read_request", txn)
        fire("send_request", txn)
        fire("send_response", txn)
        return txn.response.headers.get("x-version")

    def check(self, version: str) -> None:
        """One request, checked: the class ran all three hooks."""
        txn = Transaction(METHOD, URI, headers=REQUEST_HEADERS)
        for hook in HOOKS[:3]:
            self.host.fire(hook, txn)
        got = dict(txn.response.headers.items())
        want = {**EXPECTED, "x-version": version}
        if got != want or txn.request.headers.get("x-class-version") != version:
            raise RuntimeError(f"register benchmark: the class served {got}, expected {want}")

    def close(self) -> None:
        self.host.close()


# ---------------------------------------------------------------- G1 steady state

def steady(engine: str, rounds: int, round_ns: float) -> Dict[str, Samples]:
    """ns per request: {"registered", "loaded"}, interleaved rounds."""
    contestants = {"registered": Contestant(engine, True), "loaded": Contestant(engine, False)}
    try:
        if NAME not in contestants["registered"].host.scripts:
            raise RuntimeError(f"no {NAME} in {contestants['registered'].host.scripts}")
        measures = {}
        for name, c in contestants.items():
            n = calls_per_round(c.serve, (), round_ns)
            measures[name] = _loop(c.serve, n)
        return interleave(measures, rounds)
    finally:
        for c in contestants.values():
            c.close()


def _loop(serve: Callable[[], object], n: int) -> Callable[[], float]:
    def measure() -> float:
        t0 = time.perf_counter_ns()
        for _ in range(n):
            serve()
        return (time.perf_counter_ns() - t0) / n
    return measure


# ---------------------------------------------------------------- G2, G3 propagation

@dataclass
class Propagation:
    """Per registration (ns): LATENCY, from the start of A's registering fire (the
    hs.register call is its first statement) to the end of B's first request that
    ran the new class; FIRST, that request, when it began after A's fire had
    returned (the others are STRADDLED: a fire of more than 50 µs lets go of the
    GIL, so B may run, and see the new program, before A's fire returns); NEXT, B's
    request after it (the program unchanged); REGISTERING, A's registering fire
    (serialize, publish); PLAIN, an A fire of the same hook on an unchanged program
    that registers nothing."""

    latency: List[float]
    first: List[float]
    next: List[float]
    registering: List[float]
    plain: List[float]
    straddled: int
    rebuilds_per_registration: float

    def p(self, what: str, q: float) -> float:
        xs = sorted(getattr(self, what))
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    def median(self, what: str) -> float:
        return statistics.median(getattr(self, what))


def propagation(engine: str, registrations: int, gap_s: float = 0.001) -> Propagation:
    """Thread A (this one) replaces registrar.lua#c until REGISTRATIONS first requests
    began after A's fire returned (at most 4 × REGISTRATIONS times); thread B serves
    requests in a loop and notes the first that returns each new version."""
    c = Contestant(engine, True)
    want: List[Optional[str]] = [None]            # the version A registers now
    seen_at: List[Tuple[int, int]] = []           # B: (start, end) of that first request
    nexts: List[float] = []
    seen = threading.Event()
    stop = threading.Event()
    errors: List[BaseException] = []

    def poller() -> None:  # thread B
        pending_next = False
        try:
            while not stop.is_set():
                s = time.perf_counter_ns()
                got = c.serve()
                e = time.perf_counter_ns()
                if pending_next:
                    nexts.append(e - s)
                    pending_next = False
                    seen.set()
                elif got is not None and got == want[0]:
                    want[0] = None
                    seen_at.append((s, e))
                    pending_next = True
        except BaseException as exc:  # reported by A
            errors.append(exc)
            seen.set()

    b = threading.Thread(target=poller, name="register-bench-B")
    latency: List[float] = []
    first: List[float] = []
    registering: List[float] = []
    plain: List[float] = []
    straddled = 0
    before = c.host.stats()["rehydrations"]
    b.start()
    try:
        i = 0
        while len(first) < registrations and i < 4 * registrations:
            i += 1
            version = f"v{i + 1}"
            c.register(None)                      # A's state catches up (the last version)
            t0 = time.perf_counter_ns()
            c.register(None)                      # unchanged program: an admin fire
            plain.append(time.perf_counter_ns() - t0)
            seen.clear()
            want[0] = version
            t0 = time.perf_counter_ns()
            c.register(version)
            t1 = time.perf_counter_ns()
            registering.append(t1 - t0)
            if not seen.wait(10):
                raise RuntimeError(f"register benchmark: thread B never ran {version}")
            if errors:
                raise errors[0]
            s, e = seen_at[-1]
            latency.append(e - t0)
            if s >= t1:
                first.append(e - s)
            else:
                straddled += 1
            time.sleep(gap_s)                     # B serves on the unchanged program a while
    finally:
        stop.set()
        b.join()
        rebuilds = c.host.stats()["rehydrations"] - before
        c.close()
    if errors:
        raise errors[0]
    if not first:
        raise RuntimeError(f"register benchmark: every one of {i} first requests straddled a registration")
    return Propagation(latency, first, nexts, registering, plain, straddled, rebuilds / i)


# ---------------------------------------------------------------- G4 per request

class Alternation:
    """Thread A fires admin (registering make("v1") again when REREGISTER, nothing
    otherwise), then this thread serves one request, timed; strictly in turns."""

    def __init__(self, engine: str, reregister: bool) -> None:
        self.c = Contestant(engine, True)
        self.version = "v1" if reregister else None
        self.go: "queue.SimpleQueue[bool]" = queue.SimpleQueue()
        self.done: "queue.SimpleQueue[Optional[BaseException]]" = queue.SimpleQueue()
        self.a = threading.Thread(target=self._a, name="register-bench-A", daemon=True)
        self.a.start()

    def _a(self) -> None:
        while self.go.get():
            try:
                self.c.register(self.version)
                self.done.put(None)
            except BaseException as exc:
                self.done.put(exc)

    def measure(self, n: int) -> float:
        """Mean ns of B's request over N turns."""
        total = 0
        go, done, serve = self.go, self.done, self.c.serve
        for _ in range(n):
            go.put(True)
            exc = done.get()
            if exc is not None:
                raise exc
            s = time.perf_counter_ns()
            if serve() != "v1":
                raise RuntimeError("register benchmark: the class did not run")
            total += time.perf_counter_ns() - s
        return total / n

    def close(self) -> None:
        self.go.put(False)
        self.a.join()
        self.c.close()


@dataclass
class PerRequest:
    """G4: SAMPLES, ns per request of B {"rehydrate per request", "once per version"};
    REBUILDS, classes rebuilt per request over both threads (A's state rebuilds the
    class too, at its next fire: 2.0 is one each); COLLECT_NS, what a full collection
    of B's state costs (an admin fire that runs collectgarbage("collect") less one
    that does not, medians): rehydration ends with one."""

    samples: Dict[str, Samples]
    rebuilds: float
    collect_ns: float


def per_request(engine: str, rounds: int, round_ns: float, collects: int = 101) -> PerRequest:
    loops = {"rehydrate per request": Alternation(engine, True),
             "once per version": Alternation(engine, False)}
    try:
        measures = {}
        for name, alt in loops.items():
            n = 20
            while True:  # size the round by the whole turn (A's fire and the hand-offs too)
                t0 = time.perf_counter_ns()
                alt.measure(n)
                took = time.perf_counter_ns() - t0
                if took >= round_ns / 8 or n >= 1 << 20:
                    break
                n *= 4
            measures[name] = (lambda alt, n: lambda: alt.measure(n))(alt, max(20, int(n * round_ns / took)))
        host = loops["rehydrate per request"].c.host
        before, fires_before = host.stats()["rehydrations"], host.stats()["hooks"]["read_request"]["fires"]
        samples = interleave(measures, rounds)
        st = host.stats()
        rebuilds = (st["rehydrations"] - before) / max(1, st["hooks"]["read_request"]["fires"] - fires_before)
        steady_c = loops["once per version"].c
        with_gc, without = [], []
        for _ in range(collects):
            for collect, out in ((True, with_gc), (False, without)):
                t0 = time.perf_counter_ns()
                steady_c.register(None, collect=collect)
                out.append(time.perf_counter_ns() - t0)
        return PerRequest(samples, rebuilds, statistics.median(with_gc) - statistics.median(without))
    finally:
        for alt in loops.values():
            alt.close()


# ---------------------------------------------------------------- by heap size

def first_request_by_heap(engine: str, entries: int, registrations: int = 30) -> Tuple[float, float, int]:
    """B's first request after a registration on another thread, and its next one
    (medians, ns), with a script holding a module-level table of ENTRIES small tables
    (the thread's heap: the third value, bytes). Rehydration ends with a full
    collection of the state, so the first request grows with the heap."""
    c = Contestant(engine, True)
    try:
        c.host.load(f"local data = {{}}\nfor i = 1, {int(entries)} do data[i] = {{i}} end\n"
                    "return {on_admin = function() return data end}\n", name="data.lua")
        c.serve()
        heap = c.host.stats()["heap_max"]
        first: List[float] = []
        nexts: List[float] = []
        for i in range(registrations):
            a = threading.Thread(target=c.register, args=(f"v{i + 2}",))
            a.start()
            a.join()
            t0 = time.perf_counter_ns()
            c.serve()
            t1 = time.perf_counter_ns()
            c.serve()
            nexts.append(time.perf_counter_ns() - t1)
            first.append(t1 - t0)
        return statistics.median(first), statistics.median(nexts), heap
    finally:
        c.close()


# ---------------------------------------------------------------- on its own

def _us(ns: float) -> str:
    return f"{ns / 1e3:.2f} µs"


def main(argv: Optional[List[str]] = None) -> int:
    import hostscript

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--engine", action="append", choices=hostscript.engines())
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--registrations", type=int, default=300)
    ap.add_argument("--by-heap", action="store_true",
                    help="only: the first request after a registration as the heap grows")
    args = ap.parse_args(argv)
    if args.by_heap:
        for engine in args.engine or hostscript.engines():
            for entries in (0, 10_000, 100_000, 400_000):
                first, nxt, heap = first_request_by_heap(engine, entries)
                print(f"{engine}: heap {heap / 1024:8,.0f} KiB: first request after a registration "
                      f"{_us(first)}, next {_us(nxt)}")
        return 0
    rounds, round_ns, regs = (2, 2e6, 5) if args.quick else (args.rounds, 100e6, args.registrations)
    for engine in args.engine or hostscript.engines():
        gc.collect()
        st = steady(engine, 2 * rounds + 1, round_ns)  # as the G1 row
        p = propagation(engine, regs)
        pr = per_request(engine, rounds, round_ns)
        per = pr.samples
        reg, load = st["registered"].median, st["loaded"].median
        print(f"== {engine} ==")
        print(f"G1 steady: registered {_us(reg)}, loaded {_us(load)}: {reg / load:.3f}x "
              f"(rounds {[round(x) for x in st['registered'].rounds]} / "
              f"{[round(x) for x in st['loaded'].rounds]})")
        print(f"G2 first request on B {_us(p.median('first'))} (p90 {_us(p.p('first', .9))}), next "
              f"{_us(p.median('next'))}: {p.median('first') / p.median('next'):.2f}x; registering fire "
              f"{_us(p.median('registering'))}, plain admin fire {_us(p.median('plain'))}; straddled "
              f"{p.straddled}/{len(p.latency)}; classes rebuilt per registration, A and B: "
              f"{p.rebuilds_per_registration:.2f}")
        print(f"G3 latency A's fire start -> B's first request end: median {_us(p.median('latency'))}, "
              f"p90 {_us(p.p('latency', .9))}, max {_us(max(p.latency))}")
        a, b = per["rehydrate per request"].median, per["once per version"].median
        print(f"G4 rehydrate per request {_us(a)}, once per version {_us(b)}: {a / b:.2f}x "
              f"(classes rebuilt per request, A and B: {pr.rebuilds:.2f}; a full collection of B's "
              f"state: {_us(pr.collect_ns)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
