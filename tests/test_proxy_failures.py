"""hostscript serve's proxy when things go wrong: the upstream refuses, stalls,
breaks or goes stale; requests are malformed, too large or too slow; handlers
fail. Each time the client gets the documented status, ``log`` fires, and the
next request is served."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from helpers import wait_for
from origin import Origin, free_port
from proxy_helpers import LOG_SCRIPT, Raw, fast, read_to_close, request


def _logged(log_lines, line: str, n: int = 1) -> bool:
    return wait_for(lambda: log_lines().count(line) >= n, 5)


def _counted(p, key: str, n: int) -> bool:
    """The proxy's counter *key* reached *n* (a request is counted after its log
    hook, which runs after the client has its response)."""
    return wait_for(lambda: p.stats()[key] >= n, 5) and p.stats()[key] == n


def test_upstream_refused_is_502_then_served_once_it_is_up(start_proxy, log_lines):
    port = free_port()
    p = start_proxy(LOG_SCRIPT, upstream=f"http://127.0.0.1:{port}")
    r = request(p, "GET", "/down")
    assert r.status == 502 and r.body == b"502 Bad Gateway\n"
    assert _logged(log_lines, "LOG 502 GET /down"), log_lines()
    up = Origin(port)
    try:
        r = request(p, "GET", "/up")
        assert r.status == 200 and r.json()["path"] == "/up"
    finally:
        up.close()
    assert _logged(log_lines, "LOG 200 GET /up") and _counted(p, "requests", 2)
    st = p.stats()
    assert st["upstream_errors"] == 1 and st["responses"]["5xx"] == 1


def test_upstream_slower_than_the_timeout_is_504(start_proxy, log_lines):
    p = start_proxy(LOG_SCRIPT)  # upstream_timeout 0.6 s
    t0 = time.monotonic()
    r = request(p, "GET", "/slow?delay=2")
    assert r.status == 504 and time.monotonic() - t0 < 1.8
    assert _logged(log_lines, "LOG 504 GET /slow?delay=2"), log_lines()
    assert request(p, "GET", "/quick").status == 200
    assert _counted(p, "upstream_errors", 1)


def test_upstream_stalling_mid_body_cuts_the_client_short(start_proxy, log_lines):
    p = start_proxy(LOG_SCRIPT)
    raw = Raw(p)
    raw.send(b"GET /stall?size=5000&slowbody=2 HTTP/1.1\r\nHost: x\r\n\r\n")
    r = raw.read()  # the head went out: the proxy can only close the connection
    assert r.status == 200 and r.get("content-length") == "5000" and len(r.body) < 5000
    assert raw.closed()
    raw.close()
    assert _logged(log_lines, "LOG 200 GET /stall?size=5000&slowbody=2")
    assert _counted(p, "upstream_errors", 1)
    assert request(p, "GET", "/next").status == 200


@pytest.mark.parametrize("data, status", [
    (b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # TLS to a plain port
    (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nX-Big: " + b"v" * (70 << 10) + b"\r\n\r\n", 431),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"POST /up HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n", 413),
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 501),
    # the ways to make a proxy and its origin disagree on where a request ends
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),            # space before the colon
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),  # obsolete line folding
    (b"GET / HTTP/1.1\nHost: a\n\n", 400),                       # bare LF line ends
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),    # NUL in a value
])
def test_bad_requests_are_refused_then_the_next_is_served(start_proxy, log_lines, origin, data, status):
    p = start_proxy(LOG_SCRIPT)
    raw = Raw(p)
    raw.send(data)
    r = raw.read()
    assert r.status == status and r.get("connection") == "close"
    assert raw.closed()
    raw.close()
    assert wait_for(lambda: any(line.startswith(f"LOG {status} ") for line in log_lines()), 5), log_lines()
    assert request(p, "GET", "/next").status == 200
    assert _counted(p, "requests", 2)
    assert origin.count("/smuggled") == 0 and origin.count("/") == 0
    st = p.stats()
    assert st["client_errors"] == 1 and st["responses"]["4xx" if status < 500 else "5xx"] == 1


def test_chunked_body_over_the_limit_is_413(start_proxy, log_lines, origin):
    limits = fast(max_body=1000)
    p = start_proxy(LOG_SCRIPT, limits=limits)
    raw = Raw(p)
    raw.send(b"POST /big-chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
             + b"%x\r\n%b\r\n" % (800, b"a" * 800))
    time.sleep(0.05)
    raw.send(b"%x\r\n%b\r\n0\r\n\r\n" % (800, b"b" * 800))
    r = raw.read()
    assert r.status == 413 and raw.closed()
    raw.close()
    assert _logged(log_lines, "LOG 413 POST /big-chunked")
    assert request(p, "GET", "/next").status == 200


def test_413_reaches_a_client_that_sends_its_body_anyway(start_proxy):
    limits = fast(max_body=1000)
    p = start_proxy(limits=limits)
    s = socket.create_connection(p.address, timeout=5)
    s.sendall(b"POST /too-big HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n" + b"a" * 300000)
    data = read_to_close(s)
    s.close()
    assert data.startswith(b"HTTP/1.1 413 ") and data.endswith(b"413 Request Entity Too Large\n")


def test_request_body_too_slow_is_408(start_proxy, log_lines):
    p = start_proxy(LOG_SCRIPT)  # body_timeout 1 s
    raw = Raw(p)
    raw.send(b"POST /slow-body HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    r = raw.read()
    assert r.status == 408 and raw.closed()
    raw.close()
    assert _logged(log_lines, "LOG 408 POST /slow-body")


def test_idle_keep_alive_connection_is_closed(start_proxy):
    limits = fast(idle_timeout=0.4)
    p = start_proxy(limits=limits)
    raw = Raw(p)
    raw.send(b"GET /idle HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.read().status == 200
    t0 = time.monotonic()
    assert raw.closed(timeout=3)
    assert 0.3 < time.monotonic() - t0 < 2
    raw.close()
    wait_for(lambda: p.stats()["connections"] == 0, 2)
    assert p.stats()["connections"] == 0


@pytest.mark.parametrize("hook", ["read_request", "send_request", "read_response", "send_response"])
def test_handler_error_is_500_and_the_next_request_is_served(start_proxy, log_lines, hook):
    p = start_proxy(f"""
        local C = {{}}
        function C:on_{hook}(txn)
          if txn.req.headers["x-boom"] then error("boom in {hook}") end
          if txn.resp and txn.resp.status then txn.resp.headers["x-ok"] = "{hook}" end
        end
        return C""", LOG_SCRIPT)
    conn = __import__("http.client").client.HTTPConnection(*p.address, timeout=10)
    r = request(p, "GET", "/boom", {"X-Boom": "1"}, conn=conn)
    assert r.status == 500 and r.body == b"500 Internal Server Error\n"
    r = request(p, "GET", "/fine", conn=conn)  # same keep-alive connection
    assert r.status == 200 and r.json()["path"] == "/fine"
    conn.close()
    assert _logged(log_lines, "LOG 500 GET /boom"), log_lines()
    assert _logged(log_lines, "LOG 200 GET /fine")
    assert _counted(p, "requests", 2) and p.stats()["errors"] == 1
    assert p.host.stats()["hooks"][hook]["errors"] == 1


def test_handler_error_is_logged_by_the_host(start_proxy, caplog):
    import logging

    caplog.set_level(logging.ERROR, logger="hostscript")
    p = start_proxy("""
        local C = {}
        function C:on_read_request(txn) error("kaboom") end
        return C""")
    assert request(p, "GET", "/x").status == 500
    assert any("kaboom" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


def test_log_handler_error_does_not_break_serving(start_proxy):
    p = start_proxy("""
        local C = {}
        function C:on_log(txn) error("log fails") end
        return C""")
    for i in range(3):
        assert request(p, "GET", f"/l{i}").status == 200
    wait_for(lambda: p.host.stats()["hooks"]["log"]["errors"] == 3, 5)
    assert p.host.stats()["hooks"]["log"]["errors"] == 3


def _raw_upstream(handler) -> tuple:
    """A listening socket whose connections are served by handler(conn, index)."""
    ls = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    count = [0]

    def loop() -> None:
        ls.settimeout(0.1)
        while not stop.is_set():
            try:
                c, _ = ls.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            count[0] += 1
            threading.Thread(target=handler, args=(c, count[0]), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return f"http://127.0.0.1:{ls.getsockname()[1]}", stop, ls, count


def _read_head(c: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        got = c.recv(4096)
        if not got:
            return b""
        data += got
    return data


def test_malformed_upstream_response_is_502(start_proxy, log_lines):
    def handler(c: socket.socket, _: int) -> None:
        _read_head(c)
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\nhello")
        c.close()

    url, stop, ls, _ = _raw_upstream(handler)
    try:
        p = start_proxy(LOG_SCRIPT, upstream=url)
        assert request(p, "GET", "/bad-upstream").status == 502
        assert _logged(log_lines, "LOG 502 GET /bad-upstream")
    finally:
        stop.set()
        ls.close()


def test_stale_pooled_connection_is_retried_once(start_proxy):
    # each upstream connection answers one request, then closes when the next arrives
    def handler(c: socket.socket, n: int) -> None:
        _read_head(c)
        body = b"conn %d" % n
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        _read_head(c)
        c.close()

    url, stop, ls, count = _raw_upstream(handler)
    try:
        p = start_proxy(upstream=url)
        assert request(p, "GET", "/one").body == b"conn 1"
        r = request(p, "GET", "/two")  # the pooled connection is dead once used: retried on conn 2
        assert (r.status, r.body) == (200, b"conn 2")
        st = p.stats()["upstream"]
        assert st["retries"] == 1 and st["reuses"] >= 1
        # a POST is not replayed: 502
        r = request(p, "POST", "/three", body=b"x")
        assert r.status == 502
    finally:
        stop.set()
        ls.close()


def test_pooled_connections_closed_by_the_upstream_are_not_reused(start_proxy, origin):
    from origin import _Handler

    p = start_proxy()
    _Handler.timeout = 0.2  # the origin closes idle connections after 0.2 s
    try:
        assert request(p, "GET", "/p1").status == 200
        time.sleep(0.4)
        assert request(p, "GET", "/p2").status == 200
    finally:
        _Handler.timeout = None
    st = p.stats()["upstream"]
    assert st["connects"] == 2 and st["retries"] == 0


def test_proxy_keeps_serving_after_each_failure(start_proxy, origin):
    p = start_proxy("""
        local C = {}
        function C:on_read_request(txn) if txn.req.uri == "/err" then error("x") end end
        return C""")
    for _ in range(3):
        assert request(p, "GET", "/err").status == 500
        raw = Raw(p)
        raw.send(b"BROKEN\r\n\r\n")
        assert raw.read().status == 400
        raw.close()
        assert request(p, "GET", "/slow?delay=1").status == 504
        assert request(p, "GET", "/ok").status == 200
    assert _counted(p, "requests", 12)
    st = p.stats()
    assert st["responses"]["2xx"] == 3 and st["responses"]["5xx"] == 6 and st["responses"]["4xx"] == 3


def test_accepting_pauses_at_max_connections(start_proxy):
    limits = fast(max_connections=2)
    p = start_proxy(limits=limits)
    a, b = Raw(p), Raw(p)
    a.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert a.read().status == 200
    wait_for(lambda: p.stats()["connections"] == 2, 2)
    c = Raw(p, timeout=0.4)  # the kernel completes the handshake; the proxy does not accept
    c.send(b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(socket.timeout):
        c.sock.recv(1, socket.MSG_PEEK)
    b.close()  # room again: c is accepted and served
    c.sock.settimeout(5)
    assert c.read().status == 200
    assert p.stats()["connections_total"] == 3
    a.close()
    c.close()


def test_endless_upstream_head_is_502(start_proxy):
    def handler(c: socket.socket, _: int) -> None:
        _read_head(c)
        try:
            c.sendall(b"HTTP/1.1 200 OK\r\n")
            for i in range(100000):
                c.sendall(b"X-Filler-%d: %s\r\n" % (i, b"v" * 100))
        except OSError:
            pass
        c.close()

    url, stop, ls, _ = _raw_upstream(handler)
    try:
        p = start_proxy(upstream=url)
        assert request(p, "GET", "/endless").status == 502
    finally:
        stop.set()
        ls.close()


def test_request_body_trickled_below_min_rate_is_408(start_proxy, log_lines):
    # ten bytes every 0.2 s never let body_timeout (1 s) pass; min_rate still ends it
    limits = fast(min_rate=1000)
    p = start_proxy(LOG_SCRIPT, limits=limits)
    s = socket.create_connection(p.address, timeout=0.2)
    s.sendall(b"POST /trickle HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
    started, answer = time.monotonic(), b""
    while time.monotonic() - started < 6 and b"\r\n" not in answer:
        try:
            s.sendall(b"0123456789")
            answer += s.recv(4096)
        except socket.timeout:
            continue
        except OSError:
            break
    s.close()
    assert answer.startswith(b"HTTP/1.1 408 ") and time.monotonic() - started < 4, answer
    assert _logged(log_lines, "LOG 408 POST /trickle")
    assert request(p, "GET", "/next").status == 200


def test_response_read_below_min_rate_frees_the_worker(start_proxy):
    # each write finishes within send_timeout (2 s), but the whole response would take
    # five minutes at this reader's ~100 KB/s: min_rate frees the one worker
    limits = fast(send_timeout=2.0, min_rate=10_000_000)
    p = start_proxy(limits=limits, threads=1)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(p.address)
    s.sendall(b"GET /big?size=30000000 HTTP/1.1\r\nHost: x\r\n\r\n")
    started, got = time.monotonic(), 0
    while time.monotonic() - started < 4:  # what the kernel buffered still arrives after
        data = s.recv(2048)                # the proxy gave up: watch the worker instead
        assert data
        got += len(data)
        time.sleep(0.02)
    assert got < 1_000_000
    r = request(p, "GET", "/next", timeout=3)
    assert r.status == 200
    s.close()
