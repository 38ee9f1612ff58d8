"""pytest-benchmark suites over every built engine; the workloads come from
hostscript.bench, the same code `hostscript bench` runs. Group names put the rows
of one comparison together, e.g. "noop-fire[luajit]": hostscript, python, lupa."""
from __future__ import annotations

from typing import Iterator

import pytest

import hostscript
from hostscript import bench


@pytest.fixture(params=hostscript.engines())
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def need_lupa(engine: str) -> None:
    reason = bench.lupa_unavailable(engine)
    if reason:
        pytest.skip(reason)


@pytest.fixture
def big_host(engine: str) -> Iterator[hostscript.Host]:
    """A host with the generated 200-line script loaded."""
    with bench.hostscript_host(engine, ("big.lua", bench.script_200_lines())) as host:
        yield host
