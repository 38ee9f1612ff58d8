"""hostscript serve's proxy under attack: hostile request bytes, hostile upstream
bytes, hostile handler scripts. Each test is one attack on real sockets (both
engines); it asserts what the client, the next client and the origin observe, and
that the proxy goes on serving."""
from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from typing import Callable, List

import pytest

from helpers import wait_for
from origin import header
from proxy_helpers import Raw, fast, read_to_close, request


class RawOrigin:
    """An origin speaking raw bytes: ``answer(path, n)`` returns what is written for
    the n-th request (a list of bytes is written piece by piece, 50 ms apart). Reads
    request heads (and Content-Length bodies) on keep-alive connections."""

    def __init__(self, answer: Callable[[str, int], object]) -> None:
        self.answer = answer
        self.heads: List[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.conns: List[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = c.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        n = int(line.split(b":")[1])
                        while len(buf) < n:
                            buf += c.recv(65536)
                        buf = buf[n:]
                self.heads.append(head)
                path = head.split(b" ")[1].decode()
                out = self.answer(path, len(self.heads))
                if out is None:  # never answer
                    time.sleep(30)
                    return
                if isinstance(out, bytes):
                    c.sendall(out)
                else:
                    for piece in out:
                        c.sendall(piece)
                        time.sleep(0.05)
        except OSError:
            pass

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


@pytest.fixture
def raw_origin():
    made: List[RawOrigin] = []

    def make(answer: Callable[[str, int], object]) -> RawOrigin:
        o = RawOrigin(answer)
        made.append(o)
        return o

    yield make
    for o in made:
        o.close()


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), extra, body)


SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Smuggled: 1\r\n\r\nSMUGGLED"


def _not_smuggled(r) -> bool:
    return r.get("x-smuggled") is None and b"SMUGGLED" not in r.body


# ---- the upstream poisons its pooled connection ----

@pytest.mark.parametrize("first", [
    ok(b"first") + SMUGGLED,                                            # a second response at once
    ok(b"first") + b"HTTP/1.1 200 OK\r\nContent-Le",                   # half a response
    b"HTTP/1.1 204 No Content\r\n\r\n" + SMUGGLED,                      # 204 "with a body"
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 8\r\n\r\n" + SMUGGLED,  # 304 "with a body"
    b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"first") + SMUGGLED,         # 1xx, then two finals
    [ok(b"first"), SMUGGLED],                                          # the extra one a bit later
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nfirst\r\n0\r\n\r\n" + SMUGGLED,                                  # CL and TE
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 13\r\n\r\nfirst" + SMUGGLED,
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nfirst\r\n0\r\n\r\n" + SMUGGLED,
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n0\r\nX-T: 1\r\n\r\n" + SMUGGLED,
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n" + SMUGGLED,
    b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n" + SMUGGLED,
])
def test_upstream_extra_bytes_never_reach_the_next_client(start_proxy, raw_origin, first):
    o = raw_origin(lambda path, n: first if path == "/first" else ok(b"second"))
    p = start_proxy(upstream=o.url, threads=1, cache_size=0)
    try:
        r1 = request(p, "GET", "/first")
        assert r1.status in (200, 204, 304, 502) and _not_smuggled(r1)
    except http.client.IncompleteRead as exc:  # a close-delimited body the origin never closes
        assert b"SMUGGLED" in exc.partial or exc.partial.startswith(b"5\r\nfirst")
    time.sleep(0.2)
    for _ in range(3):
        r2 = request(p, "GET", "/second")
        assert r2.status == 200 and r2.body == b"second", r2


def test_upstream_head_response_with_a_body_does_not_poison_the_pool(start_proxy, raw_origin):
    o = raw_origin(lambda path, n: ok(b"12345678") if path == "/h" else ok(b"second"))
    p = start_proxy(upstream=o.url, threads=1, cache_size=0)
    raw = Raw(p)
    raw.send(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\nGET /s HTTP/1.1\r\nHost: x\r\n\r\n")
    r1 = raw.read(head_only=True)
    assert r1.status == 200 and r1.get("content-length") == "8"
    r2 = raw.read()
    assert r2.status == 200 and r2.body == b"second"
    raw.close()


# ---- handlers break the proxy's framing ----

HEAD_UPSTREAM = """
local C = {}
function C:on_send_request(txn)
  if txn.req.headers["x-head"] then txn.req.method = "HEAD" end
end
return C
"""

TO_200 = """
local C = {}
function C:on_send_response(txn)
  if txn.resp.status == 304 then txn.resp.status = 200 end
end
return C
"""


@pytest.mark.parametrize("script, first_request, upstream_head", [
    # send_request turns the GET into a HEAD: the upstream answers with the GET's
    # Content-Length and no body
    (HEAD_UPSTREAM, b"GET /first HTTP/1.1\r\nHost: x\r\nX-Head: 1\r\n\r\n",
     b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),
    # send_response turns a 304 (which has no body whatever its length says) into a 200
    (TO_200, b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n",
     b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"),
], ids=["get-made-head", "304-made-200"])
def test_a_handler_changing_the_exchange_keeps_the_framing(start_proxy, raw_origin, script,
                                                           first_request, upstream_head):
    # the client must not be promised 10 bytes that never come, or the next response
    # on its connection becomes that body
    o = raw_origin(lambda path, n: upstream_head if path == "/first" else ok(b"second"))
    p = start_proxy(script, upstream=o.url, cache_size=0)
    raw = Raw(p, timeout=5)
    raw.send(first_request + b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
    r1 = raw.read()
    assert r1.status == 200 and len(r1.body) == int(r1.get("content-length", "0") or 0)
    if r1.get("connection") != "close":
        r2 = raw.read()
        assert r2.status == 200 and r2.body == b"second"
    raw.close()


INTERIM = """
local C = {}
function C:on_read_request(txn)
  local s = txn.req.headers["x-respond"]
  if s then return txn:respond(tonumber(s), "interim?") end
end
function C:on_send_response(txn)
  local s = txn.req.headers["x-status"]
  if s then txn.resp.status = tonumber(s) end
end
return C
"""


@pytest.mark.parametrize("hdr", ["X-Respond", "X-Status"])
@pytest.mark.parametrize("status", [100, 101, 103])
def test_a_handler_1xx_status_is_never_a_final_response(start_proxy, origin, hdr, status):
    # an interim status ends nothing: a client pipelining a second request would take
    # that one's response for the first one's
    p = start_proxy(INTERIM)
    raw = Raw(p, timeout=5)
    raw.send(b"GET /a HTTP/1.1\r\nHost: x\r\n%b: %d\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"
             % (hdr.encode(), status))
    r1 = raw.read()
    assert r1.status >= 200, r1
    if r1.get("connection") != "close":
        r2 = raw.read()
        assert r2.status == 200 and r2.json()["path"] == "/b"
    raw.close()
    assert request(p, "GET", "/after").status == 200


HEAD_BODY = """
local C = {}
function C:on_read_request(txn)
  if txn.req.uri == "/r" then return txn:respond(tonumber(txn.req.headers["x-s"] or 200), "handler body") end
end
function C:on_send_response(txn)
  if txn.req.uri == "/sb" then txn.resp.body = "body from send_response" end
end
return C
"""


@pytest.mark.parametrize("first", [
    b"HEAD /r HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD /sb HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /r HTTP/1.1\r\nHost: x\r\nX-S: 204\r\n\r\n",
    b"GET /r HTTP/1.1\r\nHost: x\r\nX-S: 304\r\n\r\n",
    b"GET /sb?status=204 HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_handler_bodies_on_bodiless_responses_are_not_sent(start_proxy, origin, first):
    p = start_proxy(HEAD_BODY)
    raw = Raw(p, timeout=5)
    raw.send(first + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    r1 = raw.read(head_only=first.startswith(b"HEAD"))  # HEAD, 204, 304: no body
    r2 = raw.read()
    assert r2.status == 200 and r2.json()["path"] == "/next", (r1, r2)
    raw.close()


# ---- cache poisoning ----

VARY_REWRITE = """
local C = {}
function C:on_send_request(txn)
  -- the origin varies on X-User, which the handler derives from the cookie
  txn.req.headers["x-user"] = txn.req.headers["cookie"] or "anon"
end
return C
"""


def test_vary_on_a_header_send_request_rewrote_is_not_shared(start_proxy, origin):
    p = start_proxy(VARY_REWRITE)
    a = request(p, "GET", "/me?cc=max-age=60&vary=X-User", {"Cookie": "alice"})
    assert a.status == 200 and a.json()["varied"] == "alice"
    b = request(p, "GET", "/me?cc=max-age=60&vary=X-User", {"Cookie": "bob"})
    assert b.status == 200 and b.json()["varied"] == "bob", "bob got alice's response"


def test_vary_on_x_forwarded_for_is_not_shared_across_clients(start_proxy, origin):
    # the origin saw X-Forwarded-For with the proxy's peer appended; the lookup sees
    # the client's field: two clients sending the same one must not share
    p = start_proxy()
    a = request(p, "GET", "/xff?cc=max-age=60&vary=X-Forwarded-For")
    assert a.status == 200 and a.json()["varied"] == "127.0.0.1"
    b = request(p, "GET", "/xff?cc=max-age=60&vary=X-Forwarded-For", {"X-Forwarded-For": "10.9.9.9"})
    assert b.json()["varied"] == "10.9.9.9, 127.0.0.1"


def test_vary_on_a_field_the_client_made_hop_by_hop_is_not_stored(start_proxy, origin):
    # Connection: accept-language drops Accept-Language on the way up: the origin's
    # default variant must not be stored as the "fr" one
    p = start_proxy()
    url = "/lang?cc=max-age=60&vary=Accept-Language"
    a = request(p, "GET", url, {"Accept-Language": "fr", "Connection": "accept-language"})
    assert a.json()["varied"] == ""
    b = request(p, "GET", url, {"Accept-Language": "fr"})
    assert b.get("x-cache") == "MISS" and b.json()["varied"] == "fr"
    c = request(p, "GET", url, {"Accept-Language": "fr"})
    assert c.get("x-cache") == "HIT" and c.json()["varied"] == "fr"


def test_authorization_added_by_send_request_is_not_shared(start_proxy, origin):
    script = """
    local C = {}
    function C:on_send_request(txn)
      local u = txn.req.headers["x-user"]
      if u then txn.req.headers["authorization"] = "Basic " .. u end
    end
    return C
    """
    p = start_proxy(script)
    a = request(p, "GET", "/private?cc=max-age=60", {"X-User": "alice"})
    assert header(a.json(), "authorization") == ["Basic alice"]
    b = request(p, "GET", "/private?cc=max-age=60", {"X-User": "bob"})
    assert b.get("x-cache") == "MISS" and header(b.json(), "authorization") == ["Basic bob"]


def test_a_get_with_a_body_is_not_stored(start_proxy, origin):
    # "fat GET": an origin that reads GET bodies answers this one from the body; the
    # cache keys no body, so storing it would serve it for the bodiless GET
    p = start_proxy()
    r = request(p, "GET", "/fat?cc=max-age=60", body=b"evil")
    assert r.json()["body"] == "evil"
    r = request(p, "GET", "/fat?cc=max-age=60")
    assert r.get("x-cache") == "MISS" and r.json()["body"] == ""
    assert request(p, "GET", "/fat?cc=max-age=60").get("x-cache") == "HIT"


def test_absolute_form_host_does_not_split_or_poison_the_cache(start_proxy, origin):
    p = start_proxy()
    raw = Raw(p)
    raw.send(b"GET http://evil.example/abs?cc=max-age=60 HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    r = raw.read()
    raw.close()
    assert r.status == 200
    assert header(r.json(), "host") == [f"127.0.0.1:{origin.port}"]  # the origin never sees evil
    r2 = request(p, "GET", "/abs?cc=max-age=60", {"Host": "good.example"})
    assert r2.get("x-cache") == "HIT" and origin.count("/abs?cc=max-age=60") == 1


def test_no_store_for_authorization_cookies_or_set_cookie(start_proxy, origin):
    p = start_proxy()
    request(p, "GET", "/auth?cc=max-age=60", {"Authorization": "Bearer alice"})
    r = request(p, "GET", "/auth?cc=max-age=60")
    assert r.get("x-cache") == "MISS" and header(r.json(), "authorization") == []
    request(p, "GET", "/sc?cc=max-age=60&cookie=1")
    assert request(p, "GET", "/sc?cc=max-age=60&cookie=1").get("x-cache") == "MISS"
    request(p, "GET", "/pc?cc=private,max-age=60")
    assert request(p, "GET", "/pc?cc=private,max-age=60").get("x-cache") == "MISS"


def test_head_from_a_get_entry_has_the_get_length_and_no_body(start_proxy, origin):
    p = start_proxy()
    g = request(p, "GET", "/hg?cc=max-age=60&size=1234&chunked=1")
    assert g.status == 200 and len(g.body) == 1234
    raw = Raw(p)
    raw.send(b"HEAD /hg?cc=max-age=60&size=1234&chunked=1 HTTP/1.1\r\nHost: x\r\n\r\n"
             b"GET /n HTTP/1.1\r\nHost: x\r\n\r\n")
    h = raw.read(head_only=True)
    assert h.get("x-cache") == "HIT" and h.get("content-length") == "1234"
    assert h.get("transfer-encoding") is None
    n = raw.read()
    assert n.status == 200 and n.json()["path"] == "/n"
    raw.close()


def test_many_vary_variants_of_one_url_stay_bounded(start_proxy, origin):
    # Vary on a header the client picks: every value is a new variant of one key,
    # and every lookup of that URL walks them all under the cache's lock
    from hostscript.proxy import cache as cache_mod
    p = start_proxy()
    for i in range(cache_mod.MAX_VARIANTS + 20):
        p.cache.store("GET", "http://o/v", b"", [("User-Agent", f"ua{i}")], 200,
                      [("Cache-Control", "max-age=60"), ("Vary", "User-Agent")], b"x")
    assert len(p.cache._variants[("GET", "http://o/v", b"")]) <= cache_mod.MAX_VARIANTS
    # the newest are kept
    assert p.cache.lookup("GET", "http://o/v", b"", [("User-Agent", f"ua{cache_mod.MAX_VARIANTS + 19}")])
    r = request(p, "GET", "/vv?cc=max-age=60&vary=User-Agent", {"User-Agent": "x"})
    assert r.status == 200


# ---- request smuggling and pipelining ----

@pytest.mark.parametrize("attack", [
    # a refused request followed by one that must never reach the origin
    b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\n\r\n",
    b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 40\r\n\r\nabc",
    b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
    b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n",
    b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \x0bchunked\r\n\r\n",
    b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
    b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0x3\r\n\r\nabc",
    b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
    b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
    b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFF\r\n",
    b"GET /a HTTP/1.1\r\nHost: x\r\nX: a\rGET /smuggled HTTP/1.1\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    b"GET /a\x1b[31m HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
])
def test_malformed_framing_never_forwards_what_follows(start_proxy, origin, attack):
    p = start_proxy()
    raw = Raw(p, timeout=5)
    raw.send(attack + b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
    statuses = []
    try:
        while True:
            r = raw.read()
            statuses.append(r.status)
            if r.get("connection") == "close":
                break
    except (ConnectionError, OSError):
        pass
    raw.close()
    assert statuses and statuses[-1] >= 400, statuses
    time.sleep(0.1)
    assert not any(r["path"] == "/smuggled" for r in origin.requests), origin.requests
    assert request(p, "GET", "/after").status == 200


def test_pipelined_requests_after_an_answered_body_request(start_proxy, origin):
    # a handler answers without reading the body: the body bytes (a whole request,
    # here) must not be served as a request of their own
    script = """
    local C = {}
    function C:on_read_request(txn)
      if txn.req.uri == "/deny" then return txn:respond(403, "no") end
    end
    return C
    """
    p = start_proxy(script)
    raw = Raw(p, timeout=5)
    inner = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    raw.send(b"POST /deny HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    r = raw.read()
    assert r.status == 403
    try:
        raw.send(b"%x\r\n%b\r\n0\r\n\r\n" % (len(inner), inner))
    except OSError:
        pass
    raw.close()
    raw = Raw(p, timeout=5)
    raw.send(b"POST /deny HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b"
             % (len(inner), inner))
    r = raw.read()
    assert r.status == 403
    raw.close()
    time.sleep(0.2)
    assert not any(r["path"] == "/smuggled" for r in origin.requests)
    assert request(p, "GET", "/after").status == 200


def test_expect_100_continue_refused_by_a_handler_sends_no_100(start_proxy, origin):
    script = """
    local C = {}
    function C:on_read_request(txn) if txn.req.uri == "/deny" then return txn:respond(403, "no") end end
    return C
    """
    p = start_proxy(script)
    raw = Raw(p, timeout=5)
    raw.send(b"POST /deny HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    r = raw.read()
    assert r.status == 403 and r.get("connection") == "close"
    raw.close()
    raw = Raw(p, timeout=5)
    raw.send(b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    r = raw.read()
    assert r.status == 100
    raw.send(b"hello")
    r = raw.read()
    assert r.status == 200 and r.json()["body"] == "hello"
    assert header(r.json(), "expect") == []
    raw.close()


def test_a_million_tiny_chunks_and_chunk_extensions_are_bounded(start_proxy, origin):
    p = start_proxy(limits=fast(max_body=1000))
    raw = Raw(p, timeout=10)
    raw.send(b"POST /tiny HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    try:
        raw.send((b"1;ext=" + b"e" * 100 + b"\r\nx\r\n") * 2000)
    except OSError:
        pass
    r = raw.read()
    assert r.status == 413
    raw.close()
    # trailers: counted against the header limit, not forwarded
    raw = Raw(p, timeout=10)
    raw.send(b"POST /tr HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"3\r\nabc\r\n0\r\nX-Trailer: evil\r\nHost: evil\r\n\r\n")
    r = raw.read()
    assert r.status == 200 and r.json()["body"] == "abc"
    assert header(r.json(), "x-trailer") == [] and header(r.json(), "host") == [f"127.0.0.1:{origin.port}"]
    raw.close()


def test_header_injection_through_the_upstream(start_proxy, raw_origin):
    bad = [b"HTTP/1.1 200 OK\r\nX-A: a\rSet-Cookie: evil\r\nContent-Length: 2\r\n\r\nok",
           b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
           b"HTTP/1.1 200 OK\r\nX-A: a\r\n folded: evil\r\nContent-Length: 2\r\n\r\nok"]
    o = raw_origin(lambda path, n: bad[int(path[1:])] if path[1:].isdigit() else ok(b"fine"))
    p = start_proxy(upstream=o.url, cache_size=0)
    for i in range(len(bad)):
        raw = Raw(p, timeout=5)
        raw.send(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
        r = raw.read()
        raw.close()
        assert r.status in (200, 502)
        assert r.get("set-cookie") is None and r.get("folded") is None
        assert all("\r" not in v and "\n" not in v and "\x00" not in v for _, v in r.headers)
    assert request(p, "GET", "/fine").body == b"fine"


# ---- resources and hangs ----

def test_a_client_that_never_reads_frees_its_worker(start_proxy, origin):
    lim = fast(send_timeout=0.5)
    p = start_proxy(limits=lim, threads=1)
    s = socket.create_connection(p.address)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(b"GET /big?size=20000000 HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)
    t0 = time.monotonic()
    r = request(p, "GET", "/after", timeout=10)  # waits for the single worker
    assert r.status == 200 and time.monotonic() - t0 < 5
    s.close()


def test_an_upstream_that_never_answers_frees_the_worker(start_proxy, raw_origin):
    o = raw_origin(lambda path, n: None if path == "/hang" else ok(b"fine"))
    p = start_proxy(upstream=o.url, threads=1, cache_size=0)
    t0 = time.monotonic()
    assert request(p, "GET", "/hang").status == 504 and time.monotonic() - t0 < 3
    assert request(p, "GET", "/fine").body == b"fine"


def test_a_never_ending_upstream_body_to_a_gone_client(start_proxy, raw_origin):
    def endless(path, n):
        if path != "/endless":
            return ok(b"fine")
        return [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"] + [b"400\r\n" + b"x" * 1024 + b"\r\n"] * 400
    o = raw_origin(endless)
    p = start_proxy(upstream=o.url, threads=1, cache_size=0)
    s = socket.create_connection(p.address)
    s.sendall(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
    s.recv(100)
    s.close()  # gone mid-body
    t0 = time.monotonic()
    assert request(p, "GET", "/fine").body == b"fine" and time.monotonic() - t0 < 5


def test_a_handler_erroring_in_every_hook(start_proxy, origin):
    script = """
    local C = {}
    for _, h in ipairs({"read_request", "send_request", "read_response", "send_response", "log"}) do
      C["on_" .. h] = function(self, txn) error("boom in " .. h) end
    end
    return C
    """
    p = start_proxy(script)
    for _ in range(3):
        raw = Raw(p, timeout=5)
        raw.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw.read().status == 500
        assert raw.read().status == 500
        raw.close()
    assert not origin.requests


def test_shutdown_with_a_slow_client_is_bounded(start_proxy, origin):
    lim = fast(send_timeout=30.0)
    p = start_proxy(limits=lim)
    s = socket.create_connection(p.address)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(b"GET /big?size=20000000 HTTP/1.1\r\nHost: x\r\n\r\n")
    idle = socket.create_connection(p.address)
    time.sleep(0.3)
    t0 = time.monotonic()
    drained = p.shutdown(timeout=1)
    assert not drained and time.monotonic() - t0 < 4
    idle.settimeout(2)
    assert idle.recv(10) == b""  # the idle connection was closed
    s.close()
    idle.close()


def test_many_connections_past_the_limit_pause_then_resume(start_proxy, origin):
    lim = fast(max_connections=20, idle_timeout=0.5)
    p = start_proxy(limits=lim)
    socks = [socket.create_connection(p.address) for _ in range(40)]
    time.sleep(0.2)
    assert p.stats()["connections"] <= 20
    for s in socks:
        s.close()
    assert wait_for(lambda: p.stats()["connections"] == 0, 5)
    assert request(p, "GET", "/after").status == 200


def test_access_log_lines_cannot_be_forged(start_proxy, origin, tmp_path):
    path = tmp_path / "access.log"
    p = start_proxy(access_log=str(path))
    raw = Raw(p, timeout=5)
    raw.send(b'GET /a"\x201.2.3.4 HTTP/1.1\r\nHost: x\r\n\r\n')
    try:
        raw.read()
    except ConnectionError:
        pass
    raw.close()
    raw = Raw(p, timeout=5)
    raw.send(b"GET /b\x0a127.0.0.1 - - [forged] HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        raw.read()
    except ConnectionError:
        pass
    raw.close()
    assert request(p, "GET", "/c").status == 200
    assert request(p, "GET", '/q"x\\"').status == 200  # quotes llhttp lets through
    p.shutdown(timeout=2)
    lines = path.read_text("latin-1").splitlines()
    assert any('"GET /q\\"x\\\\\\" HTTP/1.1" 200 ' in line for line in lines), lines
    assert all(re.fullmatch(r'127\.0\.0\.1 - - \[[^]]+\] "(?:[^"\\]|\\.)*" \d{3} (?:\d+|-) \S+ [\d.]+',
                            line) for line in lines), lines
    assert not any("forged" in line for line in lines), lines
    assert all(line.startswith("127.0.0.1 - - [") for line in lines), lines


def test_pipelined_upgrade_requests_are_plain_requests(start_proxy, origin):
    p = start_proxy()
    raw = Raw(p, timeout=5)
    up = b"GET /u%d HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    raw.send(up % 1 + up % 2 + up % 3 + b"GET /n HTTP/1.1\r\nHost: x\r\n\r\n")
    paths = [raw.read().json()["path"] for _ in range(4)]
    assert paths == ["/u1", "/u2", "/u3", "/n"]
    assert all(header(r, "upgrade") == [] for r in origin.requests)
    raw.close()
    raw = Raw(p, timeout=5)
    raw.send(b"POST /ub HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Content-Length: %d\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n" % 36)
    r = raw.read()
    assert r.status == 501 and raw.closed()
    raw.close()
    time.sleep(0.1)
    assert not any(r["path"] in ("/smuggled", "/ub") for r in origin.requests)


def test_resets_and_half_closes_do_not_leak_or_stop_the_selector(start_proxy, origin):
    import struct
    p = start_proxy()
    for i in range(50):
        s = socket.create_connection(p.address)
        if i % 2:
            s.sendall(b"GET /rst HTTP/1.1\r\nHost: x\r\n")  # half a head, then a reset
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    s = socket.create_connection(p.address)
    s.sendall(b"GET /half HTTP/1.1\r\nHost: x\r\n\r\n")
    s.shutdown(socket.SHUT_WR)  # the request is whole: it is still answered
    s.settimeout(5)
    data = read_to_close(s)
    s.close()
    assert data.startswith(b"HTTP/1.1 200 ")
    assert wait_for(lambda: p.stats()["connections"] == 0, 5), p.stats()
    assert request(p, "GET", "/after").status == 200


def test_an_endless_1xx_stream_from_the_upstream_is_bounded(start_proxy, raw_origin):
    o = raw_origin(lambda path, n: b"HTTP/1.1 100 Continue\r\n\r\n" * 20000 if path == "/x"
                   else ok(b"fine"))
    p = start_proxy(upstream=o.url, cache_size=0)
    assert request(p, "GET", "/x").status == 502
    assert request(p, "GET", "/fine").body == b"fine"


def test_key_header_example_does_not_share_generations_across_hosts(start_proxy, origin):
    # examples/key_header.lua numbers a URL's secondary keys per Host + path, but the
    # proxy's cache keys on the upstream URL (no client Host): generation 1 of
    # Host "evil" must not be generation 1 of Host "good"
    from helpers import ROOT
    src = (ROOT / "examples" / "key_header.lua").read_text()
    p = start_proxy(src, host_kw={"shared": {"meta": 1 << 20}})
    url = "/k?cc=max-age=60&hdr=Key:X-V;div=1"
    a = request(p, "GET", url, {"Host": "good", "X-V": "1"})
    assert header(a.json(), "x-v") == ["1"]
    assert request(p, "GET", url, {"Host": "good", "X-V": "1"}).get("x-cache") == "HIT"
    # the attacker learns its own generation 1, then refreshes the entry it maps to
    request(p, "GET", url, {"Host": "evil", "X-V": "2"})
    request(p, "GET", url, {"Host": "evil", "X-V": "2", "Cache-Control": "no-cache"})
    r = request(p, "GET", url, {"Host": "good", "X-V": "1"})
    assert header(r.json(), "x-v") == ["1"], "good's variant was replaced by evil's"


def test_a_huge_streamed_chunked_body_is_cut_at_max_body(start_proxy, origin):
    p = start_proxy(limits=fast(max_body=100_000))
    raw = Raw(p, timeout=10)
    raw.send(b"POST /huge HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    time.sleep(0.1)  # the head goes to a worker alone: the body is streamed upstream
    try:
        for _ in range(50):
            raw.send(b"1000\r\n" + b"z" * 0x1000 + b"\r\n")
    except OSError:
        pass
    r = raw.read()
    assert r.status == 413 and r.get("connection") == "close"
    raw.close()
    time.sleep(0.2)
    assert not any(r["path"] == "/huge" for r in origin.requests)  # never a complete request
    assert request(p, "GET", "/after").status == 200
