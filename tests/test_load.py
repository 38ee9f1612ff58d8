"""Loading scripts and firing hooks: the basic contract, on both engines."""
from __future__ import annotations


import pytest

import hostscript
from hostscript import HandlerError, Outcome, ScriptError, Transaction
from helpers import run_in_thread


def stamp(tag: str, header: str = "x-order", hook: str = "read_request") -> str:
    """A script whose `hook` handler appends `tag` to response header `header`."""
    return f"""
local S = {{}}
function S:on_{hook}(txn)
  txn.resp.headers:add("{header}", "{tag}")
end
return S
"""


def order(host, hook: str = "read_request") -> list:
    txn = Transaction()
    out = host.fire(hook, txn)
    assert out.status is Outcome.CONTINUE, out.error
    return txn.response.headers.get_all("x-order")


# ---------------------------------------------------------------- fire basics


def test_handler_sets_response_header_visible_in_python(host):
    host.load("""
local A = {}
function A:on_send_response(txn)
  txn.resp.headers["X-Served-By"] = "hostscript"
end
return A
""", name="a.lua")
    txn = Transaction(status=200)
    out = host.fire("send_response", txn)
    assert out.status is Outcome.CONTINUE
    assert out.error is None
    assert txn.response.headers["x-served-by"] == "hostscript"
    assert txn.response.headers.get_all("X-SERVED-BY") == ["hostscript"]


def test_handler_reads_request_headers_case_insensitively(host):
    host.load("""
local A = {}
function A:on_read_request(txn)
  local h = txn.req.headers
  txn.resp.headers["x-upper"] = h["ACCEPT"] or "nil"
  txn.resp.headers["x-lower"] = h["accept"] or "nil"
  txn.resp.headers["x-get"] = h:get("Accept") or "nil"
  txn.resp.headers["x-absent"] = h["x-not-there"] == nil and "nil" or "set"
  txn.resp.headers["x-method"] = txn.req.method .. " " .. txn.req.uri
end
return A
""", name="a.lua")
    txn = Transaction("POST", "/p?q=1", headers=[("Accept", "text/html"), ("Host", "h")])
    assert host.fire("read_request", txn).status is Outcome.CONTINUE
    r = txn.response.headers
    assert (r["x-upper"], r["x-lower"], r["x-get"]) == ("text/html",) * 3
    assert r["x-absent"] == "nil"
    assert r["x-method"] == "POST /p?q=1"


def test_respond_gives_done_with_status_body_and_headers(host):
    host.load("""
local A = {}
function A:on_read_request(txn)
  return txn:respond(403, "denied\\n", {["content-type"] = "text/plain", ["x-why"] = "test"})
end
return A
""", name="deny.lua")
    txn = Transaction(headers=[("Host", "a")])
    out = host.fire("read_request", txn)
    assert out.status is Outcome.DONE
    assert out.error is None
    assert txn.response.status == 403
    assert txn.response.body == b"denied\n"
    assert txn.response.headers["Content-Type"] == "text/plain"
    assert txn.response.headers["x-why"] == "test"


def test_respond_stops_later_handlers_of_the_hook(host):
    host.load("""
local A = {}
function A:on_read_request(txn) txn:respond(204) end
return A
""", name="a.lua")
    host.load(stamp("b"), name="b.lua")
    txn = Transaction()
    assert host.fire("read_request", txn).status is Outcome.DONE
    assert txn.response.status == 204
    assert txn.response.body == b""
    assert "x-order" not in txn.response.headers


def test_return_done_stops_later_handlers_of_same_hook_only(host):
    host.load("""
local A = {}
function A:on_read_request(txn)
  txn.resp.headers:add("x-order", "a")
  return hs.DONE
end
function A:on_send_response(txn)
  txn.resp.headers:add("x-order", "a")
end
return A
""", name="a.lua")
    host.load(stamp("b"), name="b.lua")
    host.load(stamp("b", hook="send_response"), name="b2.lua")
    txn = Transaction()
    assert host.fire("read_request", txn).status is Outcome.DONE
    assert txn.response.headers.get_all("x-order") == ["a"]
    assert txn.response.status is None  # hs.DONE is not a response
    txn2 = Transaction()
    assert host.fire("send_response", txn2).status is Outcome.CONTINUE
    assert txn2.response.headers.get_all("x-order") == ["a", "b"]


def test_handlers_run_in_load_order(host):
    for tag in ("c", "a", "b"):
        host.load(stamp(tag), name=f"{tag}.lua")
    assert order(host) == ["c", "a", "b"]


def test_new_gives_each_thread_its_own_self(host):
    host.load("""
local C = {}
C.__index = C
local made = 0
function C.new()
  made = made + 1
  return setmetatable({count = 0, made = made}, C)
end
function C:on_read_request(txn)
  self.count = self.count + 1
  txn.resp.headers["x-count"] = self.count
  txn.resp.headers["x-made"] = self.made
  txn.resp.headers["x-is-class"] = tostring(self == C)
end
return C
""", name="counter.lua")

    def fire_once():
        txn = Transaction()
        assert host.fire("read_request", txn).status is Outcome.CONTINUE
        h = txn.response.headers
        return h["x-count"], h["x-made"], h["x-is-class"]

    assert [fire_once() for _ in range(3)] == [("1", "1", "false"), ("2", "1", "false"),
                                               ("3", "1", "false")]
    # another thread: a fresh state, a fresh instance that counts from 1
    assert run_in_thread(fire_once) == ("1", "1", "false")
    # and this thread's instance kept its own count
    assert fire_once() == ("4", "1", "false")


def test_handler_without_new_gets_the_class_as_self(host):
    host.load("""
local C = {kind = "class"}
function C:on_read_request(txn) txn.resp.headers["x-self"] = self.kind end
return C
""", name="c.lua")
    txn = Transaction()
    host.fire("read_request", txn)
    assert txn.response.headers["x-self"] == "class"


def test_fire_on_hook_without_handlers_continues_untouched(host):
    host.load(stamp("a"), name="a.lua")
    txn = Transaction(headers=[("Host", "h")])
    assert host.fire("log", txn).status is Outcome.CONTINUE
    assert txn.response.headers.items() == []
    assert txn.request.headers.items() == [("Host", "h")]


# ---------------------------------------------------------------- scripts: load, replace, unload, reload


def test_scripts_lists_names_in_load_order(host):
    assert host.scripts == []
    host.load(stamp("z"), name="z.lua")
    host.load(stamp("a"), name="a.lua")
    s = host.load(stamp("m"))
    assert s.name.startswith("<script")
    assert s.path is None
    assert host.scripts == ["z.lua", "a.lua", s.name]


def test_load_returns_script_with_name(host):
    s = host.load(stamp("a"), name="a.lua")
    assert s == hostscript.Script("a.lua", None)


def test_load_replacing_same_name_keeps_position_and_new_code(host):
    for tag in ("a", "b", "c"):
        host.load(stamp(tag), name=f"{tag}.lua")
    gen = host.stats()["generation"]
    assert order(host) == ["a", "b", "c"]
    host.load(stamp("B2"), name="b.lua")
    assert host.scripts == ["a.lua", "b.lua", "c.lua"]
    assert order(host) == ["a", "B2", "c"]
    assert host.stats()["generation"] == gen + 1


def test_unload_stops_its_handlers(host):
    host.load(stamp("a"), name="a.lua")
    host.load(stamp("b"), name="b.lua")
    assert order(host) == ["a", "b"]
    host.unload("a.lua")
    assert host.scripts == ["b.lua"]
    assert order(host) == ["b"]
    host.unload("b.lua")
    assert host.scripts == []
    assert order(host) == []


def test_unload_of_unknown_script_raises_value_error(host):
    host.load(stamp("a"), name="a.lua")
    with pytest.raises(ValueError, match="nope.lua"):
        host.unload("nope.lua")
    assert host.scripts == ["a.lua"]


def test_load_file_names_script_by_path_and_reload_rereads_it(host, tmp_path):
    path = tmp_path / "tag.lua"
    path.write_text(stamp("v1"))
    s = host.load_file(path)
    assert s.name == str(path) and s.path == str(path)
    assert host.scripts == [str(path)]
    assert order(host) == ["v1"]
    path.write_text(stamp("v2"))
    assert order(host) == ["v1"]  # nothing changes until reload
    host.reload(str(path))
    assert host.scripts == [str(path)]
    assert order(host) == ["v2"]


def test_reload_keeps_position_among_other_scripts(host, tmp_path):
    path = tmp_path / "mid.lua"
    path.write_text(stamp("m1"))
    host.load(stamp("first"), name="first.lua")
    host.load_file(path)
    host.load(stamp("last"), name="last.lua")
    path.write_text(stamp("m2"))
    host.reload(str(path))
    assert host.scripts == ["first.lua", str(path), "last.lua"]
    assert order(host) == ["first", "m2", "last"]


def test_reload_of_string_script_or_unknown_name_raises_value_error(host):
    host.load(stamp("a"), name="a.lua")
    with pytest.raises(ValueError, match="loaded from a string"):
        host.reload("a.lua")
    with pytest.raises(ValueError, match="no script named"):
        host.reload("missing.lua")


def test_failed_reload_keeps_the_old_version(host, tmp_path):
    path = tmp_path / "tag.lua"
    path.write_text(stamp("good"))
    host.load_file(path)
    assert order(host) == ["good"]
    gen = host.stats()["generation"]
    path.write_text("local S = {}\nfunction S:on_read_request(txn)\n  this is not lua\nend\nreturn S\n")
    with pytest.raises(ScriptError) as ei:
        host.reload(str(path))
    assert ei.value.name == str(path)
    assert ei.value.kind == "syntax"
    assert order(host) == ["good"]
    assert host.scripts == [str(path)]
    assert host.stats()["generation"] == gen


def test_load_file_syntax_error_reports_line_for_long_path(host, tmp_path):
    # Lua shortens long chunk names in its messages ("...tail/name.lua:3:"); the
    # error must still carry the line (a failed load raises name, line, message).
    d = tmp_path / "etc" / "hostscript" / "handlers.d" / "production"
    d.mkdir(parents=True)
    path = d / "syntax_error.lua"
    path.write_text("local S = {}\n\nlocal x = = 1\nreturn S\n")
    with pytest.raises(ScriptError) as ei:
        host.load_file(path)
    err = ei.value
    assert err.name == str(path)
    assert err.kind == "syntax"
    assert ":3:" in err.message
    assert err.line == 3
    assert host.scripts == []


# ---------------------------------------------------------------- bad scripts


GOOD = stamp("good")

BAD_SCRIPTS = {
    # id: (source, expected line or None, expected kind, substrings of the message)
    "syntax_error": ("local S = {}\n\nlocal x = = 1\nreturn S\n", 3, "syntax",
                     ["bad.lua:3:", "near '='"]),
    "chunk_runtime_error": ("local S = {}\nlocal t = nil\n\nlocal v = t.field\nreturn S\n", 4, "script",
                            ["bad.lua:4:"]),
    "chunk_calls_error": ("local S = {}\n\nerror('refusing to load')\nreturn S\n", 3, "script",
                          ["bad.lua:3:", "refusing to load"]),
    "returns_nothing": ("local S = {}\nfunction S:on_read_request(txn) end\n", None, "script",
                        ["bad.lua", "handler class", "nil"]),
    "returns_number": ("return 42\n", None, "script", ["bad.lua", "handler class", "number"]),
    "undeclared_hook": ("local S = {}\nfunction S:on_read_body(txn) end\nreturn S\n", None, "script",
                        ["bad.lua", "on_read_body", "read_body",
                         "read_request, send_request, read_response, send_response, log"]),
    "global_write_at_chunk_level": ("local S = {}\n\ncounter = 0\nreturn S\n", 3, "script",
                                    ["bad.lua:3:", "counter"]),
    "new_errors": ("local S = {}\nfunction S.new()\n  error('cannot make instance')\nend\n"
                   "function S:on_read_request(txn) end\nreturn S\n", 3, "script",
                   ["bad.lua:3:", "cannot make instance"]),
    "new_returns_nil": ("local S = {}\nfunction S.new() end\nreturn S\n", None, "script",
                        ["bad.lua", "new()"]),
}


@pytest.mark.parametrize("case", list(BAD_SCRIPTS), ids=list(BAD_SCRIPTS))
def test_bad_script_raises_script_error_and_keeps_published_program(host, case):
    source, line, kind, parts = BAD_SCRIPTS[case]
    host.load(GOOD, name="bad.lua")     # the name the bad version tries to replace
    host.load(stamp("other"), name="other.lua")
    assert order(host) == ["good", "other"]
    before = host.stats()
    with pytest.raises(ScriptError) as ei:
        host.load(source, name="bad.lua")
    err = ei.value
    assert isinstance(err, hostscript.Error)
    assert err.name == "bad.lua"
    assert err.line == line
    assert err.kind == kind
    for p in parts:
        assert p in err.message, (p, err.message)
    assert str(err) == err.message
    # the published program did not change
    after = host.stats()
    assert after["generation"] == before["generation"]
    assert host.scripts == ["bad.lua", "other.lua"]
    assert order(host) == ["good", "other"]
    # and a fresh thread (which rehydrates now) sees the old program too
    assert run_in_thread(lambda: order(host)) == ["good", "other"]


def test_bad_new_script_is_not_added(host):
    host.load(GOOD, name="good.lua")
    gen = host.stats()["generation"]
    with pytest.raises(ScriptError) as ei:
        host.load("return nil\n", name="new.lua")
    assert ei.value.name == "new.lua"
    assert host.scripts == ["good.lua"]
    assert host.stats()["generation"] == gen
    assert order(host) == ["good"]


def test_global_write_at_chunk_level_error_names_the_global(host):
    with pytest.raises(ScriptError) as ei:
        host.load("local S = {}\nmy_setting = 5\nreturn S\n", name="g.lua")
    assert "undeclared global 'my_setting'" in ei.value.message
    assert ei.value.line == 2


def test_error_in_chunk_has_traceback(host):
    with pytest.raises(ScriptError) as ei:
        host.load("local S = {}\nlocal function f()\n  error('deep')\nend\nf()\nreturn S\n", name="tb.lua")
    assert ei.value.line == 3
    assert "stack traceback" in ei.value.traceback
    assert "tb.lua:5" in ei.value.traceback


def test_bytecode_prefix_is_refused(host):
    host.load(GOOD, name="a.lua")
    gen = host.stats()["generation"]
    with pytest.raises(ScriptError) as ei:
        host.load(b"\x1bLua\x54\x00\x19\x93\r\n\x1a\n", name="bc.lua")
    assert ei.value.name == "bc.lua"
    assert ei.value.kind == "syntax"
    assert "bytecode is not accepted" in ei.value.message
    assert host.scripts == ["a.lua"]
    assert host.stats()["generation"] == gen
    assert order(host) == ["good"]


def test_real_string_dump_bytecode_is_refused(make_host):
    # a non-sandboxed host can produce genuine bytecode of its engine ...
    producer = make_host(sandbox=False)
    producer.load("""
local P = {}
function P:on_read_request(txn)
  txn.resp.body = string.dump(function() return {} end)
end
return P
""", name="dump.lua")
    txn = Transaction()
    assert producer.fire("read_request", txn).status is Outcome.CONTINUE
    bc = txn.response.body
    assert bc[:1] == b"\x1b"
    # ... which no host accepts as a script
    for host in (producer, make_host()):
        with pytest.raises(ScriptError) as ei:
            host.load(bc, name="bc.lua")
        assert ei.value.kind == "syntax"
        assert "bytecode is not accepted" in ei.value.message
        assert "bc.lua" not in host.scripts


# ---------------------------------------------------------------- Host arguments


def test_unknown_engine_raises_value_error(engine):
    with pytest.raises(ValueError, match="unknown engine 'lua51'; choose one of luajit, lua54"):
        hostscript.Host(engine="lua51")
    with hostscript.Host(engine=engine) as ok:  # the known ones work
        assert ok.engine == engine


def test_duplicate_hooks_raise_value_error(engine):
    with pytest.raises(ValueError, match="hook 'log' declared twice"):
        hostscript.Host(("read_request", "log", "log"), engine=engine)


@pytest.mark.parametrize("hooks, exc, pattern", [
    ((), ValueError, "1 to 64 hooks"),
    (("Read-Request",), ValueError, "invalid hook name 'Read-Request'"),
    ("read_request", TypeError, "not a string"),
], ids=["empty", "bad_name", "string"])
def test_bad_hooks_raise(engine, hooks, exc, pattern):
    with pytest.raises(exc, match=pattern):
        hostscript.Host(hooks, engine=engine)


def test_bad_on_error_raises_value_error(engine):
    with pytest.raises(ValueError, match="on_error must be"):
        hostscript.Host(engine=engine, on_error="ignore")


@pytest.mark.parametrize("kw, pattern", [
    ({"time_limit": 0}, "time_limit"),
    ({"time_limit": -1.0}, "time_limit"),
    ({"memory_limit": 0}, "memory_limit"),
], ids=["time_zero", "time_negative", "memory_zero"])
def test_bad_limits_raise_value_error(engine, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        hostscript.Host(engine=engine, **kw)


def test_host_reports_its_engine(make_host, engine):
    host = make_host()
    assert host.engine == engine
    host.load("local E = {}\nfunction E:on_log(txn) txn.ctx.engine = hs.engine end\nreturn E\n",
              name="e.lua")
    txn = Transaction()
    host.fire("log", txn)
    assert txn.ctx == {"engine": engine}


# ---------------------------------------------------------------- handler errors


ERRING = """
local E = {}
function E:on_read_request(txn)
  if txn.req.headers["x-fail"] then
    local t = nil
    return t.boom
  end
  txn.resp.headers["x-ok"] = "yes"
end
return E
"""


def test_handler_error_gives_error_outcome_and_next_fire_works(host):
    host.load(ERRING, name="erring.lua")
    host.load(stamp("after"), name="after.lua")
    txn = Transaction(headers=[("X-Fail", "1")])
    out = host.fire("read_request", txn)
    assert out.status is Outcome.ERROR
    err = out.error
    assert isinstance(err, HandlerError)
    assert err.script == "erring.lua"
    assert err.hook == "read_request"
    assert "erring.lua:6:" in err.message
    assert "nil" in err.message
    assert "stack traceback" in err.traceback
    assert "erring.lua:6" in err.traceback
    assert err.kind == "runtime"
    # the error ended the hook: the later handler did not run
    assert "x-order" not in txn.response.headers
    # the next fire works
    txn2 = Transaction()
    out2 = host.fire("read_request", txn2)
    assert out2.status is Outcome.CONTINUE and out2.error is None
    assert txn2.response.headers["x-ok"] == "yes"
    assert txn2.response.headers.get_all("x-order") == ["after"]


def test_handler_error_with_error_call_reports_its_message(host):
    host.load("""
local E = {}
function E:on_send_request(txn)

  error("upstream " .. txn.req.uri .. " refused")
end
return E
""", name="e.lua")
    out = host.fire("send_request", Transaction(uri="/x"))
    assert out.status is Outcome.ERROR
    assert out.error.message == "e.lua:5: upstream /x refused"
    assert out.error.hook == "send_request"
    assert "stack traceback" in out.error.traceback


def test_on_error_raise_makes_fire_raise_handler_error(make_host):
    host = make_host(on_error="raise")
    host.load(ERRING, name="erring.lua")
    with pytest.raises(HandlerError) as ei:
        host.fire("read_request", Transaction(headers=[("x-fail", "1")]))
    err = ei.value
    assert isinstance(err, hostscript.Error)
    assert err.script == "erring.lua"
    assert err.hook == "read_request"
    assert "erring.lua:6:" in err.message
    assert "stack traceback" in err.traceback
    assert str(err) == f"erring.lua in read_request: {err.message}"
    # and the host keeps working
    txn = Transaction()
    assert host.fire("read_request", txn).status is Outcome.CONTINUE
    assert txn.response.headers["x-ok"] == "yes"


def test_fire_of_undeclared_hook_raises_value_error(host):
    host.load(stamp("a"), name="a.lua")
    with pytest.raises(ValueError, match="undeclared hook 'read_body'") as ei:
        host.fire("read_body", Transaction())
    assert "read_request" in str(ei.value)


def test_fire_on_custom_hooks(make_host):
    host = make_host(hooks=("access", "filter"))
    host.load(stamp("f", hook="filter"), name="f.lua")
    txn = Transaction()
    assert host.fire("filter", txn).status is Outcome.CONTINUE
    assert txn.response.headers["x-order"] == "f"
    with pytest.raises(ValueError):
        host.fire("read_request", Transaction())
    with pytest.raises(ScriptError, match=r"declared hooks: access, filter"):
        host.load(stamp("r"), name="r.lua")


# ---------------------------------------------------------------- lifecycle and stats


def test_host_as_context_manager_closes(engine):
    with hostscript.Host(engine=engine) as host:
        host.load(stamp("a"), name="a.lua")
        assert order(host) == ["a"]
        assert not host.closed
    assert host.closed
    with pytest.raises(hostscript.Error, match="closed"):
        host.fire("read_request", Transaction())
    with pytest.raises(hostscript.Error, match="closed"):
        host.load(stamp("b"), name="b.lua")
    with pytest.raises(hostscript.Error, match="closed"):
        host.scripts
    host.close()  # idempotent
    assert host.closed


def test_stats_count_fires_and_errors_per_hook(host):
    host.load(ERRING, name="erring.lua")
    s0 = host.stats()
    assert s0["fires"] == 0 and s0["errors"] == 0
    assert set(s0["hooks"]) == set(hostscript.DEFAULT_HOOKS)
    host.fire("read_request", Transaction())
    host.fire("read_request", Transaction(headers=[("x-fail", "1")]))
    host.fire("read_request", Transaction(headers=[("x-fail", "1")]))
    host.fire("log", Transaction())
    s = host.stats()
    assert s["fires"] == 4
    assert s["errors"] == 2
    assert s["hooks"]["read_request"]["fires"] == 3
    assert s["hooks"]["read_request"]["errors"] == 2
    assert s["hooks"]["read_request"]["total_ns"] > 0
    assert sum(s["hooks"]["read_request"]["buckets"]) == 3  # each fire in one latency bucket
    log_ = s["hooks"]["log"]
    assert log_ == {"fires": 1, "errors": 0, "total_ns": log_["total_ns"], "buckets": log_["buckets"]}
    assert s["hooks"]["send_response"] == {"fires": 0, "errors": 0, "total_ns": 0, "buckets": [0] * 12}
    assert s["compilations"] == 1


def test_stats_sum_fires_over_threads(host):
    host.load(stamp("a"), name="a.lua")
    host.fire("read_request", Transaction())
    run_in_thread(lambda: [host.fire("read_request", Transaction()) for _ in range(3)])
    s = host.stats()
    assert s["fires"] == 4
    assert s["hooks"]["read_request"]["fires"] == 4
    assert s["errors"] == 0


def test_generation_moves_on_load_replace_and_unload(host):
    g0 = host.stats()["generation"]
    host.load(stamp("a"), name="a.lua")
    host.load(stamp("a2"), name="a.lua")
    host.unload("a.lua")
    assert host.stats()["generation"] == g0 + 3


def test_fire_saved_before_close_raises_instead_of_touching_the_freed_host(make_host):
    host = make_host(("read_request",))
    host.load("local C = {} function C:on_read_request(txn) txn.ctx.n = 1 end return C", name="a.lua")
    fire = host.fire
    txn = hostscript.Transaction()
    assert fire("read_request", txn).status is hostscript.Outcome.CONTINUE
    host.close()
    with pytest.raises(hostscript.Error, match="closed"):
        fire("read_request", txn)


def test_fire_accepts_keywords_and_refuses_what_is_not_a_transaction(make_host):
    host = make_host(("read_request",))
    host.load("local C = {} function C:on_read_request(txn) txn:respond(204) end return C", name="a.lua")
    txn = hostscript.Transaction()
    assert host.fire(hook="read_request", txn=txn).status is hostscript.Outcome.DONE
    assert txn.response.status == 204
    with pytest.raises(TypeError, match="Transaction"):
        host.fire("read_request", {"method": "GET"})
    with pytest.raises(ValueError, match="undeclared hook"):
        host.fire("nope", txn)


def test_handled_hooks_follow_the_program(host):
    assert host.handled_hooks == frozenset()
    host.load("return {on_read_request = function() end, on_log = function() end}", name="a")
    assert host.handled_hooks == {"read_request", "log"}
    host.load("return {on_send_response = function() end}", name="b")
    assert host.handled_hooks == {"read_request", "log", "send_response"}
    host.unload("a")
    assert host.handled_hooks == {"send_response"}
    with pytest.raises(hostscript.ScriptError):
        host.load("return {on_log = 5}", name="b")  # a failed load changes nothing
    assert host.handled_hooks == {"send_response"}
    host.close()
    with pytest.raises(hostscript.ClosedError):
        host.handled_hooks
