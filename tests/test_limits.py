"""Time and memory limits: a runaway handler ends with an error and the next fire works.

Every test runs on both engines (the ``engine`` fixture in conftest.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import hostscript
from hostscript import Outcome, ScriptError, Transaction
from helpers import run_in_thread

HOOKS = ("read_request", "send_response")
MEM = 16 << 20


def handler(body: str) -> str:
    """A class whose on_read_request runs BODY when the request has `x-run`, and
    otherwise just records txn.ctx.ok = true (the "next fire works" probe)."""
    return ("local C = {}\n"
            "function C:on_read_request(txn)\n"
            "  if not txn.req.headers['x-run'] then txn.ctx.ok = true return end\n"
            f"  {body}\n"
            "end\n"
            "return C\n")


def run(host):
    txn = Transaction(headers=[("x-run", "1")])
    t0 = time.monotonic()
    out = host.fire("read_request", txn)
    return out, time.monotonic() - t0, txn


def assert_next_fire_works(host):
    txn = Transaction()
    out = host.fire("read_request", txn)
    assert out.status is Outcome.CONTINUE, out.error
    assert txn.ctx == {"ok": True}


# ---- time limit ----

def test_infinite_loop_is_stopped_by_time_limit(make_host):
    host = make_host(HOOKS, time_limit=0.05)
    host.load(handler("while true do end"), name="spin.lua")
    out, elapsed, _ = run(host)
    assert out.status is Outcome.ERROR
    assert out.error.kind == "timeout"
    assert out.error.script == "spin.lua"
    assert out.error.hook == "read_request"
    assert "time limit" in out.error.message
    assert 0.04 <= elapsed < 1.0
    st = host.stats()
    assert st["timeouts"] == 1
    assert st["errors"] == 1
    assert_next_fire_works(host)
    # the limit is re-armed: a second runaway fire is stopped too
    out, elapsed, _ = run(host)
    assert out.error.kind == "timeout" and elapsed < 1.0
    assert host.stats()["timeouts"] == 2


def test_loop_luajit_would_compile_is_stopped_by_time_limit(make_host):
    host = make_host(HOOKS, time_limit=0.05)
    host.load(handler("local x = 0; for i = 1, 1e15 do x = x + i % 7 end; txn.ctx.x = x"),
              name="hot.lua")
    # warm the loop on another thread too, as a JIT would: every state must hold the limit
    for fire in (lambda: run(host), lambda: run_in_thread(lambda: run(host))):
        out, elapsed, txn = fire()
        assert out.status is Outcome.ERROR
        assert out.error.kind == "timeout"
        assert elapsed < 1.0
        assert "x" not in txn.ctx
    assert host.stats()["timeouts"] == 2
    assert_next_fire_works(host)


@pytest.mark.parametrize("body", [
    "pcall(function() while true do end end); txn.ctx.after = true",
    "while true do pcall(function() while true do end end) end",
    "while true do pcall(error, 'x') end",
    "while true do xpcall(function() while true do end end, function(e) return e end) end",
    "local co = coroutine.wrap(function() while true do end end); pcall(co); txn.ctx.after = true",
], ids=["pcall", "pcall-loop", "pcall-error-loop", "xpcall-loop", "coroutine"])
def test_pcall_cannot_swallow_the_time_limit(make_host, body):
    host = make_host(HOOKS, time_limit=0.05)
    host.load(handler(body), name="catch.lua")
    out, elapsed, txn = run(host)
    assert out.status is Outcome.ERROR
    assert out.error.kind == "timeout"
    assert elapsed < 1.0
    assert "after" not in txn.ctx
    assert host.stats()["timeouts"] == 1
    assert_next_fire_works(host)


ISOLATED = textwrap.dedent("""
    import json, sys, time
    import hostscript
    engine, body = sys.argv[1], sys.argv[2]
    sys.path.insert(0, sys.argv[3])
    from test_limits import handler
    host = hostscript.Host(("read_request",), engine=engine, time_limit=0.05)
    host.load(handler(body), name="runaway.lua")
    t0 = time.monotonic()
    out = host.fire("read_request", hostscript.Transaction(headers=[("x-run", "1")]))
    elapsed = time.monotonic() - t0
    nxt = hostscript.Transaction()
    out2 = host.fire("read_request", nxt)
    print(json.dumps({"status": out.status.name, "kind": out.error and out.error.kind,
                      "message": out.error and out.error.message,
                      "elapsed": elapsed, "next": out2.status.name, "next_ctx": nxt.ctx,
                      "timeouts": host.stats()["timeouts"]}))
    host.close()
""")


@pytest.mark.parametrize("body", [
    # the limit fires in the protected function; the message handler then loops
    "xpcall(function() while true do end end, function(e) while true do end end)",
    # a plain error calls the message handler, which loops past the deadline
    "xpcall(error, function(e) while true do end end)",
    # a finalizer that never returns, run by the collector during the handler
    "setmetatable({}, {__gc = function() while true do end end}); collectgarbage()",
], ids=["xpcall-handler-after-timeout", "xpcall-handler-after-error", "gc-finalizer"])
def test_time_limit_holds_in_message_handlers_and_finalizers(engine, body):
    # in a child process: a fire that never returns must fail this test, not hang the
    # session (nor leave a spinning thread behind whose state close() would free)
    try:
        p = subprocess.run([sys.executable, "-c", ISOLATED, engine, body,
                            str(Path(__file__).parent)],
                           capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("the fire did not return within 5 s: time_limit=0.05 did not stop it")
    assert p.returncode == 0, p.stderr[-1000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["elapsed"] < 1.0
    if "__gc" in body:
        # the sandbox refuses finalizers outright: Lua 5.4 runs them with hooks off
        assert res["status"] == "ERROR" and res["kind"] == "runtime"
        assert "__gc metamethods are not available in the sandbox" in res["message"]
    else:
        assert res["status"] == "ERROR"
        assert res["kind"] == "timeout"
        assert res["timeouts"] == 1
    assert res["next"] == "CONTINUE" and res["next_ctx"] == {"ok": True}


def test_time_limit_is_per_fire_not_cumulative(make_host):
    host = make_host(HOOKS, time_limit=0.1)
    host.load(handler("local t0 = hs.now(); local n = 0 "
                      "while hs.now() - t0 < 0.02 do n = n + 1 end; txn.ctx.n = n"),
              name="busy.lua")
    for _ in range(8):  # 8 x 20 ms > 100 ms in total, each fire well under the limit
        out, elapsed, txn = run(host)
        assert out.status is Outcome.CONTINUE, out.error
        assert txn.ctx["n"] > 0
    assert host.stats()["timeouts"] == 0


def test_long_handler_without_time_limit_completes(make_host):
    host = make_host(HOOKS)
    assert host.time_limit is None
    host.load(handler("local t0 = hs.now(); local n = 0 "
                      "while hs.now() - t0 < 0.02 do n = n + 1 end; "
                      "local x = 0; for i = 1, 2e6 do x = x + i % 7 end; "
                      "txn.ctx.n = n; txn.ctx.x = x"),
              name="long.lua")
    out, elapsed, txn = run(host)
    assert out.status is Outcome.CONTINUE, out.error
    assert elapsed >= 0.02
    assert txn.ctx["n"] > 0
    assert txn.ctx["x"] == sum(i % 7 for i in range(1, 2_000_001))
    st = host.stats()
    assert st["timeouts"] == 0 and st["errors"] == 0


# ---- memory limit ----

BOMB = 'local t = {} for i = 1, 1e9 do t[i] = string.rep("x", 100) .. i end'


def test_table_bomb_is_stopped_by_memory_limit(make_host):
    host = make_host(HOOKS, memory_limit=MEM)
    host.load(handler(BOMB), name="bomb.lua")
    assert_next_fire_works(host)
    before = host.stats()["heap_bytes"]
    out, elapsed, _ = run(host)
    assert out.status is Outcome.ERROR
    assert out.error.kind == "memory"
    assert out.error.script == "bomb.lua"
    assert "memory" in out.error.message
    assert elapsed < 10
    st = host.stats()
    assert st["memory_errors"] == 1
    assert st["errors"] == 1
    assert st["timeouts"] == 0
    # the bomb's garbage is gone: heap well below the limit again
    assert st["heap_bytes"] < MEM // 4, st["heap_bytes"]
    assert_next_fire_works(host)
    assert host.stats()["heap_bytes"] < max(before * 4, MEM // 8)
    # and the state is still usable for real work under the limit
    host.load(handler("local t = {} for i = 1, 1000 do t[i] = ('y'):rep(100) end "
                      "txn.ctx.n = #t"), name="bomb.lua")
    out, _, txn = run(host)
    assert out.status is Outcome.CONTINUE, out.error
    assert txn.ctx["n"] == 1000
    assert host.stats()["states"] == 1


def test_memory_limit_is_per_thread_state(make_host):
    host = make_host(HOOKS, memory_limit=MEM)
    # each state keeps ~10 MB in a module-level local: under the limit per state,
    # although three states hold more than one limit in total
    host.load("""
local keep = {}
local C = {}
function C:on_read_request(txn)
  for i = 1, 100 do keep[i] = string.rep("z", 100000) .. i end
  txn.ctx.n = #keep
end
return C
""", name="big.lua")
    fired, release = threading.Barrier(3), threading.Event()
    results = []

    def worker():
        txn = Transaction()
        out = host.fire("read_request", txn)
        results.append((out.status, txn.ctx.get("n")))
        fired.wait(30)
        release.wait(30)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        txn = Transaction()
        out = host.fire("read_request", txn)
        results.append((out.status, txn.ctx.get("n")))
        fired.wait(30)
        st = host.stats()
    finally:
        release.set()
        for t in threads:
            t.join(30)
    assert results == [(Outcome.CONTINUE, 100)] * 3
    assert st["states"] == 3
    assert st["heap_bytes"] > MEM
    assert MEM // 2 < st["heap_max"] <= MEM
    assert st["memory_errors"] == 0


@pytest.mark.parametrize("memory_limit", [None, MEM])
def test_deep_recursion_ends_in_an_error(make_host, memory_limit):
    host = make_host(HOOKS, memory_limit=memory_limit)
    host.load(handler("local function f(n) return 1 + f(n + 1) end; txn.ctx.r = f(1)"),
              name="deep.lua")
    out, elapsed, txn = run(host)
    assert out.status is Outcome.ERROR
    assert out.error.kind in ("runtime", "memory")
    msg = out.error.message.lower()
    assert "stack overflow" in msg or "memory" in msg
    assert "r" not in txn.ctx
    assert elapsed < 10
    assert_next_fire_works(host)
    # recursion that fits still works on the same state
    host.load(handler("local function f(n) if n == 0 then return 0 end return 1 + f(n - 1) end; "
                      "txn.ctx.r = f(150)"), name="deep.lua")
    out, _, txn = run(host)
    assert out.status is Outcome.CONTINUE, out.error
    assert txn.ctx["r"] == 150


# ---- limits at load time ----

def test_runaway_chunk_at_load_is_stopped_and_program_unchanged(make_host):
    host = make_host(HOOKS, time_limit=0.05)
    host.load(handler("txn.ctx.v = 1"), name="a.lua")
    gen = host.stats()["generation"]
    t0 = time.monotonic()
    with pytest.raises(ScriptError) as ei:
        host.load("while true do end\nreturn {}\n", name="a.lua")
    assert time.monotonic() - t0 < 1.0
    assert ei.value.name == "a.lua"
    with pytest.raises(ScriptError):
        host.load("local C = {} function C.new() while true do end end return C", name="b.lua")
    assert host.scripts == ["a.lua"]
    assert host.stats()["generation"] == gen
    assert host.stats()["compilations"] == 1
    out, _, txn = run(host)
    assert out.status is Outcome.CONTINUE
    assert txn.ctx == {"v": 1}


@pytest.mark.parametrize("source", [
    "while true do end\nreturn {}\n",
    "local C = {} function C.new() while true do end end return C",
], ids=["chunk", "new"])
def test_runaway_chunk_at_load_reports_a_timeout(make_host, source):
    host = make_host(HOOKS, time_limit=0.05)
    with pytest.raises(ScriptError) as ei:
        host.load(source, name="loop.lua")
    assert ei.value.kind == "timeout", (ei.value.kind, ei.value.message)
    assert "time limit" in ei.value.message
    assert "loop.lua" in ei.value.message


def test_memory_bomb_at_load_reports_memory_and_program_unchanged(make_host):
    host = make_host(HOOKS, memory_limit=MEM)
    host.load(handler("txn.ctx.v = 1"), name="a.lua")
    gen = host.stats()["generation"]
    with pytest.raises(ScriptError) as ei:
        host.load(BOMB + "\nreturn {}\n", name="a.lua")
    assert ei.value.kind == "memory"
    assert host.stats()["generation"] == gen
    out, _, txn = run(host)
    assert out.status is Outcome.CONTINUE
    assert txn.ctx == {"v": 1}


# ---- memory limit too small for a state ----

PROBE = textwrap.dedent("""
    import json, sys
    import hostscript
    try:
        hostscript.Host(("read_request",), engine=sys.argv[1], memory_limit=int(sys.argv[2]))
        print(json.dumps({"raised": None}))
    except Exception as e:
        print(json.dumps({"raised": type(e).__name__, "message": str(e),
                          "is_error": isinstance(e, (ValueError, hostscript.Error))}))
""")


@pytest.mark.parametrize("memory_limit", [1, 4096, 8192, 16384])
def test_memory_limit_too_small_for_a_state_raises_at_host_creation(engine, memory_limit):
    # in a child process: a crash must fail this test, not end the test session
    p = subprocess.run([sys.executable, "-c", PROBE, engine, str(memory_limit)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"Host() crashed the process (exit {p.returncode}): {p.stderr[-500:]}"
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["raised"] is not None, "a state was created under a tiny memory limit"
    assert res["is_error"], res
    assert "memory" in res["message"].lower()


@pytest.mark.parametrize("memory_limit", [1, 16384])
def test_too_small_memory_limit_error_names_the_limit(engine, memory_limit):
    with pytest.raises((ValueError, hostscript.Error)) as ei:
        hostscript.Host(("read_request",), engine=engine, memory_limit=memory_limit)
    msg = str(ei.value)
    assert "memory_limit" in msg or "memory limit" in msg, msg


def test_luajit_compiles_unless_a_limit_needs_the_interpreter(make_host, engine):
    src = "local C = {} function C:on_read_request(txn) txn.ctx.jit = hs.jit end return C"
    for kw, sandbox in (({}, True), ({}, False), ({"time_limit": 0.05}, True),
                        ({"memory_limit": 16 << 20}, True)):
        host = make_host(HOOKS, sandbox=sandbox, **kw)
        host.load(src, name="jit.lua")
        txn = hostscript.Transaction()
        assert host.fire("read_request", txn).status is Outcome.CONTINUE
        expected = engine == "luajit" and not kw
        assert txn.ctx["jit"] is expected, (kw, sandbox)
