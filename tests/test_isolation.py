"""Scripts are isolated from each other in the sandbox: each has its own global
environment, and the library tables, hs and the string metatable are read-only, so
one script cannot change what another computes or read its arguments."""
from __future__ import annotations

import pytest
from helpers import run_in_thread

import hostscript
from hostscript import Transaction

# B reports what the shared libraries compute for it.
VICTIM = """
local B = {}
function B:on_read_request(txn)
  txn.resp.headers["x-lower"] = string.lower("ABC")
  txn.resp.headers["x-method"] = ("ABC"):lower()
  txn.resp.headers["x-tostring"] = tostring(12)
  txn.resp.headers["x-now"] = tostring(hs.now() > 1e9)
  txn.resp.headers["x-concat"] = table.concat({"a", "b"})
  txn.resp.headers["x-floor"] = tostring(math.floor(2.5))
  hs.log.info("victim ran")
end
return B
"""

ATTACKS = {
    "assign-library-function": "string.lower = function() return 'spied' end",
    "rawset-library-function": "rawset(string, 'lower', function() return 'spied' end)",
    "assign-hs-function": "hs.now = function() return 0 end",
    "assign-hs-log": "hs.log.info = function() end",
    "rawset-hs-log": "rawset(hs.log, 'info', function() end)",
    "replace-hs-log": "hs.log = {}",
    "string-metatable-index": "getmetatable('').__index = {lower = function() return 'spied' end}",
    "string-metatable-set": "setmetatable(getmetatable(''), {})",
    "assign-table-function": "table.concat = function() return 'spied' end",
    "assign-math-function": "math.floor = function() return 99 end",
    "setmetatable-on-library": "setmetatable(string, {__index = function() return 'spied' end})",
}


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("when", ["load", "fire"])
def test_one_script_cannot_change_what_another_computes(host, attack, when):
    stmt = ATTACKS[attack]
    if when == "load":
        with pytest.raises(hostscript.ScriptError):
            host.load(f"{stmt}\nreturn {{}}", name="attacker.lua")
    else:
        host.load(f"local A = {{}} function A:on_read_request(txn) {stmt} end return A", name="attacker.lua")
    host.load(VICTIM, name="victim.lua")
    txn = Transaction()
    out = host.fire("read_request", txn)
    if when == "fire":
        assert out.status is hostscript.Outcome.ERROR and out.error.script == "attacker.lua"
        host.unload("attacker.lua")
        out = host.fire("read_request", txn)
    assert out.status is hostscript.Outcome.CONTINUE, out.error
    h = txn.response.headers
    assert (h["x-lower"], h["x-method"], h["x-tostring"], h["x-now"], h["x-concat"], h["x-floor"]) == (
        "abc", "abc", "12", "true", "ab", "2")


def test_each_script_has_its_own_globals(host):
    host.load("rawset(_G, 'tostring', function() return 'spied' end) "
              "rawset(_G, 'shared', 'from a') "
              "local A = {} function A:on_read_request(txn) txn.resp.headers['x-a'] = tostring(1) end return A",
              name="a.lua")
    host.load("local B = {} function B:on_read_request(txn) "
              "txn.resp.headers['x-b'] = tostring(1) "
              "txn.resp.headers['x-shared'] = tostring(rawget(_G, 'shared')) end return B", name="b.lua")
    txn = Transaction()
    assert host.fire("read_request", txn).status is hostscript.Outcome.CONTINUE
    assert txn.response.headers["x-a"] == "spied"  # a changed its own environment only
    assert txn.response.headers["x-b"] == "1"
    assert txn.response.headers["x-shared"] == "nil"


def test_loaded_chunks_and_modules_get_their_own_environment(make_host, tmp_path):
    (tmp_path / "leaky.lua").write_text("rawset(_G, 'tostring', function() return 'module' end) return {}")
    host = make_host(lua_path=[tmp_path])
    host.load("local m = require 'leaky' "
              "local f = load('rawset(_G, \"tostring\", function() return \"loaded\" end)') f() "
              "local A = {} function A:on_read_request(txn) txn.resp.headers['x'] = tostring(7) end return A",
              name="a.lua")
    txn = Transaction()
    host.fire("read_request", txn)
    assert txn.response.headers["x"] == "7"


def test_library_tables_still_read_as_usual(host):
    host.load("""local A = {}
    function A:on_read_request(txn)
      local n = 0
      for _ in pairs(string) do n = n + 1 end  -- a view: iteration shows nothing
      txn.resp.headers["x"] = string.format("%s-%d-%s", string.rep("a", 2), #("abc"), type(string.sub))
      txn.resp.headers["x-mt"] = tostring(getmetatable(""))
      txn.resp.headers["x-seed"] = tostring(math.randomseed)
    end return A""", name="a.lua")
    txn = Transaction()
    out = host.fire("read_request", txn)
    assert out.status is hostscript.Outcome.CONTINUE, out.error
    assert txn.response.headers["x"] == "aa-3-function"
    assert txn.response.headers["x-mt"] == "string"
    assert txn.response.headers["x-seed"] == "nil"  # no script picks another's sequence


def test_without_the_sandbox_scripts_share_the_globals_as_documented(make_host):
    host = make_host(sandbox=False)
    host.load("string.shout = function(s) return s:upper() .. '!' end return {}", name="a.lua")
    host.load("local B = {} function B:on_read_request(txn) txn.resp.headers['x'] = string.shout('hi') end "
              "return B", name="b.lua")
    txn = Transaction()
    host.fire("read_request", txn)
    assert txn.response.headers["x"] == "HI!"


RANDOM = "local A = {} function A:on_read_request(txn) txn.ctx.r = {math.random(1, 2^30), math.random(1, 2^30)} " \
         "end return A"


def test_states_do_not_share_a_random_sequence(make_host):
    host = make_host()
    host.load(RANDOM, name="r.lua")

    def draw():
        txn = Transaction()
        host.fire("read_request", txn)
        return tuple(txn.ctx["r"])

    draws = {run_in_thread(draw) for _ in range(4)}  # four threads, four states
    assert len(draws) == 4
    other = make_host()
    other.load(RANDOM, name="r.lua")
    txn = Transaction()
    other.fire("read_request", txn)
    assert tuple(txn.ctx["r"]) not in draws
