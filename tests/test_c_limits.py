"""Limits hold inside C library code too. The count hook never runs inside a C
function, so the engines' long loops check in with the deadline (tools/patches/),
and C code calling back into Lua is bounded by the thread's real C stack. Each case
runs in a subprocess (a regression would crash or freeze the process) with a
heartbeat thread: the fire must end with the right error within a small multiple of
the time limit, other Python threads must keep running meanwhile, and the next fire
must work."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

TIME_LIMIT = 0.05

# (name, handler body, expected error kind, words the message must contain)
LONG_C_CALLS = [
    ("find-backtracking", 'string.find(string.rep("a", 60), string.rep("a-", 40) .. "b")', "timeout", "time limit"),
    ("match-backtracking", 'string.match(string.rep("a", 40), string.rep("a*", 30) .. "b")', "timeout", "time limit"),
    ("gsub-backtracking", 'string.gsub(string.rep("a", 50), string.rep("a-", 30) .. "b", "")', "timeout", "time limit"),
    ("gmatch-many-positions", 'for _ in string.gmatch(string.rep("a", 3000), string.rep("a?", 20) .. "b") do end',
     "timeout", "time limit"),
    ("rep-huge", 'string.rep("ab", 2^30)', None, ""),
    ("rep-empty-lua54", 'string.rep("", 2^53)', None, ""),
    ("move-huge", "table.move({}, 1, 2^40, 1)", "timeout", "time limit"),
    ("collectgarbage-loop", "local big = {} for i = 1, 1e5 do big[i] = {i} end while true do collectgarbage() end",
     "timeout", "time limit"),
    ("concat-many", 'local t = {} for i = 1, 2e5 do t[i] = "x" end for i = 1, 1e4 do table.concat(t) end',
     "timeout", "time limit"),
]

C_RECURSION = [
    ("gsub-callback", 'local function f() return (string.gsub("a", "a", f)) end f()'),
    ("sort-comparator", "local function f(a, b) table.sort({3, 2, 1}, f) return a < b end table.sort({3, 2, 1}, f)"),
    ("index-metamethod-via-c",
     'local t = setmetatable({}, {__index = function(t, k) return string.gsub("a", "a", function() return t[k] end) end}) '
     "local x = t.x"),
    ("tostring-metamethod", "local function f() return tostring(setmetatable({}, {__tostring = f})) end f()"),
    ("coroutine-resume", "local function f() local co = coroutine.create(f) local ok, e = coroutine.resume(co) "
                         "if not ok then error(e, 0) end end f()"),
    ("coroutine-wrap", "local co co = function() return coroutine.wrap(function() return co() end)() end co()"),
    ("deep-parse", 'load("return " .. string.rep("(", 190) .. "1" .. string.rep(")", 190))()'),
]

CHILD = r"""
import json, sys, threading, time, logging
import hostscript
logging.disable(logging.CRITICAL)
engine, body, time_limit, stack = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
if stack:
    threading.stack_size(stack)
host = hostscript.Host(engine=engine, time_limit=time_limit or None, memory_limit=16 << 20)
host.load("local C = {} function C:on_read_request(txn) " + body + " end return C", name="case.lua")
host.load("local D = {} function D:on_send_response(txn) txn.resp.headers['x-ok'] = '1' end return D",
          name="next.lua")
gaps, stop = [], threading.Event()
def beat():
    last = time.perf_counter()
    while not stop.is_set():
        time.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
hb = threading.Thread(target=beat, daemon=True)
hb.start()
time.sleep(0.02)
res = {}
def work():
    t0 = time.perf_counter()
    out = host.fire("read_request", hostscript.Transaction())
    res["elapsed"] = time.perf_counter() - t0
    res["status"] = out.status.name
    res["kind"] = out.error.kind if out.error else None
    res["message"] = out.error.message if out.error else ""
    txn = hostscript.Transaction()
    nxt = host.fire("send_response", txn)
    res["next"] = nxt.status.name == "CONTINUE" and txn.response.headers.get("x-ok") == "1"
w = threading.Thread(target=work)
w.start()
w.join()
stop.set()
hb.join()
res["max_gap"] = max(gaps) if gaps else 0
print(json.dumps(res))
"""


def run_case(engine: str, body: str, time_limit: float = TIME_LIMIT, stack: int = 0) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, engine, body, str(time_limit), str(stack)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name,body,kind,words", LONG_C_CALLS, ids=[c[0] for c in LONG_C_CALLS])
def test_long_c_calls_end_at_the_time_limit_without_freezing_python(engine, name, body, kind, words):
    if name == "rep-empty-lua54" and engine != "lua54":
        pytest.skip("LuaJIT returns at once for an empty string")
    res = run_case(engine, body)
    assert res["status"] == "ERROR", res
    if kind:  # (string.rep of 2 GiB may end with the memory limit first; either is an error)
        assert res["kind"] == kind and words in res["message"], res
    assert res["elapsed"] < 20 * TIME_LIMIT + 0.5, res
    assert res["max_gap"] < 0.5, res  # the GIL was released: the heartbeat kept beating
    assert res["next"], res


@pytest.mark.parametrize("stack", [0, 256 << 10, 128 << 10], ids=["default-stack", "256k-stack", "128k-stack"])
@pytest.mark.parametrize("name,body", C_RECURSION, ids=[c[0] for c in C_RECURSION])
def test_c_recursion_is_an_error_not_a_crash_even_on_small_thread_stacks(engine, name, body, stack):
    res = run_case(engine, body, time_limit=2, stack=stack)
    if name == "tostring-metamethod" and engine == "luajit":
        # LuaJIT runs __tostring as a tail call: no recursion, a loop the time limit ends
        assert res["status"] == "ERROR" and res["kind"] == "timeout", res
    elif name == "deep-parse":
        assert res["status"] in ("CONTINUE", "ERROR"), res  # parsed, or refused cleanly
    else:
        assert res["status"] == "ERROR", res
        # (with a big C stack, nested coroutines may fill the 16 MiB heap first)
        assert res["kind"] == "memory" or "overflow" in res["message"] or \
            "too complex" in res["message"] or "error in error handling" in res["message"], res
    assert res["next"], res


def test_patched_engines_are_the_ones_linked(engine):
    """The check-ins come from tools/patches/: an engine built without them would let
    the backtracking pattern above run for minutes. This pins the build itself."""
    import hostscript
    mod = __import__(f"hostscript._{engine}", fromlist=["lib"])
    assert hostscript  # (imported for the module path)
    path = mod.__file__
    data = open(path, "rb").read()
    assert b"C stack overflow" in data  # the patched engines' message for C recursion


def test_library_loops_that_finish_are_unaffected(engine):
    body = textwrap.dedent("""
        local s = string.rep("ab", 100000)
        assert(#s == 200000)
        assert(string.find(s, "ba", 1, true) == 2)
        local n = 0 for _ in string.gmatch(s, "ab") do n = n + 1 end assert(n == 100000)
        local t = table.move({1, 2, 3}, 1, 3, 2) assert(t[4] == 3)
        assert(#table.concat({"a", "b"}, ",") == 3)
    """).replace("\n", " ")
    res = run_case(engine, body, time_limit=5)
    assert res["status"] == "CONTINUE", res
    assert res["next"]


TXN_GROWTH = {
    "headers-add": 'local s = string.rep("x", 4e6) while true do txn.resp.headers:add("x-a", s) end',
    "headers-list": 'local s = string.rep("x", 1e6) local l = {} for i = 1, 40 do l[i] = s end '
                    'txn.req.headers["x-b"] = l',
    "body": 'local s = string.rep("x", 4e6) txn.resp.body = s .. s .. s .. s .. s',
    "respond": 'local s = string.rep("x", 6e6) txn:respond(200, s .. s .. s)',
}


@pytest.mark.parametrize("case", list(TXN_GROWTH))
def test_transaction_storage_counts_against_the_memory_limit(make_host, case):
    import hostscript
    from helpers import rss_bytes
    host = make_host(time_limit=2, memory_limit=16 << 20)
    host.load("local C = {} function C:on_read_request(txn) " + TXN_GROWTH[case] + " end return C", name="g.lua")
    txn = hostscript.Transaction()
    before = rss_bytes()
    out = host.fire("read_request", txn)
    after = rss_bytes()
    assert out.status is hostscript.Outcome.ERROR and out.error.kind == "memory", out
    assert after - before < 96 << 20  # bounded: not gigabytes of headers
    total = sum(len(k) + len(v) for k, v in txn.response.headers) + len(txn.response.body)
    assert total <= 16 << 20


# Out-of-memory caught again and again inside one fire: the path that crashed
# LuaJIT's interpreter under a limiting allocator. LuaJIT now grants a headroom and
# raises the limit at the next safe point, where no pcall can catch it.
OOM_LOOPS = [
    ("sub-in-pcall", 'local s, k = string.rep("x", 2e6), {} '
                     "for i = 1, 1e5 do local ok, r = pcall(string.sub, s, 1, 1e6 + i) k[i % 64 + 1] = r end"),
    ("rep-in-pcall", "local k = {} for i = 1, 1e5 do local ok, r = pcall(string.rep, 'y', 1e5 + i) k[i] = r end"),
    ("table-in-pcall", "local k = {} while true do pcall(function() for i = 1, 1e4 do k[#k + 1] = {i, i} end end) end"),
    ("concat-in-pcall", 'local parts = {} for i = 1, 300 do parts[i] = string.rep("z", 1e4) .. i end '
                        "local k = {} for i = 1, 1e4 do parts[1] = tostring(i) "  # (LuaJIT interns equal strings)
                        "local ok, r = pcall(table.concat, parts) k[i] = r end"),
]


@pytest.mark.parametrize("time_limit", [TIME_LIMIT * 20, 0], ids=["time-limit", "memory-limit-only"])
@pytest.mark.parametrize("name,body", OOM_LOOPS, ids=[c[0] for c in OOM_LOOPS])
def test_out_of_memory_caught_in_a_loop_ends_the_fire_cleanly(engine, name, body, time_limit):
    res = run_case(engine, body, time_limit=time_limit)
    assert res["status"] == "ERROR" and res["kind"] == "memory", res
    assert res["next"], res


TINY_STACK = r"""
import json, logging, sys, threading
import hostscript
logging.disable(logging.CRITICAL)
threading.stack_size(64 * 1024)
host = hostscript.Host(engine=sys.argv[1])
host.load("local C = {} function C:on_read_request(txn) txn.resp.status = 204 end return C", name="a.lua")
res = {}
def run():
    out = host.fire("read_request", hostscript.Transaction())
    res.update(status=out.status.name, kind=out.error and out.error.kind,
               message=out.error and out.error.message)
t = threading.Thread(target=run)
t.start()
t.join()
print(json.dumps(res))
"""


def test_a_thread_stack_too_small_to_run_lua_safely_is_refused_up_front(engine):
    # 64 KiB is below what the C-stack bound needs to keep its margins: the fire is
    # refused with a usage error instead of running where recursion could not be caught
    proc = subprocess.run([sys.executable, "-c", TINY_STACK, engine], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["status"] == "ERROR" and res["kind"] == "usage", res
    assert "too little C stack" in res["message"], res
