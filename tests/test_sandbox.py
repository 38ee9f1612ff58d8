"""The sandbox: what a handler can and cannot reach, `require`, and API misuse."""
from __future__ import annotations


import pytest

from hostscript import Outcome, ScriptError, Transaction
from helpers import run_in_thread

# A script that runs the Lua expression/statement in request header x-code inside
# pcall and reports "ok:<value>" or "err:<message>" in response header x-result.
PROBE = """
local P = {}
function P:on_read_request(txn)
  local code = txn.req.headers["x-code"]
  local f, cerr = load(code, "=probe")
  if not f then
    txn.resp.headers["x-result"] = "compile:" .. tostring(cerr)
    return
  end
  local ok, v = pcall(f)
  txn.resp.headers["x-result"] = (ok and "ok:" or "err:") .. tostring(v)
end
return P
"""


def probe(host, code: str) -> str:
    txn = Transaction(headers=[("x-code", code)])
    out = host.fire("read_request", txn)
    assert out.status is Outcome.CONTINUE, out.error
    return txn.response.headers["x-result"]


@pytest.fixture
def probe_host(host):
    host.load(PROBE, name="probe.lua")
    return host


# ---------------------------------------------------------------- unavailable globals


@pytest.mark.parametrize("name", ["io", "debug", "dofile", "loadfile", "package", "getfenv",
                                  "setfenv", "module", "newproxy", "jit", "ffi"])
def test_reading_unavailable_global_is_undeclared_global_error(probe_host, name):
    res = probe(probe_host, f"return {name}")
    assert res.startswith("err:"), res
    assert f"undeclared global '{name}'" in res


@pytest.mark.parametrize("name", ["execute", "exit", "remove", "rename", "getenv", "tmpname",
                                  "setlocale"])
def test_os_offers_no_process_or_file_functions(probe_host, name):
    assert probe(probe_host, f"return type(os.{name})") == "ok:nil"


def test_os_time_clock_date_difftime_work(probe_host):
    # the sandbox's os table keeps exactly the time functions (README, sandbox.c)
    res = probe(probe_host, "return type(os.time) .. type(os.clock) .. type(os.date) .. type(os.difftime)")
    assert res == "ok:" + "function" * 4
    assert probe(probe_host, "return os.time() > 1600000000") == "ok:true"
    assert probe(probe_host, "return os.time({year = 2020, month = 1, day = 1, hour = 12}) > 0") == "ok:true"
    assert probe(probe_host, "return type(os.clock())") == "ok:number"
    assert probe(probe_host, "return os.date('!%Y-%m-%d', 86400)") == "ok:1970-01-02"
    assert probe(probe_host, "return os.difftime(10, 4)") in ("ok:6", "ok:6.0")


def test_string_dump_is_unavailable(probe_host):
    assert probe(probe_host, "return type(string.dump)") == "ok:nil"
    # not through the string metatable either
    assert probe(probe_host, "return type(('').dump)") == "ok:nil"


@pytest.mark.parametrize("module", ["io", "os", "debug", "ffi", "jit", "lpeg", "socket.core"])
def test_require_of_c_or_standard_module_fails(probe_host, module):
    res = probe(probe_host, f"return require('{module}')")
    assert res.startswith("err:"), res
    assert f"module '{module}' not found" in res


@pytest.mark.parametrize("opt", ["stop", "restart", "incremental", "generational", "setpause"])
def test_collectgarbage_control_options_are_unavailable(probe_host, opt):
    res = probe(probe_host, f"return collectgarbage('{opt}')")
    assert res.startswith("err:"), res
    assert f"collectgarbage('{opt}') is not available in the sandbox" in res


def test_collectgarbage_count_and_collect_work(probe_host):
    res = probe(probe_host, "return type(collectgarbage('count')) .. ' ' .. collectgarbage('collect')")
    assert res == "ok:number 0"


def test_reading_misspelled_global_is_error_not_nil(probe_host):
    res = probe(probe_host, "return strng")
    assert res == "err:probe:1: undeclared global 'strng'"


# ---------------------------------------------------------------- globals are read-only


def test_writing_global_in_handler_is_error_naming_it(host):
    host.load("""
local W = {}
function W:on_read_request(txn)
  request_count = 1
end
return W
""", name="w.lua")
    out = host.fire("read_request", Transaction())
    assert out.status is Outcome.ERROR
    assert out.error.script == "w.lua"
    assert "w.lua:4:" in out.error.message
    assert "assignment to undeclared global 'request_count'" in out.error.message
    # the global was not created
    host.load("""
local R = {}
function R:on_log(txn) txn.ctx.ok = pcall(function() return request_count end) end
return R
""", name="r.lua")
    txn = Transaction()
    host.fire("log", txn)
    assert txn.ctx == {"ok": False}


def test_environment_metatable_is_protected(probe_host):
    assert probe(probe_host, "return getmetatable(_G)") == "ok:sandbox"
    res = probe(probe_host, "return setmetatable(_G, {})")
    assert res.startswith("err:") and "protected metatable" in res


# ---------------------------------------------------------------- load


def test_load_of_source_text_works(probe_host):
    assert probe(probe_host, "return load('return 1+1')()") == "ok:2"
    assert probe(probe_host, "return load('return x', 'n', 't', {x = 'env'})()") == "ok:env"


def test_load_of_bytecode_text_is_refused(probe_host):
    res = probe(probe_host, "local f, e = load('\\27Lua\\84\\0'); return tostring(f) .. ' ' .. e")
    assert res.startswith("ok:nil ")
    assert "mode" in res


def test_load_with_binary_mode_is_refused(probe_host):
    res = probe(probe_host, "return load('return 1', 'x', 'b')")
    assert res.startswith("err:")
    assert "bytecode cannot be loaded here" in res


def test_load_of_function_reader_is_refused(probe_host):
    res = probe(probe_host, "return load(function() return nil end)")
    assert res.startswith("err:")
    assert "only source strings can be loaded" in res


def test_load_of_real_bytecode_is_refused(make_host):
    producer = make_host(sandbox=False)
    producer.load("""
local P = {}
function P:on_read_request(txn) txn.resp.body = string.dump(function() return "pwned" end) end
return P
""", name="dump.lua")
    carrier = Transaction()
    producer.fire("read_request", carrier)
    bc = carrier.response.body
    assert bc[:1] == b"\x1b"

    host = make_host()
    host.load("""
local L = {}
function L:on_read_request(txn)
  local f1, e1 = load(txn.resp.body)
  local f2, e2 = load(txn.resp.body, "x", "bt")
  txn.resp.headers["x-1"] = tostring(f1) .. " " .. tostring(e1)
  txn.resp.headers["x-2"] = tostring(f2) .. " " .. tostring(e2)
end
return L
""", name="loader.lua")
    txn = Transaction(body=bc)
    assert host.fire("read_request", txn).status is Outcome.CONTINUE
    for h in ("x-1", "x-2"):
        v = txn.response.headers[h]
        assert v.startswith("nil "), v
        assert "mode" in v


# ---------------------------------------------------------------- safe functions


@pytest.mark.parametrize("code, expected", [
    ("return string.format('%05.1f|%s|%d', 3.14159, 'x', 42)", "003.1|x|42"),
    ("return table.concat({'a', 'b', 'c'}, ',')", "a,b,c"),
    ("local t = {3, 1, 2}; table.sort(t); return table.concat(t)", "123"),
    ("return math.floor(3.7) + math.max(1, 5)", "8"),
    ("local n = 0; for k, v in pairs({a = 1, b = 2}) do n = n + v end; return n", "3"),
    ("local s = ''; for i, v in ipairs({'x', 'y'}) do s = s .. i .. v end; return s", "1x2y"),
    ("local t = setmetatable({}, {__index = function(_, k) return k .. '!' end}); return t.hi",
     "hi!"),
    ("local g = coroutine.wrap(function() coroutine.yield(1); coroutine.yield(2) end);"
     " return g() + g()", "3"),
    ("return select('#', 1, 2, 3)", "3"),
    ("return tostring(tonumber('0x10'))", "16"),
    ("return ('abc'):upper() .. string.rep('-', 2)", "ABC--"),
    ("return (string.gsub('a-b', '-', '+'))", "a+b"),
    ("return type(hs.now())", "number"),
    ("local ok, e = pcall(error, 'x', 0); return tostring(ok) .. e", "falsex"),
    ("return select(2, xpcall(function() error('y', 0) end, function(m) return 'h:' .. m end))",
     "h:y"),
    ("return next({}) == nil", "true"),
    ("return rawequal(rawget({a = 1}, 'a'), 1)", "true"),
])
def test_safe_functions_work(probe_host, code, expected):
    assert probe(probe_host, code) == f"ok:{expected}"


def test_pcall_inside_coroutine_can_yield(probe_host):
    # In standard Lua 5.4 and LuaJIT a coroutine may yield from inside pcall; the
    # sandbox's pcall must not take that away.
    code = ("local co = coroutine.wrap(function()"
            "  local ok, v = pcall(coroutine.yield, 'first')"
            "  return tostring(ok) .. ',' .. tostring(v) end)"
            " local a = co(); local b = co('resumed'); return a .. '|' .. b")
    assert probe(probe_host, code) == "ok:first|true,resumed"


# ---------------------------------------------------------------- require


def test_require_hs_util_works(host):
    host.load("""
local util = require "hs.util"
local U = {}
function U:on_read_request(txn)
  local parts = util.split(txn.req.headers["x-list"], ",")
  local q = util.parse_query("a=1&b=x%20y&a=2&flag")
  txn.resp.headers["x-split"] = table.concat(parts, "|")
  txn.resp.headers["x-a"] = table.concat(q.a, "+")
  txn.resp.headers["x-b"] = q.b
  txn.resp.headers["x-flag"] = tostring(q.flag)
  txn.resp.headers["x-same"] = tostring(require("hs.util") == util)
end
return U
""", name="u.lua")
    txn = Transaction(headers=[("x-list", " a, b ,,c ")])
    assert host.fire("read_request", txn).status is Outcome.CONTINUE
    h = txn.response.headers
    assert h["x-split"] == "a|b|c"
    assert h["x-a"] == "1+2"
    assert h["x-b"] == "x y"
    assert h["x-flag"] == "true"
    assert h["x-same"] == "true"


@pytest.fixture
def lua_dir(tmp_path):
    (tmp_path / "mymod.lua").write_text(
        "local M = {}\nfunction M.greet(n) return 'hello ' .. n end\nreturn M\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "sub.lua").write_text("return {name = 'pkg.sub', value = 42}\n")
    return tmp_path


USES_MODULES = """
local mymod = require "mymod"
local sub = require "pkg.sub"
local M = {}
function M:on_read_request(txn)
  txn.resp.headers["x-greet"] = mymod.greet(txn.req.uri)
  txn.resp.headers["x-sub"] = sub.name .. "=" .. sub.value
end
return M
"""


def test_lua_path_modules_can_be_required(make_host, lua_dir):
    host = make_host(lua_path=[lua_dir])
    host.load(USES_MODULES, name="m.lua")
    txn = Transaction(uri="/world")
    assert host.fire("read_request", txn).status is Outcome.CONTINUE
    assert txn.response.headers["x-greet"] == "hello /world"
    assert txn.response.headers["x-sub"] == "pkg.sub=42"


def test_module_required_at_load_time_is_compiled_once(make_host, lua_dir):
    host = make_host(lua_path=[lua_dir], state_pool=0)  # three threads, three fresh states
    assert host.stats()["compilations"] == 0
    host.load(USES_MODULES, name="m.lua")
    # the script and its two modules
    assert host.stats()["compilations"] == 3

    def fire():
        txn = Transaction(uri="/t")
        assert host.fire("read_request", txn).status is Outcome.CONTINUE
        return txn.response.headers["x-greet"], txn.response.headers["x-sub"]

    assert fire() == ("hello /t", "pkg.sub=42")
    assert run_in_thread(fire) == ("hello /t", "pkg.sub=42")
    assert run_in_thread(fire) == ("hello /t", "pkg.sub=42")
    s = host.stats()
    assert s["compilations"] == 3
    assert s["rehydrations"] == 3  # one script, three threads
    # a second script requiring the same module does not compile it again
    host.load("local m = require 'mymod'\nreturn {}\n", name="again.lua")
    assert host.stats()["compilations"] == 4


def test_modules_are_shared_per_thread_state_between_scripts(make_host, lua_dir):
    host = make_host(lua_path=[lua_dir])
    host.load("""
local m = require "mymod"
local A = {}
function A:on_read_request(txn) m.counter = (m.counter or 0) + 1 end
return A
""", name="a.lua")
    host.load("""
local m = require "mymod"
local B = {}
function B:on_read_request(txn) txn.resp.headers["x-counter"] = m.counter end
return B
""", name="b.lua")

    def fire():
        txn = Transaction()
        host.fire("read_request", txn)
        return txn.response.headers["x-counter"]

    assert [fire(), fire()] == ["1", "2"]
    assert run_in_thread(fire) == "1"


def test_missing_module_error_lists_searched_paths(make_host, lua_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    host = make_host(lua_path=[lua_dir, other])
    with pytest.raises(ScriptError) as ei:
        host.load("local x = require 'no.such'\nreturn {}\n", name="miss.lua")
    msg = ei.value.message
    assert "module 'no.such' not found" in msg
    assert "the embedded library" in msg
    assert str(lua_dir / "no" / "such.lua") in msg
    assert str(other / "no" / "such.lua") in msg
    assert ei.value.line == 1
    assert host.scripts == []


@pytest.mark.parametrize("name", ["../etc/passwd", "/abs", "a..b", ".hidden", "a/b", ""])
def test_require_rejects_invalid_module_names(probe_host, name):
    res = probe(probe_host, f"return require('{name}')")
    assert res.startswith("err:")
    assert f"invalid module name '{name}'" in res


def test_lua_path_module_runs_in_the_sandbox_at_load_time(make_host, tmp_path):
    # A module's chunk must see the same sandbox as the script that requires it,
    # both when the script is validated by host.load and in worker threads.
    (tmp_path / "inspect_env.lua").write_text("""
local M = {}
M.execute = type(os.execute)
M.dofile = type(rawget(_G, "dofile"))
M.global_write = pcall(function() leaked_global = 1 end)
return M
""")
    host = make_host(lua_path=[tmp_path])
    host.load("""
local env = require "inspect_env"
local seen = env.execute .. " " .. env.dofile .. " " .. tostring(env.global_write)
if seen ~= "nil nil false" then error("module escaped the sandbox: " .. seen) end
local S = {}
function S:on_read_request(txn) txn.resp.headers["x-seen"] = seen end
return S
""", name="env.lua")
    txn = Transaction()
    assert host.fire("read_request", txn).status is Outcome.CONTINUE
    assert txn.response.headers["x-seen"] == "nil nil false"


def test_lua_path_module_required_in_handler_runs_in_the_sandbox(make_host, tmp_path):
    (tmp_path / "lazy_env.lua").write_text(
        "return {execute = type(os.execute), dofile = type(rawget(_G, 'dofile'))}\n")
    host = make_host(lua_path=[tmp_path])
    host.load("""
local S = {}
function S:on_read_request(txn)
  local env = require "lazy_env"
  txn.resp.headers["x-seen"] = env.execute .. " " .. env.dofile
end
return S
""", name="lazy.lua")
    txn = Transaction()
    assert host.fire("read_request", txn).status is Outcome.CONTINUE
    assert txn.response.headers["x-seen"] == "nil nil"


# ---------------------------------------------------------------- sandbox=False


def test_without_sandbox_globals_and_io_are_available(make_host):
    host = make_host(sandbox=False)
    host.load("""
local S = {}
function S:on_read_request(txn)
  hits = (hits or 0) + 1
  txn.resp.headers["x-hits"] = hits
  txn.resp.headers["x-io"] = type(io.open)
  txn.resp.headers["x-exec"] = type(os.execute)
  txn.resp.headers["x-dump"] = type(string.dump)
end
return S
""", name="free.lua")

    def fire():
        txn = Transaction()
        assert host.fire("read_request", txn).status is Outcome.CONTINUE
        return txn.response.headers

    fire()
    h = fire()
    assert h["x-hits"] == "2"
    assert (h["x-io"], h["x-exec"], h["x-dump"]) == ("function", "function", "function")


def test_without_sandbox_load_still_refuses_bytecode(make_host):
    host = make_host(sandbox=False)
    host.load("""
local S = {}
function S:on_read_request(txn)
  local f, e = load(string.dump(function() return 1 end))
  txn.resp.headers["x-r"] = tostring(f) .. " " .. tostring(e)
end
return S
""", name="bc.lua")
    txn = Transaction()
    assert host.fire("read_request", txn).status is Outcome.CONTINUE
    assert txn.response.headers["x-r"].startswith("nil ")
    assert "mode" in txn.response.headers["x-r"]


# ---------------------------------------------------------------- txn misuse


def test_respond_in_log_hook_is_an_error(host):
    host.load("""
local S = {}
function S:on_log(txn) txn:respond(200, "late") end
return S
""", name="late.lua")
    txn = Transaction(status=200)
    out = host.fire("log", txn)
    assert out.status is Outcome.ERROR
    assert out.error.hook == "log"
    assert out.error.script == "late.lua"
    assert "txn:respond is not available in hook log" in out.error.message
    assert txn.response.body == b""


def test_respond_in_log_hook_error_message_exact(host):
    host.load("""
local S = {}
function S:on_log(txn)
  local ok, e = pcall(txn.respond, txn, 200, "late")
  txn.ctx.err = e
end
return S
""", name="late.lua")
    txn = Transaction()
    assert host.fire("log", txn).status is Outcome.CONTINUE
    assert txn.ctx == {"err": "txn:respond is not available in hook log"}


@pytest.mark.parametrize("stmt, fragment", [
    ("txn.foo = 1", "txn.foo cannot be assigned"),
    ("txn.req.body = 'x'", "txn.req.body cannot be assigned"),
    ("txn.resp.method = 'GET'", "txn.resp.method cannot be assigned"),
    ("txn.ctx = 5", "table expected"),
    ("setmetatable(txn, {})", "protected metatable"),
])
def test_assigning_unknown_txn_fields_is_an_error(host, stmt, fragment):
    host.load(f"""
local S = {{}}
function S:on_read_request(txn)
  {stmt}
end
return S
""", name="assign.lua")
    out = host.fire("read_request", Transaction())
    assert out.status is Outcome.ERROR
    assert fragment in out.error.message


def test_saved_txn_used_outside_its_hook_call_is_an_error(make_host, tmp_path):
    # a.lua saves its txn (and parts of it) in a shared module; b.lua's chunk runs
    # on the worker thread when the program changes, outside any hook call, and
    # touches the saved objects there.
    (tmp_path / "keep.lua").write_text("return {}\n")
    host = make_host(lua_path=[tmp_path])
    host.load("""
local keep = require "keep"
local A = {}
function A:on_read_request(txn)
  keep.txn, keep.req, keep.headers = txn, txn.req, txn.req.headers
  if keep.results then
    for k, v in pairs(keep.results) do txn.resp.headers["x-" .. k] = v end
  end
end
return A
""", name="a.lua")
    host.fire("read_request", Transaction(headers=[("Host", "h")]))
    host.load("""
local keep = require "keep"
if keep.txn then
  local function try(f)
    local ok, e = pcall(f)
    return (ok and "ok:" or "err:") .. tostring(e)
  end
  keep.results = {
    method = try(function() return keep.req.method end),
    header = try(function() return keep.headers["host"] end),
    ctx = try(function() return keep.txn.ctx end),
    status = try(function() keep.txn.resp.status = 500 end),
    respond = try(function() keep.txn:respond(200) end),
  }
end
return {}
""", name="b.lua")
    txn = Transaction(headers=[("Host", "h")])
    assert host.fire("read_request", txn).status is Outcome.CONTINUE
    h = txn.response.headers
    for k in ("method", "header", "ctx", "status", "respond"):
        assert h[f"x-{k}"].startswith("err:"), (k, h[f"x-{k}"])
        assert "txn is only valid during the hook call it was passed to" in h[f"x-{k}"]
    assert txn.response.status is None
