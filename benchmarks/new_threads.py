"""What a new thread costs: its first fire (R4), the Lua heap its state holds, and the
process RSS over many short-lived threads that each serve one request.

hostscript gives each thread that fires its own Lua state. Without a state pool
(``Host(state_pool=0)``) the thread's first fire creates that state and rehydrates
the loaded scripts from bytecode; with one (the default, ``state_pool=16``) it takes
over the idle state of a thread that ended.
"""
from __future__ import annotations

import gc
import itertools
import os
import threading
import time
from typing import Any, Callable, List, Tuple

from hostscript import Host, Transaction

from .contestants import HostscriptContestant, LupaContestant
from .workloads import METHOD, REQUEST_HEADERS, URI, Workload

def hostscript_with_pool(engine: str, workload: Workload, state_pool: int) -> HostscriptContestant:
    """A hostscript contestant whose host keeps up to STATE_POOL idle states (0: none)."""
    return HostscriptContestant(engine, workload, state_pool=state_pool)


def pool_hits(host: Host) -> int:
    """New threads that took over a pooled state so far."""
    return int(host.stats()["pool_hits"])


def in_new_thread(fn: Callable[[], Any]) -> Any:
    """fn() on a fresh thread that ends right after; its result (or its exception)."""
    result: List[Any] = []
    error: List[BaseException] = []

    def body() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    t = threading.Thread(target=body, name="bench-fresh")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


# ---------------------------------------------------------------- R4: the first fire

def first_fire_ns(host: Host, hook: str = "read_request") -> int:
    """The first fire on a brand-new thread (the request made before the clock starts)."""

    def first() -> int:
        txn = Transaction(METHOD, URI, headers=REQUEST_HEADERS)
        t0 = time.perf_counter_ns()
        host.fire(hook, txn)
        return time.perf_counter_ns() - t0

    return in_new_thread(first)


def lupa_first_fire_ns(lupa: LupaContestant, hook: str = "read_request") -> int:
    """lupa's first fire on a brand-new thread: the thread's LuaRuntime is made and the
    script compiled, then the handler called (building the request is not counted)."""

    def first() -> int:
        t0 = time.perf_counter_ns()
        lua = lupa.runtime()
        t1 = time.perf_counter_ns()
        txn, _ = lua.new_txn(METHOD, URI, *itertools.chain.from_iterable(REQUEST_HEADERS))
        t2 = time.perf_counter_ns()
        lua.fire(hook, txn)
        return (t1 - t0) + (time.perf_counter_ns() - t2)

    return in_new_thread(first)


def load_ns(host: Host, source: str, name: str) -> int:
    """host.load(source): compile from source on a scratch state, validate, publish."""
    t0 = time.perf_counter_ns()
    host.load(source, name=name)
    return time.perf_counter_ns() - t0


# ---------------------------------------------------------------- heap per state

def heap_per_state_bytes(hs: HostscriptContestant) -> Tuple[int, int]:
    """(heap_max, heap_bytes / states) of the host's states while a thread that served
    one request is still alive (its state goes back to the pool when the thread ends)."""
    served, release = threading.Event(), threading.Event()
    failure: List[BaseException] = []

    def worker() -> None:
        try:
            hs.serve(METHOD, URI, REQUEST_HEADERS)
        except BaseException as exc:
            failure.append(exc)
        served.set()
        release.wait()

    t = threading.Thread(target=worker, name="bench-heap")
    t.start()
    served.wait()
    stats = hs.host.stats()
    release.set()
    t.join()
    if failure:
        raise failure[0]
    return stats["heap_max"], stats["heap_bytes"] // max(1, stats["states"])


def lupa_heap_bytes(lupa: LupaContestant) -> int:
    """Lua heap of this thread's lupa runtime after one request and a full collection."""
    lupa.serve(METHOD, URI, REQUEST_HEADERS)
    runtime = lupa.runtime().runtime
    runtime.execute("collectgarbage('collect')")
    return int(runtime.eval("collectgarbage('count')") * 1024)


# ---------------------------------------------------------------- RSS over thread churn

def rss_bytes() -> int:
    """Resident set size of this process (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def rss_growth_bytes(work: Callable[[], Any], threads: int, warmup: int) -> int:
    """RSS after minus RSS before THREADS short-lived threads, one after another, each
    calling work() and ending. WARMUP threads run first so allocator arenas and
    thread-stack caches are already at their working size."""

    def churn(count: int) -> None:
        for _ in range(count):
            in_new_thread(work)

    churn(warmup)
    gc.collect()
    before = rss_bytes()
    churn(threads)
    gc.collect()
    return rss_bytes() - before
