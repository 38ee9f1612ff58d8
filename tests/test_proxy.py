"""hostscript serve's proxy: hooks, cache, HTTP semantics, concurrency — on real
loopback sockets with real threads, both engines."""
from __future__ import annotations

import http.client
import io
import json
import re
import socket
import threading
import time

import pytest

from hostscript.proxy.cache import ResponseCache
from helpers import wait_for
from origin import header
from proxy_helpers import FAST, LOG_SCRIPT, Raw, fast, hook_fires, read_to_close, request

# ---- hooks ----

REWRITE = """
local C = {}
function C:on_read_request(txn)
  txn.req.headers["x-from-read-request"] = "rr"
  txn.req.headers["x-drop-me"] = nil
  if txn.req.uri:sub(1, 5) == "/old/" then txn.req.uri = "/new/" .. txn.req.uri:sub(6) end
end
function C:on_send_request(txn)
  txn.req.headers["x-from-send-request"] = "sr:" .. (txn.req.headers["host"] or "?")
end
function C:on_read_response(txn)
  txn.resp.headers["x-origin-type"] = txn.resp.headers["content-type"]
  txn.resp.headers["server"] = nil
end
function C:on_send_response(txn)
  txn.resp.headers["x-from-send-response"] = "sp"
  if txn.req.headers["x-want-status"] then txn.resp.status = tonumber(txn.req.headers["x-want-status"]) end
end
return C
"""


def test_hooks_rewrite_request_headers_seen_by_the_origin(start_proxy, origin):
    p = start_proxy(REWRITE)
    r = request(p, "GET", "/hdr", {"X-Drop-Me": "1", "X-Keep": "k"})
    assert r.status == 200
    got = r.json()
    assert header(got, "x-from-read-request") == ["rr"]
    assert header(got, "x-from-send-request") == [f"sr:127.0.0.1:{origin.port}"]
    assert header(got, "x-keep") == ["k"]
    assert header(got, "x-drop-me") == []


def test_handler_changes_the_upstream_path(start_proxy, origin):
    p = start_proxy(REWRITE)
    r = request(p, "GET", "/old/thing?q=1")
    assert r.status == 200
    assert r.json()["path"] == "/new/thing?q=1"
    assert origin.count("/old/thing?q=1") == 0


def test_response_headers_and_status_rewritten(start_proxy):
    p = start_proxy(REWRITE)
    r = request(p, "GET", "/resp")
    assert r.get("x-origin-type") == "application/json"
    assert r.get("server") is None
    assert r.get("x-from-send-response") == "sp"
    r = request(p, "GET", "/resp2", {"X-Want-Status": "203"})
    assert r.status == 203 and r.json()["path"] == "/resp2"


RESPOND = """
local C = {}
function C:on_read_request(txn)
  if txn.req.uri == "/deny" then
    return txn:respond(403, "denied\\n", { ["content-type"] = "text/plain", ["x-why"] = "test" })
  end
end
function C:on_send_request(txn)
  if txn.req.uri == "/late" then return txn:respond(202, "from send_request") end
end
function C:on_read_response(txn)
  if txn.req.uri == "/replace" then txn:respond(200, "replaced body") end
end
return C
"""


def test_respond_answers_without_the_upstream(start_proxy, origin):
    p = start_proxy(RESPOND)
    before = len(origin.requests)
    r = request(p, "GET", "/deny")
    assert (r.status, r.body, r.get("x-why"), r.get("content-type")) == (403, b"denied\n", "test", "text/plain")
    assert r.get("content-length") == "7"
    r = request(p, "POST", "/late", body=b"ignored")
    assert (r.status, r.body) == (202, b"from send_request")
    assert len(origin.requests) == before
    r = request(p, "GET", "/replace")  # read_response replaces the origin's body
    assert (r.status, r.body) == (200, b"replaced body")
    assert len(origin.requests) == before + 1


@pytest.mark.parametrize("handled", [("read_request", "log"), ("send_response",),
                                     ("read_request", "send_request", "read_response", "send_response", "log")])
def test_only_handled_hooks_fire(start_proxy, handled):
    src = "local C = {}\n" + "".join(f"function C:on_{h}(txn) end\n" for h in handled) + "return C\n"
    p = start_proxy(src)
    for i in range(3):
        assert request(p, "GET", f"/only/{i}").status == 200
    wait_for(lambda: p.stats()["requests"] == 3)
    fires = hook_fires(p)
    assert fires == {h: (3 if h in handled else 0) for h in fires}


def test_log_fires_for_every_path(start_proxy, log_lines, origin):
    p = start_proxy(RESPOND, LOG_SCRIPT)
    request(p, "GET", "/a?cc=max-age=60")        # miss
    request(p, "GET", "/a?cc=max-age=60")        # hit
    request(p, "GET", "/deny")                   # answered by read_request
    raw = Raw(p)
    raw.send(b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n")  # malformed: 400
    assert raw.read().status == 400
    raw.close()
    expected = ["LOG 200 GET /a?cc=max-age=60", "LOG 200 GET /a?cc=max-age=60", "LOG 403 GET /deny",
                "LOG 400 GET /"]
    assert wait_for(lambda: sorted(log_lines()) == sorted(expected), 5), log_lines()


def test_txn_ctx_travels_from_read_request_to_log(start_proxy, log_lines):
    p = start_proxy("""
        local C = {}
        function C:on_read_request(txn) txn.ctx.seen = { "rr" } end
        function C:on_read_response(txn) table.insert(txn.ctx.seen, "rp") end
        function C:on_send_response(txn) table.insert(txn.ctx.seen, "sp") end
        function C:on_log(txn) hs.log.info("LOG " .. table.concat(txn.ctx.seen, ",")) end
        return C""")
    request(p, "GET", "/ctx")
    assert wait_for(lambda: log_lines() == ["LOG rr,rp,sp"], 5), log_lines()


# ---- cache ----

def test_cache_miss_then_hit_with_age(start_proxy, origin):
    now = [1000.0]
    p = start_proxy(cache=ResponseCache(clock=lambda: now[0]))
    r1 = request(p, "GET", "/cached?cc=max-age=60")
    assert r1.get("x-cache") == "MISS" and r1.get("age") is None
    now[0] += 7
    r2 = request(p, "GET", "/cached?cc=max-age=60")
    assert (r2.status, r2.get("x-cache"), r2.get("age")) == (200, "HIT", "7")
    assert r2.body == r1.body and r2.get("cache-control") == "max-age=60"
    assert origin.count("/cached?cc=max-age=60") == 1
    now[0] += 60  # stale: fetched again
    assert request(p, "GET", "/cached?cc=max-age=60").get("x-cache") == "MISS"
    assert origin.count("/cached?cc=max-age=60") == 2
    # HEAD is answered from the GET entry, with its length and no body
    raw = Raw(p)
    raw.send(b"HEAD /cached?cc=max-age=60 HTTP/1.1\r\nHost: x\r\n\r\n")
    r = raw.read(head_only=True)
    assert (r.status, r.get("x-cache"), r.get("content-length")) == (200, "HIT", str(len(r1.body)))
    raw.send(b"GET /after-head HTTP/1.1\r\nHost: x\r\n\r\n")  # no body bytes came before this one
    assert raw.read().json()["path"] == "/after-head"
    raw.close()
    st = p.stats()["cache"]
    assert (st["hits"], st["stores"]) == (2, 2)


def test_vary_is_respected(start_proxy, origin):
    p = start_proxy()
    url = "/vary?vary=X-Lang&cc=max-age=60"
    en = request(p, "GET", url, {"X-Lang": "en"})
    fr = request(p, "GET", url, {"X-Lang": "fr"})
    assert (en.get("x-cache"), fr.get("x-cache")) == ("MISS", "MISS")
    assert (en.json()["varied"], fr.json()["varied"]) == ("en", "fr")
    en2 = request(p, "GET", url, {"X-Lang": "en"})
    fr2 = request(p, "GET", url, {"X-Lang": "fr"})
    assert (en2.get("x-cache"), en2.json()["varied"]) == ("HIT", "en")
    assert (fr2.get("x-cache"), fr2.json()["varied"]) == ("HIT", "fr")
    assert origin.count(url) == 2


def test_no_store_is_not_cached(start_proxy, origin):
    p = start_proxy()
    url = "/nostore?cc=no-store"
    assert [request(p, "GET", url).get("x-cache") for _ in range(3)] == ["MISS"] * 3
    assert origin.count(url) == 3
    assert p.stats()["cache"]["stores"] == 0


def test_set_cache_key_splits_the_cache(start_proxy, origin):
    p = start_proxy("""
        local C = {}
        function C:on_read_request(txn) txn:set_cache_key("tenant=" .. (txn.req.headers["x-tenant"] or "")) end
        return C""")
    url = "/tenant?cc=max-age=60"
    a1 = request(p, "GET", url, {"X-Tenant": "a"})
    b1 = request(p, "GET", url, {"X-Tenant": "b"})
    a2 = request(p, "GET", url, {"X-Tenant": "a"})
    b2 = request(p, "GET", url, {"X-Tenant": "b"})
    assert [r.get("x-cache") for r in (a1, b1, a2, b2)] == ["MISS", "MISS", "HIT", "HIT"]
    assert (a1.json()["n"], b1.json()["n"]) == (1, 2)  # two upstream fetches, two entries
    assert (a2.body, b2.body) == (a1.body, b1.body)
    assert p.stats()["cache"]["entries"] == 2


def test_cache_key_set_in_read_response_keys_the_stored_response(start_proxy, origin):
    # what examples/key_header.lua relies on: the key learnt from a response keys it
    p = start_proxy("""
        local C = {}
        function C:on_read_request(txn)
            local k = txn.req.headers["x-k"]
            if k then txn:set_cache_key(k) end
        end
        function C:on_read_response(txn) txn:set_cache_key("learnt") end
        return C""")
    url = "/learn?cc=max-age=60"
    first = request(p, "GET", url)
    again = request(p, "GET", url, {"X-K": "learnt"})
    other = request(p, "GET", url)  # no secondary key at the lookup: not the stored one
    assert [r.get("x-cache") for r in (first, again, other)] == ["MISS", "HIT", "MISS"]
    assert again.body == first.body and origin.count(url) == 2


def test_cache_off(start_proxy, origin):
    p = start_proxy(cache_size=0)
    url = "/nocache?cc=max-age=60"
    assert [request(p, "GET", url).get("x-cache") for _ in range(2)] == ["MISS", "MISS"]
    assert origin.count(url) == 2 and p.stats()["cache"] is None


def test_large_response_streams_past_the_cache(start_proxy, origin):
    cache = ResponseCache(max_bytes=1 << 20, max_object=64 << 10)
    p = start_proxy(cache=cache)
    for url in ("/big?size=300000&cc=max-age=60", "/big?size=300000&chunked=1&cc=max-age=60"):
        r = request(p, "GET", url)
        assert r.status == 200 and r.body == b"x" * 300000
        assert request(p, "GET", url).get("x-cache") == "MISS"
    assert cache.stats()["stores"] == 0


# ---- bodies and framing ----

def test_request_bodies_both_framings(start_proxy, origin):
    p = start_proxy()
    r = request(p, "POST", "/post-cl", body=b"hello body", headers={"Content-Type": "text/plain"})
    got = r.json()
    assert got["body"] == "hello body" and header(got, "content-length") == ["10"]
    raw = Raw(p)
    raw.send(b"POST /post-chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    got = raw.read().json()
    assert got["body"] == "hello world" and header(got, "transfer-encoding") == []
    # a body still arriving is streamed upstream, chunked in and chunked out
    raw.send(b"PUT /put-stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    pieces = [bytes([65 + i]) * 70000 for i in range(5)]
    for piece in pieces:
        raw.send(b"%x\r\n%b\r\n" % (len(piece), piece))
        time.sleep(0.02)
    raw.send(b"0\r\n\r\n")
    got = raw.read().json()
    assert got["body"].encode() == b"".join(pieces)
    assert header(got, "transfer-encoding") == ["chunked"]
    # Content-Length body still arriving
    body = b"z" * 200000
    raw.send(b"POST /post-stream HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
    for i in range(0, len(body), 50000):
        raw.send(body[i:i + 50000])
        time.sleep(0.02)
    got = raw.read().json()
    assert got["body"].encode() == body and header(got, "content-length") == [str(len(body))]
    raw.close()


def test_response_bodies_both_framings(start_proxy):
    p = start_proxy()
    raw = Raw(p)
    raw.send(b"GET /c?chunked=1&size=5000 HTTP/1.1\r\nHost: x\r\n\r\n")
    r = raw.read()
    assert r.get("transfer-encoding") == "chunked" and r.get("content-length") is None
    assert r.body == b"x" * 5000
    raw.send(b"GET /l?size=5000 HTTP/1.1\r\nHost: x\r\n\r\n")
    r = raw.read()
    assert r.get("content-length") == "5000" and r.get("transfer-encoding") is None
    assert r.body == b"x" * 5000
    # no length from the upstream: chunked to an HTTP/1.1 client, keep-alive kept
    raw.send(b"GET /n?nolength=1&size=3000 HTTP/1.1\r\nHost: x\r\n\r\n")
    r = raw.read()
    assert r.get("transfer-encoding") == "chunked" and r.body == b"x" * 3000
    raw.send(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.read().status == 200
    raw.close()
    # ... and delimited by the close to an HTTP/1.0 one
    raw = Raw(p)
    raw.send(b"GET /n?nolength=1&size=3000 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    r = raw.read()
    assert r.get("transfer-encoding") is None and r.get("content-length") is None
    assert r.body == b"x" * 3000 and r.get("connection") == "close"
    raw.close()


def test_keep_alive_carries_many_requests(start_proxy):
    p = start_proxy()
    conn = http.client.HTTPConnection(*p.address, timeout=10)
    for i in range(10):
        r = request(p, "GET", f"/ka/{i}", conn=conn)
        assert r.status == 200 and r.json()["path"] == f"/ka/{i}"
        assert r.get("connection") is None  # HTTP/1.1 default: open
    conn.close()
    assert p.stats()["connections_total"] == 1


def test_pipelined_requests_answered_in_order(start_proxy):
    p = start_proxy()
    raw = Raw(p)
    raw.send(b"".join(b"GET /pipe/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(5)))
    assert [raw.read().json()["path"] for _ in range(5)] == [f"/pipe/{i}" for i in range(5)]
    raw.close()


def test_http10_keep_alive_only_when_asked(start_proxy):
    p = start_proxy()
    raw = Raw(p)
    raw.send(b"GET /ten HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    r = raw.read()
    assert r.status == 200 and r.get("connection") == "keep-alive"
    raw.send(b"GET /ten2 HTTP/1.0\r\n\r\n")
    r = raw.read()
    assert r.get("connection") == "close" and raw.closed()
    raw.close()


def test_head_keeps_framing_headers_without_a_body(start_proxy):
    p = start_proxy()
    raw = Raw(p)
    raw.send(b"HEAD /h?size=1234 HTTP/1.1\r\nHost: x\r\n\r\n")
    r = raw.read(head_only=True)
    assert r.status == 200 and r.get("content-length") == "1234"
    raw.send(b"GET /h2?size=10 HTTP/1.1\r\nHost: x\r\n\r\n")  # the connection goes on, no stray bytes
    r = raw.read()
    assert r.status == 200 and r.body == b"x" * 10
    raw.close()


def test_connection_close_both_ways(start_proxy, origin):
    p = start_proxy()
    raw = Raw(p)
    raw.send(b"GET /bye HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    r = raw.read()
    assert r.status == 200 and r.get("connection") == "close"
    assert raw.closed()
    raw.close()
    # the upstream closing (nolength) ends only its own connection
    conn = http.client.HTTPConnection(*p.address, timeout=10)
    assert request(p, "GET", "/up-close?nolength=1", conn=conn).status == 200
    assert request(p, "GET", "/up-close-2", conn=conn).status == 200
    conn.close()


def test_hop_by_hop_headers_removed(start_proxy, origin):
    p = start_proxy()
    r = request(p, "GET", "/hop?hdr=X-Hop:1&hdr=Keep-Alive:timeout=5&hdr=Connection:x-hop&hdr=X-End:2",
                {"Connection": "x-custom", "X-Custom": "1", "Keep-Alive": "300", "TE": "trailers",
                 "Proxy-Authorization": "Basic eA==", "Proxy-Connection": "keep-alive",
                 "Upgrade": "h2c", "X-Kept": "yes"})
    got = r.json()
    for name in ("x-custom", "keep-alive", "te", "proxy-authorization", "proxy-connection", "upgrade"):
        assert header(got, name) == [], name
    assert header(got, "x-kept") == ["yes"]
    assert r.get("x-hop") is None and r.get("keep-alive") is None
    assert r.get("x-end") == "2"


def test_via_and_x_forwarded_for(start_proxy, origin):
    p = start_proxy()
    r = request(p, "GET", "/via", {"X-Forwarded-For": "10.0.0.1", "Via": "1.0 downstream"})
    got = r.json()
    assert header(got, "x-forwarded-for") == ["10.0.0.1, 127.0.0.1"]
    assert header(got, "via") == ["1.0 downstream", "1.1 hostscript"]
    assert header(got, "host") == [f"127.0.0.1:{origin.port}"]
    assert "1.1 hostscript" in r.all("via")


# ---- concurrency ----

def test_8_threads_x_500_keep_alive_requests(start_proxy, origin):
    p = start_proxy(LOG_SCRIPT.replace("hs.log.info", "local _ = "), threads=4)
    for j in range(10):  # warm the cacheable URLs
        assert request(p, "GET", f"/load/{j}?cc=max-age=600").get("x-cache") == "MISS"
    counts = {"HIT": 0, "MISS": 0}
    errors = []
    lock = threading.Lock()

    def client(tid: int) -> None:
        conn = http.client.HTTPConnection(*p.address, timeout=10)
        mine = {"HIT": 0, "MISS": 0}
        try:
            for j in range(500):
                path = f"/nc?t={tid}&j={j}" if j % 5 == 0 else f"/load/{j % 10}?cc=max-age=600"
                conn.request("GET", path)
                r = conn.getresponse()
                body = r.read()
                if r.status != 200 or json.loads(body)["path"].split("?")[0] != path.split("?")[0]:
                    raise AssertionError(f"{path}: {r.status} {body[:100]!r}")
                mine[r.getheader("X-Cache")] += 1
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        finally:
            conn.close()
            with lock:
                for k in mine:
                    counts[k] += mine[k]

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert counts == {"HIT": 3200, "MISS": 800}
    wait_for(lambda: p.stats()["requests"] == 4010)
    st = p.stats()
    assert st["cache"]["hits"] == 3200 and st["cache"]["stores"] == 10
    assert st["responses"]["2xx"] == 4010 and st["errors"] == 0
    assert sum(1 for r in origin.requests if r["path"].startswith("/nc?")) == 800
    assert p.host.stats()["hooks"]["log"]["fires"] == 4010


def test_64_keep_alive_connections_on_4_workers(start_proxy):
    p = start_proxy(threads=4)
    conns = [http.client.HTTPConnection(*p.address, timeout=10) for _ in range(64)]
    for round_ in range(3):
        for i, c in enumerate(conns):
            assert request(p, "GET", f"/many/{i}/{round_}", conn=c).status == 200
    for c in conns:
        c.close()
    st = p.stats()
    assert st["connections_total"] == 64 and st["requests"] >= 191


def test_slowloris_does_not_block_other_clients(start_proxy, log_lines):
    limits = fast(head_timeout=2.0)
    p = start_proxy(LOG_SCRIPT, threads=2, limits=limits)
    slow = [Raw(p) for _ in range(6)]  # more slow clients than workers
    stop = threading.Event()
    head = b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100

    def dribble() -> None:
        for i in range(len(head)):
            if stop.is_set():
                return
            for s in slow:
                try:
                    s.send(head[i:i + 1])
                except OSError:
                    pass
            time.sleep(0.1)

    t = threading.Thread(target=dribble)
    t.start()
    try:
        time.sleep(0.3)
        for i in range(10):
            t0 = time.monotonic()
            assert request(p, "GET", f"/fast/{i}").status == 200
            assert time.monotonic() - t0 < 0.5
        # the head deadline runs from the first byte: the slow clients get 408
        replies = [s.read() for s in slow]
        assert {r.status for r in replies} == {408}
        assert all(s.closed() for s in slow)
    finally:
        stop.set()
        t.join()
        for s in slow:
            s.close()
    assert wait_for(lambda: log_lines().count("LOG 408 GET /slow") == 6, 5), log_lines()


# ---- admin and access log ----

def test_admin_stats_json(start_proxy):
    p = start_proxy(LOG_SCRIPT, admin="127.0.0.1:0")
    request(p, "GET", "/s?cc=max-age=60")
    request(p, "GET", "/s?cc=max-age=60")
    wait_for(lambda: p.stats()["requests"] == 2)
    c = http.client.HTTPConnection(*p.admin_address, timeout=5)
    c.request("GET", "/-/stats")
    r = c.getresponse()
    doc = json.loads(r.read())
    assert r.status == 200 and r.getheader("content-type") == "application/json"
    assert doc["host"]["hooks"]["log"]["fires"] == 2
    px = doc["proxy"]
    assert px["requests"] == 2 and px["responses"]["2xx"] == 2
    assert (px["cache"]["hits"], px["cache"]["misses"]) == (1, 1)
    assert px["errors"] == 0 and px["upstream_errors"] == 0 and px["connections_total"] >= 2
    c.request("GET", "/other")
    r = c.getresponse()
    r.read()
    assert r.status == 404


def test_access_log_lines(start_proxy):
    out = io.StringIO()
    p = start_proxy(RESPOND, access_log=out)
    for i, path in enumerate(("/al?cc=max-age=60", "/al?cc=max-age=60", "/deny")):
        request(p, "GET", path)
        # the line is written after the response went out: wait, to know the order
        assert wait_for(lambda: out.getvalue().count("\n") == i + 1, 5)
    lines = out.getvalue().splitlines()
    pat = re.compile(r'^127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] '
                     r'"(GET [^ ]+ HTTP/1\.1)" (\d{3}) (\d+|-) (HIT|MISS|-) (\d+\.\d{3})$')
    parsed = [pat.match(line) for line in lines]
    assert all(parsed), lines
    assert [(m.group(1), m.group(2), m.group(4)) for m in parsed] == [
        ("GET /al?cc=max-age=60 HTTP/1.1", "200", "MISS"),
        ("GET /al?cc=max-age=60 HTTP/1.1", "200", "HIT"),
        ("GET /deny HTTP/1.1", "403", "-")]
    assert parsed[2].group(3) == "7"


def test_proxy_used_from_python_without_a_with_block(make_host, origin):
    from hostscript.proxy import Proxy

    p = Proxy(make_host(), origin.url, "127.0.0.1:0", threads=1, limits=FAST).start()
    try:
        assert request(p, "GET", "/plain").status == 200
    finally:
        assert p.shutdown() is True
    with pytest.raises(OSError):
        socket.create_connection(p.address, timeout=1)


def test_the_examples_through_the_proxy(start_proxy, origin, caplog):
    import logging
    import pathlib

    caplog.set_level(logging.INFO, logger="hostscript")
    root = pathlib.Path(__file__).resolve().parent.parent / "examples"
    scripts = [(root / n).read_text() for n in ("normalize.lua", "stamp.lua", "headers.lua",
                                                "access_log.lua")]
    p = start_proxy(*scripts)
    r = request(p, "GET", "/Shop/Item?utm_source=mail&utm_campaign=autumn&color=red",
                {"X-Internal-User": "spoofed"})
    got = r.json()
    assert got["path"] == "/shop/item?color=red"                 # normalize.lua
    assert header(got, "x-internal-user") == []                  # headers.lua
    assert header(got, "x-forwarded-proto") == ["http"] and header(got, "x-request-id")
    assert r.get("x-elapsed-ms") is not None                     # stamp.lua
    assert r.get("x-content-type-options") == "nosniff" and r.get("server") is None
    assert request(p, "GET", "/", {"X-Deny": "1"}).status == 403
    assert wait_for(lambda: sum("campaign=autumn" in m.getMessage() for m in caplog.records) == 1, 5)


def test_absolute_form_target_and_http10_via(start_proxy, origin):
    p = start_proxy()
    raw = Raw(p)
    raw.send(b"GET http://example.com/abs?q=1 HTTP/1.1\r\nHost: example.com\r\n\r\n")
    got = raw.read().json()
    assert got["path"] == "/abs?q=1" and header(got, "host") == [f"127.0.0.1:{origin.port}"]
    raw.send(b"GET ftp-ish HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.read().status == 400
    raw.close()
    raw = Raw(p)
    raw.send(b"GET /ten HTTP/1.0\r\n\r\n")
    assert header(raw.read().json(), "via") == ["1.0 hostscript"]
    raw.close()


def test_an_answer_before_the_body_reaches_the_client(start_proxy):
    # answered without reading the body: the proxy must not reset the connection
    # (unread bytes at close) before its whole answer is through
    p = start_proxy("""
        local C = {}
        function C:on_read_request(txn) return txn:respond(413, string.rep("y", 3000000)) end
        return C""")
    s = socket.create_connection(p.address, timeout=5)
    s.sendall(b"POST /big-answer HTTP/1.1\r\nHost: x\r\nContent-Length: 9000000\r\n\r\n" + b"a" * 200000)
    time.sleep(0.2)
    data = read_to_close(s)
    s.close()
    assert data.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n")
    assert data.endswith(b"y" * 1000) and len(data.split(b"\r\n\r\n", 1)[1]) == 3000000


def test_upgrade_request_is_served_as_plain_http(start_proxy, origin):
    p = start_proxy()
    raw = Raw(p)
    raw.send(b"GET /h2c HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
             b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\nGET /after-upgrade HTTP/1.1\r\nHost: x\r\n\r\n")
    r = raw.read()
    assert r.status == 200 and r.get("upgrade") is None
    got = r.json()
    assert got["path"] == "/h2c"
    assert header(got, "upgrade") == [] and header(got, "http2-settings") == []
    assert raw.read().json()["path"] == "/after-upgrade"  # the pipelined request behind it
    raw.close()
