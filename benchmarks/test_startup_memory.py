"""Rows 5 and 6: the first fire on a new thread (state creation + rehydration from
bytecode) against compiling the same 200-line script (host.load); the Lua heap of a
state and RSS over thread churn, reported in extra_info (they are not times)."""
from __future__ import annotations

from typing import Any

import hostscript
from hostscript import bench


def test_first_fire_on_new_thread(benchmark: Any, engine: str, big_host: hostscript.Host) -> None:
    benchmark.group = f"rehydration[{engine}]"
    benchmark.pedantic(bench.first_fire_ns, args=(big_host,), rounds=20)


def test_new_thread_without_fire(benchmark: Any, engine: str) -> None:
    """The cost of starting and joining a thread, included in the first-fire row."""
    benchmark.group = f"rehydration[{engine}]"
    benchmark.pedantic(bench.in_new_thread, args=(lambda: 0,), rounds=20)


def test_host_load_compiles_from_source(benchmark: Any, engine: str, big_host: hostscript.Host) -> None:
    benchmark.group = f"rehydration[{engine}]"
    source = bench.script_200_lines()
    benchmark.pedantic(big_host.load, args=(source,), kwargs={"name": "big.lua"}, rounds=20)


def test_lupa_new_runtime_on_new_thread(benchmark: Any, engine: str, need_lupa: None) -> None:
    benchmark.group = f"rehydration[{engine}]"
    benchmark.pedantic(bench.lupa_first_call_ns, args=(engine, bench.script_200_lines()), rounds=20)


def test_heap_per_state(benchmark: Any, engine: str, big_host: hostscript.Host) -> None:
    benchmark.group = f"memory[{engine}]"
    heap_max, heap_avg = benchmark.pedantic(bench.heap_per_state_bytes, args=(big_host,), rounds=1)
    benchmark.extra_info.update(heap_max_kib=heap_max / 1024, heap_avg_kib=heap_avg / 1024,
                                target_kib=64)
    assert heap_max > 0


def test_rss_over_thread_churn(benchmark: Any, engine: str, big_host: hostscript.Host) -> None:
    benchmark.group = f"memory[{engine}]"
    growth = benchmark.pedantic(
        bench.rss_growth_bytes,
        args=(lambda: bench.check_fire(big_host, bench.new_transaction()), 10_000, 300), rounds=1)
    benchmark.extra_info.update(rss_growth_kib=growth / 1024, flat_below_kib=bench.RSS_FLAT_KIB)
