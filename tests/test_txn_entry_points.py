"""The transaction lives in C: every way in (header pairs, a raw header block, an
http.client.HTTPMessage, the C API) stores into the one C transaction, validated by
the same rules; txn.ctx crosses both ways; a transaction in use by a fire on another
thread refuses to be touched; every error is a hostscript.Error."""
from __future__ import annotations

import email.message
import gc
import http.client
import io
import subprocess
import threading

import pytest
from helpers import build_c_program, rss_bytes, run_in_thread

import hostscript
from hostscript import Headers, Transaction

PAIRS = [("Host", "example.com"), ("Accept", "text/html"), ("X-Rep", "1"), ("Cookie", "a=1"),
         ("x-rep", "2"), ("X-REP", "3")]
RAW = b"".join(f"{k}: {v}\r\n".encode() for k, v in PAIRS) + b"\r\n"

# A handler that reports every request header it sees, in order, into the response.
ECHO = """
local C = {}
function C:on_read_request(txn)
  local seen = {}
  for name, value in txn.req.headers:each() do seen[#seen + 1] = name .. "=" .. value end
  txn.resp.headers["x-seen"] = table.concat(seen, ";")
  txn.resp.headers["x-rep"] = table.concat(txn.req.headers:get_all("X-REP"), ",")
end
return C
"""


def _message() -> http.client.HTTPMessage:
    return http.client.parse_headers(io.BytesIO(RAW))


def _email_message() -> email.message.Message:
    m = email.message.Message()
    for k, v in PAIRS:
        m[k] = v
    return m


ENTRY_POINTS = {
    "pairs": lambda: PAIRS,
    "tuple-of-lists": lambda: tuple([k, v] for k, v in PAIRS),
    "raw-bytes": lambda: RAW,
    "raw-bytes-lf-no-blank-line": lambda: RAW.replace(b"\r\n", b"\n")[:-1],
    "raw-bytearray": lambda: bytearray(RAW),
    "http-message": _message,
    "email-message": _email_message,
    "headers-view": lambda: Transaction(headers=PAIRS).request.headers,
    "bytes-pairs": lambda: [(k.encode(), v.encode()) for k, v in PAIRS],
}


@pytest.mark.parametrize("source", list(ENTRY_POINTS))
def test_every_entry_point_stores_repeated_names_in_order_and_lua_sees_them(host, source):
    host.load(ECHO, name="echo.lua")
    txn = Transaction("GET", "/", ENTRY_POINTS[source]())
    assert txn.request.headers.items() == PAIRS
    assert host.fire("read_request", txn).status is hostscript.Outcome.CONTINUE
    assert txn.response.headers["x-seen"] == ";".join(f"{k}={v}" for k, v in PAIRS)
    assert txn.response.headers["X-Rep"] == "1,2,3"


def test_assigning_headers_replaces_them_from_any_entry_point(host):
    host.load(ECHO, name="echo.lua")
    txn = Transaction(headers=[("Old", "1")])
    txn.request.headers = RAW
    host.fire("read_request", txn)
    assert txn.response.headers["x-rep"] == "1,2,3"
    txn.response.headers = _message()
    assert txn.response.headers.items() == PAIRS


def test_lua_changes_are_python_reads_without_a_copy_step(host):
    host.load("""local C = {} function C:on_read_request(txn)
      txn.req.headers["x-added"] = "lua"; txn.req.headers["cookie"] = nil
      txn.req.method = "POST"; txn.req.uri = "/rewritten"
      txn.resp.status = 201; txn.resp.body = "made"
    end return C""", name="w.lua")
    txn = Transaction("GET", "/", PAIRS)
    headers = txn.request.headers  # a view taken before the fire sees the change
    host.fire("read_request", txn)
    assert headers["x-added"] == "lua" and "cookie" not in headers
    assert (txn.request.method, txn.request.uri) == ("POST", "/rewritten")
    assert (txn.response.status, txn.response.body) == (201, b"made")


# ---- refused everywhere ----

BAD_VALUES = ["a\r\nX-Injected: 1", "a\nb", "a\rb", "a\0b", "a\x0bb", "a\x7fb", "\x1b[31m"]
BAD_NAMES = ["X A", "X:A", "", "X\r\nA", "X\0", "caf\u00e9"]


@pytest.mark.parametrize("value", BAD_VALUES + ["\u20ac"])
def test_bad_header_values_are_refused_by_every_python_entry_point(value):
    txn = Transaction(headers=[("Host", "x")])
    attempts = [
        lambda: Transaction(headers=[("X-A", value)]),
        lambda: Transaction(response_headers=[("X-A", value)]),
        lambda: Headers([("X-A", value)]),
        lambda: txn.request.headers.__setitem__("X-A", value),
        lambda: txn.request.headers.__setitem__("X-A", ["ok", value]),
        lambda: txn.request.headers.add("X-A", value),
        lambda: setattr(txn.request, "headers", [("X-A", value)]),
    ]
    if value != "\u20ac":  # the raw-block and Message forms carry bytes / parsed lines
        if "\r\n" not in value:  # (in a raw block that is just the next line)
            raw = b"X-A: " + value.encode("latin-1") + b"\r\n"
            attempts.append(lambda: Transaction(headers=b"Host: x\r\n" + raw))
        m = email.message.Message()
        m._headers.append(("X-A", value))  # as a parser keeps a folded or raw line
        attempts.append(lambda: Transaction(headers=m))
    for attempt in attempts:
        with pytest.raises(hostscript.UsageError):
            attempt()
    assert txn.request.headers.items() == [("Host", "x")]  # nothing stored half-way


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_header_names_are_refused_by_every_python_entry_point(name):
    txn = Transaction(headers=[("Host", "x")])
    for attempt in (lambda: Transaction(headers=[(name, "v")]),
                    lambda: txn.response.headers.__setitem__(name, "v"),
                    lambda: txn.response.headers.add(name, "v"),
                    lambda: Headers([(name, "v")])):
        with pytest.raises(hostscript.UsageError):
            attempt()
    assert len(txn.response.headers) == 0


@pytest.mark.parametrize("block", [b"Host: a\r\n folded\r\n", b"Host a\r\n", b"Host: a\r\n\r\nGET / HTTP/1.1\r\n",
                                   b"Bad Name: v\r\n", b"Host: a\r\nX: b\rc\r\n"])
def test_raw_header_blocks_that_could_smuggle_are_refused(block):
    with pytest.raises(hostscript.UsageError, match="header block line"):
        Transaction(headers=block)


@pytest.mark.parametrize("method", ["GET / HTTP/1.1\r\nHost: internal\r\n\r\nGET", "GE T", "", "G\u20acT", "G\0"])
def test_invalid_methods_are_refused_from_python_and_lua(host, method):
    with pytest.raises(hostscript.UsageError):
        Transaction(method=method)
    txn = Transaction()
    with pytest.raises(hostscript.UsageError):
        txn.request.method = method
    host.load("local C = {} function C:on_read_request(txn) txn.req.method = txn.req.headers['m'] end return C",
              name="m.lua")
    if "\u20ac" not in method and method:
        txn.request.headers["m"] = method.replace("\r\n", " ").replace("\0", " ")  # headers carry no CR/LF
        out = host.fire("read_request", txn)
        assert out.status is hostscript.Outcome.ERROR and "invalid method" in out.error.message
    assert txn.request.method == "GET"


@pytest.mark.parametrize("uri", ["/a b", "/a\r\nX: y", "/a\0", "", "/\x7f"])
def test_invalid_uris_are_refused_from_python_and_lua(host, uri):
    with pytest.raises(hostscript.UsageError):
        Transaction(uri=uri)
    host.load("local C = {} function C:on_read_request(txn) txn.req.uri = txn.ctx.uri end return C", name="u.lua")
    txn = Transaction(uri="/ok")
    txn.ctx = {"uri": uri}
    out = host.fire("read_request", txn)
    assert out.status is hostscript.Outcome.ERROR and "invalid uri" in out.error.message
    assert txn.request.uri == "/ok"


def test_tabs_and_obs_text_are_fine_in_values(host):
    txn = Transaction(headers=[("X-T", "a\tb"), ("X-O", "\xe9\xff")])
    assert txn.request.headers.items() == [("X-T", "a\tb"), ("X-O", "\xe9\xff")]


def test_header_names_fold_case_in_ascii_only():
    txn = Transaction(headers=[("X-I", "1")])
    assert txn.request.headers["x-i"] == "1"
    assert "X-\u0131" not in txn.request.headers  # dotless i is not a case of I
    with pytest.raises(KeyError):
        txn.request.headers["X@"]  # '@' and '`' differ by the case bit but are not letters


def test_latin1_text_and_bytes_round_trip(host):
    host.load(ECHO, name="echo.lua")
    txn = Transaction(b"GET", b"/caf\xe9", [("X-L", "caf\u00e9"), (b"X-B", b"\xff")])
    assert txn.request.uri == "/caf\u00e9"
    host.fire("read_request", txn)
    assert txn.response.headers["x-seen"] == "X-L=caf\u00e9;X-B=\u00ff"


@pytest.mark.parametrize("engine", ["luajit", "lua54"])
def test_c_entry_points_validate_like_python(engine, tmp_path):
    exe = build_c_program(engine, "txn_checks.c", tmp_path / "txn_checks", "-O1", "-g")
    proc = subprocess.run([str(exe), "validate"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


@pytest.mark.parametrize("engine", ["luajit", "lua54"])
def test_one_field_reads_of_unfetched_headers_ask_the_host_not_copy_the_set(engine, tmp_path):
    # the Traffic Server plugin's binding (hs_txn.fetch/lookup): reads before and after
    # edits give what a copied-in set would, and only a listing or a field the host
    # cannot answer copies the set in (txn_checks.c "lookup" counts both)
    exe = build_c_program(engine, "txn_checks.c", tmp_path / "txn_lookup", "-O1", "-g")
    proc = subprocess.run([str(exe), "lookup"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "ok", proc.stdout + proc.stderr
    assert "list=0 fetches=1 lookups=7" in proc.stdout
    assert "list=1 fetches=1 lookups=6" in proc.stdout


@pytest.mark.parametrize("engine", ["luajit", "lua54"])
def test_peek_answers_what_fetching_and_replaying_the_edits_would(engine, tmp_path):
    # 200,000 random cases (txn_checks.c "peek"): host fields with duplicates, names
    # that differ in case and values the core refuses, then random set/add/remove
    # edits; a one-field read must equal the fetched set after the replay
    exe = build_c_program(engine, "txn_checks.c", tmp_path / "txn_peek", "-O1", "-g")
    proc = subprocess.run([str(exe), "peek", "200000"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("ok peek="), proc.stdout + proc.stderr
    assert int(proc.stdout.split("=")[1]) > 500000  # most reads are answered without a fetch


# ---- txn.ctx both ways ----

def test_ctx_assigned_in_python_is_read_by_lua_on_another_thread_and_back(host):
    host.load("""local C = {}
    function C:on_read_request(txn)
      txn.resp.headers["x-from-py"] = txn.ctx.user .. ":" .. #txn.ctx.roles
      txn.ctx.seen_by_lua = true
    end
    function C:on_send_response(txn) txn.resp.headers["x-edit"] = tostring(txn.ctx.edit) end
    return C""", name="c.lua")
    txn = Transaction()
    txn.ctx = {"user": "ann", "roles": ["a", "b"]}
    run_in_thread(host.fire, "read_request", txn)
    assert txn.response.headers["x-from-py"] == "ann:2"
    ctx = run_in_thread(lambda: txn.ctx)
    assert ctx == {"user": "ann", "roles": ["a", "b"], "seen_by_lua": True}
    ctx["edit"] = 7  # a change to the dict read is sent with the next fire
    run_in_thread(host.fire, "send_response", txn)
    assert txn.response.headers["x-edit"] == "7"
    assert txn.ctx["edit"] == 7


def test_ctx_item_assignment_in_python_is_not_lost(host):
    host.load("local C = {} function C:on_read_request(txn) txn.resp.headers['x'] = txn.ctx.x end return C",
              name="x.lua")
    txn = Transaction()
    txn.ctx["x"] = "set in python"
    host.fire("read_request", txn)
    assert txn.response.headers["x"] == "set in python"


def _nested(levels: int) -> list:
    v: list = [1]
    for _ in range(levels):
        v = [v]
    return v


@pytest.mark.parametrize("bad", [{"f": print}, {"s": {1, 2}}, {1j: 1}, {"deep": _nested(40)},
                                 {"big": 2 ** 64}, "not a dict"])
def test_ctx_with_non_plain_data_is_refused_and_changes_nothing(bad):
    txn = Transaction()
    txn.ctx = {"keep": 1}
    with pytest.raises(hostscript.Error):
        txn.ctx = bad
    assert txn.ctx == {"keep": 1}


def test_ctx_that_python_broke_fails_the_fire_cleanly_then_works(host):
    host.load("local C = {} function C:on_read_request(txn) txn.ctx.n = (txn.ctx.n or 0) + 1 end return C",
              name="n.lua")
    txn = Transaction()
    txn.ctx["f"] = print
    with pytest.raises(hostscript.ArgumentTypeError, match=r"txn.ctx\['f'\]"):
        host.fire("read_request", txn)
    del txn.ctx["f"]
    assert host.fire("read_request", txn).status is hostscript.Outcome.CONTINUE
    assert txn.ctx == {"n": 1}


# ---- busy ----

SLOW = """local C = {}
function C:on_read_request(txn)
  local t0 = os.clock() while os.clock() - t0 < 0.4 do end
  txn.resp.headers["x-done"] = "yes"
end return C"""


def test_a_transaction_in_use_by_a_long_fire_refuses_every_touch(make_host):
    host = make_host(time_limit=5)  # the count hook lets the long fire release the GIL
    host.load(SLOW, name="slow.lua")
    txn = Transaction(headers=PAIRS)
    headers = txn.request.headers
    worker = threading.Thread(target=host.fire, args=("read_request", txn))
    worker.start()
    while host.stats()["fires"] == 0:
        pass
    touches = [lambda: txn.request.headers, lambda: headers["host"], lambda: headers.items(),
               lambda: txn.request.method, lambda: txn.response.status, lambda: txn.response.body,
               lambda: txn.ctx, lambda: setattr(txn.response, "status", 200),
               lambda: headers.add("x", "y"), lambda: host.fire("read_request", txn)]
    refused = 0
    for touch in touches:
        try:
            touch()
        except hostscript.BusyError:
            refused += 1
    worker.join()
    assert refused == len(touches)  # the fire runs 0.4 s: every touch happened during it
    assert txn.response.headers["x-done"] == "yes"
    assert len(txn.request.headers) == len(PAIRS)


def test_c_second_fire_on_a_busy_transaction_is_refused(engine, tmp_path):
    # (under TSan too: tests/test_sanitizers.py, txn_checks-thread)
    exe = build_c_program(engine, "txn_checks.c", tmp_path / "txn_busy", "-O1", "-g")
    proc = subprocess.run([str(exe), "busy"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-4000:]


# ---- every error is a hostscript.Error ----

def _bad_calls(host: hostscript.Host) -> list:
    txn = Transaction()
    h = txn.request.headers
    return [
        lambda: hostscript.Host(hooks="read_request"),
        lambda: hostscript.Host(hooks=[1]),
        lambda: hostscript.Host(hooks=["bad hook"]),
        lambda: hostscript.Host(hooks=["a", "a"]),
        lambda: hostscript.Host(engine="nope"),
        lambda: hostscript.Host(time_limit=-1),
        lambda: hostscript.Host(time_limit="1"),
        lambda: hostscript.Host(memory_limit=0),
        lambda: hostscript.Host(memory_limit=1.5),
        lambda: hostscript.Host(memory_limit=100),
        lambda: hostscript.Host(on_error="ignore"),
        lambda: host.load(5),
        lambda: host.load("return {}", name="a\0b"),
        lambda: host.load("return {", name="syntax.lua"),
        lambda: host.load("\udcff"),
        lambda: host.load_file("/nonexistent/x.lua"),
        lambda: host.reload("never-loaded"),
        lambda: host.unload("never-loaded"),
        lambda: host.unload(5),
        lambda: host.fire("undeclared", txn),
        lambda: host.fire(5, txn),
        lambda: host.fire("read_request", {"not": "a txn"}),
        lambda: host.fire("read_request"),
        lambda: host.fire(hook="read_request", txn=txn, extra=1),
        lambda: Transaction(method=5),
        lambda: Transaction(method=b"GET", uri="/caf\u20ac"),
        lambda: Transaction(status=2 ** 32 + 200),
        lambda: Transaction(status=-7),
        lambda: Transaction(status=True),
        lambda: Transaction(status="200"),
        lambda: Transaction(body=5),
        lambda: Transaction(body="\udcff"),
        lambda: Transaction(headers="Host: x"),
        lambda: Transaction(headers=[("a",)]),
        lambda: Transaction(headers=[("a", 1)]),
        lambda: Transaction(headers=5),
        lambda: Transaction("GET", "/", (), 1),
        lambda: Transaction(nope=1),
        lambda: h["absent"],
        lambda: h[5],
        lambda: h.get(),
        lambda: h.add("x"),
        lambda: h.remove(5),
        lambda: h.__delitem__("absent"),
        lambda: setattr(txn.response, "status", 1000),
        lambda: setattr(txn.response, "body", object()),
        lambda: delattr(txn.request, "method"),
        lambda: delattr(txn, "ctx"),
        lambda: setattr(txn, "ctx", []),
        lambda: hostscript._bridge.ctx_decode(b"\x01corrupt"),
    ]


def test_every_error_the_package_raises_is_a_hostscript_error(make_host):
    host = make_host()
    calls = _bad_calls(host)
    for i, call in enumerate(calls):
        try:
            call()
        except KeyError:
            pass  # a mapping's missing key, as dict does
        except hostscript.Error:
            pass
        except BaseException as exc:  # pragma: no cover - the failure being tested for
            pytest.fail(f"call #{i} raised {type(exc).__name__}: {exc}, not a hostscript.Error")
        else:
            pytest.fail(f"call #{i} did not raise")
    closed = make_host()
    closed.close()
    for call in (lambda: closed.fire("read_request", Transaction()), lambda: closed.load("return {}"),
                 lambda: closed.stats(), lambda: closed.scripts):
        with pytest.raises(hostscript.ClosedError):
            call()


def test_usage_errors_are_still_value_and_type_errors():
    with pytest.raises(ValueError):
        Transaction(method="GE T")
    with pytest.raises(TypeError):
        Transaction(method=5)
    with pytest.raises(ValueError):
        hostscript.Host(engine="nope")


# ---- no cycle, no leak ----

def test_a_million_transactions_created_and_dropped_leave_rss_flat(host):
    host.load("local C = {} function C:on_read_request(txn) txn.resp.headers['x'] = '1' txn.ctx.a = 1 end return C",
              name="a.lua")
    gc.disable()  # freed by reference counting alone: nothing waits for the cyclic GC
    try:
        for i in range(20000):  # warm up allocator pools
            Transaction("GET", "/", PAIRS).request.headers.items()
        before = rss_bytes() // 1024
        for i in range(1_000_000):
            t = Transaction("GET", "/", PAIRS)
            if i % 100 == 0:
                host.fire("read_request", t)
                t.response.headers.items()
                t.ctx
        after = rss_bytes() // 1024
    finally:
        gc.enable()
    assert after - before < 4096, (before, after)
