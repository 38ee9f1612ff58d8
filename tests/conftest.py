"""Shared fixtures: every behaviour is checked on both engines."""
from __future__ import annotations

import hashlib
import os

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


# ---- Redis: a real redis-server (tests/redis_server.py) ----


def _redis_or_skip():
    from redis_server import REDIS_SERVER, RedisServer
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.skip("redis-server is not installed (tools/install-deps.sh installs it)")
    return RedisServer().start()


@pytest.fixture(scope="session")
def redis_server():
    """One redis-server for the whole run: tests keep to their own key prefix
    (redis_prefix) and must not kill, pause or reconfigure it (use own_redis)."""
    srv = _redis_or_skip()
    yield srv
    srv.stop()


@pytest.fixture
def own_redis():
    """A private redis-server the test may kill, restart, pause or reconfigure."""
    srv = _redis_or_skip()
    yield srv
    srv.stop()


@pytest.fixture
def redis_prefix(request) -> str:
    """A key prefix of this test alone (from its node id, so each parametrization
    has its own): "t:<12 hex digits>:"."""
    return f"t:{hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]}:"


@pytest.fixture
def rhost(make_host, redis_server, redis_prefix):
    """A host with one Redis-backed dictionary 'meta' under this test's prefix."""
    return make_host(shared={"meta": redis_server.url(prefix=redis_prefix)})


# the proxy tests' fixtures: origin, start_proxy, log_lines
from proxy_helpers import log_lines, origin, start_proxy  # noqa: E402,F401
