"""Regression tests for what tests/fuzz/fuzz_fire.py found, minimised; both engines.

Each finding keeps the name it had in fuzz_fire.py while it was open; all are fixed
in the core now, and these tests keep them fixed. Cases that can crash the process
or never return run in a subprocess.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hostscript import Outcome, Transaction

ROOT = Path(__file__).resolve().parent.parent


def known(name: str, why: str, engines=("luajit", "lua54")):
    """A finding: its name, what went wrong, the engines it hit."""
    return name, why, engines


# ---- headers-assign ----

HEADERS_ASSIGN = known(
    "headers-assign",
    "txn.resp.headers = t is accepted silently: the transaction's headers do not change, and "
    "the state's headers proxy is replaced by t for every later fire (other requests read "
    "and write t)")


def test_assigning_txn_resp_headers_neither_is_lost_nor_leaks_into_the_next_request(
        request, engine, make_host):
    host = make_host(("read_request",))
    host.load("""local C = {}
    function C:on_read_request(txn)
      if txn.req.uri == '/alice' then
        txn.resp.headers = {['set-cookie'] = 'session=alice'}
      else
        txn.resp.headers['x-leaked'] = tostring(txn.resp.headers['set-cookie'])
        txn.resp.headers['x-seen'] = 'bob'
      end
    end
    return C""", name="assign.lua")
    alice = Transaction("GET", "/alice")
    out = host.fire("read_request", alice)
    # either the assignment is refused, or it replaces the response headers
    assert out.status is Outcome.ERROR or alice.response.headers.items() == [
        ("set-cookie", "session=alice")], (out, alice.response.headers.items())
    bob = Transaction("GET", "/bob")
    out = host.fire("read_request", bob)
    assert out.status is Outcome.CONTINUE, out.error
    assert bob.response.headers.items() == [("x-leaked", "nil"), ("x-seen", "bob")]


# ---- proxy-rawset ----

PROXY_RAWSET = known(
    "proxy-rawset",
    "rawset on txn, txn.req or a headers proxy writes the per-state table every later "
    "fire reuses: txn.ctx, txn.req.uri and request headers leak into the next transactions")


@pytest.mark.parametrize("leak,read", [
    ("rawset(txn, 'ctx', {user = 'alice'})", "tostring(txn.ctx.user)"),
    ("rawset(txn.req, 'uri', '/alice/private')", "tostring(txn.req.uri)"),
    ("rawset(txn.req.headers, 'authorization', 'Bearer alice')",
     "tostring(txn.req.headers.authorization)"),
], ids=["ctx", "uri", "headers"])
def test_rawset_on_the_txn_proxies_does_not_leak_into_the_next_request(
        request, engine, make_host, leak, read):
    host = make_host(("read_request",))
    host.load(f"""local C = {{}}
    function C:on_read_request(txn)
      if txn.req.headers['x-user'] then {leak} return end
      txn.resp.headers['x-seen'] = {read}
    end
    return C""", name="rawset.lua")
    alice = Transaction("GET", "/alice", [("x-user", "alice")])
    host.fire("read_request", alice)  # refused or not: only the next request matters
    bob = Transaction("GET", "/bob")
    out = host.fire("read_request", bob)
    assert out.status is Outcome.CONTINUE, out.error
    assert "alice" not in bob.response.headers["x-seen"]


# ---- c-call-time ----

C_CALL_TIME = "c-call-time"
C_CALL_WHY = ("time_limit is a count hook, which one long C library call never reaches: the "
              "fire runs for seconds (or forever with bigger inputs)")

FIRE_ONCE = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    import hostscript
    engine, body, limit, mem = sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
    host = hostscript.Host(("read_request",), engine=engine, time_limit=limit, memory_limit=mem)
    host.load("local C = {} function C:on_read_request(txn)\\n"
              "if txn.req.headers['x-probe'] then txn.ctx.probe = true return end\\n"
              + body + "\\nend return C", name="finding.lua")
    t0 = time.monotonic()
    out = host.fire("read_request", hostscript.Transaction())
    elapsed = time.monotonic() - t0
    probe = hostscript.Transaction(headers=[("x-probe", "1")])
    nxt = host.fire("read_request", probe)
    print(json.dumps({"status": out.status.name, "kind": out.error and out.error.kind,
                      "message": out.error and out.error.message, "elapsed": elapsed,
                      "next": nxt.status.name, "next_ctx": probe.ctx}))
    host.close()
""")


def fire_in_child(engine: str, body: str, time_limit: float = 0.05, memory_limit: int = 16 << 20,
                  timeout: float = 60):
    """(returncode, result dict or None, stderr) of one fire of BODY in a child process."""
    try:
        p = subprocess.run([sys.executable, "-c", FIRE_ONCE, str(ROOT), engine, body,
                            str(time_limit), str(memory_limit)],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the fire did not return within {timeout} s (time_limit {time_limit} s)")
    lines = p.stdout.strip().splitlines()
    return p.returncode, json.loads(lines[-1]) if p.returncode == 0 and lines else None, p.stderr


@pytest.mark.parametrize("body,engines", [
    # a backtracking pattern: O(n^3) steps in one string.find call
    ("local s = string.rep('a', 320) txn.ctx.r = s:find('.-.-.-x')", ("luajit", "lua54")),
    # a plain find of a long needle that almost matches everywhere: O(n*m) in one call
    ("local s = string.rep('x', 1e6) txn.ctx.r = s:find(string.rep('x', 1e5) .. 'y', 1, true)",
     ("luajit", "lua54")),
    # Lua 5.4's string.rep copies an empty string 2^29 times (LuaJIT returns at once)
    ("txn.ctx.r = #string.rep('', 2^29)", ("lua54",)),
    # Lua 5.4's table.move walks 1e8 nils in C (LuaJIT's is Lua code, and stops)
    ("table.move({}, 1, 1e8, 1, {})", ("lua54",)),
], ids=["pattern-backtracking", "plain-find", "rep-empty", "table-move"])
def test_a_long_c_library_call_is_stopped_by_the_time_limit(request, engine, body, engines):
    rc, res, err = fire_in_child(engine, body)
    assert rc == 0, err[-2000:]
    assert res["elapsed"] < 0.4, f"the fire ran {res['elapsed']:.2f} s with time_limit 0.05 s"
    # stopped by the limit, or (LuaJIT's string.rep and table.move) done in time anyway
    assert res["status"] == "CONTINUE" or res["kind"] == "timeout", res
    assert res["next"] == "CONTINUE" and res["next_ctx"] == {"probe": True}, res


# ---- luajit-cstack ----

LUAJIT_CSTACK = known(
    "luajit-cstack",
    "on LuaJIT, gsub calling back into a function that calls gsub nests C frames (8 KiB "
    "luaL_Buffer each) with no depth limit until the thread's C stack overflows: SIGSEGV",
    ("luajit",))


@pytest.mark.parametrize("body", [
    "local function f(s) return (string.gsub(s, '.', f)) end f('ab')",
    "local function r(s) return (s:gsub('.', function(c) return r(c) end)) end r('a')",
], ids=["gsub-self", "gsub-closure"])
def test_lua_reentered_through_gsub_without_end_is_an_error_not_a_crash(request, engine, body):
    rc, res, err = fire_in_child(engine, body, time_limit=1.0)
    assert rc == 0, f"the process died with {rc}: {err[-2000:]}"
    assert res["status"] == "ERROR" and res["kind"] in ("runtime", "memory"), res
    assert "stack overflow" in res["message"] or res["kind"] == "memory", res
    assert res["next"] == "CONTINUE" and res["next_ctx"] == {"probe": True}, res


# ---- luajit-caught-oom ----

LUAJIT_CAUGHT_OOM = known(
    "luajit-caught-oom",
    "on LuaJIT a memory error caught by pcall leaves the heap full of garbage (no emergency "
    "GC, and the core collects only after a fire that failed with it): the next fire, "
    "another request's, fails with 'memory limit exceeded'",
    ("luajit",))


def test_a_memory_error_caught_by_pcall_does_not_fail_the_next_request(request, engine, make_host):
    # The memory limit is no longer something pcall can catch (as for the time
    # limit): the bomb's fire ends with it, and the next request on the state works.
    host = make_host(("read_request",), memory_limit=8 << 20)
    host.load("""local C = {}
    function C:on_read_request(txn)
      if txn.req.headers['x-bomb'] then
        local ok, e = pcall(function() local t = {} for i = 1, 1e9 do t = {t} end end)
        txn.resp.headers['x-caught'] = tostring(e)
      else
        txn.ctx.ok = true
      end
    end
    return C""", name="oom.lua")
    bomb = Transaction(headers=[("x-bomb", "1")])
    out = host.fire("read_request", bomb)
    assert out.status is Outcome.ERROR and out.error.kind == "memory", out
    assert "x-caught" not in bomb.response.headers
    other = Transaction()
    out = host.fire("read_request", other)
    assert out.status is Outcome.CONTINUE, out.error
    assert other.ctx == {"ok": True}


# ---- coroutine-load ----

COROUTINE_LOAD = known(
    "coroutine-load",
    "sb_load and sb_require (native/sandbox.c) push the sandbox environment with "
    "hs_sandbox_push_env(S), onto S->L, the state's main Lua thread, not the coroutine that "
    "runs: load returns its source string, require fails, and on Lua 5.4 repeated loads "
    "write past the main thread's stack (heap corruption, SIGSEGV)")


@pytest.mark.parametrize("body,want", [
    ("local f = load('return 42') txn.resp.headers['x-r'] = tostring(f and f())", "42"),
    ("txn.resp.headers['x-r'] = type(require('hs.util'))", "table"),
], ids=["load", "require"])
def test_load_and_require_work_inside_a_coroutine(request, engine, make_host, body, want):
    host = make_host(("read_request",))
    host.load("local C = {} function C:on_read_request(txn)\n"
              f"local co = coroutine.wrap(function() {body} end) co()\n"
              "end return C", name="co.lua")
    txn = Transaction()
    out = host.fire("read_request", txn)
    assert out.status is Outcome.CONTINUE, out.error
    assert txn.response.headers["x-r"] == want


def test_many_loads_inside_a_coroutine_do_not_corrupt_the_heap(request, engine):
    # LuaJIT grows the main thread's stack on each push: only Lua 5.4 writes past it
    body = ("local co = coroutine.wrap(function() for i = 1, 10000 do load('return 1') end end) "
            "co() txn.ctx.r = 'done'")
    rc, res, err = fire_in_child(engine, body, time_limit=5.0)
    assert rc == 0, f"the process died with {rc}: {err[-2000:]}"
    assert res["status"] == "CONTINUE", res
    assert res["next"] == "CONTINUE" and res["next_ctx"] == {"probe": True}, res


# ---- soft-limit-at-return ----

SOFT_LIMIT_AT_RETURN = known(
    "soft-limit-at-return",
    "LuaJIT's memory limit is soft (allocations past it are granted within a headroom and "
    "refused at the next safe point); a handler that allocated past the limit in fewer "
    "instructions than the count hook's period returned CONTINUE and left the state 10 MB "
    "large under an 8 MiB limit", engines=("luajit",))


def test_a_handler_that_returns_past_the_memory_limit_fails_and_the_state_shrinks_back(
        request, engine, make_host):
    limit = 8 << 20
    host = make_host(("read_request",), memory_limit=limit)
    host.load("""local C = {}
    function C:on_read_request(txn)
      if txn.req.headers['x-big'] then
        local t = {} for i = 1, 100 do t[i] = string.rep('y', 1e5) .. i end
        txn.resp.headers['x-kept'] = tostring(#t)
      else
        txn.ctx.ok = true
      end
    end
    return C""", name="big.lua")
    out = host.fire("read_request", Transaction(headers=[("x-big", "1")]))
    assert out.status is Outcome.ERROR and out.error.kind == "memory", out
    assert host.stats()["heap_max"] <= limit + (1 << 20)
    other = Transaction()
    assert host.fire("read_request", other).status is Outcome.CONTINUE
    assert other.ctx == {"ok": True}
