"""pytest-benchmark suites over every built engine; the contestants, workloads and
measuring helpers are the modules `hostscript bench` runs, so the two never drift.
Group names put the contestants of one comparison together, e.g.
"request-flow[luajit]": hostscript, python, lupa. pytest-benchmark runs each
contestant's rounds on their own (not interleaved as `hostscript bench` does)."""
from __future__ import annotations

from typing import Iterator

import pytest

import hostscript

from . import contestants as cs
from .workloads import FLOW


@pytest.fixture(params=hostscript.engines())
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def need_lupa(engine: str) -> None:
    reason = cs.lupa_unavailable(engine)
    if reason:
        pytest.skip(reason)


@pytest.fixture
def flow(engine: str) -> Iterator[dict]:
    """{name: contestant} serving R1's request flow (checked to serve it right)."""
    contestants = cs.contestants(engine, FLOW)
    yield contestants
    cs.close_all(contestants)


def pick(contestants: dict, who: str, engine: str) -> cs.Contestant:
    """CONTESTANTS[WHO], or skip with the reason it is missing."""
    if who not in contestants:
        pytest.skip(f"no {who} contestant on {engine}: {cs.lupa_unavailable(engine)}")
    return contestants[who]
