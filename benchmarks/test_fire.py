"""Rows 1-3: one fire from Python (no-op, realistic) against the pure-Python
dispatcher and lupa; and in C, hs_fire against a bare lua_pcall."""
from __future__ import annotations

from typing import Any

import pytest

from hostscript import bench


@pytest.mark.parametrize("who", ["hostscript", "python", "python (dict)", "lupa"])
@pytest.mark.parametrize("workload", list(bench.FIRE_WORKLOADS))
def test_fire(benchmark: Any, engine: str, workload: str, who: str) -> None:
    benchmark.group = f"{workload}-fire[{engine}]"
    with bench.fire_contestants(engine, workload) as contestants:
        if who not in contestants:
            pytest.skip(f"no {who} contestant for {workload} on {engine}"
                        + (f": {bench.lupa_unavailable(engine)}" if who == "lupa" else ""))
        fire, txn = contestants[who]
        benchmark(fire, bench.HOOK, txn)


def test_c_fire(benchmark: Any, engine: str) -> None:
    """The C benchmark reports its own best round; the figures are in extra_info."""
    benchmark.group = f"c-fire[{engine}]"
    try:
        pcall_ns, fire_ns = benchmark.pedantic(bench.run_fire_bench, args=(engine, 1_000_000, 5),
                                               rounds=1, iterations=1)
    except bench.Unavailable as exc:
        pytest.skip(str(exc))
    benchmark.extra_info.update(pcall_ns=pcall_ns, fire_ns=fire_ns, ratio=fire_ns / pcall_ns)
    assert pcall_ns > 0 and fire_ns > 0
