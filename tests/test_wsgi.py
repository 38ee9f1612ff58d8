"""hostscript.wsgi.Middleware: PEP 3333 details with an in-process driver (wrapped in
wsgiref.validate on both sides), then real servers on loopback — waitress and
cheroot in threads, gunicorn (gthread) in a subprocess — with keep-alive clients."""
from __future__ import annotations

import contextlib
import http.client
import importlib.util
import io
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
import wsgiref.util
from wsgiref.validate import validator

import pytest

import hostscript
from hostscript.wsgi import HOOKS, Middleware, environ_headers, environ_uri

ROOT = pathlib.Path(hostscript.__file__).resolve().parent.parent

SCRIPT = r"""
local T = {}

function T:on_read_request(txn)
  local h = txn.req.headers
  if h["x-deny"] then
    return txn:respond(403, "denied by lua\n", {["content-type"] = "text/plain", ["x-denied-by"] = "lua"})
  end
  if h["x-fail"] == "read_request" then error("boom in read_request") end
  if h["x-rewrite"] then h["x-echo"] = "rewritten:" .. h["x-rewrite"] end
  if h["x-drop"] then h["x-drop"] = nil end
  if h["x-multi"] then h:add("x-multi", "two"); h:add("cookie", "b=2") end
  if h["x-uri"] then txn.req.uri = h["x-uri"] end
  if h["x-method"] then txn.req.method = h["x-method"] end
  if h["content-type"] then h["x-saw-ct"] = h["content-type"] end
  txn.ctx.seen = txn.req.method .. " " .. txn.req.uri
end

function T:on_send_response(txn)
  local h = txn.req.headers
  if h["x-fail"] == "send_response" then error("boom in send_response") end
  txn.resp.headers["x-hooked"] = "yes"
  txn.resp.headers["x-app-status"] = tostring(txn.resp.status)
  if h["x-replace"] then txn.resp.body = "replaced by lua\n" end
  if h["x-status"] then txn.resp.status = tonumber(h["x-status"]) end
  if h["x-hop"] then txn.resp.headers["connection"] = "close" end
end

function T:on_log(txn)
  local h = txn.req.headers
  if h["x-fail"] == "log" then error("boom in log") end
  local d = hs.shared.log
  d:incr("n", 1, 0)
  d:set("status", txn.resp.status or 0)
  d:set("uri", txn.req.uri)
  d:set("status:" .. txn.req.uri, txn.resp.status or 0)
end

return T
"""

# the application the servers run (and the in-process tests import): echoes what it
# got, counts its calls; GET /count answers the count
APP_SOURCE = r'''
import os, threading
from hostscript.wsgi import Middleware

calls = [0]
_lock = threading.Lock()


def inner(environ, start_response):
    if environ["PATH_INFO"] == "/count":
        body = str(calls[0]).encode()
    elif environ["PATH_INFO"] == "/logged":  # how many times the log hook ran
        body = str(_mw[0].host.shared["log"].get("n")).encode()
    elif environ["PATH_INFO"] == "/status":  # the status the log hook saw for ?URI
        body = str(_mw[0].host.shared["log"].get("status:" + environ["QUERY_STRING"])).encode()
    elif environ["PATH_INFO"] == "/raise":
        raise RuntimeError("the application failed")
    else:
        with _lock:
            calls[0] += 1
        body = ("echo=%s path=%s qs=%s method=%s" % (
            environ.get("HTTP_X_ECHO"), environ["PATH_INFO"], environ.get("QUERY_STRING", ""),
            environ["REQUEST_METHOD"])).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


_mw = []


def make(script, engine):
    _mw.append(Middleware(inner, [script], engine=engine, shared={"log": 1 << 20}))
    return _mw[-1]


if os.environ.get("HS_WSGI_SCRIPT"):
    app = make(os.environ["HS_WSGI_SCRIPT"], os.environ["HS_WSGI_ENGINE"])
'''


@pytest.fixture
def script(tmp_path):
    p = tmp_path / "wsgi_hooks.lua"
    p.write_text(SCRIPT)
    return str(p)


@pytest.fixture
def mw_host(make_host, script):
    h = make_host(hooks=HOOKS, shared={"log": 1 << 20})
    h.load_file(script)
    return h


# ---- an in-process WSGI server ----


class Driven:
    def __init__(self) -> None:
        self.status = None
        self.headers = []
        self.body = b""
        self.starts = 0

    def header(self, name):
        got = [v for n, v in self.headers if n.lower() == name.lower()]
        return got[0] if got else None


def environ(path="/", query="", method="GET", headers=(), **extra):
    env = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
           "SCRIPT_NAME": "", "wsgi.input": io.BytesIO(b"")}
    for name, value in headers:
        key = name.upper().replace("-", "_")
        env[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key] = value
    wsgiref.util.setup_testing_defaults(env)
    env.update(extra)
    return env


def drive(app, env, *, validate=True) -> Driven:
    """Run one request the way a server does: start_response, iterate, close()."""
    d = Driven()
    sent = [False]

    def start_response(status, headers, exc_info=None):
        if exc_info is not None:
            try:
                if sent[0]:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        d.starts += 1
        d.status, d.headers = status, list(headers)

        def write(data):
            sent[0] = sent[0] or bool(data)
            d.body += data
        return write

    result = (validator(app) if validate else app)(env, start_response)
    try:
        for chunk in result:
            if chunk:
                sent[0] = True
            d.body += chunk
    finally:
        if hasattr(result, "close"):
            result.close()
    return d


class Closing:
    """An application iterable that records its close() calls."""

    def __init__(self, chunks, on_close=None):
        self.chunks = list(chunks)
        self.closes = 0
        self.on_close = on_close
        self.iterated = False

    def __iter__(self):
        self.iterated = True
        return iter(self.chunks)

    def close(self):
        self.closes += 1
        if self.on_close:
            self.on_close()


def simple_app(calls, body=b"hello", status="200 OK"):
    def app(environ, start_response):
        calls.append(environ)
        start_response(status, [("Content-Type", "text/plain"), ("X-App", "1")])
        return [body]
    return app


def logged(host):
    d = host.shared["log"]
    return d.get("n"), d.get("status"), d.get("uri")


# ---- the environ <-> transaction mapping ----


def test_environ_mapping():
    env = environ("/a b/ü", "x=1&y=%20", headers=[("X-Foo", "1"), ("Content-Type", "text/x")],
                  CONTENT_LENGTH="")
    env["SCRIPT_NAME"] = "/app"
    assert environ_uri(env) == "/app/a%20b/%FC?x=1&y=%20"  # PATH_INFO is latin-1
    hdrs = dict(environ_headers(env))
    assert hdrs["x-foo"] == "1" and hdrs["content-type"] == "text/x"
    assert "content-length" not in hdrs  # empty CONTENT_LENGTH is no header
    env["RAW_URI"] = "/app/a%20b?x=1"
    assert environ_uri(env) == "/app/a%20b?x=1"
    env["RAW_URI"] = "http://example.com/p?q"
    assert environ_uri(env) == "/p?q"


def test_latin1_path_quoted_as_on_the_wire():
    # PEP 3333: PATH_INFO holds the unquoted bytes decoded as latin-1
    env = environ("/caf\u00c3\u00a9", "")
    assert environ_uri(env) == "/caf%C3%A9"


# ---- in process: read_request ----


def test_read_request_rewrites_header_and_only_what_changed(mw_host):
    calls = []
    mw = Middleware(simple_app(calls), mw_host)
    env = environ("/p", "a=1", headers=[("X-Rewrite", "abc"), ("X-Keep", "k"),
                                        ("Content-Type", "text/plain")])
    before = dict(env)
    d = drive(mw, env)
    assert d.status == "200 OK" and d.body == b"hello"
    seen = calls[0]
    assert seen["HTTP_X_ECHO"] == "rewritten:abc"
    assert seen["HTTP_X_SAW_CT"] == "text/plain"  # CONTENT_TYPE reached Lua as content-type
    # (wsgiref.validate wraps wsgi.input and wsgi.errors)
    changed = {k for k in seen if seen[k] is not before.get(k)} - {"hostscript.txn", "wsgi.input", "wsgi.errors"}
    assert changed == {"HTTP_X_ECHO", "HTTP_X_SAW_CT"}, changed
    assert seen["hostscript.txn"].ctx["seen"] == "GET /p?a=1"
    assert mw.errors == 0


def test_read_request_rewrites_uri_method_and_removes_header(mw_host):
    calls = []
    mw = Middleware(simple_app(calls), mw_host)
    env = environ("/old", "", headers=[("X-Uri", "/new%20path/x?q=1&r=%C3%A9"), ("X-Method", "POST"),
                                       ("X-Drop", "1")], RAW_URI="/old")
    env["SCRIPT_NAME"] = ""
    drive(mw, env)
    seen = calls[0]
    assert seen["PATH_INFO"] == "/new path/x"
    assert seen["QUERY_STRING"] == "q=1&r=%C3%A9"
    assert seen["REQUEST_METHOD"] == "POST"
    assert seen["RAW_URI"] == "/new%20path/x?q=1&r=%C3%A9"
    assert "HTTP_X_DROP" not in seen


def test_repeated_headers_joined_as_a_server_does(mw_host):
    calls = []
    mw = Middleware(simple_app(calls), mw_host)
    drive(mw, environ("/", headers=[("X-Multi", "one"), ("Cookie", "a=1")]))
    assert calls[0]["HTTP_X_MULTI"] == "one, two"
    assert calls[0]["HTTP_COOKIE"] == "a=1; b=2"


def test_uri_rewrite_keeps_script_name(mw_host):
    calls = []
    mw = Middleware(simple_app(calls), mw_host)
    env = environ("/x", "", headers=[("X-Uri", "/mount/y")])
    env["SCRIPT_NAME"] = "/mount"
    drive(mw, env)
    assert calls[0]["SCRIPT_NAME"] == "/mount" and calls[0]["PATH_INFO"] == "/y"
    env = environ("/x", "", headers=[("X-Uri", "/elsewhere")])
    env["SCRIPT_NAME"] = "/mount"
    drive(mw, env)
    assert calls[1]["SCRIPT_NAME"] == "" and calls[1]["PATH_INFO"] == "/elsewhere"


def test_handler_answers_and_app_not_called(mw_host):
    calls = []
    mw = Middleware(simple_app(calls), mw_host)
    d = drive(mw, environ("/secret", headers=[("X-Deny", "1")]))
    assert calls == []
    assert d.status == "403 Forbidden"
    assert d.body == b"denied by lua\n"
    assert d.header("x-denied-by") == "lua"
    assert d.header("content-length") == str(len(d.body))
    assert d.header("x-hooked") == "yes"  # send_response saw the handler's answer too
    assert logged(mw_host) == (1, 403, b"/secret")


def test_wsgi_input_never_touched(mw_host):
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"wsgi.input.{name} touched")

    mw = Middleware(lambda e, s: (s("200 OK", [("Content-Type", "text/plain")]), [b"x"])[1],
                    mw_host)
    env = environ("/", headers=[("X-Deny", "1")])
    env["wsgi.input"] = Untouchable()
    assert drive(mw, env, validate=False).status.startswith("403")
    env = environ("/")
    env["wsgi.input"] = Untouchable()
    assert drive(mw, env, validate=False).body == b"x"


# ---- send_response ----


def test_send_response_adds_header_and_streams_lazily(mw_host):
    produced = []

    def gen_app(environ, start_response):
        start_response("201 Created", [("Content-Type", "text/plain")])
        for i in range(3):
            produced.append(i)
            yield b"part%d" % i

    mw = Middleware(gen_app, mw_host)
    it = mw(environ("/"), lambda s, h, e=None: None)
    assert produced == []  # nothing consumed before the server iterates
    first = next(iter(it))
    assert first == b"part0" and produced == [0]
    it.close()
    d = drive(mw, environ("/"))
    assert d.status == "201 Created"
    assert d.header("x-hooked") == "yes" and d.header("x-app-status") == "201"
    assert d.body == b"part0part1part2"


def test_send_response_replaces_body_and_status(mw_host):
    inner = Closing([b"app body"])
    mw = Middleware(lambda e, s: (s("200 OK", [("Content-Type", "text/plain"),
                                                ("Content-Length", "8")]), inner)[1], mw_host)
    d = drive(mw, environ("/", headers=[("X-Replace", "1"), ("X-Status", "418")]))
    assert d.body == b"replaced by lua\n"
    assert d.status == "418 I'm a Teapot" or d.status.startswith("418 ")
    assert d.header("content-length") == str(len(b"replaced by lua\n"))
    assert inner.closes == 1 and not inner.iterated
    assert logged(mw_host)[:2] == (1, 418)


def test_send_response_replaces_body_of_generator_app(mw_host):
    # a generator calls start_response at its first step, after iteration began
    def gen_app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"app"
        yield b"more"

    d = drive(Middleware(gen_app, mw_host), environ("/", headers=[("X-Replace", "1")]))
    assert d.body == b"replaced by lua\n"


def test_send_response_hop_by_hop_dropped(mw_host):
    calls = []
    d = drive(Middleware(simple_app(calls), mw_host), environ("/", headers=[("X-Hop", "1")]))
    assert d.header("connection") is None and d.header("x-hooked") == "yes"


def test_write_callable_passes_through(mw_host):
    def legacy(environ, start_response):
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written ")
        return [b"returned"]

    d = drive(Middleware(legacy, mw_host), environ("/"))
    assert d.body == b"written returned" and d.header("x-hooked") == "yes"


# ---- exc_info, close, log ----


def test_exc_info_before_anything_sent_replaces_the_response(mw_host):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise ValueError("late failure")
        except ValueError:
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")],
                           sys.exc_info())
        return [b"sorry"]

    d = drive(Middleware(app, mw_host), environ("/"))
    assert d.status == "500 Internal Server Error" and d.starts == 2
    assert d.header("x-app-status") == "500" and d.body == b"sorry"
    assert logged(mw_host)[:2] == (1, 500)


def test_exc_info_after_body_sent_reraises(mw_host):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"first"
        try:
            raise KeyError("after the head")
        except KeyError:
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")],
                           sys.exc_info())
        yield b"never"

    with pytest.raises(KeyError, match="after the head"):
        drive(Middleware(app, mw_host), environ("/"), validate=False)
    assert logged(mw_host)[:2] == (1, 200)  # the status that went out


def test_second_start_response_without_exc_info_is_an_error(mw_host):
    def app(environ, start_response):
        start_response("200 OK", [])
        start_response("200 OK", [])
        return [b""]

    with pytest.raises(AssertionError):
        drive(Middleware(app, mw_host), environ("/"), validate=False)
    assert logged(mw_host)[0] == 1


def test_close_called_once_and_before_log(mw_host):
    at_close = []
    inner = Closing([b"a", b"b"], on_close=lambda: at_close.append(logged(mw_host)[0]))
    mw = Middleware(lambda e, s: (s("200 OK", [("Content-Type", "text/plain")]), inner)[1], mw_host)
    result = mw(environ("/c"), lambda s, h, e=None: None)
    assert b"".join(result) == b"ab"
    assert logged(mw_host)[0] is None  # log waits for close()
    result.close()
    result.close()  # a second close() from a sloppy server changes nothing
    assert inner.closes == 1
    assert at_close == [None]  # log had not fired when the app's close() ran
    assert logged(mw_host) == (1, 200, b"/c")


def test_app_raising_fires_log_with_500(mw_host):
    def app(environ, start_response):
        raise RuntimeError("app crashed")

    mw = Middleware(app, mw_host)
    with pytest.raises(RuntimeError, match="app crashed"):
        drive(mw, environ("/crash"))
    assert logged(mw_host) == (1, 500, b"/crash")


def test_app_raising_while_iterating_fires_log_with_500(mw_host):
    inner_closed = []

    class Bad:
        def __iter__(self):
            raise OSError("disk gone")

        def close(self):
            inner_closed.append(1)

    mw = Middleware(lambda e, s: (s("200 OK", [("Content-Type", "text/plain")]), Bad())[1], mw_host)
    with pytest.raises(OSError):
        drive(mw, environ("/iter"))
    assert inner_closed == [1]
    assert logged(mw_host) == (1, 500, b"/iter")


@pytest.mark.parametrize("hook", ["read_request", "send_response", "log"])
def test_handler_error_leaves_response_unchanged_and_is_counted(mw_host, hook, caplog):
    calls = []
    mw = Middleware(simple_app(calls), mw_host)
    plain = drive(mw, environ("/e"))
    errors_before = mw_host.stats()["errors"]
    with caplog.at_level("ERROR", logger="hostscript"):
        d = drive(mw, environ("/e", headers=[("X-Fail", hook), ("X-Rewrite", "r")]))
    assert d.status == plain.status and d.body == plain.body
    assert mw.errors == 1
    assert mw_host.stats()["errors"] == errors_before + 1
    assert any(f"boom in {hook}" in r.getMessage() for r in caplog.records)
    if hook == "send_response":  # the app's headers, not half of the handler's edit
        assert d.header("x-hooked") is None
    assert len(calls) == 2


def test_host_without_hooks_or_scripts_is_a_passthrough(make_host):
    h = make_host(hooks=HOOKS)
    calls = []
    d = drive(Middleware(simple_app(calls), h), environ("/"))
    assert d.body == b"hello" and len(calls) == 1 and "hostscript.txn" not in calls[0]


def test_invalid_request_is_passed_through_and_counted(mw_host):
    calls = []
    mw = Middleware(simple_app(calls), mw_host)
    env = environ("/", headers=[("X-Bad", "a\x01b")])
    d = drive(mw, env)
    assert d.body == b"hello" and mw.errors == 1


# ---- construction ----


def test_construction_errors(make_host, script, engine, tmp_path):
    app = simple_app([])
    with pytest.raises(hostscript.UsageError, match="send_response"):
        Middleware(app, make_host(hooks=("read_request", "log")))
    with pytest.raises(hostscript.ArgumentTypeError):
        Middleware(object(), make_host(hooks=HOOKS))
    with pytest.raises(hostscript.ArgumentTypeError):
        Middleware(app, script)  # one path, not a list
    with pytest.raises(hostscript.UsageError):
        Middleware(app, make_host(hooks=HOOKS), engine=engine)
    closed = make_host(hooks=HOOKS)
    closed.close()
    with pytest.raises(hostscript.UsageError):
        Middleware(app, closed)
    with pytest.raises(hostscript.ScriptError):
        Middleware(app, [str(tmp_path / "missing.lua")], engine=engine)
    bad = tmp_path / "bad.lua"
    bad.write_text("return 42")
    with pytest.raises(hostscript.Error):
        Middleware(app, [script, str(bad)], engine=engine)
    with pytest.raises(hostscript.UsageError, match="hooks must include"):
        Middleware(app, [script], engine=engine, hooks=("read_request",))


def test_scripts_list_creates_and_closes_its_host(script, engine):
    calls = []
    with Middleware(simple_app(calls), [script], engine=engine, shared={"log": 1 << 20}) as mw:
        assert mw.host.engine == engine and mw.host.hooks == HOOKS
        d = drive(mw, environ("/", headers=[("X-Deny", "1")]))
        assert d.status.startswith("403") and calls == []
    assert mw.host.closed


def test_given_host_is_not_closed(mw_host):
    mw = Middleware(simple_app([]), mw_host)
    mw.close()
    assert not mw_host.closed


# ---- real servers ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc=None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def load_app_module(tmp_path):
    path = tmp_path / "wsgiapp.py"
    path.write_text(APP_SOURCE)
    spec = importlib.util.spec_from_file_location(f"wsgiapp_{id(path)}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def serve(kind, tmp_path, script, engine):
    """Run the app module behind KIND on loopback; yields the port."""
    if kind == "gunicorn":
        (tmp_path / "wsgiapp.py").write_text(APP_SOURCE)
        port = free_port()
        env = dict(os.environ, HS_WSGI_SCRIPT=script, HS_WSGI_ENGINE=engine,
                   PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--threads", "4",
             "--workers", "1", "--bind", f"127.0.0.1:{port}", "--chdir", str(tmp_path),
             "--keep-alive", "30", "--log-level", "warning", "wsgiapp:app"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_listening(port, proc)
            yield port
        finally:
            proc.terminate()
            try:
                out, _ = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            # no traceback but those of GET /raise
            assert out.count("Traceback") == out.count("RuntimeError: the application failed"), out
        return
    mod = load_app_module(tmp_path)
    app = mod.make(script, engine)
    if kind == "waitress":
        import waitress.server
        srv = waitress.server.create_server(app, host="127.0.0.1", port=0, threads=4,
                                            channel_timeout=30)
        port = srv.effective_port
        stopping = threading.Event()

        def run_waitress():
            try:
                srv.run()
            except OSError:  # close() from this thread raced its select(): EBADF, at the end only
                if not stopping.is_set():
                    raise

        def stop_waitress():
            stopping.set()
            srv.close()

        t = threading.Thread(target=run_waitress, daemon=True)
        t.start()
        stop = stop_waitress
    elif kind == "cheroot":
        from cheroot import wsgi as cw
        srv = cw.Server(("127.0.0.1", 0), app, numthreads=4)
        srv.prepare()
        port = srv.bind_addr[1]
        t = threading.Thread(target=srv.serve, daemon=True)
        t.start()
        stop = srv.stop
    else:
        raise ValueError(kind)
    try:
        wait_listening(port)
        yield port
    finally:
        stop()
        t.join(10)
        app.close()


SERVERS = ["waitress", "cheroot", "gunicorn"]


@pytest.fixture(params=SERVERS)
def server(request, tmp_path, script, engine):
    with serve(request.param, tmp_path, script, engine) as port:
        yield port


def get(conn, path, headers=None):
    conn.request("GET", path, headers=headers or {})
    r = conn.getresponse()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


def test_server_rewrite_header(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    status, hdrs, body = get(conn, "/p%20q?x=1", {"X-Rewrite": "abc"})
    assert status == 200
    assert body == b"echo=rewritten:abc path=/p q qs=x=1 method=GET"
    status, _, body = get(conn, "/p", {"X-Uri": "/moved?z=2", "X-Method": "PUT"})
    assert body == b"echo=None path=/moved qs=z=2 method=PUT"
    conn.close()


def test_server_handler_answers(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    assert get(conn, "/count")[2] == b"0"
    status, hdrs, body = get(conn, "/x")
    assert status == 200
    for _ in range(3):
        status, hdrs, body = get(conn, "/x", {"X-Deny": "1"})
        assert status == 403 and body == b"denied by lua\n" and hdrs["x-denied-by"] == "lua"
    assert get(conn, "/count")[2] == b"1"  # the app saw the one allowed request only
    conn.close()


def test_server_send_response_adds_header(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    status, hdrs, body = get(conn, "/y")
    assert status == 200 and hdrs["x-hooked"] == "yes" and hdrs["x-app-status"] == "200"
    status, hdrs, body = get(conn, "/y", {"X-Replace": "1"})
    assert body == b"replaced by lua\n" and int(hdrs["content-length"]) == len(body)
    # the connection is still usable after a replaced body of another length
    assert get(conn, "/y")[0] == 200
    conn.close()


def test_server_app_raising_still_logs_500(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    status, _, _ = get(conn, "/raise")
    assert status == 500
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    deadline = time.monotonic() + 10
    while (got := get(conn, "/status?/raise")[2]) == b"None" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert got == b"500"
    assert get(conn, "/status?/count")[2] == b"None"  # (nothing logged under that URI)
    conn.close()


THREADS, PER_THREAD = 8, 500


def test_server_under_load(server):
    errors = []
    done = [0]
    lock = threading.Lock()

    def client(n):
        conn = http.client.HTTPConnection("127.0.0.1", server, timeout=20)
        try:
            for i in range(PER_THREAD):
                deny = i % 10 == 0
                status, hdrs, body = get(conn, f"/t{n}?i={i}",
                                         {"X-Deny": "1"} if deny else {"X-Rewrite": f"{n}-{i}"})
                if deny:
                    ok = status == 403 and body == b"denied by lua\n"
                else:
                    ok = (status == 200 and hdrs.get("x-hooked") == "yes"
                          and body == f"echo=rewritten:{n}-{i} path=/t{n} qs=i={i} method=GET".encode())
                if not ok:
                    errors.append((n, i, status, body[:100]))
                    return
                with lock:
                    done[0] += 1
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append((n, repr(exc)))
        finally:
            conn.close()

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    elapsed = time.monotonic() - started
    assert not errors, errors[:5]
    assert done[0] == THREADS * PER_THREAD
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    assert get(conn, "/count")[2] == str(THREADS * PER_THREAD * 9 // 10).encode()
    # log fires once per request, after the server closed its response (maybe after
    # the client read it): poll until every earlier request (the load, /count and the
    # earlier polls) has been logged, and never more
    expected = THREADS * PER_THREAD + 1
    deadline = time.monotonic() + 10
    while True:
        got = int(get(conn, "/logged")[2])
        assert got <= expected, (got, expected)
        if got == expected or time.monotonic() > deadline:
            break
        expected += 1  # this poll is logged too
        time.sleep(0.02)
    assert got == expected, (got, expected)
    conn.close()
    print(f"{THREADS * PER_THREAD} requests in {elapsed:.2f} s "
          f"({THREADS * PER_THREAD / elapsed:.0f}/s)")


def test_send_response_respond_with_empty_body(make_host, tmp_path):
    h = make_host(hooks=HOOKS)
    h.load("""
local E = {}
function E:on_send_response(txn)
  if txn.req.headers["x-empty"] then return txn:respond(204) end
end
return E""", "e")
    inner = Closing([b"app body"])
    mw = Middleware(lambda e, s: (s("200 OK", [("Content-Type", "text/plain")]), inner)[1], h)
    d = drive(mw, environ("/", headers=[("X-Empty", "1")]), validate=False)
    assert d.status == "204 No Content" and d.body == b"" and d.header("content-length") == "0"
    assert inner.closes == 1 and not inner.iterated
    inner = Closing([b"app body"])
    d = drive(mw, environ("/"))
    assert d.status == "200 OK" and d.body == b"app body"


def test_only_handled_hooks_fire_and_answer_drops_hop_by_hop(make_host):
    h = make_host(hooks=HOOKS, shared={"log": 1 << 20})
    h.load("""
local L = {}
function L:on_log(txn) hs.shared.log:incr("n", 1, 0); hs.shared.log:set("status", txn.resp.status) end
return L""", "logonly")
    calls = []
    mw = Middleware(simple_app(calls), h)
    d = drive(mw, environ("/", headers=[("X-Deny", "1")]))  # no read_request handler: no answer
    assert d.status == "200 OK" and d.header("x-hooked") is None and len(calls) == 1
    assert logged(h)[:2] == (1, 200)
    h.load("""
local A = {}
function A:on_read_request(txn) return txn:respond(503, "busy", {connection = "close", ["x-a"] = "1"}) end
return A""", "answer")
    d = drive(mw, environ("/"), validate=False)  # (validate wants a Content-Type)
    assert d.status == "503 Service Unavailable" and d.header("connection") is None
    assert d.header("x-a") == "1" and len(calls) == 1


def test_closed_host_passes_requests_through(make_host, script):
    h = make_host(hooks=HOOKS, shared={"log": 1 << 20})
    h.load_file(script)
    calls = []
    mw = Middleware(simple_app(calls), h)
    h.close()
    d = drive(mw, environ("/", headers=[("X-Deny", "1")]))
    assert d.status == "200 OK" and len(calls) == 1 and mw.errors == 1


def test_on_error_raise_host_is_still_counted_not_raised(make_host, script, caplog):
    h = make_host(hooks=HOOKS, shared={"log": 1 << 20}, on_error="raise")
    h.load_file(script)
    calls = []
    mw = Middleware(simple_app(calls), h)
    with caplog.at_level("ERROR", logger="hostscript"):
        d = drive(mw, environ("/", headers=[("X-Fail", "read_request")]))
    assert d.body == b"hello" and mw.errors == 1 and len(calls) == 1
    assert sum("boom in read_request" in r.getMessage() for r in caplog.records) == 1
