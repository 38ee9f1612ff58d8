"""T1 and T2: throughput of 2 threads against 1, each thread serving requests with its
own Lua state or lupa runtime. In each group, compare a "-2]" row with its "-1]" row:
the 2-thread rows serve twice the requests, so equal times mean 2x throughput."""
from __future__ import annotations

from typing import Any, Iterator

import pytest

from . import contestants as cs
from . import rows, scaling
from .conftest import pick
from .workloads import FLOW, cpu_workload

SHORT_REQUESTS = 5_000  # per thread
CPU_REQUESTS = 50       # per thread, ~1 ms each


@pytest.fixture
def pair(engine: str, workload: str, who: str) -> Iterator[scaling.WorkerPair]:
    if workload == "cpu":
        w = cpu_workload(rows.calibrated_lua_loops(engine), rows.calibrated_python_loops())
    else:
        w = FLOW
    contestants = cs.contestants(engine, w)
    try:
        with scaling.WorkerPair(scaling.serve_runner(pick(contestants, who, engine))) as p:
            yield p
    finally:
        cs.close_all(contestants)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("who", ["hostscript", "python", "lupa"])
@pytest.mark.parametrize("workload", ["flow", "cpu"])
def test_scaling(benchmark: Any, engine: str, workload: str, who: str, threads: int,
                 pair: scaling.WorkerPair) -> None:
    benchmark.group = f"scaling-{workload}[{engine}]"
    n = CPU_REQUESTS if workload == "cpu" else SHORT_REQUESTS
    benchmark.extra_info.update(threads=threads, requests=threads * n)
    benchmark.pedantic(pair.run, args=(threads, n), rounds=5, warmup_rounds=1)


def test_scaling_control_gil_free(benchmark: Any, engine: str) -> None:
    """What the shared machine gives two threads right now: GIL-free C work."""
    benchmark.group = f"scaling-cpu[{engine}]"
    with scaling.WorkerPair(scaling.gil_free_runner) as p:
        one = min(p.run(1, 100) for _ in range(3))
        two = benchmark.pedantic(p.run, args=(2, 100), rounds=3)
    benchmark.extra_info.update(one_thread_ns=one, ratio=2 * one / two)
