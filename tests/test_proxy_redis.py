"""The Key header examples (examples/key_header.lua on hs.shared.meta,
examples/key_header_redis.lua on hs.redis) with their dictionary in a real Redis,
through the proxy: the demo's scenario, two `hostscript serve` processes agreeing
on generation ids, and Redis dying under traffic (every request still answered, no
wrong variant, the cache back without a restart)."""
from __future__ import annotations

import concurrent.futures
import http.client
import itertools
import json
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from helpers import ROOT, wait_for
from proxy_helpers import Reply, request
from test_proxy_cli import Serve

from hostscript.demo import SEQUENCE

EXAMPLES = ROOT / "examples"
KEY_HEADER = "key_header.lua"
KEY_HEADER_REDIS = "key_header_redis.lua"
TIMEOUT = 0.2  # the Redis URL's timeout and connect_timeout
# what a request may take beyond the Redis timeout (measured on 2 idle cores: ~60 ms
# when Redis is killed, a few ms past the timeout when it does not answer; under
# heavy CPU load up to ~0.4 s more)
MARGIN = 0.8

# send_response: the secondary cache key the request was looked up or stored under
SHOW_CACHE_KEY = """
local C = {}
function C:on_send_response(txn) txn.resp.headers["x-cache-key"] = txn.cache_key or "-" end
return C
"""

# the demo's script, then the dictionary it runs on
SETUPS = [(KEY_HEADER, "in-process"), (KEY_HEADER, "redis"), (KEY_HEADER_REDIS, "redis")]
SETUP_IDS = ["key_header-in-process", "key_header-redis", "key_header_redis"]


class KeyOrigin:
    """The demo's origin: every response says ``Key: <self.key>`` (``?key=`` in the
    target wins) and ``Cache-Control: max-age=60``; its JSON body names the variant
    (the request's ``abc`` and ``x-v``). ``count(path)``: requests seen for PATH."""

    def __init__(self) -> None:
        self.key = "abc;match=bennet"
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                key = query[4:] if query.startswith("key=") else outer.key
                with outer.lock:
                    outer.counts[path] += 1
                    n = outer.counts[path]
                body = json.dumps({"abc": self.headers.get("abc"), "x-v": self.headers.get("x-v"),
                                   "n": n}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "max-age=60")
                self.send_header("Key", key)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def count(self, path: str) -> int:
        with self.lock:
            return self.counts[path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def key_origin():
    o = KeyOrigin()
    yield o
    o.close()


def variant(abc: str | None) -> str:
    """What ``abc;match=bennet`` reduces ABC to: "1", "0", or "none" when absent."""
    if abc is None:
        return "none"
    return "1" if any(item.strip() == "bennet" for item in abc.split(",")) else "0"


def get(proxy_or_port: Any, path: str, abc: str | None = None, **headers: str):
    """GET PATH with abc: ABC (absent when None); the Reply, its JSON body as .doc."""
    if abc is not None:
        headers["abc"] = abc
    if isinstance(proxy_or_port, int):  # a `hostscript serve` process's port
        c = http.client.HTTPConnection("127.0.0.1", proxy_or_port, timeout=10)
        c.request("GET", path, headers=headers)
        r = c.getresponse()
        reply = Reply(r.status, r.getheaders(), r.read(), "1.1")
        c.close()
    else:
        reply = request(proxy_or_port, "GET", path, headers)
    reply.doc = json.loads(reply.body) if reply.status == 200 else None
    return reply


def start(start_proxy, key_origin, script: str, meta: Any, threads: int = 4, time_limit: float = 1.0):
    src = (EXAMPLES / script).read_text()
    return start_proxy(src, SHOW_CACHE_KEY, upstream=key_origin.url, threads=threads,
                       host_kw={"shared": {"meta": meta}, "time_limit": time_limit})


def meta_for(backend: str, request, redis_prefix: str) -> Any:
    """The dictionary "meta": 1 MiB in the process, or the session's Redis (only then
    is redis-server needed)."""
    if backend == "in-process":
        return 1 << 20
    redis_server = request.getfixturevalue("redis_server")
    return redis_server.url(prefix=redis_prefix, timeout=TIMEOUT, connect_timeout=TIMEOUT)


# ---- the demo's scenario ----


@pytest.mark.parametrize("script, backend", SETUPS, ids=SETUP_IDS)
def test_the_demo_scenario(start_proxy, key_origin, request, redis_prefix, script, backend):
    p = start(start_proxy, key_origin, script, meta_for(backend, request, redis_prefix))
    replies = [get(p, "/article", abc) for abc, _ in SEQUENCE]
    assert [r.get("x-cache") for r in replies] == [status for _, status in SEQUENCE]
    assert key_origin.count("/article") == 3
    for (abc, _), r in zip(SEQUENCE, replies):
        assert r.status == 200 and variant(r.doc["abc"]) == variant(abc), (abc, r)
        assert r.get("cache-control") == "max-age=60"
    # one generation per variant, the same for every request of that variant
    keys = {variant(abc): set() for abc, _ in SEQUENCE}
    for (abc, _), r in zip(SEQUENCE, replies):
        keys[variant(abc)].add(r.get("x-cache-key"))
    assert all(len(k) == 1 for k in keys.values()), keys
    assert len({next(iter(k)) for k in keys.values()}) == 3
    assert all(next(iter(k)).startswith("gen-") for k in keys.values())
    if script == KEY_HEADER_REDIS:  # what it keeps in Redis, read from outside
        redis_server = request.getfixturevalue("redis_server")
        k = f"{redis_prefix}kh:key:/article"
        assert redis_server.cmd("HGET", k, "value") == b"abc;match=bennet"
        assert 0 < redis_server.cmd("TTL", k) <= 300
        gens = redis_server.cmd("HGETALL", f"{redis_prefix}kh:gen:/article")
        gens = dict(zip(gens[::2], gens[1::2]))
        ids = {f: v for f, v in gens.items() if f != b"max-genid"}
        assert sorted(ids) == [b"abc;match=bennet\x00" + v + b"\x00" for v in (b"0", b"1", b"none")]
        assert {f"gen-{v.decode()}" for v in ids.values()} == {next(iter(k)) for k in keys.values()}
        assert int(gens[b"max-genid"]) == max(int(v) for v in ids.values())


@pytest.mark.parametrize("script, backend", SETUPS, ids=SETUP_IDS)
def test_a_key_learnt_again_does_not_find_the_old_keys_variants(
        start_proxy, key_origin, request, redis_prefix, script, backend):
    # the origin's Key changes while the first one expires: a secondary key that
    # reads the same under the new Key ("1") is another variant
    p = start(start_proxy, key_origin, script, meta_for(backend, request, redis_prefix))
    assert get(p, "/a", "bennet").get("x-cache") == "MISS"
    assert get(p, "/a", "bennet").get("x-cache") == "HIT"
    # the Key expires (KEY_TTL, 300 s: deleted here) and the origin sends another
    if backend == "in-process":
        assert p.host.shared["meta"].delete("key:/a")
    else:
        name = "key:/a" if script == KEY_HEADER else "kh:key:/a"
        assert request.getfixturevalue("redis_server").cmd("DEL", redis_prefix + name) == 1
    key_origin.key = "abc;match=theodore"
    assert get(p, "/a").get("x-cache") == "MISS"  # learns the new Key
    r = get(p, "/a", "theodore")  # "1" under match=theodore
    assert r.doc["abc"] == "theodore", "the variant of the old Key's \"1\" (bennet) was answered"
    assert get(p, "/a", "theodore").get("x-cache") == "HIT"
    assert key_origin.count("/a") == 3


# ---- two processes, one Redis ----


@pytest.fixture
def serve(key_origin, tmp_path):
    """serve(script, meta_url, engine) -> a started `hostscript serve` process with
    SCRIPT and SHOW_CACHE_KEY in front of key_origin; stopped (exit 0) after the test."""
    show = tmp_path / "show_cache_key.lua"
    show.write_text(SHOW_CACHE_KEY)
    procs: list[Serve] = []

    def run(script: str, meta_url: str, engine: str) -> Serve:
        s = Serve("--listen", "127.0.0.1:0", "--upstream", key_origin.url, "--engine", engine,
                  "--threads", "8", "--script", str(EXAMPLES / script), "--script", str(show),
                  "--shared", f"meta={meta_url}")
        procs.append(s)
        return s

    yield run
    for s in procs:
        assert s.stop() == 0, "\n".join(s.lines)


@pytest.mark.parametrize("script", [KEY_HEADER, KEY_HEADER_REDIS])
def test_two_serve_processes_behind_one_redis_agree_on_generations(
        script, serve, redis_server, redis_prefix):
    url = redis_server.url(prefix=redis_prefix, timeout=1, connect_timeout=1)
    # one process on each engine: LuaJIT's numbers and Lua 5.4's integers agree too
    a, b = serve(script, url, "luajit"), serve(script, url, "lua54")
    pa, pb = a.started(), b.started()
    # the demo's variants, through A then B: B's own cache, A's generation ids
    ra = get(pa, "/article", "bennet")
    rb = get(pb, "/article", "bennet")
    assert (ra.get("x-cache"), rb.get("x-cache")) == ("MISS", "MISS")
    assert rb.get("x-cache-key") == ra.get("x-cache-key") != "-"
    assert get(pb, "/article", "foo, bennet").get("x-cache") == "HIT"
    rb2 = get(pb, "/article", "theodore")
    ra2 = get(pa, "/article", "Bennet")  # reduces like theodore: B's id, A's own miss
    assert rb2.get("x-cache-key") == ra2.get("x-cache-key") != ra.get("x-cache-key")
    assert (rb2.get("x-cache"), ra2.get("x-cache")) == ("MISS", "MISS")
    assert ra2.doc["abc"] == "Bennet"
    assert get(pa, "/article", "theodore").get("x-cache") == "HIT"

    # racing: each value of x-v (Key: x-v;div=1, one variant per value) is asked
    # through both processes at once, from 16 threads
    path = "/race?key=x-v;div=1"
    values = [str(v) for v in range(1, 25)]
    jobs = [(port, v) for v in values for port in (pa, pb) for _ in range(2)]
    random.Random(7).shuffle(jobs)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda j: (j, get(j[0], path, **{"x-v": j[1]})), jobs))
    seen: dict[str, set] = {v: set() for v in values}
    for (port, v), r in replies:
        assert r.status == 200 and r.doc["x-v"] == v, r
        seen[v].add(r.get("x-cache-key"))
    assert all(len(k) == 1 and "-" not in k for k in seen.values()), seen
    ids = {v: next(iter(k)) for v, k in seen.items()}
    assert len(set(ids.values())) == len(values)  # one id per variant
    if script == KEY_HEADER_REDIS:  # the ids as Redis holds them
        gens = redis_server.cmd("HGETALL", f"{redis_prefix}kh:gen:/race?key=x-v;div=1")
        gens = dict(zip(gens[::2], gens[1::2]))
        fields = {v: b"x-v;div=1\x00" + v.encode() + b"\x00" for v in values}
        assert {v: "gen-" + gens[fields[v]].decode() for v in values} == ids
    # each process hits the copy it cached, under the id both use
    for v in values:
        for port in (pa, pb):
            r = get(port, path, **{"x-v": v})
            assert (r.get("x-cache"), r.get("x-cache-key"), r.doc["x-v"]) == ("HIT", ids[v], v)


# ---- Redis failing under traffic ----

ABCS = ["bennet", "theodore", None, "foo, bennet", "Bennet"]


class Traffic:
    """Client threads sending GET /article with a random abc each, each request on a
    new connection, until stop(); .log: (start, end, abc, Reply or exception)."""

    def __init__(self, proxy: Any, path: str = "/article", clients: int = 6) -> None:
        self.proxy, self.path = proxy, path
        self.log: list[tuple[float, float, str | None, Any]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]
        for t in self._threads:
            t.start()

    def _run(self, seed: int) -> None:
        rnd = random.Random(seed)
        while not self._stop.is_set():
            abc = rnd.choice(ABCS)
            t0 = time.monotonic()
            try:
                r: Any = get(self.proxy, self.path, abc)
            except Exception as e:  # noqa: BLE001 - recorded, asserted on below
                r = e
            self.log.append((t0, time.monotonic(), abc, r))

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def between(self, start: float, end: float) -> list:
        return [e for e in self.log if e[0] >= start and e[1] <= end]


def check_every_answer(log: list, bound: float) -> float:
    """Every request answered 200 with its own variant within BOUND s; the slowest."""
    assert log
    slowest = 0.0
    for t0, t1, abc, r in log:
        assert not isinstance(r, Exception), (abc, r)
        assert r.status == 200, (abc, r)
        assert variant(r.doc["abc"]) == variant(abc), f"abc {abc!r} answered {r.doc['abc']!r}'s variant"
        assert r.get("cache-control") == "max-age=60", r  # put back after a bypass
        slowest = max(slowest, t1 - t0)
    assert slowest < bound, slowest
    return slowest


_fresh = itertools.count()


def key_flow_works(proxy: Any) -> bool:
    """On a fresh URL: a miss that learns the Key, a hit, another variant's miss."""
    path = f"/fresh{next(_fresh)}"
    got = [get(proxy, path, abc).get("x-cache") for abc in ("bennet", "foo, bennet", "theodore")]
    return got == ["MISS", "HIT", "MISS"]


@pytest.mark.parametrize("script", [KEY_HEADER, KEY_HEADER_REDIS])
def test_redis_killed_under_traffic_then_restarted(start_proxy, key_origin, own_redis, redis_prefix,
                                                   script, caplog):
    # time_limit (1 s) above the Redis timeout: a handler is given the failure to handle
    p = start(start_proxy, key_origin, script,
              own_redis.url(prefix=redis_prefix, timeout=TIMEOUT, connect_timeout=TIMEOUT), threads=8)
    assert [get(p, "/article", abc).get("x-cache") for abc in ("bennet", "bennet", "theodore")] \
        == ["MISS", "HIT", "MISS"]
    traffic = Traffic(p)
    time.sleep(0.3)
    killed = time.monotonic()
    own_redis.kill()
    time.sleep(1.0)
    restarted = time.monotonic()
    own_redis.start()  # the same port, empty
    time.sleep(0.5)  # traffic again, on a Redis that forgot every Key and id
    traffic.stop()
    check_every_answer(traffic.log, TIMEOUT + MARGIN)
    down = traffic.between(killed + 0.05, restarted)
    assert len(down) >= 20, len(down)
    assert {r.get("x-cache") for *_, r in down} == {"MISS"}  # bypassed: never a hit
    assert any("cache bypassed: redis:" in rec.getMessage() for rec in caplog.records
               if rec.levelname == "WARNING"), "no warning logged"
    # the Key flow again, without restarting the proxy (the back-off is at most 1 s)
    assert wait_for(lambda: key_flow_works(p), 5)
    assert p.host.stats()["errors"] == 0


@pytest.mark.parametrize("script", [KEY_HEADER, KEY_HEADER_REDIS])
def test_redis_not_answering_costs_a_request_one_timeout(start_proxy, key_origin, own_redis,
                                                         redis_prefix, script):
    timeout = 1.0  # two timeouts (a second call after a failed one) would be 2 s
    p = start(start_proxy, key_origin, script,
              own_redis.url(prefix=redis_prefix, timeout=timeout, connect_timeout=timeout),
              threads=8, time_limit=3.0)
    assert [get(p, "/article", abc).get("x-cache") for abc in ("bennet", "bennet")] == ["MISS", "HIT"]
    own_redis.pause()  # connections stay open, nothing answers
    try:
        traffic = Traffic(p, clients=6)
        time.sleep(1.5)
        traffic.stop()
    finally:
        own_redis.resume()
    # a request waits for one Redis timeout at most: no call follows a failed one
    slowest = check_every_answer(traffic.log, timeout + MARGIN)
    assert slowest >= timeout * 0.9  # it did wait for Redis
    assert {r.get("x-cache") for *_, r in traffic.log} == {"MISS"}
    assert wait_for(lambda: key_flow_works(p), 5)
    assert p.host.stats()["errors"] == 0


@pytest.mark.parametrize("script", [KEY_HEADER, KEY_HEADER_REDIS])
def test_redis_restarted_empty_gives_no_id_twice(start_proxy, key_origin, own_redis, redis_prefix,
                                                 script):
    # the proxy's cache outlives Redis's memory: ids given again after a restart would
    # find the responses cached under the old ones, for another variant
    p = start(start_proxy, key_origin, script,
              own_redis.url(prefix=redis_prefix, timeout=TIMEOUT, connect_timeout=TIMEOUT))
    for abc in ("bennet", "theodore"):
        assert [get(p, "/article", abc).get("x-cache") for _ in range(2)] == ["MISS", "HIT"]
    own_redis.kill()
    own_redis.start()
    # the first request Redis answers again learns the Key; theodore first this time
    assert wait_for(lambda: get(p, "/article", "theodore").get("x-cache-key") != "key-unavailable", 5)
    r = get(p, "/article", "bennet")
    assert r.doc["abc"] == "bennet", "theodore's cached response answered for bennet"
    assert get(p, "/article", "bennet").get("x-cache") == "HIT"
