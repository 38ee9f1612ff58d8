"""Row 4: throughput of 2 threads against 1 — each thread its own transaction (and
Lua state or lupa runtime). In each group, compare a "-2]" row with its "-1]" row:
the 2-thread rows do twice the fires, so equal times mean 2x throughput."""
from __future__ import annotations

from typing import Any, Iterator

import pytest

from hostscript import bench

SHORT_FIRES = 20_000  # per thread
CPU_FIRES = 50        # per thread, ~1 ms each


@pytest.fixture
def pair(engine: str, workload: str, who: str) -> Iterator[bench.WorkerPair]:
    loops = bench.calibrated_lua_loops(engine) if workload == "cpu" else 0
    py_loops = bench.calibrated_python_loops() if workload == "cpu" else 0
    runners = bench.scaling_runners(engine, workload, loops, py_loops)
    if who not in runners:
        pytest.skip(f"no {who} runner: {bench.lupa_unavailable(engine)}")
    with runners[who] as make_runner, bench.WorkerPair(make_runner) as p:
        yield p


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("who", ["hostscript", "python", "lupa"])
@pytest.mark.parametrize("workload", ["noop", "realistic", "cpu"])
def test_scaling(benchmark: Any, engine: str, workload: str, who: str, threads: int,
                 pair: bench.WorkerPair) -> None:
    benchmark.group = f"scaling-{workload}[{engine}]"
    n = CPU_FIRES if workload == "cpu" else SHORT_FIRES
    benchmark.extra_info.update(threads=threads, fires=threads * n)
    benchmark.pedantic(pair.run, args=(threads, n), rounds=5, warmup_rounds=1)


def test_scaling_control_gil_free(benchmark: Any, engine: str) -> None:
    """What the shared machine gives two threads right now: GIL-free C work."""
    benchmark.group = f"scaling-cpu[{engine}]"
    with bench.WorkerPair(bench.gil_free_runner) as p:
        one = min(p.run(1, 100) for _ in range(3))
        two = benchmark.pedantic(p.run, args=(2, 100), rounds=3)
    benchmark.extra_info.update(one_thread_ns=one, ratio=2 * one / two)
