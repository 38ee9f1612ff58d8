"""The transaction: Python-side Headers, the Lua-side header/field API, the round trip
of changes in both directions, txn.ctx encoding, and a transaction moving between
engines."""
from __future__ import annotations

import threading

import pytest

import hostscript
from hostscript import Headers, Outcome, Transaction


def handler(body: str, hook: str = "read_request", prelude: str = "") -> str:
    """A handler class whose on_<hook>(txn) runs BODY."""
    return f"{prelude}\nlocal C = {{}}\nfunction C:on_{hook}(txn)\n{body}\nend\nreturn C\n"


def run(host, body: str, txn: Transaction = None, hook: str = "read_request",
        prelude: str = ""):
    """(Re)load script t.lua with BODY as the handler of HOOK, fire it once."""
    host.load(handler(body, hook, prelude), name="t.lua")
    txn = txn if txn is not None else Transaction()
    return host.fire(hook, txn), txn


def ok(out: Outcome) -> None:
    assert out.status is Outcome.CONTINUE, out.error


# =====================================================================================
# Python-side Headers
# =====================================================================================

def test_headers_getitem_and_get_are_case_insensitive():
    h = Headers([("Content-Type", "text/plain"), ("X-A", "1")])
    assert h["content-type"] == "text/plain"
    assert h["CONTENT-TYPE"] == "text/plain"
    assert h.get("x-a") == "1"
    assert h.get("X-a") == "1"
    assert h.get("missing") is None
    assert h.get("missing", "dflt") == "dflt"
    assert "x-A" in h and "missing" not in h and 3 not in h
    with pytest.raises(KeyError):
        h["missing"]


def test_headers_getitem_returns_first_value():
    h = Headers([("x-a", "1"), ("X-A", "2")])
    assert h["X-A"] == "1"


def test_headers_get_all_returns_every_value_in_order():
    h = Headers([("Accept", "a"), ("Host", "h"), ("accept", "b"), ("ACCEPT", "c")])
    assert h.get_all("accept") == ["a", "b", "c"]
    assert h.get_all("Host") == ["h"]
    assert h.get_all("missing") == []


def test_headers_set_replaces_first_and_drops_the_rest_keeping_order():
    h = Headers([("A", "1"), ("B", "2"), ("a", "3"), ("C", "4"), ("A", "5")])
    h["a"] = "x"
    # the first A keeps its place and its spelling; the later ones are gone
    assert h.items() == [("A", "x"), ("B", "2"), ("C", "4")]
    assert h == [("A", "x"), ("B", "2"), ("C", "4")]


def test_headers_set_appends_when_absent():
    h = Headers([("A", "1")])
    h["New"] = "n"
    assert h.items() == [("A", "1"), ("New", "n")]


def test_headers_add_appends_another_value():
    h = Headers([("A", "1"), ("B", "2")])
    h.add("a", "3")
    assert h.items() == [("A", "1"), ("B", "2"), ("a", "3")]
    assert h.get_all("A") == ["1", "3"]
    assert len(h) == 3


def test_headers_remove_drops_every_value_and_ignores_absent():
    h = Headers([("A", "1"), ("B", "2"), ("a", "3")])
    h.remove("A")
    assert h.items() == [("B", "2")]
    h.remove("not-there")  # no error
    assert h.items() == [("B", "2")]


def test_headers_del_removes_all_values():
    h = Headers([("A", "1"), ("B", "2"), ("a", "3")])
    del h["a"]
    assert h.items() == [("B", "2")]


def test_headers_del_raises_keyerror_when_absent():
    h = Headers([("A", "1")])
    with pytest.raises(KeyError):
        del h["B"]
    assert h.items() == [("A", "1")]


def test_headers_iterate_as_pairs_in_order():
    pairs = [("A", "1"), ("B", "2"), ("a", "3")]
    assert list(Headers(pairs)) == pairs


BAD_VALUES = ["a\r\nb", "a\nb", "a\rb", "a\0b", "\r\nX-Injected: 1"]
BAD_NAMES = ["a\r\nb", "a\nb", "a\0b", "", "a:b", "a b"]


@pytest.mark.parametrize("value", BAD_VALUES)
def test_headers_reject_values_with_cr_lf_nul(value):
    with pytest.raises(ValueError):
        Headers([("X-A", value)])
    h = Headers([("X-A", "ok")])
    with pytest.raises(ValueError):
        h["X-A"] = value
    with pytest.raises(ValueError):
        h["X-B"] = value
    with pytest.raises(ValueError):
        h.add("X-A", value)
    assert h.items() == [("X-A", "ok")]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_headers_reject_invalid_names(name):
    with pytest.raises(ValueError):
        Headers([(name, "v")])
    h = Headers()
    with pytest.raises(ValueError):
        h[name] = "v"
    with pytest.raises(ValueError):
        h.add(name, "v")
    assert h.items() == []


def test_transaction_rejects_invalid_headers_at_construction():
    with pytest.raises(ValueError):
        Transaction(headers=[("X-A", "a\r\nb")])
    with pytest.raises(ValueError):
        Transaction(response_headers=[("X\nA", "v")])


# =====================================================================================
# Lua-side header API
# =====================================================================================

@pytest.fixture(params=["req", "resp"])
def which(request) -> str:
    return request.param


def _txn_with(which: str, headers) -> Transaction:
    if which == "req":
        return Transaction(headers=headers)
    return Transaction(response_headers=headers)


def _hdrs(txn: Transaction, which: str) -> Headers:
    return txn.request.headers if which == "req" else txn.response.headers


def test_lua_header_reads_are_case_insensitive(host, which):
    txn = _txn_with(which, [("Host", "h"), ("x-a", "1"), ("X-B", "b"), ("X-A", "2")])
    out, txn = run(host, f"""
      local h = txn.{which}.headers
      local all = h:get_all("X-a")
      txn.ctx.r = {{
        index = h["X-A"], lower = h["x-a"], mixed = h["x-A"],
        get = h:get("X-A"), all = all, nall = #all, b = h:get("x-b"),
      }}
    """, txn)
    ok(out)
    assert txn.ctx["r"] == {"index": "1", "lower": "1", "mixed": "1", "get": "1",
                            "all": ["1", "2"], "nall": 2, "b": "b"}


def test_lua_header_set_add_remove_and_nil(host, which):
    txn = _txn_with(which, [("Host", "h"), ("x-a", "1"), ("X-B", "b"), ("X-A", "2")])
    out, txn = run(host, f"""
      local h = txn.{which}.headers
      h:set("X-A", "s")          -- replaces the first x-a in place, drops the second
      h:add("X-C", "c1")
      h:add("x-c", "c2")
      h["x-d"] = "d"
      h["x-d"] = nil             -- removes
      h:remove("x-b")
      h["x-e"] = 42              -- numbers become strings
      h["Host"] = "h2"           -- index assignment replaces
      h:set("x-gone", "g")
      h:set("x-gone", nil)       -- :set with nil removes
    """, txn)
    ok(out)
    assert _hdrs(txn, which).items() == [
        ("Host", "h2"), ("x-a", "s"), ("X-C", "c1"), ("x-c", "c2"), ("x-e", "42")]


def test_lua_header_list_assignment_sets_multiple_values(host, which):
    txn = _txn_with(which, [("Host", "h"), ("X-L", "old1"), ("X-B", "b"), ("x-l", "old2")])
    out, txn = run(host, f"""
      local h = txn.{which}.headers
      h["x-l"] = {{"l1", "l2", 3}}
      h:set("x-m", {{"m1", "m2"}})
      txn.ctx.all = h:get_all("X-L")
      txn.ctx.first = h["x-l"]
    """, txn)
    ok(out)
    hdrs = _hdrs(txn, which)
    assert hdrs.get_all("x-l") == ["l1", "l2", "3"]
    assert hdrs.get_all("x-m") == ["m1", "m2"]
    assert "old1" not in [v for _, v in hdrs] and "old2" not in [v for _, v in hdrs]
    # the headers that were not touched keep their relative order
    assert [k for k, _ in hdrs if k.lower() not in ("x-l", "x-m")] == ["Host", "X-B"]
    assert txn.ctx == {"all": ["l1", "l2", "3"], "first": "l1"}


def test_lua_header_empty_list_assignment_removes(host, which):
    txn = _txn_with(which, [("X-L", "1"), ("Host", "h"), ("x-l", "2")])
    out, txn = run(host, f'txn.{which}.headers["x-l"] = {{}}', txn)
    ok(out)
    assert _hdrs(txn, which).items() == [("Host", "h")]


def test_lua_header_each_iterates_in_order(host, which):
    pairs = [("Host", "h"), ("x-a", "1"), ("X-B", "b"), ("X-A", "2"), ("Empty", "")]
    txn = _txn_with(which, pairs)
    out, txn = run(host, f"""
      local h = txn.{which}.headers
      local seen = {{}}
      for name, value in h:each() do seen[#seen + 1] = {{name, value}} end
      h:add("x-late", "z")
      local after = {{}}
      for name, value in h:each() do after[#after + 1] = name .. "=" .. value end
      txn.ctx.seen = seen
      txn.ctx.after = after
    """, txn)
    ok(out)
    assert txn.ctx["seen"] == [list(p) for p in pairs]
    assert txn.ctx["after"] == [f"{k}={v}" for k, v in pairs] + ["x-late=z"]


def test_lua_header_each_on_empty_headers_yields_nothing(host, which):
    out, txn = run(host, f"""
      local n = 0
      for _ in txn.{which}.headers:each() do n = n + 1 end
      txn.ctx.n = n
    """)
    ok(out)
    assert txn.ctx == {"n": 0}


def test_lua_reading_an_absent_header_gets_nil(host, which):
    txn = _txn_with(which, [("Host", "h")])
    out, txn = run(host, f"""
      local h = txn.{which}.headers
      local all = h:get_all("x-missing")
      txn.ctx.r = {{
        index_nil = h["x-missing"] == nil, get_nil = h:get("X-Missing") == nil,
        type = type(h["x-missing"]), all_type = type(all), nall = #all,
        host = h["host"],
      }}
    """, txn)
    ok(out)
    assert txn.ctx["r"] == {"index_nil": True, "get_nil": True, "type": "nil",
                            "all_type": "table", "nall": 0, "host": "h"}


def test_lua_header_changes_show_up_in_python_after_the_fire(host):
    txn = Transaction(headers=[("Host", "h"), ("X-Drop", "d")],
                      response_headers=[("Server", "s")])
    out, txn = run(host, """
      txn.req.headers["x-added"] = "a"
      txn.req.headers["x-drop"] = nil
      txn.resp.headers:add("x-resp", "r1")
      txn.resp.headers:add("x-resp", "r2")
    """, txn)
    ok(out)
    assert txn.request.headers.items() == [("Host", "h"), ("x-added", "a")]
    assert txn.response.headers.items() == [("Server", "s"), ("x-resp", "r1"), ("x-resp", "r2")]
    assert txn.request.headers["X-ADDED"] == "a"
    assert txn.response.headers.get_all("X-Resp") == ["r1", "r2"]


def test_python_header_changes_before_a_fire_are_seen_by_lua(host):
    host.load(handler("""
      local seen = {}
      for n, v in txn.req.headers:each() do seen[#seen + 1] = n .. "=" .. v end
      local rseen = {}
      for n, v in txn.resp.headers:each() do rseen[#rseen + 1] = n .. "=" .. v end
      txn.ctx.req = seen
      txn.ctx.resp = rseen
      txn.req.headers["x-lua"] = "l"
    """), name="t.lua")
    txn = Transaction(headers=[("Host", "h")])
    ok(host.fire("read_request", txn))
    assert txn.ctx == {"req": ["Host=h"], "resp": {}}  # an empty table is a dict
    assert txn.request.headers.items() == [("Host", "h"), ("x-lua", "l")]

    # now only Python changes things between fires
    txn.request.headers["x-lua"] = "from-python"
    txn.request.headers.add("X-Py", "p")
    del txn.request.headers["host"]
    txn.response.headers.add("Set-Cookie", "a=1")
    txn.response.headers.add("Set-Cookie", "b=2")
    ok(host.fire("read_request", txn))
    assert txn.ctx == {"req": ["x-lua=from-python", "X-Py=p"],
                       "resp": ["Set-Cookie=a=1", "Set-Cookie=b=2"]}
    # Lua's x-lua set replaced Python's value in place
    assert txn.request.headers.items() == [("x-lua", "l"), ("X-Py", "p")]


def test_python_removing_every_header_is_seen_by_lua(host):
    host.load(handler("txn.ctx.n = #txn.req.headers:get_all('x-a'); "
                      "txn.ctx.host = txn.req.headers.host or false"), name="t.lua")
    txn = Transaction(headers=[("Host", "h"), ("X-A", "1")])
    ok(host.fire("read_request", txn))
    assert txn.ctx == {"n": 1, "host": "h"}
    txn.request.headers.remove("x-a")
    txn.request.headers.remove("host")
    ok(host.fire("read_request", txn))
    assert txn.ctx == {"n": 0, "host": False}


def test_header_values_with_empty_strings_and_latin1_bytes_round_trip(host):
    txn = Transaction(headers=[("X-Empty", ""), ("X-Latin", "caf\xe9"), ("X-Last", "")])
    out, txn = run(host, """
      local h = txn.req.headers
      txn.ctx.empty = h["x-empty"]
      txn.ctx.latin_len = #h["x-latin"]
      txn.ctx.last = h["x-last"]
      h:add("x-new-empty", "")
    """, txn)
    ok(out)
    assert txn.ctx == {"empty": "", "latin_len": 4, "last": ""}
    assert txn.request.headers.items() == [
        ("X-Empty", ""), ("X-Latin", "caf\xe9"), ("X-Last", ""), ("x-new-empty", "")]


def test_many_headers_round_trip(host):
    n = 200
    req = [(f"X-H-{i}", f"value {i} " + "v" * (i % 50)) for i in range(n)]
    txn = Transaction(headers=req)
    out, txn = run(host, """
      local count, bad = 0, 0
      for name, value in txn.req.headers:each() do
        count = count + 1
        local i = tonumber(name:match("^X%-H%-(%d+)$"))
        if not i or value:sub(1, #("value " .. i .. " ")) ~= "value " .. i .. " " then bad = bad + 1 end
        txn.resp.headers:add("x-r-" .. i, value:upper())
        if i % 2 == 0 then txn.req.headers[name] = "even " .. i end
      end
      txn.ctx.count, txn.ctx.bad = count, bad
      txn.ctx.h150 = txn.req.headers["x-h-150"]
      txn.ctx.h151 = txn.req.headers:get("X-H-151")
    """, txn)
    ok(out)
    assert txn.ctx["count"] == n and txn.ctx["bad"] == 0
    assert txn.ctx["h150"] == "even 150"
    assert txn.ctx["h151"] == req[151][1]
    assert txn.request.headers.items() == [
        (k, f"even {i}" if i % 2 == 0 else v) for i, (k, v) in enumerate(req)]
    assert txn.response.headers.items() == [(f"x-r-{i}", v.upper()) for i, (_, v) in enumerate(req)]
    # and back again, unchanged by Python: the second fire sees the pulled state
    out = host.fire("read_request", txn)
    ok(out)
    assert txn.ctx["count"] == n
    assert len(txn.response.headers) == 2 * n


def test_repeated_header_replacement_keeps_every_header_intact(host):
    # replacing values leaves garbage in the C arena until it is compacted; the
    # headers around the replaced one must survive the compaction
    txn = Transaction(headers=[("A", "a"), ("X-Big", "0"), ("B", "b")])
    out, txn = run(host, """
      local h = txn.req.headers
      for i = 1, 500 do
        h["x-big"] = string.rep("v", 100) .. i
        if h.a ~= "a" or h.b ~= "b" then error("neighbour lost at " .. i) end
        if i % 50 == 0 then h:add("x-n" .. i, tostring(i)) end
      end
    """, txn)
    ok(out)
    assert txn.request.headers.items() == (
        [("A", "a"), ("X-Big", "v" * 100 + "500"), ("B", "b")]
        + [(f"x-n{i}", str(i)) for i in range(50, 501, 50)])


# ---- injection ----

INJECTIONS = [
    'txn.req.headers["x-a"] = "a\\r\\nb"',
    'txn.req.headers:set("x-a", "a\\nb")',
    'txn.req.headers:add("x-a", "a\\rb")',
    'txn.req.headers["x-a"] = "a\\0b"',
    'txn.resp.headers["x-a"] = {"ok", "a\\r\\nInjected: 1"}',
    'txn.resp.headers:add("x-a", "v\\r\\n\\r\\n<html>")',
    'txn.req.headers["x-a\\r\\nInjected"] = "v"',
    'txn.req.headers["bad name"] = "v"',
    'txn.req.headers:add("x:y", "v")',
    'txn.resp.headers:set("", "v")',
    'txn:respond(200, "body", {["x-a"] = "a\\r\\nb"})',
    'txn:respond(200, "body", {["x\\r\\ny"] = "v"})',
]


@pytest.mark.parametrize("stmt", INJECTIONS)
def test_lua_header_injection_is_an_error(host, stmt):
    txn = Transaction(headers=[("Host", "h"), ("X-A", "orig")], response_headers=[("X-A", "r")])
    out, txn = run(host, stmt, txn)
    assert out.status is Outcome.ERROR
    assert out.error.kind == "runtime"
    assert "invalid header" in out.error.message
    for hdrs in (txn.request.headers, txn.response.headers):
        for k, v in hdrs:
            assert not any(c in k + v for c in "\r\n\0"), (k, v)
    assert txn.request.headers.items() == [("Host", "h"), ("X-A", "orig")]
    assert txn.response.headers.items() == [("X-A", "r")]


def test_lua_list_assignment_with_one_bad_value_changes_nothing(host):
    txn = Transaction(headers=[("X-A", "1"), ("X-A", "2")])
    out, txn = run(host, """
      local ok, err = pcall(function() txn.req.headers["x-a"] = {"fine", "bad\\nvalue"} end)
      txn.ctx.ok = ok
      txn.ctx.all = txn.req.headers:get_all("x-a")
    """, txn)
    ok(out)
    assert txn.ctx == {"ok": False, "all": ["1", "2"]}
    assert txn.request.headers.items() == [("X-A", "1"), ("X-A", "2")]


@pytest.mark.parametrize("value", ["true", "function() end", "{{}}", "{'a', true}"])
def test_lua_header_value_of_wrong_type_is_an_error(host, value):
    out, txn = run(host, f'txn.req.headers["x-a"] = {value}',
                   Transaction(headers=[("X-A", "orig")]))
    assert out.status is Outcome.ERROR
    assert "header value must be a string or number" in out.error.message
    assert txn.request.headers.items() == [("X-A", "orig")]


# =====================================================================================
# method / uri / status / body
# =====================================================================================

def test_lua_sets_method_uri_status_body_visible_in_python(host):
    txn = Transaction("GET", "/old")
    out, txn = run(host, """
      txn.req.method = "POST"
      txn.req.uri = "/new?q=1&r=%20"
      txn.resp.status = 404
      txn.resp.body = "gone\\0binary\\255"
    """, txn)
    ok(out)
    assert txn.request.method == "POST"
    assert txn.request.uri == "/new?q=1&r=%20"
    assert txn.response.status == 404
    assert txn.response.body == b"gone\x00binary\xff"


def test_python_method_uri_status_body_are_seen_by_lua(host):
    host.load(handler("""
      txn.ctx.r = {method = txn.req.method, uri = txn.req.uri,
                   status = txn.resp.status or false, body = txn.resp.body}
    """), name="t.lua")
    txn = Transaction("PUT", "/x?y", body=b"abc")
    ok(host.fire("read_request", txn))
    assert txn.ctx["r"] == {"method": "PUT", "uri": "/x?y", "status": False, "body": "abc"}
    txn.request.method = "DELETE"
    txn.request.uri = "/z"
    txn.response.status = 201
    txn.response.body = "created"
    ok(host.fire("read_request", txn))
    assert txn.ctx["r"] == {"method": "DELETE", "uri": "/z", "status": 201, "body": "created"}
    txn.response.status = None
    ok(host.fire("read_request", txn))
    assert txn.ctx["r"]["status"] is False


def test_lua_status_number_is_an_integer(host):
    out, txn = run(host, """
      txn.resp.status = 201
      txn.ctx.int = math.type == nil or math.type(txn.resp.status) == "integer"
      txn.ctx.status = txn.resp.status
    """)
    ok(out)
    assert txn.ctx == {"int": True, "status": 201}
    assert txn.response.status == 201


@pytest.mark.parametrize("value", ["42", "'abc'", "99", "1000", "200.5", "-200", "0",
                                   "true", "{}", "1e300", "0/0"])
def test_lua_invalid_status_is_an_error(host, value):
    txn = Transaction(status=200)
    out, txn = run(host, f"txn.resp.status = {value}", txn)
    assert out.status is Outcome.ERROR
    assert out.error.kind == "runtime"
    assert txn.response.status == 200


@pytest.mark.parametrize("value", ["42", "'abc'", "1000"])
def test_lua_respond_with_invalid_status_is_an_error(host, value):
    txn = Transaction(status=200)
    out, txn = run(host, f"txn:respond({value}, 'x')", txn)
    assert out.status is Outcome.ERROR
    assert "respond" in out.error.message
    assert txn.response.status == 200
    assert txn.response.body == b""


def test_failed_respond_leaves_no_change_the_host_cannot_see(host):
    # txn:respond validates its headers only after it replaced the body; when a
    # header is invalid the fire fails, and the host must still see the very
    # response the next handler sees (nothing half-applied behind its back)
    txn = Transaction(status=200, body=b"original")
    out, txn = run(host, 'txn:respond(403, "partial", {["x-bad"] = "a\\r\\nb"})', txn)
    assert out.status is Outcome.ERROR
    assert txn.response.body == b"original"
    out, txn = run(host, "txn.ctx.body = txn.resp.body; txn.ctx.status = txn.resp.status", txn)
    ok(out)
    assert txn.ctx == {"body": txn.response.body.decode(), "status": txn.response.status}
    assert txn.ctx == {"body": "original", "status": 200}


@pytest.mark.parametrize("headers", ['{"a"}', '{[1.5] = "a"}', '{"a", ["x-ok"] = "1"}'])
def test_respond_with_a_numeric_header_key_is_handled_cleanly(host, headers):
    # A number key in txn:respond's header table must either be taken as a header
    # name (outcome DONE) or be refused with a clear error that changed nothing --
    # not converted in place under lua_next, which then fails with Lua's internal
    # "invalid key to 'next'" after part of the headers were already applied.
    txn = Transaction(response_headers=[("Server", "s")])
    out, txn = run(host, f'txn:respond(200, "x", {headers})', txn)
    if out.status is Outcome.ERROR:
        assert "next" not in out.error.message, out.error.message
        assert txn.response.headers.items() == [("Server", "s")]
    else:
        assert out.status is Outcome.DONE
        assert txn.response.headers.get_all("1") == ["a"] or \
            txn.response.headers.get_all("1.5") == ["a"]


def test_lua_respond_sets_status_body_and_headers(host):
    out, txn = run(host, 'txn:respond(403, "denied\\n", {["content-type"] = "text/plain", '
                         '["x-multi"] = {"1", "2"}})')
    assert out.status is Outcome.DONE
    assert txn.response.status == 403
    assert txn.response.body == b"denied\n"
    assert txn.response.headers["Content-Type"] == "text/plain"
    assert txn.response.headers.get_all("x-multi") == ["1", "2"]


# =====================================================================================
# txn.ctx
# =====================================================================================

CTX_BUILD = r"""
local function build()
  return {
    t = true, f = false,
    int = 42, neg = -7, zero = 0, float = 2.5, negf = -0.125, big = 2^40,
    s = "plain", emptystr = "",
    u = "h\195\169llo w\195\182rld \226\156\147 \240\159\142\137",
    nul = "a\0b",
    raw = "\255\254",
    empty = {},
    list = {1, "two", 3.5, true, {nested = {deeper = {"x"}}}},
    lol = {{1, 2}, {3, {4, 5}}, {}},
    map = {a = {b = {c = "d"}}, [1] = "int key", [2.5] = "float key", [-3] = "negative key",
           [0] = "zero key", [true] = "true key", [false] = "false key"},
    sparse = {[1] = "a", [3] = "c"},
  }
end

-- deep equality; unless LOOSE, Lua 5.4's integer/float subtypes must match too
local function same(a, b, path, loose)
  if type(a) ~= type(b) then
    error(path .. ": " .. type(a) .. " vs " .. type(b), 0)
  end
  if type(a) ~= "table" then
    if a ~= b then error(path .. ": " .. tostring(a) .. " vs " .. tostring(b), 0) end
    if not loose and math.type and math.type(a) ~= math.type(b) then
      error(path .. ": " .. math.type(a) .. " vs " .. math.type(b), 0)
    end
    return
  end
  for k, v in pairs(a) do same(v, b[k], path .. "[" .. tostring(k) .. "]", loose) end
  for k in pairs(b) do
    if a[k] == nil then error(path .. ": unexpected key " .. tostring(k), 0) end
  end
end
"""

CTX_HANDLERS = CTX_BUILD + r"""
local C = {}
function C:on_read_request(txn)
  txn.ctx.v = build()
end
function C:on_send_response(txn)
  same(build(), txn.ctx.v, "ctx.v")
  txn.ctx.checked = true
end
return C
"""


def _expected_ctx_value(engine: str) -> dict:
    big = 2 ** 40 if engine == "luajit" else float(2 ** 40)  # 2^40 is a float in Lua 5.4
    return {
        "t": True, "f": False,
        "int": 42, "neg": -7, "zero": 0, "float": 2.5, "negf": -0.125, "big": big,
        "s": "plain", "emptystr": "",
        "u": "héllo wörld ✓ 🎉",
        "nul": "a\x00b",
        "raw": b"\xff\xfe",  # not UTF-8: stays bytes
        "empty": {},
        "list": [1, "two", 3.5, True, {"nested": {"deeper": ["x"]}}],
        "lol": [[1, 2], [3, [4, 5]], {}],
        # "map" is checked apart: its [1]/[true] and [0]/[false] keys cannot all be
        # Python dict keys (see test_ctx_snapshot_does_not_silently_merge_number_
        # and_boolean_keys); the Lua-side comparison covers them.
        "sparse": {1: "a", 3: "c"},
    }


def test_ctx_round_trips_plain_data_across_hooks_and_threads(make_host, engine):
    host = make_host()
    host.load(CTX_HANDLERS, name="ctx.lua")
    txn = Transaction()
    ok(host.fire("read_request", txn))
    result = {}

    def other_thread():
        result["out"] = host.fire("send_response", txn)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    ok(result["out"])  # the Lua-side deep comparison (incl. math.type on 5.4) passed
    assert txn.ctx["checked"] is True
    v = dict(txn.ctx["v"])
    m = v.pop("map")
    assert v == _expected_ctx_value(engine)
    assert m["a"] == {"b": {"c": "d"}}
    assert m[2.5] == "float key" and m[-3] == "negative key"
    # [1]/[true] and [0]/[false] collide as Python dict keys; the Lua side checked them


def test_ctx_keeps_integers_and_floats_apart(make_host, engine):
    host = make_host()
    out, txn = run(host, """
      txn.ctx.i = 3
      txn.ctx.f = 3.5
      txn.ctx.whole_float = 3.0
      txn.ctx.keys = {[1] = "int", [1.5] = "float"}
      txn.ctx.maxint = math.maxinteger or 2^52
    """)
    ok(out)
    ctx = txn.ctx
    assert ctx["i"] == 3 and type(ctx["i"]) is int
    assert ctx["f"] == 3.5 and type(ctx["f"]) is float
    assert ctx["keys"] == {1: "int", 1.5: "float"}
    assert type(next(k for k in ctx["keys"] if k == 1)) is int
    if engine == "lua54":
        assert type(ctx["whole_float"]) is float  # Lua 5.4 keeps the float subtype
        assert ctx["maxint"] == 2 ** 63 - 1
    else:
        assert ctx["whole_float"] == 3 and type(ctx["whole_float"]) is int
        assert ctx["maxint"] == 2 ** 52
    # and back into Lua in the next hook
    out, txn = run(host, """
      local c = txn.ctx
      local r = {c.i == 3, c.f == 3.5, c.keys[1] == "int", c.keys[1.5] == "float",
                 c.whole_float == 3}
      if math.type then
        r[#r + 1] = math.type(c.i) == "integer"
        r[#r + 1] = math.type(c.whole_float) == "float"
        r[#r + 1] = c.maxint == math.maxinteger
      end
      txn.ctx.r = r
    """, txn, hook="send_response")
    ok(out)
    assert all(txn.ctx["r"]) and len(txn.ctx["r"]) == (8 if engine == "lua54" else 5)


def test_ctx_empty_table_round_trips(host):
    out, txn = run(host, "txn.ctx.e = {}; txn.ctx.nested = {inner = {}}")
    ok(out)
    assert txn.ctx == {"e": {}, "nested": {"inner": {}}}
    out, txn = run(host, """
      txn.ctx.r = {type(txn.ctx.e) == "table", next(txn.ctx.e) == nil,
                   next(txn.ctx.nested.inner) == nil}
    """, txn, hook="send_response")
    ok(out)
    assert txn.ctx["r"] == [True, True, True]


def test_ctx_snapshot_is_empty_before_any_fire_and_when_untouched(host):
    txn = Transaction()
    assert txn.ctx == {}
    out, txn = run(host, "local x = txn.req.uri", txn)
    ok(out)
    assert txn.ctx == {}


def test_ctx_replaced_by_assignment(host):
    out, txn = run(host, "txn.ctx.a = 1")
    ok(out)
    out, txn = run(host, "txn.ctx = {b = 2}", txn)
    ok(out)
    assert txn.ctx == {"b": 2}


@pytest.mark.parametrize("num,boolean", [("1", "true"), ("0", "false")])
def test_ctx_snapshot_does_not_silently_merge_number_and_boolean_keys(host, num, boolean):
    # In Lua, t[1] and t[true] (t[0] and t[false]) are different keys, and txn.ctx
    # keeps both between hooks. In a Python dict 1 == True and 0 == False, so a naive
    # snapshot keeps one value and drops the other without a word. the contract: "not a
    # silent loss" -- either raise a clear error or keep both values.
    out, txn = run(host, f'txn.ctx.m = {{[{num}] = "one", [{boolean}] = "yes"}}')
    ok(out)
    out2, _ = run(host, f'assert(txn.ctx.m[{num}] == "one" and txn.ctx.m[{boolean}] == "yes")',
                  txn, hook="send_response")
    ok(out2)  # the C side keeps both
    try:
        snap = txn.ctx
    except (ValueError, hostscript.Error):
        return  # a clear error is acceptable
    values = []

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        else:
            values.append(x)

    walk(snap)
    assert "one" in values and "yes" in values, f"snapshot lost a value: {snap!r}"


CTX_BAD = [
    ("cycle", "local t = {}; t.me = t; txn.ctx.loop = t"),
    ("self", "txn.ctx.back = txn.ctx"),
    ("function", "txn.ctx.fn = function() end"),
    ("coroutine", "txn.ctx.co = coroutine.create(function() end)"),
    ("table key", "txn.ctx.k = {[{}] = 1}"),
    ("txn", "txn.ctx.txn = txn"),
]


@pytest.mark.parametrize("label,stmt", CTX_BAD, ids=[c[0] for c in CTX_BAD])
def test_ctx_with_non_plain_data_is_a_ctx_error(host, label, stmt):
    out, txn = run(host, "txn.ctx.kept = 'yes'")
    ok(out)
    out, txn = run(host, stmt, txn)
    assert out.status is Outcome.ERROR
    assert out.error.kind == "ctx"
    assert "ctx" in out.error.message
    assert txn.ctx == {"kept": "yes"}  # the last good ctx is unchanged
    # and the next fire works, with the last good ctx
    out, txn = run(host, "txn.ctx.after = txn.ctx.kept", txn)
    ok(out)
    assert txn.ctx == {"kept": "yes", "after": "yes"}


@pytest.mark.parametrize("stmt", ["txn.ctx.h = txn.req.headers",
                                  "txn.ctx.h = txn.resp.headers"])
def test_ctx_refuses_a_headers_proxy_instead_of_saving_an_empty_table(host, stmt):
    # a headers proxy keeps no data in its table: saving it as {} would be a
    # silent loss; the contract: anything but plain data is a clear error
    out, txn = run(host, stmt, Transaction(headers=[("Host", "h")],
                                           response_headers=[("Server", "s")]))
    assert out.status is Outcome.ERROR, f"saved as {txn.ctx!r}"
    assert out.error.kind == "ctx"


def test_ctx_cycle_error_names_the_path(host):
    out, _ = run(host, "local t = {}; t.me = t; txn.ctx.loop = t")
    assert out.error.kind == "ctx"
    assert "txn.ctx.loop" in out.error.message


def test_deepest_ctx_that_saves_can_be_read_back(host):
    # whatever nesting save accepts, the next hook must be able to decode
    results = {}
    for depth in (8, 30, 31, 32, 33):
        out, txn = run(host, f"""
          local t = {{leaf = "x"}}
          for i = 1, {depth} - 1 do t = {{t}} end
          txn.ctx.deep = t
        """)
        results[depth] = out.status
        if out.status is Outcome.CONTINUE:
            out2, txn = run(host, """
              local t, n = txn.ctx.deep, 1
              while t.leaf == nil do t = t[1]; n = n + 1 end
              txn.ctx.n = n
            """, txn, hook="send_response")
            ok(out2)
            assert txn.ctx["n"] == depth
        else:
            assert out.error.kind == "ctx"
    assert results[8] is Outcome.CONTINUE
    assert results[33] is Outcome.ERROR


def test_ctx_with_many_keys_round_trips(host):
    out, txn = run(host, """
      for i = 1, 1000 do txn.ctx["k" .. i] = i end
      local l = {}
      for i = 1, 1000 do l[i] = string.rep("x", i % 17) end
      txn.ctx.list = l
    """)
    ok(out)
    ctx = txn.ctx
    assert all(ctx[f"k{i}"] == i for i in range(1, 1001))
    assert ctx["list"] == ["x" * (i % 17) for i in range(1, 1001)]


# =====================================================================================
# one transaction, two engines
# =====================================================================================

HOP = CTX_BUILD + r"""
local C = {}
local function hop(txn)
  local c = txn.ctx
  c.path = c.path or {}
  c.path[#c.path + 1] = hs.engine
  c.n = (c.n or 0) + 1
  -- loose: a whole float made by Lua 5.4 comes back from LuaJIT as an integer
  if c.v then same(build(), c.v, "ctx.v", true) else c.v = build() end
  txn.req.headers:add("x-hop", hs.engine)
  txn.resp.headers["x-last"] = hs.engine
  txn.resp.headers["x-seen"] = table.concat(txn.req.headers:get_all("x-hop"), ",")
  txn.req.uri = txn.req.uri .. "/" .. hs.engine
end
function C:on_read_request(txn) hop(txn) end
function C:on_send_response(txn) hop(txn) end
function C:on_log(txn) hop(txn) end
return C
"""


def test_transaction_keeps_ctx_and_headers_when_fired_on_the_other_engine(make_host, engine):
    other = "lua54" if engine == "luajit" else "luajit"
    first, second = make_host(engine=engine), make_host(engine=other)
    assert (first.engine, second.engine) == (engine, other)
    first.load(HOP, name="hop.lua")
    second.load(HOP, name="hop.lua")
    txn = Transaction("GET", "/a", headers=[("Host", "h")])
    ok(first.fire("read_request", txn))
    ok(second.fire("send_response", txn))   # Lua-side comparison of ctx.v passed
    ok(first.fire("log", txn))              # and back again
    assert txn.ctx["path"] == [engine, other, engine]
    assert txn.ctx["n"] == 3
    assert txn.request.headers.items() == [
        ("Host", "h"), ("x-hop", engine), ("x-hop", other), ("x-hop", engine)]
    assert txn.response.headers["x-last"] == engine
    assert txn.response.headers["x-seen"] == f"{engine},{other},{engine}"
    assert txn.request.uri == f"/a/{engine}/{other}/{engine}"
    v = dict(txn.ctx["v"])
    v.pop("map")
    want = _expected_ctx_value("lua54")
    # 2^40 was built by whichever engine ran first; its int/float subtype may change
    # across engines, its value may not
    assert v.pop("big") == 2 ** 40
    want.pop("big")
    assert v == want


def test_python_changes_between_engines_are_carried_over(make_host, engine):
    other = "lua54" if engine == "luajit" else "luajit"
    a, b = make_host(engine=engine), make_host(engine=other)
    a.load(handler('txn.ctx.from_a = 1; txn.resp.status = 202'), name="t.lua")
    b.load(handler('txn.ctx.r = {status = txn.resp.status, m = txn.req.method, '
                   'x = txn.req.headers["x-py"] or false, a = txn.ctx.from_a}'), name="t.lua")
    txn = Transaction()
    ok(a.fire("read_request", txn))
    txn.request.method = "PATCH"
    txn.request.headers["X-Py"] = "set-in-python"
    ok(b.fire("read_request", txn))
    assert txn.ctx["r"] == {"status": 202, "m": "PATCH", "x": "set-in-python", "a": 1}


@pytest.mark.parametrize("data", [b"T", b"T\x02\x00\x00\x00s\x01\x00\x00\x00a", b"x", b"s\xff\x00\x00\x00ab",
                                  b"T\x01\x00\x00\x00" * 100])
def test_corrupt_ctx_data_raises_value_error_not_a_crash(data):
    from hostscript import _bridge
    with pytest.raises(ValueError, match="corrupt"):
        _bridge.ctx_decode(data)
