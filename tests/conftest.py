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


# =====================================================================================
# Traffic Server plugin (hosts/ats): a private traffic_server (tests/ats_server.py)
# with build/ats/hostscript_ats_<engine>.so loaded. Fixtures: ats_plugin, start_ats.
# =====================================================================================

import http.client as _ats_http  # noqa: E402
import shutil as _ats_shutil  # noqa: E402
import socket as _ats_socket  # noqa: E402
import tempfile as _ats_tempfile  # noqa: E402
import time  # noqa: E402

_ATS_REPO_BUILD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "build", "ats")


def ats_plugin_path(engine: str) -> str:
    """build/ats/hostscript_ats_<engine>.so of this repository, else of the directory
    $HS_ATS_PLUGIN_DIR names (a worktree testing another checkout's build); the repo's
    path when neither has it."""
    name = f"hostscript_ats_{engine}.so"
    candidates = [os.path.join(_ATS_REPO_BUILD, name)]
    if os.environ.get("HS_ATS_PLUGIN_DIR"):
        candidates.append(os.path.join(os.environ["HS_ATS_PLUGIN_DIR"], name))
    for c in candidates:
        if os.path.isfile(c):
            return c
    return candidates[0]


def _ats_or_skip() -> None:
    from ats_server import TRAFFIC_SERVER
    if not os.access(TRAFFIC_SERVER, os.X_OK):
        pytest.skip("traffic_server is not installed (Debian: trafficserver; see "
                    "docs/ats.md: make ats installs it without starting the service)")


@pytest.fixture
def ats_plugin(engine) -> str:
    """The path of build/ats/hostscript_ats_<engine>.so (fails when it is not built)."""
    path = ats_plugin_path(engine)
    if not os.path.isfile(path):
        where = _ATS_REPO_BUILD + (f" or {os.environ['HS_ATS_PLUGIN_DIR']}"
                                   if os.environ.get("HS_ATS_PLUGIN_DIR") else "")
        pytest.fail(f"the Traffic Server plugin hostscript_ats_{engine}.so is not built "
                    f"(looked in {where}): run make ats", pytrace=False)
    return path


class AtsReply:
    """One response through ATS: status, reason, headers [(name, value)], body (bytes)."""

    def __init__(self, status, reason, headers, body):
        self.status, self.reason, self.headers, self.body = status, reason, headers, body

    def get(self, name, default=None):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return default

    def all(self, name):
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self):
        import json
        return json.loads(self.body)

    def __repr__(self):
        return f"AtsReply({self.status}, {self.headers}, {self.body[:200]!r})"


class AtsClient:
    """What start_ats yields: ``ats`` (the AtsServer), ``origin``, ``scripts`` (name ->
    path), ``get/request`` (one request on a new connection: each may land on another
    net thread), ``raw`` (bytes in, every byte until the close out), ``diags()``,
    ``diags_lines(pattern)``, ``wait_diags(pattern, count, timeout)``."""

    def __init__(self, ats, origin, scripts):
        self.ats, self.origin, self.scripts = ats, origin, scripts

    @property
    def port(self):
        return self.ats.port

    @property
    def url(self):
        return self.ats.url

    def died(self):
        """None while traffic_server runs, else a description of its end with the
        tails of diags.log and stderr."""
        rc = self.ats.proc.poll() if self.ats.proc else None
        if rc is None:
            return None
        from ats_server import _tail
        return (f"traffic_server exited with status {rc}\n--- diags.log ---\n"
                f"{_tail(self.ats.diags_path, 40)}\n--- stderr ---\n{_tail(self.ats.stderr_path)}")

    def request(self, method="GET", path="/", headers=None, body=None, timeout=10.0):
        c = _ats_http.HTTPConnection("127.0.0.1", self.ats.port, timeout=timeout)
        try:
            hdrs = {"Connection": "close"}
            hdrs.update(headers or {})
            c.request(method, path, body=body, headers=hdrs)
            r = c.getresponse()
            data = r.read()
            return AtsReply(r.status, r.reason, r.getheaders(), data)
        except (OSError, _ats_http.HTTPException) as e:
            time.sleep(0.2)
            why = self.died()
            if why:
                raise AssertionError(f"{method} {path}: {e!r}; {why}") from e
            raise
        finally:
            c.close()

    def get(self, path="/", headers=None, timeout=10.0):
        return self.request("GET", path, headers=headers, timeout=timeout)

    def raw(self, data, timeout=10.0):
        with _ats_socket.create_connection(("127.0.0.1", self.ats.port), timeout=timeout) as s:
            s.sendall(data)
            out = b""
            try:
                while True:
                    got = s.recv(65536)
                    if not got:
                        break
                    out += got
            except OSError:
                pass
            return out

    def diags(self):
        return self.ats.diags()

    def diags_lines(self, pattern=None):
        return self.ats.diags_lines(pattern)

    def wait_diags(self, pattern, count=1, timeout=5.0):
        return self.ats.wait_diags(pattern, count=count, timeout=timeout)


@pytest.fixture
def start_ats(request, engine, origin, _ats_reaper):
    """start_ats(scripts=[src | (name, src)], plugin_args=[...], cache=False,
    extra_plugins=[plugin.config lines], origin_url=None, threads=2, records=None,
    manager=False: under traffic_manager, for traffic_ctl) -> AtsClient: writes the scripts to files, loads
    ``<hostscript_ats_<engine>.so> [plugin_args] script.lua ...`` (then the extra
    plugins) into a private traffic_server in front of ``origin``, stopped at teardown
    (its directory is kept and named on the terminal when the test failed)."""
    _ats_or_skip()
    from ats_server import AtsServer, plugin_line
    started = []
    failed_before = request.session.testsfailed

    def start(scripts=(), plugin_args=(), cache=False, extra_plugins=(), origin_url=None,
              threads=2, records=None, with_plugin=True, manager=False):
        root = _ats_tempfile.mkdtemp(prefix="hs-ats-")
        paths = {}
        for i, s in enumerate(scripts):
            name, src = s if isinstance(s, tuple) else (f"script{i}.lua", s)
            path = os.path.join(root, name)
            with open(path, "w") as f:
                f.write(src)
            paths[name] = path
        lines = []
        if with_plugin:
            lines.append(plugin_line(request.getfixturevalue("ats_plugin"),
                                     list(plugin_args) + list(paths.values())))
        lines += list(extra_plugins)
        ats = AtsServer(origin_url or origin.url, lines, cache=cache, threads=threads,
                        records=records, root=root, manager=manager,
                        start_timeout=30 if manager else 10)
        started.append(ats)
        ats.start()
        return AtsClient(ats, origin, paths)

    yield start
    failed = request.session.testsfailed > failed_before
    dead = [AtsClient(a, origin, {}).died() for a in started if a.proc is not None and not a.stopped]
    for ats in started:
        ats.stop(wait=False)  # SIGTERM now; the waiting (about 1 s) in the background
        _ats_reaper.append((ats, not failed))
        if failed:
            tr = request.config.pluginmanager.get_plugin("terminalreporter")
            if tr is not None:
                tr.write_line(f"\n[{request.node.nodeid}] ATS run root kept: {ats.root}")
    dead = [d for d in dead if d]
    if dead and not failed:  # a crash after the last response the test looked at
        pytest.fail("traffic_server died during the test: " + "\n".join(dead), pytrace=False)


@pytest.fixture(scope="session")
def _ats_reaper():
    """The instances start_ats stopped without waiting: waited for (SIGKILL after 4 s)
    and their directories removed at the end of the session."""
    pending = []
    yield pending
    for ats, remove in pending:
        ats.join(10)
        if remove:
            _ats_shutil.rmtree(ats.root, ignore_errors=True)
