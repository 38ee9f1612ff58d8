"""R4, M1 and M2: the first fire on a new thread (with and without a state pool)
against host.load of the same 200-line script; the Lua heap of a state and RSS over
thread churn, reported in extra_info (they are not times)."""
from __future__ import annotations

from typing import Any, Iterator

import pytest

from . import contestants as cs
from . import new_threads
from .conftest import pick
from .rows import RSS_FLAT_KIB, STATE_POOL
from .workloads import METHOD, REQUEST_HEADERS, URI, big_workload

ARGS = (METHOD, URI, REQUEST_HEADERS)


@pytest.fixture
def big(engine: str) -> Iterator[cs.HostscriptContestant]:
    """hostscript without a state pool, the 200-line script loaded."""
    c = new_threads.hostscript_with_pool(engine, big_workload(), 0)
    yield c
    c.close()


def test_first_fire_on_new_thread(benchmark: Any, engine: str, big: cs.HostscriptContestant) -> None:
    benchmark.group = f"first-fire[{engine}]"
    benchmark.pedantic(new_threads.first_fire_ns, args=(big.host,), rounds=20)


def test_first_fire_with_state_pool(benchmark: Any, engine: str) -> None:
    benchmark.group = f"first-fire[{engine}]"
    try:
        pooled = new_threads.hostscript_with_pool(engine, big_workload(), STATE_POOL)
    except new_threads.NoStatePool as exc:
        pytest.skip(str(exc))
    with pooled.host:
        before = new_threads.pool_hits(pooled.host)
        benchmark.pedantic(new_threads.first_fire_ns, args=(pooled.host,), rounds=20)
        benchmark.extra_info.update(pool_hits=new_threads.pool_hits(pooled.host) - before)


def test_new_thread_without_fire(benchmark: Any, engine: str) -> None:
    """Starting and joining a thread: around every first-fire round, not inside it."""
    benchmark.group = f"first-fire[{engine}]"
    benchmark.pedantic(new_threads.in_new_thread, args=(lambda: 0,), rounds=20)


def test_host_load_compiles_from_source(benchmark: Any, engine: str, big: cs.HostscriptContestant) -> None:
    benchmark.group = f"first-fire[{engine}]"
    benchmark.pedantic(big.host.load, args=(big_workload().lua,), kwargs={"name": "big.lua"}, rounds=20)


def test_lupa_new_runtime_on_new_thread(benchmark: Any, engine: str, need_lupa: None) -> None:
    benchmark.group = f"first-fire[{engine}]"
    lupa = cs.LupaContestant(engine, big_workload())
    benchmark.pedantic(new_threads.lupa_first_fire_ns, args=(lupa,), rounds=20)


def test_heap_per_state(benchmark: Any, engine: str, big: cs.HostscriptContestant) -> None:
    benchmark.group = f"memory[{engine}]"
    heap_max, heap_avg = benchmark.pedantic(new_threads.heap_per_state_bytes, args=(big,), rounds=1)
    benchmark.extra_info.update(heap_max_kib=heap_max / 1024, heap_avg_kib=heap_avg / 1024,
                                target_kib=64)


@pytest.mark.parametrize("who", ["hostscript", "python", "lupa"])
def test_rss_over_thread_churn(benchmark: Any, engine: str, flow: dict, who: str) -> None:
    benchmark.group = f"memory[{engine}]"
    c = pick(flow, who, engine)
    growth = benchmark.pedantic(new_threads.rss_growth_bytes,
                                args=(lambda: c.serve(*ARGS), 10_000, 300), rounds=1)
    benchmark.extra_info.update(rss_growth_kib=growth / 1024, flat_below_kib=RSS_FLAT_KIB)
