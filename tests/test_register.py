"""hs.register / hs.unregister (docs/register.md): handler classes registered by Lua,
several per script at load time and from inside a fire at run time, published as
one new program when the fire is over and rebuilt on every thread.

Every test runs on both engines (the ``engine`` fixture in conftest.py), with real
threads where the feature is about threads. Hostile scripts: test_register_attacks.py.
"""
from __future__ import annotations

import concurrent.futures
import logging
import re
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from helpers import ROOT, run_in_thread, wait_for

import hostscript
from hostscript import Outcome, Transaction

# ---- helpers ----

class Worker:
    """One long-lived thread (its Lua state stays with it) that runs what it is given."""

    def __init__(self):
        self._ex = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def call(self, fn, *args):
        return self._ex.submit(fn, *args).result(timeout=60)

    def stop(self):
        self._ex.shutdown(wait=True)


@pytest.fixture
def workers():
    made = []

    def make():
        w = Worker()
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()


def fire(host, hook, headers=(), uri="/"):
    """Fire HOOK on a fresh transaction; (outcome, txn)."""
    txn = Transaction(method="GET", uri=uri, headers=list(headers))
    return host.fire(hook, txn), txn


def ok(host, hook, headers=(), uri="/"):
    """Fire HOOK; it must succeed. The transaction's response headers as a dict."""
    out, txn = fire(host, hook, headers, uri)
    assert out.status is not Outcome.ERROR, out.error
    return dict(txn.response.headers.items())


def failed(host, hook, headers=()):
    out, _ = fire(host, hook, headers)
    assert out.status is Outcome.ERROR, "the fire should have failed"
    return out.error


def lua(src):
    return textwrap.dedent(src)


# Appends its tag to x-order: handlers' run order shows in one header.
TAG = """
local function tag(t)
  return function(self, txn)
    local h = txn.resp.headers
    h["x-order"] = (h["x-order"] or "") .. t .. ","
  end
end
"""


# ==== 1. load time: several classes per script ====

def test_load_time_classes_are_named_listed_and_all_run(host):
    host.load(lua(TAG + """
    local names = {}
    names[1] = hs.register({on_send_response = tag("audit")}, {name = "audit"})
    names[2] = hs.register({on_send_response = tag("anon")})      -- its rank: #2
    names[3] = hs.register({on_log = tag("third")})               -- #3
    return {on_read_request = function(self, txn)
      txn.resp.headers["x-names"] = table.concat(names, " ")
    end}
    """), name="app.lua")
    assert host.scripts == ["app.lua", "app.lua#audit", "app.lua#2", "app.lua#3"]
    assert ok(host, "read_request")["x-names"] == "app.lua#audit app.lua#2 app.lua#3"
    assert ok(host, "send_response")["x-order"] == "audit,anon,"
    assert ok(host, "log")["x-order"] == "third,"
    assert host.handled_hooks == {"read_request", "send_response", "log"}
    # a second script: its unnamed class ranks from 1 again
    host.load(lua(TAG + """
    hs.register({on_log = tag("b1")})
    return {on_log = tag("b")}
    """), name="b.lua")
    assert host.scripts == ["app.lua", "app.lua#audit", "app.lua#2", "app.lua#3", "b.lua", "b.lua#1"]
    assert ok(host, "log")["x-order"] == "third,b1,b,"


def test_handlers_run_in_the_documented_order_and_order_changes_it(host, workers):
    host.load(lua(TAG + """
    hs.register({on_send_response = tag("a1")}, {name = "one"})
    hs.register({on_send_response = tag("a2")})
    hs.register({on_send_response = tag("early")}, {name = "early", order = -10})
    return {on_send_response = tag("a")}
    """), name="a.lua")
    host.load(lua(TAG + """
    hs.register({on_send_response = tag("late")}, {name = "late", order = 10})
    hs.register({on_send_response = tag("b1")}, {name = "b1"})
    return {on_send_response = tag("b")}
    """), name="b.lua")
    # scripts in load order, a script's registered classes before the class it
    # returns; a lower order first whatever the script
    assert ok(host, "send_response")["x-order"] == "early,a1,a2,a,b1,b,late,"
    # a run-time class (order 0) runs after the scripts' order-0 classes; one with
    # order -20 runs first of all
    host.load(lua(TAG + """
    local RT = {on_send_response = tag("rt")}
    local First = {on_send_response = tag("first")}
    return {on_read_request = function(self, txn)
      hs.register(RT, {name = "rt"})
      hs.register(First, {name = "first", order = -20})
    end}
    """), name="c.lua")
    ok(host, "read_request")
    assert host.scripts == ["a.lua", "a.lua#one", "a.lua#2", "a.lua#early", "b.lua", "b.lua#late",
                            "b.lua#b1", "c.lua", "c.lua#rt", "c.lua#first"]
    expect = "first,early,a1,a2,a,b1,b,rt,late,"
    assert ok(host, "send_response")["x-order"] == expect
    assert workers().call(ok, host, "send_response")["x-order"] == expect


def test_an_undeclared_hook_in_a_registered_class_is_a_load_error_naming_the_declared_hooks(host):
    with pytest.raises(hostscript.ScriptError) as ei:
        host.load(lua("""
        hs.register({on_bogus = function() end}, {name = "x"})
        return {on_log = function() end}
        """), name="u.lua")
    msg = str(ei.value)
    assert "on_bogus" in msg and "u.lua#x" in msg
    assert "declared hooks: read_request, send_request, read_response, send_response, log" in msg
    assert host.scripts == []


def test_a_non_function_on_hook_in_a_registered_class_is_a_load_error(host):
    with pytest.raises(hostscript.ScriptError, match=r"on_log must be a function, not string"):
        host.load(lua("""
        hs.register({on_log = "nope"}, {name = "x"})
        return {on_read_request = function() end}
        """), name="n.lua")
    assert host.scripts == []


def test_a_chunk_that_registers_need_not_return_a_class(host):
    host.load('hs.register({on_log = function(self, txn) txn.resp.headers["x-l"] = "1" end}, '
              '{name = "only"})', name="r.lua")
    assert host.scripts == ["r.lua", "r.lua#only"]
    assert ok(host, "log")["x-l"] == "1"
    assert host.handled_hooks == {"log"}


def test_a_chunk_that_neither_returns_nor_registers_is_an_error(host):
    with pytest.raises(hostscript.ScriptError, match=r"must return a handler class .*or register one"):
        host.load("local x = 1", name="nothing.lua")
    assert host.scripts == []


@pytest.mark.parametrize("body,words", [
    ('local C = {on_log = function() end} hs.register(C, {name = "a"}) hs.register(C, {name = "b"})',
     "registered already, as 'twice.lua#a'"),
    (('hs.register({on_log = function() end}, {name = "a"}) '
      'hs.register({on_log = function() end}, {name = "a"})'), "registers 'twice.lua#a' twice"),
], ids=["same-class", "same-name"])
def test_registering_a_class_or_a_name_twice_at_load_time_is_an_error(host, body, words):
    with pytest.raises(hostscript.ScriptError) as ei:
        host.load(body + " return {on_read_request = function() end}", name="twice.lua")
    assert words in str(ei.value)
    assert host.scripts == []


def test_a_class_both_registered_and_returned_runs_once(host):
    host.load(lua(TAG + """
    local C = {on_log = tag("c")}
    hs.register(C, {name = "c"})
    return C
    """), name="both.lua")
    assert ok(host, "log")["x-order"] == "c,"


@pytest.mark.parametrize("bad", [
    'hs.register({on_log = function() end}, {name = "ok2"}) hs.register({on_nope = function() end})',
    'hs.register({on_log = function() end}, {name = "ok2"}) error("chunk fails")',
    'hs.register({on_log = function() end}, {name = "bad name"})',
    'hs.register({on_log = function() end, new = function() error("new fails") end}, {name = "n"})',
], ids=["undeclared", "chunk-error", "bad-name", "new-error"])
def test_a_failed_load_leaves_the_running_program_unchanged(host, workers, bad):
    host.load(lua(TAG + """
    hs.register({on_log = tag("v1-extra")}, {name = "extra"})
    return {on_log = tag("v1")}
    """), name="s.lua")
    w = workers()
    assert w.call(ok, host, "log")["x-order"] == "v1-extra,v1,"
    before = host.stats()["generation"], host.scripts
    with pytest.raises(hostscript.ScriptError):
        host.load(bad + " return {on_log = function() end}", name="s.lua")
    assert (host.stats()["generation"], host.scripts) == before
    assert w.call(ok, host, "log")["x-order"] == "v1-extra,v1,"
    assert ok(host, "log")["x-order"] == "v1-extra,v1,"


def test_a_required_module_cannot_register_at_load_time(make_host, tmp_path):
    (tmp_path / "regmod.lua").write_text(
        'hs.register({on_log = function() end}, {name = "frommod"}) return {}')
    host = make_host(lua_path=[tmp_path])
    with pytest.raises(hostscript.ScriptError, match=r"regmod:1: hs.register: not while a module loads"):
        host.load('local m = require("regmod") return {on_log = function() end}', name="l.lua")
    assert host.scripts == []


def test_a_required_module_cannot_register_at_run_time(make_host, tmp_path):
    (tmp_path / "regmod.lua").write_text(lua("""
    local C = {on_log = function(self, txn) txn.resp.headers["x-mod"] = "1" end}
    local ok, err = pcall(hs.register, C, {name = "frommod"})
    return {ok = ok, err = tostring(err)}
    """))
    host = make_host(lua_path=[tmp_path])
    host.load(lua("""
    return {on_read_request = function(self, txn)
      local m = require("regmod")     -- first required here, inside a fire
      txn.resp.headers["x-ok"] = tostring(m.ok)
    end}
    """), name="s.lua")
    assert ok(host, "read_request")["x-ok"] == "false"
    assert host.scripts == ["s.lua"]
    assert "x-mod" not in ok(host, "log")


def test_a_script_name_with_a_hash_is_refused(host):
    with pytest.raises(hostscript.ScriptError, match="may not contain '#'"):
        host.load("return {on_log = function() end}", name="a#b.lua")
    assert host.scripts == []


def test_load_time_classes_are_rebuilt_on_every_thread(host, workers):
    host.load(lua("""
    local n = 0
    hs.register({on_log = function(self, txn)
      n = n + 1
      txn.resp.headers["x-n"] = tostring(n)
    end}, {name = "count"})
    """), name="c.lua")
    a, b = workers(), workers()
    assert [a.call(ok, host, "log")["x-n"] for _ in range(3)] == ["1", "2", "3"]
    assert b.call(ok, host, "log")["x-n"] == "1"  # its own state, its own chunk run


def test_a_chunk_that_registers_differently_on_another_thread_fails_there(make_host):
    host = make_host(shared={"d": 1 << 16})
    host.load(lua("""
    local runs = hs.shared.d:incr("runs", 1, 0)
    if runs == 1 then        -- only where it ran first: the load's scratch state
      hs.register({on_log = function() end}, {name = "once"})
    end
    return {on_log = function() end}
    """), name="rnd.lua")
    assert host.scripts == ["rnd.lua", "rnd.lua#once"]
    err = failed(host, "log")
    assert "rnd.lua: the chunk made 1 handler class(es) here but 2 when it was loaded" in err.message


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "3"])
def test_max_registrations_must_be_a_positive_int(engine, bad):
    with pytest.raises(hostscript.UsageError, match="max_registrations must be a positive int"):
        hostscript.Host(engine=engine, max_registrations=bad)


# ==== 2. run time: the class crosses threads ====

STAMP = lua("""
local Stamp = {}
local tag = "v2"
function Stamp:on_send_response(txn) txn.resp.headers["x-stamp"] = tag end
function Stamp:on_read_request(txn) txn.resp.headers["x-stamp-rr"] = tag end
return {on_read_request = function(self, txn)
  if txn.req.headers["x-enable"] then
    txn.resp.headers["x-name"] = hs.register(Stamp, {name = "stamp"})
  elseif txn.req.headers["x-disable"] then
    txn.resp.headers["x-gone"] = tostring(hs.unregister("stamp"))
  end
end}
""")


def test_a_class_registered_on_one_thread_runs_on_another_without_compiling(make_host, workers):
    host = make_host(state_pool=0)
    host.load(STAMP, name="s.lua")
    a, b = workers(), workers()
    assert "x-stamp" not in b.call(ok, host, "send_response")  # B has its state, on the old program
    before = host.stats()
    assert before["compilations"] == 1 and before["registered"] == 0
    got = a.call(ok, host, "read_request", [("x-enable", "1")])
    assert got["x-name"] == "s.lua#stamp"
    assert host.scripts == ["s.lua", "s.lua#stamp"]
    mid = host.stats()
    assert mid["generation"] == before["generation"] + 1
    assert mid["registered"] == 1 and mid["registrations"] == 1
    assert b.call(ok, host, "send_response")["x-stamp"] == "v2"
    after = host.stats()
    assert after["compilations"] == before["compilations"]      # B compiled nothing
    assert after["rehydrations"] == mid["rehydrations"] + 1     # it rebuilt the class once
    assert after["generation"] == mid["generation"]
    # once per program version, not once per call
    assert b.call(ok, host, "send_response")["x-stamp"] == "v2"
    assert host.stats()["rehydrations"] == after["rehydrations"]


def test_the_registering_fire_finishes_on_its_program_and_the_next_fire_sees_the_class(host, workers):
    host.load(STAMP, name="s.lua")
    a = workers()
    got = a.call(ok, host, "read_request", [("x-enable", "1")])
    # Stamp handles read_request too, but this fire started on the old program
    assert got["x-name"] == "s.lua#stamp" and "x-stamp-rr" not in got
    # the next fire on the same thread runs it
    assert a.call(ok, host, "read_request")["x-stamp-rr"] == "v2"
    assert ok(host, "read_request")["x-stamp-rr"] == "v2"  # and so does any other thread


def test_changes_of_one_fire_land_together_as_one_program(host):
    host.load(lua("""
    local A = {on_log = function(self, txn) txn.resp.headers["x-a"] = "1" end}
    local B = {on_log = function(self, txn) txn.resp.headers["x-b"] = "1" end}
    return {on_read_request = function(self, txn)
      hs.register(A, {name = "a"})
      hs.register(B, {name = "b"})
      hs.register(B, {name = "c"})
      txn.resp.headers["x-un"] = tostring(hs.unregister("c"))   -- pending in this fire: true
    end}
    """), name="s.lua")
    gen = host.stats()["generation"]
    assert ok(host, "read_request")["x-un"] == "true"
    assert host.stats()["generation"] == gen + 1
    assert host.scripts == ["s.lua", "s.lua#a", "s.lua#b"]
    got = ok(host, "log")
    assert got["x-a"] == "1" and got["x-b"] == "1"


# ==== 3. what crosses threads ====

CROSSING = lua("""
local num, int, str, yes, no = 1.5, 42, "hello", true, false
local nested = {a = {b = {c = "deep"}}, list = {1, 2, 3}}
local box = {n = 0}
local alias = box                -- another local, the same table
local count = 5                  -- one upvalue, shared by two methods
local function helper(x) return "<" .. x .. ">" end
local function fact(n) if n <= 1 then return 1 end return n * fact(n - 1) end
local fmt = string.format
local str_lib = string
local log = hs.log
local util = require("hs.util")
local split = util.split
local d = hs.shared.d

local C = {}
function C.new()
  d:incr("news", 1, 0)
  return setmetatable({id = d:get("news")}, {__index = C})
end
function C:on_send_request(txn)
  count = count + 1
  box.n = box.n + 1
  local h = txn.resp.headers
  h["x-values"] = fmt("%s|%d|%s|%s|%s", tostring(num), int, str, tostring(yes), tostring(no))
  h["x-nested"] = nested.a.b.c .. "," .. table.concat(nested.list, ",")
  h["x-helper"] = helper(str_lib.upper("h")) .. fact(5)
  h["x-split"] = table.concat(split("a, b ,c"), "+") .. "," .. util.trim("  t  ")
  log.info("crossing " .. count)
  d:set("seen", "yes")
end
function C:on_read_response(txn)
  local h = txn.resp.headers
  h["x-count"] = tostring(count)
  h["x-same-table"] = tostring(box == alias) .. "," .. alias.n
  h["x-shared"] = tostring(d:get("seen"))
  h["x-self"] = type(self.id)
end
return {on_read_request = function(self, txn)
  count = 5
  hs.register(C, {name = "c"})
end}
""")


def test_upvalues_library_values_and_modules_cross_threads(make_host, workers, caplog):
    host = make_host(shared={"d": 1 << 16})
    host.load(CROSSING, name="x.lua")
    ok(host, "read_request")
    b = workers()
    with caplog.at_level(logging.INFO, logger="hostscript"):
        got = b.call(ok, host, "send_request")
    assert got["x-values"] == "1.5|42|hello|true|false"
    assert got["x-nested"] == "deep,1,2,3"
    assert got["x-helper"] == "<H>120"
    assert got["x-split"] == "a+b+c,t"
    assert any("crossing 6" in r.getMessage() for r in caplog.records)
    got = b.call(ok, host, "read_response")
    assert got["x-count"] == "6"               # on_send_request's increment, seen by on_read_response
    assert got["x-same-table"] == "true,1"     # box and alias stay one table
    assert got["x-shared"] == "yes"            # hs.shared.d is the host's dictionary
    assert got["x-self"] == "number"           # new() made the instance
    assert host.shared["d"].get("seen") == b"yes"
    # per state: another thread starts from the registered values again
    c = workers()
    c.call(ok, host, "send_request")
    assert c.call(ok, host, "read_response")["x-count"] == "6"
    assert b.call(ok, host, "read_response")["x-count"] == "6"
    b.call(ok, host, "send_request")
    assert b.call(ok, host, "read_response")["x-count"] == "7"
    # new() ran once per state that rebuilt the class (B and C), not once per call, and
    # once when hs.register tried the class in the registering fire
    for _ in range(3):
        b.call(ok, host, "read_response")
        c.call(ok, host, "read_response")
    assert host.shared["d"].get("news") == 3


def test_class_metatables_and_inheritance_cross_threads(host, workers):
    host.load(lua("""
    local Base = {}
    Base.__index = Base
    function Base:name() return "base" end
    function Base:on_send_response(txn)
      txn.resp.headers["x-who"] = self:name() .. "/" .. self:kind()
    end
    function Base:kind() return "base-kind" end
    local Derived = setmetatable({}, Base)
    Derived.__index = Derived
    function Derived:name() return "derived" end
    return {on_read_request = function(self, txn) hs.register(Derived, {name = "derived"}) end}
    """), name="inh.lua")
    ok(host, "read_request")
    assert workers().call(ok, host, "send_response")["x-who"] == "derived/base-kind"
    assert host.handled_hooks >= {"send_response"}


def test_each_registration_carries_the_values_of_its_moment(host, workers):
    host.load(lua("""
    return {on_read_request = function(self, txn)
      local tag = txn.req.headers["x-tag"]
      local V = {}
      function V:on_log(t) t.resp.headers["x-tag"] = tag end
      hs.register(V, {name = "v"})
    end}
    """), name="t.lua")
    b = workers()
    for tag in ("one", "two", "three"):
        ok(host, "read_request", [("x-tag", tag)])
        assert b.call(ok, host, "log")["x-tag"] == tag
    assert host.scripts == ["t.lua", "t.lua#v"]


# ==== 4. what does not cross: refused, naming the path ====

@pytest.mark.parametrize("setup,path_words", [
    ("local co = coroutine.create(function() end)\nfunction C:on_log() return co end",
     "x.on_log upvalue 'co' is a coroutine: it cannot cross threads"),
    ("local cache = {f = function() end}\nfunction C:on_log() return cache end",
     "x.on_log upvalue 'cache'.f is a function inside a table of upvalue data"),
    ("local saved = txn\nfunction C:on_log() return saved end",
     "x.on_log upvalue 'saved' is a table with a metatable"),
    ("local it = string.gmatch('abc', '%a')\nfunction C:on_log() return it end",
     "x.on_log upvalue 'it' is a C function that is not a library function"),
    ("C.co = coroutine.create(function() end)\nfunction C:on_log() end",
     "x.co is a coroutine"),
    ("local data = setmetatable({}, {})\nfunction C:on_log() return data end",
     "x.on_log upvalue 'data' is a table with a metatable"),
], ids=["coroutine", "function-in-upvalue-table", "saved-txn", "c-closure", "field-coroutine",
        "upvalue-metatable"])
def test_what_cannot_cross_is_refused_naming_its_path(host, setup, path_words):
    host.load(lua("""
    return {on_read_request = function(self, txn)
      local C = {}
      %s
      local ok, err = pcall(hs.register, C, {name = "x"})
      txn.resp.headers["x-err"] = ok and "registered" or err
    end}
    """) % setup.replace("\n", "\n      "), name="s.lua")
    err = ok(host, "read_request")["x-err"]
    assert err.startswith("hs.register: cannot register s.lua#x: ") or \
        "hs.register: cannot register s.lua#x: " in err, err
    assert path_words in err, err
    assert host.scripts == ["s.lua"]
    assert host.stats()["registered"] == 0


def test_an_uncaught_refusal_fails_the_handler(host):
    host.load(lua("""
    local co = coroutine.create(function() end)
    local S = {on_log = function() return co end}
    return {on_read_request = function(self, txn) hs.register(S, {name = "stamp"}) end}
    """), name="s.lua")
    err = failed(host, "read_request")
    assert "cannot register s.lua#stamp: stamp.on_log upvalue 'co' is a coroutine" in err.message
    assert err.script == "s.lua" and err.hook == "read_request"
    assert host.scripts == ["s.lua"]


# ==== 5. replace, unregister, unload, reload ====

def test_replacing_a_name_is_atomic_for_other_threads(host):
    host.load(lua("""
    return {on_read_request = function(self, txn)
      local tag = txn.req.headers["x-set"]
      local V = {}
      function V:on_send_response(t)
        local h = t.resp.headers
        h["x-ver"] = (h["x-ver"] or "") .. tag .. ";"
      end
      hs.register(V, {name = "v"})
    end}
    """), name="r.lua")
    ok(host, "read_request", [("x-set", "0")])
    stop = threading.Event()
    seen, bad = [], []

    def reader():
        mine = []
        while not stop.is_set():
            v = ok(host, "send_response").get("x-ver")
            if v is None or not re.fullmatch(r"\d+;", v):
                bad.append(v)
            else:
                mine.append(int(v[:-1]))
        seen.append(mine)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 0.6
        n = 0
        while time.monotonic() < deadline:
            n += 1
            ok(host, "read_request", [("x-set", str(n))])
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not bad, bad[:10]  # never none, never both
    for mine in seen:
        assert mine, "a reader thread saw nothing"
        assert mine == sorted(mine), "a thread went back to an older version"
    assert host.scripts == ["r.lua", "r.lua#v"]
    assert ok(host, "send_response")["x-ver"] == f"{n};"
    st = host.stats()
    assert st["registered"] == 1 and st["registrations"] == n + 1


def test_unregister_returns_whether_the_class_existed(host, workers):
    host.load(STAMP, name="s.lua")
    b = workers()
    assert ok(host, "read_request", [("x-disable", "1")])["x-gone"] == "false"
    ok(host, "read_request", [("x-enable", "1")])
    assert b.call(ok, host, "send_response")["x-stamp"] == "v2"
    assert ok(host, "read_request", [("x-disable", "1")])["x-gone"] == "true"
    assert host.scripts == ["s.lua"]
    assert "x-stamp" not in b.call(ok, host, "send_response")
    assert ok(host, "read_request", [("x-disable", "1")])["x-gone"] == "false"
    st = host.stats()
    assert (st["registered"], st["registrations"], st["unregistrations"]) == (0, 1, 1)


def test_unregister_accepts_the_full_name_of_its_own_class(host):
    host.load(lua("""
    local S = {on_log = function(self, txn) txn.resp.headers["x-s"] = "1" end}
    return {on_read_request = function(self, txn)
      if txn.req.headers["x-full"] then
        txn.resp.headers["x-gone"] = tostring(hs.unregister("s.lua#stamp"))
      else
        hs.register(S, {name = "stamp"})
      end
    end}
    """), name="s.lua")
    ok(host, "read_request")
    assert host.scripts == ["s.lua", "s.lua#stamp"]
    assert ok(host, "read_request", [("x-full", "1")])["x-gone"] == "true"
    assert host.scripts == ["s.lua"]


def test_a_script_cannot_unregister_or_replace_another_scripts_class(host):
    host.load(STAMP, name="s.lua")
    ok(host, "read_request", [("x-enable", "1")])
    host.load(lua("""
    local Evil = {on_send_response = function(self, txn) txn.resp.headers["x-stamp"] = "evil" end}
    return {on_log = function(self, txn)
      local ok1, e1 = pcall(hs.unregister, "s.lua#stamp")
      local r2 = hs.register(Evil, {name = "stamp"})      -- lands under other.lua#
      txn.resp.headers["x-un"] = tostring(ok1) .. " " .. tostring(e1)
      txn.resp.headers["x-reg"] = r2
    end}
    """), name="other.lua")
    got = ok(host, "log")
    assert got["x-un"].startswith("false ")
    assert "may unregister only its own classes (other.lua#...)" in got["x-un"]
    assert got["x-reg"] == "other.lua#stamp"
    assert sorted(host.scripts) == sorted(["s.lua", "other.lua", "s.lua#stamp", "other.lua#stamp"])
    # both run, the run-time classes in registration order: other.lua's last
    assert ok(host, "send_response")["x-stamp"] == "evil"
    host.unload("other.lua")
    assert host.scripts == ["s.lua", "s.lua#stamp"]
    assert ok(host, "send_response")["x-stamp"] == "v2"


def test_a_load_time_class_cannot_be_unregistered_or_replaced_at_run_time(host):
    host.load(lua("""
    hs.register({on_log = function(self, txn) txn.resp.headers["x-keep"] = "1" end}, {name = "keep"})
    local R = {on_log = function() end}
    return {on_read_request = function(self, txn)
      local ok1, e1 = pcall(hs.unregister, "keep")
      local ok2, e2 = pcall(hs.register, R, {name = "keep"})
      txn.resp.headers["x-un"] = e1
      txn.resp.headers["x-re"] = e2
    end}
    """), name="s.lua")
    got = ok(host, "read_request")
    assert "'s.lua#keep' is a class its script registers when it loads" in got["x-un"]
    assert "'s.lua#keep' is a class its script registers when it loads" in got["x-re"]
    assert host.scripts == ["s.lua", "s.lua#keep"]
    assert ok(host, "log")["x-keep"] == "1"


UNLOAD_BY_HASH = r"""
import sys, threading
import hostscript
host = hostscript.Host(engine=sys.argv[1])
host.load('hs.register({on_log = function() end}, {name = "keep"}) '
          'return {on_read_request = function() end}', name="s.lua")
def go(name, res):
    try:
        host.unload(name)
        res.append("unloaded")
    except hostscript.UsageError as e:
        res.append(str(e))
for name in sys.argv[2:]:
    res = []
    t = threading.Thread(target=go, args=(name, res), daemon=True)
    t.start()
    t.join(3)
    if t.is_alive():
        print("HUNG", name, flush=True)
        break
    print(res[0], flush=True)
else:
    print(host.scripts)
    host.close()
import os
os._exit(0)
"""


def test_unloading_a_missing_or_load_time_class_is_a_usage_error(engine):
    proc = subprocess.run([sys.executable, "-c", UNLOAD_BY_HASH, engine, "s.lua#keep", "s.lua#gone"],
                          check=False, capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert not lines[0].startswith("HUNG"), "host.unload('s.lua#keep') never returned"
    assert "registered by 's.lua' when it loads" in lines[0]
    assert not lines[1].startswith("HUNG"), "host.unload('s.lua#gone') never returned"
    assert "no script named 's.lua#gone'" in lines[1]
    assert lines[2] == "['s.lua', 's.lua#keep']"


def test_a_run_time_class_registers_under_its_script_and_may_unregister_itself(host, workers, caplog):
    host.load(lua("""
    local Second = {on_log = function(self, txn) txn.resp.headers["x-second"] = "1" end}
    local First = {Second = Second}      -- a field: part of the class, crosses with it
    function First:on_send_response(txn)
      txn.resp.headers["x-name"] = hs.register(self.Second, {name = "second"})
      txn.resp.headers["x-gone"] = tostring(hs.unregister("first"))
    end
    return {on_read_request = function(self, txn) hs.register(First, {name = "first"}) end}
    """), name="s.lua")
    ok(host, "read_request")
    assert host.scripts == ["s.lua", "s.lua#first"]
    with caplog.at_level(logging.INFO, logger="hostscript"):
        got = workers().call(ok, host, "send_response")
    assert got == {"x-name": "s.lua#second", "x-gone": "true"}
    assert host.scripts == ["s.lua", "s.lua#second"]
    assert ok(host, "log")["x-second"] == "1"
    msgs = [r.getMessage() for r in caplog.records]
    assert "[s.lua#first] registered s.lua#second (hooks: log) from s.lua#first in send_response" in msgs
    assert "[s.lua#first] unregistered s.lua#first from s.lua#first in send_response" in msgs
    host.unload("s.lua")  # its classes go with it, whichever class registered them
    assert host.scripts == []


def test_host_unload_of_one_run_time_class(host, workers):
    host.load(STAMP, name="s.lua")
    ok(host, "read_request", [("x-enable", "1")])
    b = workers()
    assert b.call(ok, host, "send_response")["x-stamp"] == "v2"
    host.unload("s.lua#stamp")
    assert host.scripts == ["s.lua"]
    assert "x-stamp" not in b.call(ok, host, "send_response")
    assert host.stats()["registered"] == 0
    # (unloading it again: test_unloading_a_missing_or_load_time_class_is_a_usage_error)
    # it can be registered again
    ok(host, "read_request", [("x-enable", "1")])
    assert b.call(ok, host, "send_response")["x-stamp"] == "v2"


def test_unloading_a_script_removes_its_run_time_classes_and_reloading_keeps_them(host, workers):
    host.load(STAMP, name="s.lua")
    host.load("return {on_log = function(self, txn) txn.resp.headers['x-o'] = '1' end}", name="o.lua")
    ok(host, "read_request", [("x-enable", "1")])
    b = workers()
    assert host.scripts == ["s.lua", "o.lua", "s.lua#stamp"]
    # reloading keeps the classes its handlers registered
    host.load(STAMP.replace('x-stamp-rr"] = tag', 'x-stamp-rr"] = "reloaded"'), name="s.lua")
    assert host.scripts == ["s.lua", "o.lua", "s.lua#stamp"]
    assert b.call(ok, host, "send_response")["x-stamp"] == "v2"
    assert host.stats()["registered"] == 1
    host.unload("s.lua")
    assert host.scripts == ["o.lua"]
    assert host.stats()["registered"] == 0
    assert "x-stamp" not in b.call(ok, host, "send_response")
    assert b.call(ok, host, "log")["x-o"] == "1"


def test_a_chunk_class_wins_over_a_run_time_class_of_the_same_name(host):
    host.load(lua("""
    local R = {on_log = function(self, txn) txn.resp.headers["x-who"] = "runtime" end}
    return {on_read_request = function(self, txn) hs.register(R, {name = "x"}) end}
    """), name="s.lua")
    ok(host, "read_request")
    assert ok(host, "log")["x-who"] == "runtime"
    host.load(lua("""
    hs.register({on_log = function(self, txn) txn.resp.headers["x-who"] = "chunk" end}, {name = "x"})
    return {on_read_request = function() end}
    """), name="s.lua")
    assert host.scripts == ["s.lua", "s.lua#x"]
    assert ok(host, "log")["x-who"] == "chunk"
    assert host.stats()["registered"] == 0


def test_run_time_classes_keep_the_place_where_they_were_first_added(host):
    # program order: entries in the order they were first added (docs/register.md)
    host.load(lua(TAG + """
    local RT = {on_send_response = tag("rt")}
    return {on_send_response = tag("a"),
            on_read_request = function(self, txn) hs.register(RT, {name = "rt"}) end}
    """), name="a.lua")
    ok(host, "read_request")
    host.load(lua(TAG + 'return {on_send_response = tag("b")}'), name="b.lua")
    assert ok(host, "send_response")["x-order"] == "a,rt,b,"
    assert host.scripts == ["a.lua", "a.lua#rt", "b.lua"]
    ok(host, "read_request")  # replaced: it keeps its place
    assert host.scripts == ["a.lua", "a.lua#rt", "b.lua"]


SLOW_REGISTER = lua("""
local d = hs.shared.d
local C = {on_log = function(self, txn) txn.resp.headers["x-c"] = "runtime" end}
return {on_read_request = function(self, txn)
  if txn.req.headers["x-slow"] then
    hs.register(C, {name = "x"})
    d:set("registered", 1)
    while not d:get("go") do end     -- the host meanwhile changes the script
  end
end}
""")


def _while_registering(host, change):
    """Start a fire that registers s.lua#x and waits; run CHANGE before it ends."""
    d = host.shared["d"]
    ok(host, "read_request")  # the thread state exists; the GIL goes once a fire runs long
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("out", fire(host, "read_request",
                                                                   [("x-slow", "1")])[0]))
    t.start()
    try:
        assert wait_for(lambda: d.get("registered"), 20), "the handler did not register"
        change()
    finally:
        d.set("go", 1)
        t.join(30)
    assert box["out"].status is Outcome.CONTINUE, box["out"].error


def test_unloading_the_script_while_its_handler_registers_leaves_no_orphan_class(make_host, caplog):
    host = make_host(time_limit=30, shared={"d": 1 << 16})
    host.load(SLOW_REGISTER, name="s.lua")
    with caplog.at_level(logging.INFO, logger="hostscript"):
        _while_registering(host, lambda: host.unload("s.lua"))
    assert host.scripts == []
    assert host.stats()["registered"] == 0
    assert "x-c" not in ok(host, "log")
    dropped = [r for r in caplog.records if "registration of s.lua#x dropped" in r.getMessage()]
    assert len(dropped) == 1 and dropped[0].levelno == logging.WARNING


def test_a_chunk_class_loaded_while_a_handler_registers_the_same_name_wins(make_host):
    host = make_host(time_limit=30, shared={"d": 1 << 16})
    host.load(SLOW_REGISTER, name="s.lua")
    _while_registering(host, lambda: host.load(SLOW_REGISTER.replace(
        "return {", 'hs.register({on_log = function(self, txn) txn.resp.headers["x-c"] = "chunk" '
                    'end}, {name = "x"})\nreturn {', 1), name="s.lua"))
    assert host.scripts == ["s.lua", "s.lua#x"]
    assert ok(host, "log")["x-c"] == "chunk"


# ==== 6. limits: runtime_register, max_registrations ====

def test_runtime_register_false_refuses_at_run_time_but_not_at_load_time(make_host):
    host = make_host(runtime_register=False)
    host.load(lua("""
    hs.register({on_log = function(self, txn) txn.resp.headers["x-l"] = "1" end}, {name = "load"})
    local C = {on_log = function() end}
    return {on_read_request = function(self, txn)
      local ok1, e1 = pcall(hs.register, C, {name = "rt"})
      local ok2, e2 = pcall(hs.unregister, "rt")
      txn.resp.headers["x-reg"] = e1
      txn.resp.headers["x-unreg"] = e2
    end}
    """), name="s.lua")
    assert host.scripts == ["s.lua", "s.lua#load"]
    got = ok(host, "read_request")
    assert "runtime_register=False" in got["x-reg"] and "turned off" in got["x-reg"]
    assert "runtime_register=False" in got["x-unreg"]
    assert host.scripts == ["s.lua", "s.lua#load"]
    assert ok(host, "log")["x-l"] == "1"
    assert host.stats()["registrations"] == 0


MANY = lua("""
local C = {on_log = function(self, txn) end}
return {on_read_request = function(self, txn)
  local h = txn.req.headers
  local ok, err
  if h["x-reg"] then ok, err = pcall(hs.register, C, {name = h["x-reg"]})
  else ok, err = pcall(hs.unregister, h["x-unreg"]) end
  txn.resp.headers["x-r"] = tostring(ok) .. " " .. tostring(err)
end}
""")


def test_max_registrations_bounds_distinct_names_and_replacing_still_works(make_host, workers):
    host = make_host(max_registrations=3)
    host.load(MANY, name="m.lua")
    for n in ("a", "b", "c"):
        assert ok(host, "read_request", [("x-reg", n)])["x-r"] == f"true m.lua#{n}"
    got = workers().call(ok, host, "read_request", [("x-reg", "d")])["x-r"]
    assert got.startswith("false ") and "allows 3 classes registered at run time" in got
    assert ok(host, "read_request", [("x-reg", "b")])["x-r"] == "true m.lua#b"  # replacing
    assert host.scripts == ["m.lua", "m.lua#a", "m.lua#b", "m.lua#c"]
    assert ok(host, "read_request", [("x-unreg", "a")])["x-r"] == "true true"
    assert ok(host, "read_request", [("x-reg", "d")])["x-r"] == "true m.lua#d"
    assert host.scripts == ["m.lua", "m.lua#b", "m.lua#c", "m.lua#d"]
    st = host.stats()
    assert (st["registered"], st["registrations"], st["unregistrations"]) == (3, 5, 1)


def test_max_registrations_counts_the_changes_pending_in_the_fire(make_host):
    host = make_host(max_registrations=2)
    host.load(lua("""
    local C = {on_log = function() end}
    return {on_read_request = function(self, txn)
      hs.register(C, {name = "a"})
      hs.register(C, {name = "a"})          -- the same name: one class
      hs.register(C, {name = "b"})
      local ok, err = pcall(hs.register, C, {name = "c"})
      txn.resp.headers["x-c"] = tostring(ok)
      hs.unregister("a")                    -- frees a place in this fire
      txn.resp.headers["x-c2"] = tostring(pcall(hs.register, C, {name = "c"}))
    end}
    """), name="p.lua")
    got = ok(host, "read_request")
    assert got == {"x-c": "false", "x-c2": "true"}
    assert host.scripts == ["p.lua", "p.lua#b", "p.lua#c"]
    assert host.stats()["registered"] == 2


def test_max_registrations_is_checked_again_when_publishing(make_host, caplog):
    host = make_host(max_registrations=1, time_limit=30, shared={"d": 1 << 16})
    host.load(lua("""
    local d = hs.shared.d
    local C = {on_log = function() end}
    return {on_read_request = function(self, txn)
      if not txn.req.headers["x-n"] then return end
      hs.register(C, {name = txn.req.headers["x-n"]})
      d:incr("in", 1, 0)
      while d:get("in") < 2 do end     -- both registered before either publishes
    end}
    """), name="p.lua")
    barrier = threading.Barrier(2)

    def go(n):
        ok(host, "read_request")  # a state on the empty program first
        barrier.wait()
        return ok(host, "read_request", [("x-n", n)])

    with caplog.at_level(logging.INFO, logger="hostscript"), \
            concurrent.futures.ThreadPoolExecutor(2) as ex:
        list(ex.map(go, ["a", "b"]))
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.ERROR
    assert re.search(r"registration of p\.lua#[ab] refused: the host allows 1 classes",
                     refused[0].getMessage())
    # both checked against a program with none; the second to publish is refused then,
    # and says so in the log
    st = host.stats()
    assert st["registered"] == 1 and len(host.scripts) == 2
    assert (st["registrations"], st["registrations_refused"]) == (1, 1)


# ==== 7. a failing fire publishes nothing ====

@pytest.mark.parametrize("tail,kind", [
    ('error("after registering")', "runtime"),
    ("while true do end", "timeout"),
    ("local t, s = {}, string.rep('x', 1024 * 1024) for i = 1, 1000 do t[i] = s .. i end", "memory"),
], ids=["error", "time-limit", "memory-limit"])
def test_a_handler_that_fails_after_registering_publishes_nothing(make_host, workers, tail, kind):
    host = make_host(time_limit=0.3, memory_limit=16 << 20)
    host.load(lua("""
    local C = {on_log = function(self, txn) txn.resp.headers["x-c"] = "1" end}
    return {on_read_request = function(self, txn)
      hs.register(C, {name = "c"})
      hs.unregister("c")
      hs.register(C, {name = "c"})
      %s
    end}
    """) % tail, name="f.lua")
    b = workers()
    assert "x-c" not in b.call(ok, host, "log")
    before = host.stats()
    err = workers().call(failed, host, "read_request")
    assert err.kind == kind, err
    after = host.stats()
    assert host.scripts == ["f.lua"]
    assert after["generation"] == before["generation"]
    assert (after["registered"], after["registrations"]) == (0, 0)
    assert "x-c" not in b.call(ok, host, "log")
    assert "x-c" not in ok(host, "log")


def test_an_error_in_a_later_handler_does_not_undo_an_earlier_handlers_registration(host):
    host.load(lua("""
    local C = {on_log = function(self, txn) txn.resp.headers["x-c"] = "1" end}
    return {on_read_request = function(self, txn) hs.register(C, {name = "c"}) end}
    """), name="a.lua")
    host.load('return {on_read_request = function() error("b fails") end}', name="b.lua")
    err = failed(host, "read_request")
    assert err.script == "b.lua"
    assert host.scripts == ["a.lua", "b.lua", "a.lua#c"]
    assert ok(host, "log")["x-c"] == "1"


@pytest.mark.parametrize("ending", ['return txn:respond(403, "denied")', "return hs.DONE"],
                         ids=["respond", "done"])
def test_a_handler_that_answers_after_registering_publishes(host, ending):
    host.load(lua("""
    local C = {on_log = function(self, txn) txn.resp.headers["x-c"] = "1" end}
    return {on_read_request = function(self, txn)
      hs.register(C, {name = "c"})
      %s
    end}
    """) % ending, name="a.lua")
    out, _ = fire(host, "read_request")
    assert out.status is Outcome.DONE
    assert host.scripts == ["a.lua", "a.lua#c"]
    assert run_in_thread(ok, host, "log")["x-c"] == "1"


def test_a_registration_a_pcall_inside_the_handler_survives(host):
    host.load(lua("""
    local C = {on_log = function(self, txn) txn.resp.headers["x-c"] = "1" end}
    return {on_read_request = function(self, txn)
      pcall(function() hs.register(C, {name = "c"}) error("caught") end)
    end}
    """), name="a.lua")
    ok(host, "read_request")
    assert host.scripts == ["a.lua", "a.lua#c"]


# ==== 8. many threads registering while others fire ====

STRESS = lua("""
return {on_read_request = function(self, txn)
  local h = txn.req.headers
  local name, ver = h["x-name"], h["x-ver"]
  if not name then return end
  if ver == "off" then hs.unregister(name) return end
  local V = {}
  local stamp = name .. "=" .. ver
  function V:on_send_response(t)
    local r = t.resp.headers
    r["x-stamps"] = (r["x-stamps"] or "") .. stamp .. ";"
  end
  function V:on_log(t)
    local r = t.resp.headers
    r["x-stamps"] = (r["x-stamps"] or "") .. stamp .. ";"
  end
  hs.register(V, {name = name})
end}
""")


def test_eight_threads_fire_while_four_register_and_unregister(host):
    host.load(STRESS, name="st.lua")
    stop = threading.Event()
    errors, broken = [], []
    fires = [0]

    def check(stamps, last):
        seen = set()
        for item in filter(None, (stamps or "").split(";")):
            name, ver = item.split("=")
            if name in seen:
                broken.append(("twice in one fire", stamps))
            seen.add(name)
            v = int(ver)
            if v < last.get(name, -1):
                broken.append(("went back", name, v, last[name]))
            last[name] = v

    def run(i):
        last = {}
        n = 0
        try:
            while not stop.is_set():
                n += 1
                if i < 4:  # a registrar
                    name = f"r{i}"
                    if n % 5 == 0:
                        ok(host, "read_request", [("x-name", name), ("x-ver", "off")])
                    else:
                        ok(host, "read_request", [("x-name", name), ("x-ver", str(n))])
                out, txn = fire(host, "send_response" if n % 2 else "log")
                if out.status is Outcome.ERROR:
                    errors.append(out.error)
                check(txn.response.headers.get("x-stamps"), last)
                fires[0] += 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert not errors, errors[:5]
    assert not broken, broken[:5]
    assert fires[0] > 100
    # a final deterministic step
    for i in range(4):
        ok(host, "read_request", [("x-name", f"r{i}"), ("x-ver", "off")])
    for i in (2, 0):
        ok(host, "read_request", [("x-name", f"r{i}"), ("x-ver", "1000000")])
    assert host.scripts == ["st.lua", "st.lua#r2", "st.lua#r0"]
    assert host.stats()["registered"] == 2
    got = run_in_thread(ok, host, "send_response")
    assert got["x-stamps"] == "r2=1000000;r0=1000000;"
    st = host.stats()
    assert st["registrations"] > 10 and st["unregistrations"] > 0


# ==== 9. logging ====

def test_changes_are_logged_at_info_with_script_and_hook(host, caplog):
    host.load(STAMP, name="app.lua")
    with caplog.at_level(logging.INFO, logger="hostscript"):
        ok(host, "read_request", [("x-enable", "1")])
        ok(host, "read_request", [("x-disable", "1")])
    msgs = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "hostscript"]
    assert (logging.INFO, ("[app.lua] registered app.lua#stamp (hooks: read_request, send_response) "
                           "from app.lua in read_request")) in msgs, msgs
    assert (logging.INFO, "[app.lua] unregistered app.lua#stamp from app.lua in read_request") in msgs, msgs
    rec = next(r for r in caplog.records if "registered app.lua#stamp" in r.getMessage())
    assert rec.hook == "read_request" and rec.script == "app.lua"


# ==== 10. handled_hooks ====

def test_handled_hooks_follows_a_run_time_class(host, workers):
    host.load(STAMP.replace("function Stamp:on_read_request", "function Stamp:on_read_response"),
              name="s.lua")
    assert host.handled_hooks == {"read_request"}
    workers().call(ok, host, "read_request", [("x-enable", "1")])
    assert host.handled_hooks == {"read_request", "send_response", "read_response"}
    ok(host, "read_request", [("x-disable", "1")])
    assert host.handled_hooks == {"read_request"}
