"""Thread scaling: throughput of two threads serving requests against one.

Each contestant gets a WorkerPair: two long-lived threads, each with its own runner
(its own Lua state or lupa runtime, made in that thread). A round runs N requests
on one thread, then N on each of the two at once; the ratio is
``2 * t(1 thread) / t(2 threads)`` (2.0: perfect scaling, 1.0: no gain).
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import threading
import time
from typing import Callable, Dict, List, Mapping, Optional, Tuple

from .contestants import Contestant
from .timing import Samples, interleave
from .workloads import METHOD, REQUEST_HEADERS, URI

Runner = Callable[[int], None]          # run(n): do n units of work
MakeRunner = Callable[[], Runner]       # called once in each worker thread


class WorkerPair:
    """Two long-lived threads, each with a runner made in that thread. run(threads, n)
    lets 1 or both run n units at once and returns the wall time of the lot, from the
    first worker's start to the last one's end as the workers clock themselves (the
    main thread may get the GIL back long after they finished)."""

    def __init__(self, make_runner: MakeRunner) -> None:
        self._make_runner = make_runner
        self._start = threading.Barrier(3)
        self._end = threading.Barrier(3)
        self._job: Optional[Tuple[int, int]] = None
        self._spans: List[Tuple[int, int]] = [(0, 0), (0, 0)]
        self._errors: List[BaseException] = []
        self._threads = [threading.Thread(target=self._work, args=(i,), daemon=True,
                                          name=f"bench-worker-{i}") for i in range(2)]
        for t in self._threads:
            t.start()
        try:
            self.run(2, 0)  # both runners exist and are warm before anything is timed
        except BaseException:
            self.close()
            raise

    def _work(self, index: int) -> None:
        runner: Optional[Runner] = None
        try:
            runner = self._make_runner()
            runner(20)
        except BaseException as exc:  # reported by run(), never swallowed
            self._errors.append(exc)
            runner = None
        while True:
            self._start.wait()
            job = self._job
            if job is None:
                return
            threads, n = job
            if runner is not None and index < threads:
                try:
                    t0 = time.perf_counter_ns()
                    runner(n)
                    self._spans[index] = (t0, time.perf_counter_ns())
                except BaseException as exc:
                    self._errors.append(exc)
            self._end.wait()

    def run(self, threads: int, n: int) -> int:
        self._job = (threads, n)
        self._start.wait()
        self._end.wait()
        if self._errors:
            raise RuntimeError(f"benchmark worker failed: {self._errors[0]!r}") from self._errors[0]
        spans = self._spans[:threads]
        return max(end for _, end in spans) - min(start for start, _ in spans)

    def close(self) -> None:
        self._job = None
        self._start.wait()
        for t in self._threads:
            t.join()

    def __enter__(self) -> "WorkerPair":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_runner(contestant: Contestant) -> MakeRunner:
    """Each worker serves the benchmark request N times (a fresh request each time)."""

    def make_runner() -> Runner:
        serve = contestant.serve

        def run(n: int) -> None:
            for _ in itertools.repeat(None, n):
                serve(METHOD, URI, REQUEST_HEADERS)

        return run

    return make_runner


def gil_free_runner() -> Runner:
    """make_runner for the machine control: hashing 256 KiB, which CPython does
    without the GIL — what two threads can get from the shared machine just then."""
    data = bytes(256 << 10)

    def run(n: int) -> None:
        for _ in range(n):
            hashlib.sha256(data).digest()

    return run


def phase_count(pair: WorkerPair, phase_ns: float) -> int:
    """N such that one thread running N units takes about PHASE_NS."""
    probe = 4
    while True:
        took = pair.run(1, probe)
        if took > phase_ns / 10 or probe >= 1 << 22:
            return max(4, int(probe * phase_ns / max(took, 1)))
        probe *= 4


def scaling_ratios(make_runners: Mapping[str, MakeRunner], phase_ns: float,
                   rounds: int) -> Dict[str, Samples]:
    """Per contestant, the 2-threads / 1-thread throughput ratio of each round; the
    contestants' rounds interleaved, each round one phase on 1 thread then on 2."""
    pairs: Dict[str, WorkerPair] = {}
    try:
        for name, make_runner in make_runners.items():
            pairs[name] = WorkerPair(make_runner)
        counts = {name: phase_count(pair, phase_ns) for name, pair in pairs.items()}

        def ratio(pair: WorkerPair, n: int) -> float:
            one = pair.run(1, n)
            two = pair.run(2, n)
            return 2 * one / two

        return interleave({name: functools.partial(ratio, pair, counts[name])
                           for name, pair in pairs.items()}, rounds)
    finally:
        for pair in pairs.values():
            pair.close()


def calibrate_loops(request_ns_for: Callable[[int], float], target_ns: float, start: int) -> int:
    """The loop count that makes one request take about TARGET_NS (three refinements)."""
    loops = start
    for _ in range(3):
        took = request_ns_for(loops)
        loops = max(1000, int(loops * target_ns / max(took, 1.0)))
    return loops
