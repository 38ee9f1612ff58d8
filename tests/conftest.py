"""Shared fixtures: every behaviour is checked on both engines."""
from __future__ import annotations

import pytest

import hostscript

ENGINES = ["luajit", "lua54"]
HOOKS = ("read_request", "send_request", "read_response", "send_response", "log")


@pytest.fixture(params=ENGINES)
def engine(request) -> str:
    return request.param


@pytest.fixture
def make_host(engine):
    """make_host(**kwargs) -> Host on the parametrized engine, closed after the test."""
    hosts = []

    def make(hooks=HOOKS, **kw):
        kw.setdefault("engine", engine)
        h = hostscript.Host(hooks, **kw)
        hosts.append(h)
        return h

    yield make
    for h in hosts:
        h.close()


@pytest.fixture
def host(make_host):
    return make_host()


# the proxy tests' fixtures: origin, start_proxy, log_lines
from proxy_helpers import log_lines, origin, start_proxy  # noqa: E402,F401
