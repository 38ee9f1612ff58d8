"""The Traffic Server plugin (hosts/ats, build/ats/hostscript_ats_<engine>.so) in a
private traffic_server on loopback (tests/ats_server.py), in front of tests/origin.py.

What is checked is what can be seen from outside: the headers the origin received (its
echo), the status, headers and body the client got, and diags.log. Every test makes
several requests, each on a new connection, so that both ET_NET threads run hooks.

plugin.config line: hostscript_ats_<engine>.so [--time-limit S] [--memory-limit BYTES]
[--shared NAME=SIZE] script.lua [script.lua ...]
"""
from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.parse
import urllib.request

import pytest

from ats_server import TRAFFIC_SERVER, AtsError, AtsServer
from origin import free_port, header

pytestmark = pytest.mark.skipif(not os.access(TRAFFIC_SERVER, os.X_OK),
                                reason="traffic_server is not installed")

N = 8  # requests per check, each on its own connection


# ---- ATS alone -------------------------------------------------------------------


def test_ats_alone_forwards_to_the_origin(origin):
    """No plugin: requests through a private ATS reach the origin with their path,
    query, method, headers and body, and the origin's answer comes back."""
    with AtsServer(origin.url, threads=2) as ats:
        assert ats.port and ats.url == f"http://127.0.0.1:{ats.port}"
        for i in range(N):
            c = http.client.HTTPConnection("127.0.0.1", ats.port, timeout=10)
            c.request("GET", f"/alone/{i}?b={i}", headers={"X-In": f"v{i}", "Connection": "close"})
            r = c.getresponse()
            body = r.read()
            c.close()
            assert r.status == 200, body
            seen = json.loads(body)
            assert seen["path"] == f"/alone/{i}?b={i}"
            assert header(seen, "x-in") == [f"v{i}"]
            assert header(seen, "host") == [f"127.0.0.1:{origin.port}"]  # remapped
        # a status and a header of the origin pass through; so does a POST body
        c = http.client.HTTPConnection("127.0.0.1", ats.port, timeout=10)
        c.request("POST", "/p?status=404&hdr=x-o:1", body=b"hello", headers={"Connection": "close"})
        r = c.getresponse()
        body = r.read()
        c.close()
        assert r.status == 404 and r.getheader("x-o") == "1"
        assert json.loads(body)["body"] == "hello"
        assert origin.count("/alone/3?b=3") == 1
        assert "traffic server running" in ats.wait_diags("traffic server running")[0]
        pid = ats.pid
    assert ats.proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_ats_alone_cache_and_restart(origin):
    """cache=True caches a cacheable response; restart() comes back on a new port."""
    with AtsServer(origin.url, cache=True) as ats:
        path = "/cached?cc=" + urllib.parse.quote("max-age=60")
        for _ in range(3):
            with urllib.request.urlopen(ats.url + path, timeout=10) as r:
                assert r.status == 200
        assert origin.count(path) == 1
        ats.restart()
        with urllib.request.urlopen(ats.url + "/after-restart", timeout=10) as r:
            assert r.status == 200


def test_ats_alone_start_failure_is_reported(origin):
    """A plugin that cannot load: start() raises at once with diags.log's tail."""
    t0 = time.monotonic()
    with pytest.raises(AtsError, match="unable to load '/nonexistent/x.so'"):
        with AtsServer(origin.url, plugins=["/nonexistent/x.so"]):
            pass
    assert time.monotonic() - t0 < 5


# ---- the plugin: each hook and what txn shows -------------------------------------


def test_read_request_sees_the_client_request_and_changes_what_is_forwarded(start_ats, origin):
    c = start_ats(scripts=[("rr.lua", r"""
local C = {}
function C:on_read_request(txn)
  local h = txn.req.headers
  h["x-seen"] = txn.req.method .. " " .. txn.req.uri .. " " .. (h["x-in"] or "-")
  h["x-seen-host"] = h["host"] or "-"
  h["x-drop"] = nil
end
return C
""")])
    for i in range(N):
        method = "GET" if i % 2 == 0 else "POST"
        r = c.request(method, f"/a?b={i}", headers={"X-In": f"hello{i}", "X-Drop": "secret",
                                                  "Host": "client.example"},
                      body=b"x" if method == "POST" else None)
        assert r.status == 200, r
        seen = r.json()
        assert seen["path"] == f"/a?b={i}"
        assert header(seen, "x-seen") == [f"{method} /a?b={i} hello{i}"]
        assert header(seen, "x-seen-host") == ["client.example"]  # the client's request
        assert header(seen, "x-drop") == []


def test_send_request_sees_the_request_to_the_origin(start_ats, origin):
    c = start_ats(scripts=[("sr.lua", r"""
local C = {}
function C:on_read_request(txn)
  txn.req.headers["x-from-read-request"] = "1"
end
function C:on_send_request(txn)
  local h = txn.req.headers
  h["x-sr-host"] = h["host"] or "-"
  h["x-sr"] = txn.req.method .. " " .. txn.req.uri .. " " .. (h["x-from-read-request"] or "-")
  h["x-secret"] = nil
end
return C
""")])
    for i in range(N):
        r = c.get(f"/s/{i}?q={i}", headers={"Host": "client.example", "X-Secret": "s"})
        assert r.status == 200, r
        seen = r.json()
        # after remap: the Host of the origin, not the client's
        assert header(seen, "x-sr-host") == header(seen, "host") == [f"127.0.0.1:{origin.port}"]
        assert header(seen, "x-sr") == [f"GET /s/{i}?q={i} 1"]
        assert header(seen, "x-secret") == []


def test_the_request_line_is_read_from_traffic_server_when_a_handler_uses_it(start_ats, origin):
    # method and uri are copied in on first use: a method set before the uri is read
    # keeps the uri Traffic Server has; the response hooks show the client's request
    c = start_ats(scripts=[("line.lua", r"""
local C = {}
function C:on_read_request(txn)
  if txn.req.headers["x-mode"] == "set-method" then
    txn.req.method = "DELETE"
    txn.req.headers["x-line"] = txn.req.method .. " " .. txn.req.uri
  end
end
function C:on_send_response(txn)
  txn.resp.headers["x-client-line"] = txn.req.method .. " " .. txn.req.uri
end
return C
""")])
    for i in range(N):
        mode = ("set-method", "none")[i % 2]
        r = c.get(f"/line/{i}?m={mode}", headers={"X-Mode": mode})
        assert r.status == 200, r
        seen = r.json()
        if mode == "set-method":
            assert seen["method"] == "DELETE", seen
            assert header(seen, "x-line") == [f"DELETE /line/{i}?m={mode}"]
            assert r.get("x-client-line") == f"DELETE /line/{i}?m={mode}"
        else:
            assert seen["method"] == "GET" and header(seen, "x-line") == []
            assert r.get("x-client-line") == f"GET /line/{i}?m={mode}"


def test_read_response_sees_and_changes_the_origin_response(start_ats, origin):
    c = start_ats(scripts=[("rresp.lua", r"""
local C = {}
function C:on_read_response(txn)
  local h = txn.resp.headers
  h["x-rresp"] = tostring(txn.resp.status) .. " " .. (h["x-origin"] or "-")
  h["x-origin"] = nil
end
return C
""")])
    for i in range(N):
        status = (200, 201, 404, 503)[i % 4]
        r = c.get(f"/r/{i}?status={status}&hdr=x-origin:o{i}")
        assert r.status == status, r
        assert r.get("x-rresp") == f"{status} o{i}"
        assert r.all("x-origin") == []
        assert r.json()["path"] == f"/r/{i}?status={status}&hdr=x-origin:o{i}"


def test_read_response_status_is_writable(start_ats, origin):
    c = start_ats(scripts=[("rstatus.lua", r"""
local C = {}
function C:on_read_response(txn)
  if txn.resp.status == 200 then txn.resp.status = 203 end
end
return C
""")])
    for i in range(4):
        r = c.get(f"/rs/{i}")
        assert r.status == 203, r
        assert r.json()["path"] == f"/rs/{i}"


BODY_SCRIPT = r"""
local C = {}
function C:on_read_response(txn)
  local size = tonumber(txn.req.uri:match("set=(%d+)"))
  if size then txn.resp.body = ("<" .. txn.resp.status .. ">"):rep(size) end
end
function C:on_send_response(txn)
  if txn.req.uri:find("late") then txn.resp.body = "too late" end
end
return C
"""


@pytest.mark.parametrize("how", ["size=70000", "size=10&chunked=1", "size=200000&slowbody=0.2",
                                 "size=3&nolength=1"])
def test_read_response_body_replaces_the_origins(start_ats, origin, how):
    # txn.resp.body set in read_response goes to the client instead of the origin's
    # body, whatever the origin's framing and size (a response transform)
    c = start_ats(scripts=[("body.lua", BODY_SCRIPT)])
    for set_size in (0, 1, 5000):
        r = c.get(f"/body?{how}&set={set_size}")
        assert r.status == 200, r
        assert r.body == b"<200>" * set_size, (how, set_size, r.body[:100], len(r.body))
    r = c.get(f"/body?{how}")  # no body set: the origin's, untouched
    assert r.body == b"x" * int(how.split("&")[0].split("=")[1])
    assert c.died() is None


def test_a_client_that_leaves_during_a_replaced_body_leaves_the_server_serving(start_ats, origin):
    import socket
    c = start_ats(scripts=[("body.lua", BODY_SCRIPT)])
    for _ in range(5):  # 4 MB bodies; each client reads a little and goes
        with socket.create_connection(("127.0.0.1", c.port), timeout=10) as s:
            s.sendall(b"GET /gone?size=100&set=800000 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")
    for _ in range(4):
        r = c.get("/after?size=10&set=1")
        assert (r.status, r.body) == (200, b"<200>")
    assert c.died() is None


def test_no_body_follows_a_response_that_has_none(start_ats, origin):
    # a body set in read_response is not sent after HEAD or a 204/304: on a keep-alive
    # connection it would be read as the start of the next response
    import socket
    c = start_ats(scripts=[("body.lua", BODY_SCRIPT)])
    for first in (b"HEAD /h?size=10&set=3", b"GET /h?size=10&status=204&set=3"):
        with socket.create_connection(("127.0.0.1", c.port), timeout=10) as s:
            s.sendall(first + b" HTTP/1.1\r\nHost: x\r\n\r\n"
                      b"GET /next?size=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            got = b""
            while True:
                part = s.recv(65536)
                if not part:
                    break
                got += part
        head, rest = got.split(b"\r\n\r\n", 1)
        assert b"<200>" not in got and b"<204>" not in got, got
        # nothing but the next response after the head (Traffic Server closes after
        # the origin's 204, which carries a Content-Length)
        if first.startswith(b"HEAD") or rest:
            assert rest.startswith(b"HTTP/1.1 200") and rest.endswith(b"\r\n\r\nxx"), got
    assert len(c.wait_diags(r"txn.resp.body set in read_response is not sent", 2)) == 2


def test_stopping_traffic_server_during_a_replaced_body_is_a_clean_exit(start_ats, origin):
    # shutdown while transforms are mid-body (clients reading slowly, the origin's
    # body still arriving): Traffic Server ends on SIGTERM as it does without them
    import signal
    import socket
    c = start_ats(scripts=[("body.lua", BODY_SCRIPT)])
    socks = []
    for i in range(4):
        s = socket.create_connection(("127.0.0.1", c.port), timeout=10)
        s.sendall(f"GET /stop{i}?size=200000&slowbody=2&set=800000 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        socks.append(s)
    time.sleep(0.5)
    rc = c.ats.stop(timeout=10)
    for s in socks:
        s.close()
    assert rc in (0, -signal.SIGTERM), (rc, c.ats.stderr()[-2000:])  # not SIGSEGV, SIGABRT


def test_a_body_set_in_read_response_is_what_the_cache_keeps(start_ats, origin):
    c = start_ats(scripts=[("body.lua", BODY_SCRIPT)], cache=True)
    first = c.get("/cached?size=100&cc=max-age%3D60&set=2")
    again = c.get("/cached?size=100&cc=max-age%3D60&set=2")
    assert first.body == again.body == b"<200><200>"
    assert origin.count("/cached?size=100&cc=max-age%3D60&set=2") == 1


def test_a_body_set_in_send_response_is_reported_not_sent(start_ats, origin):
    c = start_ats(scripts=[("body.lua", BODY_SCRIPT)])
    r = c.get("/late?size=4")
    assert r.status == 200 and r.body == b"xxxx", r
    assert c.wait_diags(r"txn.resp.body set in send_response is not sent"), c.diags()[-2000:]


def test_send_response_changes_what_the_client_gets(start_ats, origin):
    c = start_ats(scripts=[("sresp.lua", r"""
local C = {}
function C:on_send_response(txn)
  local h = txn.resp.headers
  h["x-sresp"] = tostring(txn.resp.status)
  h["x-kill"] = nil
  if h["x-make"] then txn.resp.status = tonumber(h["x-make"]) end
end
return C
""")])
    for i in range(N):
        r = c.get(f"/sr/{i}?hdr=x-kill:1")
        assert r.status == 200, r
        assert r.get("x-sresp") == "200"
        assert r.all("x-kill") == []
        assert r.json()["path"] == f"/sr/{i}?hdr=x-kill:1"
    r = c.get("/sr/status?status=404&hdr=x-make:410")
    assert r.status == 410 and r.get("x-sresp") == "404", r


def test_respond_answers_without_the_origin(start_ats, origin):
    c = start_ats(scripts=[("deny.lua", r"""
local C = {}
function C:on_read_request(txn)
  if txn.req.uri:sub(1, 5) == "/deny" then
    return txn:respond(403, "no", {["x-why"] = "rule"})
  end
end
return C
""")])
    for i in range(N):
        if i % 2:
            r = c.get(f"/deny/{i}")
            assert r.status == 403, r
            assert r.body == b"no"
            assert r.get("x-why") == "rule"
        else:
            r = c.get(f"/ok/{i}")
            assert r.status == 200 and r.json()["path"] == f"/ok/{i}", r
    assert not [q for q in origin.requests if q["path"].startswith("/deny")]
    assert len([q for q in origin.requests if q["path"].startswith("/ok/")]) == N // 2


def test_respond_with_a_success_status(start_ats, origin):
    c = start_ats(scripts=[("health.lua", r"""
local C = {}
function C:on_read_request(txn)
  if txn.req.uri == "/health" then
    return txn:respond(200, "fine\n", {["content-type"] = "text/plain"})
  end
end
return C
""")])
    for _ in range(4):
        r = c.get("/health")
        assert (r.status, r.body) == (200, b"fine\n"), r
        assert r.get("content-type") == "text/plain"
    assert origin.count("/health") == 0


def test_ctx_from_read_request_in_send_response_and_log(start_ats, origin):
    c = start_ats(scripts=[("ctx.lua", r"""
local C = {}
function C:on_read_request(txn)
  txn.ctx.tag = "t:" .. txn.req.uri
  txn.ctx.n = 41
end
function C:on_send_response(txn)
  txn.resp.headers["x-ctx"] = txn.ctx.tag .. " " .. tostring(txn.ctx.n + 1)
end
function C:on_log(txn)
  hs.log.info("CTXLOG " .. tostring(txn.ctx.tag) .. " " .. tostring(txn.resp.status))
end
return C
""")])
    for i in range(N):
        r = c.get(f"/ctx/{i}")
        assert r.status == 200, r
        assert r.get("x-ctx") == f"t:/ctx/{i} 42"
    for i in range(N):
        assert c.wait_diags(rf"CTXLOG t:/ctx/{i} 200\b"), c.diags_lines("CTXLOG")


def test_ctx_stays_with_its_transaction_under_concurrent_keep_alive_clients(start_ats, origin):
    # many transactions in flight on both net threads, several per connection: each
    # finds its own data (ctx, in the transaction's user arg) in every hook, and the
    # data of a closed transaction is never found by the next one on its connection
    import threading
    c = start_ats(scripts=[("own.lua", r"""
local C = {}
function C:on_read_request(txn)
  if txn.req.headers["x-id"] then txn.ctx.id = txn.req.headers["x-id"] end
end
function C:on_send_request(txn) txn.req.headers["x-ctx-id"] = txn.ctx.id or "none" end
function C:on_send_response(txn) txn.resp.headers["x-ctx-id"] = txn.ctx.id or "none" end
return C
""")])
    wrong = []

    def client(k):
        conn = http.client.HTTPConnection("127.0.0.1", c.port, timeout=10)
        try:
            for i in range(40):
                mine = f"c{k}-{i}" if i % 3 else None  # every third request has no id
                conn.request("GET", f"/own/{k}/{i}", headers={"X-Id": mine} if mine else {})
                r = conn.getresponse()
                body = json.loads(r.read())
                sent = [v for n, v in body["headers"] if n.lower() == "x-ctx-id"]
                if r.getheader("x-ctx-id") != (mine or "none") or sent != [mine or "none"]:
                    wrong.append((k, i, mine, r.getheader("x-ctx-id"), sent))
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [], wrong[:5]
    assert c.died() is None


def test_log_fires_after_respond_and_after_errors(start_ats, origin):
    src = r"""
local C = {}
function C:on_read_request(txn)
  if txn.req.uri == "/deny" then return txn:respond(403, "no") end
  if txn.req.uri == "/boom" then error("read_request blew up") end
end
function C:on_log(txn)
  hs.log.info("TXNLOG " .. txn.req.uri .. " " .. tostring(txn.resp.status))
end
return C
"""
    c = start_ats(scripts=[("log.lua", src)])
    for path, status in (("/deny", 403), ("/boom", 200), ("/fine", 200)):
        r = c.get(path)
        assert r.status == status, r
        assert c.wait_diags(rf"TXNLOG {path} {status}\b"), c.diags()[-3000:]
    # an origin that refuses: ATS's own 502, and on_log still runs
    dead = start_ats(scripts=[("log.lua", src)], origin_url=f"http://127.0.0.1:{free_port()}")
    # (the readiness probe got its 502 too)
    r = dead.get("/down")
    assert r.status == 502, r
    assert dead.wait_diags(r"TXNLOG /down 502\b"), dead.diags()[-3000:]


def test_log_alone_observes_the_transaction(start_ats, origin):
    """A script with on_log only: the request and the response to the client are
    there to read; an attempt to write is not the client's concern."""
    c = start_ats(scripts=[("onlylog.lua", r"""
local C = {}
function C:on_log(txn)
  hs.log.info("ONLYLOG " .. tostring(txn.req.method) .. " " .. tostring(txn.req.uri) .. " "
              .. tostring(txn.req.headers["x-a"]) .. " " .. tostring(txn.resp.status))
  pcall(function() txn.resp.headers["x-late"] = "1" end)
end
return C
""")])
    for i in range(N):
        status = (200, 404)[i % 2]
        r = c.get(f"/only/{i}?status={status}", headers={"X-A": f"a{i}"})
        assert r.status == status and r.get("x-late") is None, r
    for i in range(N):
        status = (200, 404)[i % 2]
        assert c.wait_diags(rf"ONLYLOG GET /only/{i}\?status={status} a{i} {status}$"), \
            c.diags_lines("ONLYLOG")


def test_hs_log_info_goes_to_diags(start_ats, origin):
    c = start_ats(scripts=[("say.lua", r"""
local C = {}
function C:on_read_request(txn)
  hs.log.info("hello from " .. txn.req.uri)
end
return C
""")])
    for i in range(N):
        assert c.get(f"/say/{i}").status == 200
    for i in range(N):
        assert c.wait_diags(rf"hello from /say/{i}\b"), c.diags()[-3000:]
    # new connections went to both net threads
    threads = {re.search(r"\[(ET_NET \d+)\]", line).group(1)
               for line in c.diags_lines(r"hello from /say/")}
    assert threads == {"ET_NET 0", "ET_NET 1"}, threads


# ---- fail-open: errors, time and memory limits ----------------------------------

BOOM = r"""
local C = {}
-- x-boom names the hook that fails; the later hooks read it from ctx
function C:on_read_request(txn)
  txn.ctx.boom = txn.req.headers["x-boom"]
  if txn.ctx.boom == "read_request" then error("boom in read_request") end
end
function C:on_send_request(txn)
  if txn.ctx.boom == "send_request" then error("boom in send_request") end
end
function C:on_read_response(txn)
  if txn.ctx.boom == "read_response" then error("boom in read_response") end
end
function C:on_send_response(txn)
  if txn.ctx.boom == "send_response" then error("boom in send_response") end
  txn.resp.headers["x-handled"] = "1"
end
return C
"""


def _assert_normal(c, path):
    r = c.get(path)
    assert r.status == 200, r
    assert r.json()["path"] == path
    return r


def test_a_handler_error_fails_open_in_every_hook(start_ats, origin):
    c = start_ats(scripts=[("boom.lua", BOOM)])
    for round_ in range(2):
        for hook in ("read_request", "send_request", "read_response", "send_response"):
            path = f"/boom/{round_}/{hook}"
            r = c.get(path, headers={"X-Boom": hook})
            assert r.status == 200, (hook, r)
            assert r.json()["path"] == path  # the origin's answer
            lines = c.wait_diags(rf"boom\.lua.*{hook}|{hook}.*boom\.lua", count=round_ + 1)
            assert len(lines) >= round_ + 1, (hook, c.diags()[-3000:])
            assert any(f"boom in {hook}" in line for line in lines), lines
            r = _assert_normal(c, f"/after/{round_}/{hook}")
            assert r.get("x-handled") == "1"


def test_fail_closed_answers_500_when_a_handler_fails_before_the_response(start_ats, origin):
    # --fail-closed: a handler that fails (raises, or runs out of time) in a hook before
    # send_response ends its transaction with a 500 — what it would have checked does
    # not slip through; in send_response and log the response is already made
    c = start_ats(scripts=[("fc.lua", r"""
local C = {}
local function maybe(txn, hook)
  if txn.ctx.fail == hook then
    if hook == "send_request" then while true do end end -- the time limit stops it
    error("failing in " .. hook)
  end
end
function C:on_read_request(txn)
  txn.ctx.fail = txn.req.headers["x-fail"]
  maybe(txn, "read_request")
end
function C:on_send_request(txn) maybe(txn, "send_request") end
function C:on_read_response(txn) maybe(txn, "read_response") end
function C:on_send_response(txn) maybe(txn, "send_response") end
function C:on_log(txn) maybe(txn, "log") end
return C
""")], plugin_args=["--fail-closed", "--time-limit", "0.2"])
    expect = {"read_request": (500, False), "send_request": (500, False),
              "read_response": (500, True), "send_response": (200, True), "log": (200, True),
              "none": (200, True)}
    for hook, (status, reaches_origin) in expect.items():
        before = origin.count(f"/fc/{hook}")
        r = c.get(f"/fc/{hook}", headers={"X-Fail": hook})
        assert r.status == status, (hook, r)
        if status == 500:
            assert r.body == b"hostscript: a handler failed\n", (hook, r)
        assert origin.count(f"/fc/{hook}") - before == (1 if reaches_origin else 0), hook
    assert len(c.wait_diags(r"hostscript.*(failing in|time limit)", 5, 5)) >= 5, c.diags()[-3000:]
    assert c.get("/fc/after").status == 200
    assert c.died() is None


def test_time_limit_fails_open(start_ats, origin):
    c = start_ats(plugin_args=["--time-limit", "0.05"], scripts=[("spin.lua", r"""
local C = {}
function C:on_read_request(txn)
  if txn.req.headers["x-spin"] then
    local i = 0
    while true do i = i + 1 end
  end
  txn.req.headers["x-ran"] = "1"
end
return C
""")])
    for i in range(4):
        t0 = time.monotonic()
        r = c.get(f"/spin/{i}", headers={"X-Spin": "1"})
        took = time.monotonic() - t0
        assert r.status == 200, r
        assert r.json()["path"] == f"/spin/{i}"
        assert took < 2.0, took
        r = _assert_normal(c, f"/after-spin/{i}")
        assert header(r.json(), "x-ran") == ["1"]
    lines = c.wait_diags(r"spin\.lua.*read_request|read_request.*spin\.lua", count=4)
    assert len(lines) >= 4, c.diags()[-3000:]


@pytest.mark.parametrize("how,limit", [("one_block", str(16 << 20)), ("many_tables", "16m")])
def test_memory_limit_fails_open(start_ats, origin, how, limit):
    alloc = {"one_block": 'local s = string.rep("x", 64 * 1024 * 1024)\n    t[1] = s',
             "many_tables": "for i = 1, 1e8 do t[i] = {i} end"}[how]
    c = start_ats(plugin_args=["--memory-limit", limit, "--time-limit", "5"],
                  scripts=[("hog.lua", r"""
local C = {}
function C:on_read_request(txn)
  if txn.req.headers["x-hog"] then
    local t = {}
    %s
  end
  txn.req.headers["x-ran"] = "1"
end
return C
""" % alloc)])
    for i in range(3):
        r = c.get(f"/hog/{i}", headers={"X-Hog": "1"})
        assert r.status == 200, r
        assert r.json()["path"] == f"/hog/{i}"
        r = _assert_normal(c, f"/after-hog/{i}")
        assert header(r.json(), "x-ran") == ["1"]
    lines = c.wait_diags(r"hog\.lua.*read_request|read_request.*hog\.lua", count=3)
    assert len(lines) >= 3, c.diags()[-3000:]
    assert any(re.search(r"memory", line, re.I) for line in lines), lines


def test_memory_error_traceback_is_its_own(start_ats, origin):
    """The traceback logged for a memory-limit error is that error's, not the one of
    the error before it on the same state."""
    c = start_ats(plugin_args=["--memory-limit", str(16 << 20), "--time-limit", "0.05"],
                  threads=1, scripts=[("tb.lua", r"""
local C = {}
function C:on_read_request(txn)
  if txn.req.headers["x-spin"] then while true do end end                         -- line 4
  if txn.req.headers["x-hog"] then local t = {} for i = 1, 1e8 do t[i] = {i} end end -- line 5
end
return C
""")])
    assert c.get("/tb/1", headers={"X-Spin": "1"}).status == 200
    assert c.wait_diags(r"tb\.lua in read_request: .*time limit")
    assert c.get("/tb/2", headers={"X-Hog": "1"}).status == 200
    assert c.wait_diags(r"tb\.lua in read_request: .*memory limit")
    time.sleep(0.2)
    text = c.diags()
    mem = text[text.index("memory limit exceeded"):]
    mem = mem[:mem.find("\n[")] if "\n[" in mem else mem
    assert "tb.lua:4:" not in mem, mem  # the time limit's line


# ---- more than one script, shared dictionaries, cache, beside tslua ----------------


def test_several_scripts_all_run(start_ats, origin):
    c = start_ats(scripts=[("a.lua", r"""
local C = {}
function C:on_read_request(txn) txn.req.headers["x-a"] = "a" end
return C
"""), ("b.lua", r"""
local C = {}
function C:on_read_request(txn) txn.req.headers["x-b"] = "b" end
function C:on_send_response(txn) txn.resp.headers["x-b-resp"] = "b" end
return C
""")])
    for i in range(N):
        r = c.get(f"/two/{i}")
        assert r.status == 200, r
        seen = r.json()
        assert header(seen, "x-a") == ["a"] and header(seen, "x-b") == ["b"]
        assert r.get("x-b-resp") == "b"


def test_shared_dictionary_across_threads(start_ats, origin):
    c = start_ats(plugin_args=["--shared", "hits=1048576"], scripts=[("count.lua", r"""
local C = {}
function C:on_read_request(txn)
  local n, err = hs.shared.hits:incr("n", 1, 0)
  txn.ctx.n = n or err
end
function C:on_send_response(txn)
  txn.resp.headers["x-n"] = tostring(txn.ctx.n)
end
return C
""")])
    got = [c.get(f"/n/{i}").get("x-n") for i in range(N)]
    nums = [int(g) for g in got]
    # the readiness probe counted too; every request on either thread saw one counter
    assert nums == list(range(nums[0], nums[0] + N)), got


def test_cache_hit_runs_send_response_but_not_read_response(start_ats, origin):
    c = start_ats(cache=True, scripts=[("cache.lua", r"""
local C = {}
function C:on_read_response(txn) txn.resp.headers["x-read-response"] = "1" end
function C:on_send_response(txn) txn.resp.headers["x-send-response"] = "1" end
return C
""")])
    path = "/c?cc=" + urllib.parse.quote("max-age=60")
    replies = [c.get(path) for _ in range(4)]
    assert [r.status for r in replies] == [200] * 4
    assert origin.count(path) == 1
    assert all(r.get("x-send-response") == "1" for r in replies)
    # the stored response was the origin's as read_response changed it
    assert all(r.get("x-read-response") == "1" for r in replies)


def test_beside_tslua(start_ats, origin, tmp_path):
    ts = tmp_path / "ts.lua"
    ts.write_text("""
function do_global_send_response()
  ts.client_response.header['X-Tslua'] = 'yes'
  return 0
end
""")
    c = start_ats(scripts=[("mine.lua", r"""
local C = {}
function C:on_send_response(txn) txn.resp.headers["x-hostscript"] = "yes" end
return C
""")], extra_plugins=[f"tslua.so {ts}"])
    for i in range(N):
        r = c.get(f"/both/{i}")
        assert r.status == 200, r
        assert (r.get("x-tslua"), r.get("x-hostscript")) == ("yes", "yes"), r


# ---- documented in docs/ats.md: a script that does not load, cache keys, --watch ----


def test_a_script_that_does_not_load_is_left_out(start_ats, origin):
    c = start_ats(scripts=[("broken.lua", "local C = {\nfunction C:on_read_request(txn) end\n"),
                           ("good.lua", r"""
local C = {}
function C:on_read_request(txn) txn.req.headers["x-good"] = "1" end
return C
""")])
    for i in range(4):
        r = c.get(f"/left-out/{i}")
        assert r.status == 200 and header(r.json(), "x-good") == ["1"], r
    assert c.diags_lines(r"broken\.lua"), c.diags()[-3000:]


def test_set_cache_key_separates_cache_entries(start_ats, origin):
    c = start_ats(cache=True, scripts=[("key.lua", r"""
local C = {}
function C:on_read_request(txn)
  local v = txn.req.headers["x-variant"]
  if v then txn:set_cache_key("variant=" .. v) end
end
return C
""")])
    path = "/keyed?cc=" + urllib.parse.quote("max-age=60")
    counts = []
    for variant in ("a", "a", "b", "b", "a", "c"):
        r = c.get(path, headers={"X-Variant": variant})
        assert r.status == 200, r
        counts.append(origin.count(path))
    assert counts == [1, 1, 2, 2, 2, 3], counts


def test_watch_reloads_a_changed_script(start_ats, origin):
    src = r"""
local C = {}
function C:on_send_response(txn) txn.resp.headers["x-version"] = "%s" end
return C
"""
    c = start_ats(plugin_args=["--watch", "0.2"], scripts=[("w.lua", src % "1")])
    for i in range(4):
        assert c.get(f"/w/{i}").get("x-version") == "1"
    path = c.scripts["w.lua"]
    with open(path, "w") as f:
        f.write(src % "2")
    st = os.stat(path)
    os.utime(path, (st.st_atime + 2, st.st_mtime + 2))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if [c.get(f"/w2/{i}").get("x-version") for i in range(4)] == ["2"] * 4:
            break
        time.sleep(0.1)
    assert [c.get(f"/w3/{i}").get("x-version") for i in range(N)] == ["2"] * N, c.diags()[-3000:]
