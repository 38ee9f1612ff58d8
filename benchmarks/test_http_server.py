"""R3: ThreadingHTTPServer on loopback, with and without hooks. Every benchmark round
runs the same number of connections (one request each), so times compare directly:
requests per second = CONNECTIONS / time (also in extra_info)."""
from __future__ import annotations

from typing import Any, Iterator

import pytest

from . import contestants as cs
from . import http_server
from .conftest import pick

CONNECTIONS = 500


@pytest.fixture
def server(engine: str, flow: dict, who: str) -> Iterator[http_server.RunningServer]:
    serve = cs.no_hooks if who == "no hooks" else pick(flow, who, engine).serve
    with http_server.RunningServer(serve) as s:
        http_server.requests_per_second(s.address, 50)  # warm-up
        yield s


@pytest.mark.parametrize("who", ["no hooks", "hostscript", "python", "lupa"])
def test_http_server(benchmark: Any, engine: str, who: str, server: http_server.RunningServer) -> None:
    benchmark.group = f"http-server[{engine}]"
    rps = benchmark.pedantic(http_server.requests_per_second, args=(server.address, CONNECTIONS),
                             rounds=5, iterations=1)
    benchmark.extra_info.update(connections=CONNECTIONS, last_round_rps=rps)
