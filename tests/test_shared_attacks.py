"""Shared dictionaries under attack: hostile handler scripts, hostile Python callers
and C hosts trying to crash the process, corrupt or deadlock a dictionary, bloat it
past its capacity or break its types, TTLs and keys. Anything that could crash or
freeze the process runs in a child process."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time

import pytest
from helpers import ROOT
from test_shared import ENTRY, RUNNER, lua, lua_error, small_host

import hostscript

CHILD_HEAD = r"""
import json, logging, os, sys, threading, time
import hostscript
logging.disable(logging.CRITICAL)
engine, runner = sys.argv[1], sys.argv[2]

def in_thread(what, fn, timeout=20):
    box = {}
    def run():
        try:
            box["r"] = fn()
        except BaseException as exc:  # reported, not raised: the parent reads stdout
            box["r"] = "raised %s: %s" % (type(exc).__name__, exc)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        print(json.dumps({"stuck": what}), flush=True)
        os._exit(3)
    return box["r"]

def fire(host, src, hook="read_request"):
    host.load(runner % src, name="runner.lua")
    txn = hostscript.Transaction()
    out = host.fire(hook, txn)
    return out.status.name, out.error.kind if out.error else None, txn.ctx
"""


@pytest.fixture
def shost(make_host):
    """A host with one dictionary 'meta' of 1 MiB."""
    return make_host(shared={"meta": 1 << 20})


def child(engine, body, timeout=120):
    """Run CHILD_HEAD + BODY in a fresh interpreter; the JSON it printed last."""
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD_HEAD + body, engine, RUNNER],
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("the process froze (a dictionary lock left held?)")
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stdout} {proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def used(d):
    return d.capacity() - d.free_space()


# ---- forged dictionary objects ----


FORGED = r"""
host = hostscript.Host(["read_request"], engine=engine, sandbox=False, shared={"meta": 1 << 16})
host.shared["meta"].set("x", "secret")
res = []
for victim in ("hs.DONE", "io.stdout", "coroutine.create(print)", "hs.shared",
               "newproxy and newproxy() or io.stderr"):
    status, _, ctx = fire(host, '''
        local mt = debug.getmetatable(d)
        local ud = %s
        local old = debug.getmetatable(ud)
        debug.setmetatable(ud, mt)
        local ok, err = pcall(mt.__index.get, ud, "x")
        local ok2, err2 = pcall(tostring, ud)
        debug.setmetatable(ud, old)
        return ok, err, ok2, err2''' % victim)
    res.append([status] + [r.get("v") for r in ctx.get("r", [])])
status, _, ctx = fire(host, "return d:get('x')")
res.append([status, ctx["r"][0]["v"]])
print(json.dumps(res))
"""


def test_the_dictionary_metatable_on_another_userdata_does_not_make_it_a_dictionary(engine):
    # without the sandbox, debug.getmetatable reaches the real metatable and
    # debug.setmetatable puts it on any userdata: the methods read that userdata's
    # memory as a dictionary pointer (a segfault before the fix)
    res = child(engine, FORGED)
    for r in res[:-1]:
        assert r[0] == "CONTINUE" and r[1] is False and "called with ':'" in r[2], res
        assert r[3] is False and "called with ':'" in r[4], res
    assert res[-1] == ["CONTINUE", "secret"]


# ---- accounting ----


def test_every_kind_of_overwrite_is_counted_exactly(make_host):
    host = small_host(make_host, 1 << 16)
    d = host.shared["meta"]
    cap = d.capacity()
    d.set("k", b"x" * 100)
    assert used(d) == ENTRY + 1 + 100
    d.set("k", b"x" * 10, flags=7)
    assert used(d) == ENTRY + 1 + 10
    d.set("k", 5)
    assert used(d) == ENTRY + 1
    assert d.incr("k", 0.5) == 5.5 and used(d) == ENTRY + 1
    d.set("k", True)
    assert used(d) == ENTRY + 1
    lua(host, "d:set('k', string.rep('y', 300)) d:set('j', '') d:incr('n', 1, 0)")
    assert used(d) == 3 * ENTRY + 3 + 300
    lua(host, "d:set('k', nil) d:delete('j') d:replace('n', 'abc')")
    assert used(d) == ENTRY + 1 + 3
    d.set("n", b"abcd", ttl=0.001)
    time.sleep(0.01)
    assert used(d) == ENTRY + 1 + 4  # expired but not reclaimed: still counted
    assert d.add("n", 1) and used(d) == ENTRY + 1
    d.flush_all()
    assert d.flush_expired() == 1 and d.free_space() == cap
    assert host.stats()["shared"]["meta"]["keys"] == 0


@pytest.mark.parametrize("seed", [1, 2])
def test_random_mixed_operations_keep_used_within_capacity(make_host, seed):
    host = small_host(make_host, 8192)
    d = host.shared["meta"]
    rnd = random.Random(seed)
    cap = d.capacity()
    for i in range(3000):
        k = f"k{rnd.randrange(60)}"
        op = rnd.randrange(9)
        size = rnd.choice([0, 1, 50, 500, 3000, cap - ENTRY - len(k)])
        try:
            if op == 0:
                d.set(k, b"v" * size, ttl=rnd.choice([0, 0, 0.0005]))
            elif op == 1:
                d.safe_set(k, b"v" * size)
            elif op == 2:
                d.add(k, b"v" * size, flags=rnd.randrange(3))
            elif op == 3:
                d.replace(k, rnd.random())
            elif op == 4:
                d.incr(k, 1, init=0, init_ttl=rnd.choice([0, 0.0005]))
            elif op == 5:
                d.delete(k)
            elif op == 6:
                d.expire(k, rnd.choice([0, 0.0001]))
            elif op == 7:
                d.flush_expired(rnd.randrange(3))
            else:
                d.safe_add(k, rnd.randrange(1 << 40))
        except (hostscript.SharedDictFullError, hostscript.SharedDictError):
            pass
        free = d.free_space()
        assert 0 <= free <= cap, (i, free)
    d.flush_all()
    d.flush_expired()
    assert d.free_space() == cap and d.keys(0) == []


def test_an_entry_that_exactly_fills_the_capacity_fits_one_byte_more_does_not(make_host):
    host = small_host(make_host, 8192)
    d = host.shared["meta"]
    d.set("a", 1)
    assert d.set("k", b"x" * (8192 - ENTRY - 1)) is True  # evicted 'a'
    assert d.free_space() == 0 and d.get("a") is None
    with pytest.raises(hostscript.SharedDictFullError):
        d.set("k", b"x" * (8192 - ENTRY))
    assert len(d.get("k")) == 8192 - ENTRY - 1 and d.free_space() == 0
    assert lua(host, "return d:set('z', string.rep('x', 8192 - 96))") == \
        [False, b"no memory", False]
    assert lua(host, "return d:incr('z', 1, 0)") == [1, None, True]
    assert d.get("k") is None and used(d) == ENTRY + 1


# ---- numbers ----


def test_int64_overflow_in_incr_is_refused_and_changes_nothing(shost, engine):
    d = shost.shared["meta"]
    d.set("max", (1 << 63) - 1)
    d.set("min", -(1 << 63))
    with pytest.raises(hostscript.SharedDictError, match="overflow"):
        d.incr("max", 1)
    with pytest.raises(hostscript.SharedDictError, match="overflow"):
        d.incr("min", -1)
    with pytest.raises(hostscript.SharedDictError, match="overflow"):
        d.incr("new", 1, init=(1 << 63) - 1)
    assert d.get("max") == (1 << 63) - 1 and d.get("min") == -(1 << 63) and "new" not in d
    assert d.incr("max", -1) == (1 << 63) - 2
    d.set("f", (1 << 63) - 1)
    assert d.incr("f", 1.0) == float(1 << 63)  # a float sum never overflows
    if engine == "lua54":
        assert lua(shost, """
            d:set('m', math.maxinteger)
            local a, b = d:incr('m', 1)
            local c, e = d:incr('fresh', math.mininteger, -1)
            return a, b, d:get('m') == math.maxinteger, c, e, d:get('fresh')""") == \
            [None, b"integer overflow", True, None, b"integer overflow", None]
    else:  # LuaJIT: an integer beyond 2^53 is refused on the way out, not corrupted
        d.set("big", 1 << 60)
        assert lua(shost, "return d:get('big')")[0] is None
        assert lua(shost, "return d:get('max')")[1].startswith(b"the value is an integer beyond")
        assert d.get("big") == 1 << 60


def test_nan_inf_and_negative_zero_round_trip(shost):
    d = shost.shared["meta"]
    d.set("nan", math.nan)
    d.set("inf", math.inf)
    d.set("ninf", -math.inf)
    d.set("nz", -0.0)
    assert math.isnan(d.get("nan")) and d.get("inf") == math.inf and d.get("ninf") == -math.inf
    assert math.copysign(1, d.get("nz")) == -1
    assert d.incr("inf", -math.inf) != d.incr("inf", 0)  # NaN now: inf - inf
    assert lua(shost, """
        local n = d:get('nan')
        d:set('lnan', 0/0)
        d:set('lnz', -0.0)
        local m = d:get('lnan')
        local i = d:incr('ninf', 1)
        return n ~= n, m ~= m, 1/d:get('lnz'), i, d:incr('c', 0/0, 0) ~= d:get('c')""") == \
        [True, True, -math.inf, -math.inf, True]
    assert math.isnan(d.get("lnan")) and math.copysign(1, d.get("lnz")) == -1


def test_booleans_are_not_numbers(shost):
    d = shost.shared["meta"]
    d.set("t", True)
    with pytest.raises(hostscript.SharedDictError, match="not a number"):
        d.incr("t", 1)
    assert lua(shost, "d:set('f', false) return select(2, d:incr('f', 1)), d:get('f'), d:get('t')") == \
        [b"not a number", False, True]
    with pytest.raises(hostscript.ArgumentTypeError):
        d.incr("t", True)
    assert "bad increment" in lua_error(shost, "d:incr('n', true, 0)")


# ---- TTLs ----


def test_ttl_edges_from_lua(shost):
    assert lua(shost, """
        d:set('huge', 1, 1e300)
        d:set('maxint', 1, 2^63)
        d:set('tiny', 1, 1e-300)
        d:set('nz', 1, -0.0)
        d:set('e', 1)
        local ok = d:expire('e', 1e308)
        return d:ttl('huge') > 1e9, d:ttl('maxint') > 1e9, d:ttl('nz'), ok, d:ttl('e') > 1e9,
               d:get('tiny'), select(3, d:get_stale('tiny'))""") == \
        [True, True, 0, True, True, None, True]
    for bad in ("-1e-300", "0/0", "-(0/0)", "1/0", "-1/0", "'1'"):
        assert "bad ttl" in lua_error(shost, f"d:set('k', 1, {bad})")
        assert "bad ttl" in lua_error(shost, f"d:expire('e', {bad})")
        assert "bad init_ttl" in lua_error(shost, f"d:incr('k', 1, 0, {bad})")
    assert lua(shost, "return d:get('k')") == [None]


def test_ttl_edges_from_python(shost):
    d = shost.shared["meta"]
    d.set("huge", 1, ttl=1e308)
    d.set("bigint", 1, ttl=1 << 80)
    assert d.ttl("huge") > 1e9 and d.ttl("bigint") > 1e9
    d.set("nz", 1, ttl=-0.0)
    assert d.ttl("nz") == 0.0
    for bad in (-1, -1e-300, math.nan, math.inf, 10 ** 400, -(10 ** 400)):
        with pytest.raises(hostscript.UsageError):
            d.set("k", 1, ttl=bad)
        with pytest.raises(hostscript.UsageError):
            d.expire("huge", bad)
        with pytest.raises(hostscript.UsageError):
            d.incr("k", 1, init=0, init_ttl=bad)
    assert "k" not in d and d.ttl("huge") > 1e9


# ---- keys ----


def test_keys_with_nul_bytes_and_at_the_length_limits(make_host):
    host = make_host(shared={"meta": 1 << 20})
    d = host.shared["meta"]
    assert lua(host, r"""
        d:set('a\0b', 1) d:set('a\0c', 2) d:set('\0', 3)
        local long = string.rep('\0', 65535)
        local ok = d:set(long, 4)
        local bad, err = d:set(long .. 'x', 5)
        return d:get('a\0b'), d:get('a\0c'), d:get('\0'), d:get('a'), ok, err, d:get(long)""") == \
        [1, 2, 3, None, True, b"key too long", 4]
    assert d.get(b"a\0b") == 1 and d.get("a\0c") == 2 and d.get("\0" * 65535) == 4
    with pytest.raises(hostscript.UsageError, match="key too long"):
        d.set("x" * 65536, 1)
    with pytest.raises(hostscript.UsageError, match="key too long"):
        d.get("x" * 65536)
    assert sorted(d.keys(0)) == ["\0", "\0" * 65535, "a\0b", "a\0c"]
    assert lua(host, "local n = 0 for _, k in ipairs(d:get_keys(0)) do n = n + #k end return n") == \
        [1 + 65535 + 3 + 3]


def test_get_keys_and_flush_expired_count_limits(shost):
    d = shost.shared["meta"]
    for i in range(50):
        d.set(f"k{i}", i)
    assert lua(shost, "return #d:get_keys(2^32 - 1), #d:get_keys(2^31), #d:get_keys(1), "
                      "#d:get_keys(0), #d:get_keys()") == [50, 50, 1, 50, 50]
    for bad in ("2^32", "-1", "0.5", "0/0", "1/0"):
        assert "bad max" in lua_error(shost, f"d:get_keys({bad})")
        assert "bad max" in lua_error(shost, f"d:flush_expired({bad})")
    assert len(d.keys(1 << 40)) == 50
    d.flush_all()
    assert lua(shost, "return d:flush_expired(2^32 - 1), #d:get_keys(0)") == [50, 0]


def test_a_key_or_value_with_metamethods_is_refused_without_calling_them(shost):
    assert lua(shost, """
        local calls = 0
        local mt = {__tostring = function() calls = calls + 1 return 'k' end,
                    __index = function() calls = calls + 1 end,
                    __len = function() calls = calls + 1 return 1 end,
                    __concat = function() calls = calls + 1 return 'k' end}
        local t = setmetatable({}, mt)
        local a, e1 = d:set(t, 1)
        local b, e2 = d:set('k', t)
        local c, e3 = d:get(t)
        local f, e4 = d:incr(t, 1, 0)
        return a, e1, b, e2, c, e3, f, e4, calls, #d:get_keys(0)""") == [
        None, b"bad key type (a string is expected)", None, b"bad value type",
        None, b"bad key type (a string is expected)", None, b"bad key type (a string is expected)",
        0, 0]
    assert "bad increment" in lua_error(shost, """
        d:incr('k', setmetatable({}, {__index = function() error('no') end}), 0)""")


# ---- Lua errors and yields around the calls ----


def test_coroutines_interleave_dictionary_calls(shost):
    assert lua(shost, """
        local co = {}
        for i = 1, 10 do
            co[i] = coroutine.wrap(function()
                for j = 1, 5 do
                    d:incr('n', 1, 0)
                    d:set('c' .. i, j)
                    coroutine.yield()
                end
                error('boom ' .. i)
            end)
        end
        local errors = 0
        for round = 1, 6 do
            for i = 1, 10 do
                if not pcall(co[i]) then errors = errors + 1 end
            end
        end
        return d:get('n'), errors, d:get('c7')""") == [50, 10, 5]
    assert shost.shared["meta"].incr("n", 1) == 51


LIMITS = r"""
res = {}
host = hostscript.Host(["read_request"], engine=engine, shared={"meta": 1 << 20},
                       time_limit=0.2, memory_limit=4 << 20, sandbox=sandbox)
d = host.shared["meta"]
d.set("big", b"x" * 100000)
res["timeout"] = in_thread("timeout fire", lambda: fire(host, '''
    local i = 0
    while true do
        i = i + 1
        d:incr('n', 1, 0)
        d:set('k' .. (i % 500), string.rep('v', i % 300))
        d:get('k' .. (i % 7))
        d:get_keys(10)
    end'''))[:2]
res["memory"] = in_thread("memory fire", lambda: fire(host, '''
    local keep = {}
    for i = 1, 1e9 do
        keep[i] = d:get('big') .. i  -- LuaJIT interns every string: make new ones
        d:set('m' .. (i % 100), i)
        keep[#keep + 1] = d:get_keys(0)
    end'''))[:2]
res["python"] = in_thread("python", lambda: [d.incr("p", 1, init=0), len(d.keys(0)) > 0])
status, _, ctx = in_thread("lua after", lambda: fire(host, "return d:incr('after', 1, 0)"))
res["lua"] = [status, ctx["r"][0]["v"]]
print(json.dumps(res))
"""


@pytest.mark.parametrize("sandbox", [True, False])
def test_time_and_memory_limits_in_the_middle_of_dictionary_calls(engine, sandbox):
    res = child(engine, f"sandbox = {sandbox!r}\n" + LIMITS)
    assert res["timeout"] == ["ERROR", "timeout"], res
    assert res["memory"] == ["ERROR", "memory"], res
    assert res["python"] == [1, True] and res["lua"] == ["CONTINUE", 1], res


GC = r"""
host = hostscript.Host(["read_request"], engine=engine, shared={"meta": 1 << 22}, sandbox=False)
d = host.shared["meta"]
d.set("big", b"x" * 100000)
status, kind, ctx = in_thread("fire with finalizers", lambda: fire(host, '''
    local function fin() d:incr('gc', 1, 0) d:set('g', string.rep('y', 1000)) end
    for i = 1, 20000 do
        if newproxy then  -- LuaJIT: __gc on userdata only
            getmetatable(newproxy(true)).__gc = fin
        else
            setmetatable({}, {__gc = fin})
        end
        if i % 100 == 0 then
            local v = d:get('big')
            local ks = d:get_keys(0)
        end
    end
    collectgarbage()
    return d:get('gc') > 0'''))
print(json.dumps([status, kind, ctx.get("r", [{}])[0].get("v"), d.get("gc") > 0]))
"""


def test_finalizers_that_use_the_dictionary_run_during_binding_allocations(engine):
    # unsandboxed __gc runs inside lua_newuserdata of a get: no lock is held there
    assert child(engine, GC) == ["CONTINUE", None, True, True]


# ---- closing under use ----


CLOSE = r"""
host = hostscript.Host(["read_request"], engine=engine, shared={"meta": 1 << 16})
d = host.shared["meta"]
host.load(runner % "for i = 1, 2000 do d:incr('n', 1, 0) d:set('k' .. i % 50, 'v') d:get_keys(5) end",
          name="runner.lua")
stop = threading.Event()
outcomes = []

def py_worker():
    try:
        while True:
            d.incr("p", 1, init=0); d.set("x", b"y" * 300); d.get("x"); d.keys(0)
            d.flush_expired(); d.free_space()
    except hostscript.ClosedError:
        outcomes.append("closed")
    except BaseException as exc:
        outcomes.append(repr(exc))

def lua_worker():
    txn = hostscript.Transaction()
    try:
        while True:
            out = host.fire("read_request", txn)
            if out.status.name != "CONTINUE":
                outcomes.append("lua " + out.status.name)
                return
    except hostscript.ClosedError:
        outcomes.append("closed")
    except BaseException as exc:
        outcomes.append(repr(exc))

threads = [threading.Thread(target=f, daemon=True) for f in (py_worker, lua_worker) * 4]
for t in threads:
    t.start()
time.sleep(0.5)
in_thread("close", host.close, 60)
for t in threads:
    t.join(30)
alive = sum(t.is_alive() for t in threads)
after = []
for call in (lambda: d.get("x"), lambda: d.set("x", 1), d.keys, d.flush_all):
    try:
        call()
        after.append("no error")
    except hostscript.ClosedError:
        after.append("closed")
print(json.dumps({"outcomes": sorted(outcomes), "alive": alive, "after": after}))
"""


def test_close_while_python_and_lua_threads_use_a_dictionary(engine):
    res = child(engine, CLOSE)
    assert res == {"outcomes": ["closed"] * 8, "alive": 0, "after": ["closed"] * 4}, res


CHAOS = r"""
host = hostscript.Host(["read_request"], engine=engine, shared={"meta": 8192}, time_limit=30)
d = host.shared["meta"]
host.load(runner % '''
    local ops = 0
    for i = 1, 3000 do
        local k = 'k' .. (i * 7919 % 40)
        local r = i % 11
        if r == 0 then d:set(k, string.rep('s', i % 900), (i % 3) * 0.0001, i % 5)
        elseif r == 1 then d:incr(k, 1, 0, (i % 2) * 0.0001)
        elseif r == 2 then d:safe_set(k, i * 0.5)
        elseif r == 3 then d:add(k, i % 2 == 0)
        elseif r == 4 then d:replace(k, string.rep('r', i % 3000))
        elseif r == 5 then d:delete(k)
        elseif r == 6 then d:get_stale(k)
        elseif r == 7 then d:get_keys(3)
        elseif r == 8 then d:expire(k, (i % 2) * 0.0001)
        elseif r == 9 then
            if i % 97 == 0 then d:flush_all() end
            d:flush_expired(2)
        else d:get(k) end
        ops = ops + 1
    end
    return ops''', name="runner.lua")
errors = []

def lua_worker():
    txn = hostscript.Transaction()
    for _ in range(15):
        out = host.fire("read_request", txn)
        if out.status.name != "CONTINUE":
            errors.append(str(out.error))

def py_worker(seed):
    import random
    rnd = random.Random(seed)
    for i in range(3000):
        k = "k%d" % rnd.randrange(40)
        try:
            [lambda: d.set(k, b"p" * rnd.randrange(1500), ttl=rnd.choice([0, 0.0001])),
             lambda: d.incr(k, 2, init=0), lambda: d.get_stale(k), lambda: d.keys(0),
             lambda: d.delete(k), lambda: d.safe_add(k, 1.5)][i % 6]()
        except hostscript.SharedDictError:
            pass
        free = d.free_space()
        if not 0 <= free <= 8192:
            errors.append("free_space %d" % free)

threads = [threading.Thread(target=lua_worker) for _ in range(4)]
threads += [threading.Thread(target=py_worker, args=(s,)) for s in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join(120)
alive = sum(t.is_alive() for t in threads)
d.flush_all()
d.flush_expired()
print(json.dumps({"errors": errors[:5], "alive": alive, "free": d.free_space(),
                  "keys": host.stats()["shared"]["meta"]["keys"], "releases": host.stats()["releases"]}))
"""


def test_lua_and_python_threads_mix_every_operation_on_a_full_dictionary(engine):
    # a 30 s time limit lets long fires release the GIL, so Lua runs in parallel
    res = child(engine, CHAOS)
    assert {k: res[k] for k in ("errors", "alive", "free", "keys")} == \
        {"errors": [], "alive": 0, "free": 8192, "keys": 0}, res


# ---- the C API through cffi ----


CAPI = r"""
host = hostscript.Host(["read_request"], engine=engine, shared={"meta": 1 << 16})
d = host.shared["meta"]
ffi, lib = host._ffi, host._lib
d.set("s", b"hello")
d.set("e", b"")
out = ffi.new("hs_value *")
res = {}
res["null_buf"] = [lib.hs_shared_get(d._d, b"s", 1, out, ffi.NULL, 100, ffi.NULL), int(out.len)]
res["null_buf_empty"] = [lib.hs_shared_get(d._d, b"e", 1, out, ffi.NULL, 100, ffi.NULL),
                         int(out.len), ffi.string(out.s).decode()]
res["null_key"] = lib.hs_shared_get(d._d, ffi.NULL, 5, out, ffi.NULL, 0, ffi.NULL)
v = ffi.new("hs_value *")
v.type, v.s, v.len = lib.HS_VAL_STRING, ffi.NULL, 10
res["null_string"] = lib.hs_shared_store(d._d, lib.HS_STORE_SET, b"k", 1, v, 0, ffi.NULL)
buf = ffi.new("char[]", 8)
v.s, v.len = buf, (1 << 64) - 64  # a length that wraps the entry's cost
res["huge_len"] = lib.hs_shared_store(d._d, lib.HS_STORE_SET, b"k", 1, v, 0, ffi.NULL)
v.type, v.i = lib.HS_VAL_BOOLEAN, 2
res["bool2"] = lib.hs_shared_store(d._d, lib.HS_STORE_SET, b"k", 1, v, 0, ffi.NULL)
v.type = 99
res["type99"] = lib.hs_shared_store(d._d, lib.HS_STORE_SET, b"k", 1, v, 0, ffi.NULL)
v.type, v.i = lib.HS_VAL_INTEGER, 1
res["mode99"] = lib.hs_shared_store(d._d, 99, b"k", 1, v, 0, ffi.NULL)
res["mode-1"] = lib.hs_shared_store(d._d, -1, b"k", 1, v, 0, ffi.NULL)
res["ttl_nan"] = lib.hs_shared_store(d._d, lib.HS_STORE_SET, b"k", 1, v, float("nan"), ffi.NULL)
res["incr_null_delta"] = lib.hs_shared_incr(d._d, b"k", 1, ffi.NULL, ffi.NULL, 0, out, ffi.NULL)
res["keys_null"] = [lib.hs_shared_keys(d._d, -5, ffi.NULL, 1000, ffi.NULL)]
res["flush_neg"] = lib.hs_shared_flush_expired(d._d, -1)
res["free"] = d.free_space() == d.capacity() - 2 * 97 - 5
print(json.dumps(res))
"""


def test_c_api_misuse_is_refused_not_a_crash(engine, make_host):
    res = child(engine, CAPI)
    lib = make_host(["log"])._lib
    buffer, bad, no_mem = lib.HS_SHARED_BUFFER, lib.HS_SHARED_BAD_VALUE, lib.HS_SHARED_NO_MEMORY
    assert res["null_buf"] == [buffer, 5], res  # a NULL buffer asks for the length
    assert res["null_buf_empty"] == [0, 0, ""], res
    assert res["null_key"] != 0 and res["null_string"] == bad and res["huge_len"] == no_mem, res
    assert res["bool2"] == bad and res["type99"] == bad and res["mode99"] == bad, res
    assert res["mode-1"] == bad and res["ttl_nan"] != 0 and res["incr_null_delta"] == bad, res
    assert res["keys_null"] == [2 * 4 + 2] and res["flush_neg"] == 0 and res["free"], res


# ---- hash flooding ----


def test_many_keys_stay_linear(make_host):
    # SipHash with a per-dictionary key: inserting n keys costs O(n); 40k keys that
    # all share a long prefix and differ in the last bytes take well under a second
    host = make_host(shared={"meta": 64 << 20})
    t = time.perf_counter()
    n = lua(host, """
        local p = string.rep('A', 200)
        for i = 1, 40000 do d:set(p .. i, i) end
        return #d:get_keys(0)""")[0]
    assert n == 40000 and time.perf_counter() - t < 10
