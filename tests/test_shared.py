"""Shared dictionaries: hs.shared.NAME in Lua, host.shared[NAME] in Python — the
semantics of ngx.shared.DICT, on both engines, from both sides, under threads and
under a memory limit. The semantics suite (`shost`) runs on both backends, in
process and Redis; what only one of them has (LRU, capacity, stale entries; key
prefixes, the values other Redis clients see) is tested on that one."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from helpers import ROOT, build_c_program, wait_for

import hostscript
from hostscript import Status, Transaction

# ---- running Lua against the dictionaries ----

RUNNER = """
local function pack(...) return {n = select('#', ...), ...} end
local function kind(v)
    if type(v) == "number" and math.type then return math.type(v) end
    return type(v)
end
local C = {}
function C:on_read_request(txn)
    local d = hs.shared.meta
    local r = pack((function(d) %s
    end)(d))
    local out = {}
    for i = 1, r.n do out[i] = {t = kind(r[i]), v = r[i]} end
    txn.ctx.n = r.n
    txn.ctx.r = out
end
return C
"""


def lua_typed(host, body):
    """Run BODY (a Lua function body; `d` is hs.shared.meta) in a handler: what it
    returned, as [(Lua type, value)] (math.type for numbers on Lua 5.4)."""
    host.load(RUNNER % body, name="runner.lua")
    txn = Transaction()
    out = host.fire("read_request", txn)
    assert out.status is Status.CONTINUE, out.error
    items = txn.ctx["r"] if txn.ctx["n"] else []
    if isinstance(items, dict):  # an empty Lua table
        items = []
    return [(it["t"], _bytes(it.get("v"))) for it in items]


def _bytes(v):
    return v.encode() if isinstance(v, str) else v


def lua(host, body):
    """The values BODY returned (strings as bytes)."""
    return [v for _, v in lua_typed(host, body)]


def lua_error(host, body):
    """The error message of BODY, which must raise."""
    host.load(RUNNER % body, name="runner.lua")
    out = host.fire("read_request", Transaction())
    assert out.status is Status.ERROR, "the handler did not fail"
    return out.error.message


@pytest.fixture(params=["memory", "redis"])
def shost(request, make_host):
    """A host with one dictionary 'meta': in process (1 MiB), or on Redis under this
    test's own key prefix (the session's redis-server)."""
    if request.param == "memory":
        return make_host(shared={"meta": 1 << 20})
    return request.getfixturevalue("rhost")


def small_host(make_host, capacity=8192, **kw):
    return make_host(shared={"meta": capacity}, **kw)


ENTRY = 96  # HS_SHARED_ENTRY_OVERHEAD
# the counters of host.stats()["shared"][NAME] a Redis backend moves (0 in process)
REDIS_COUNTERS = ("calls", "errors", "timeouts", "reconnects", "seconds")


def test_entry_overhead_constant_matches_the_header(host):
    assert host._lib.HS_SHARED_ENTRY_OVERHEAD == ENTRY
    assert host._lib.HS_SHARED_MIN_CAPACITY == 8192


# ---- configuration ----


def test_dictionaries_are_reachable_by_name_and_unknown_names_are_nil(make_host):
    host = make_host(shared={"meta": 1 << 16, "my-dict": 1 << 16})
    assert sorted(host.shared) == ["meta", "my-dict"]
    assert lua(host, """
        hs.shared["my-dict"]:set("a", 1)
        return hs.shared.nope == nil, hs.shared["my-dict"]:get("a"), d:get("a"),
               tostring(hs.shared["my-dict"])""") == [True, 1, None, b"shared dictionary 'my-dict'"]
    assert host.shared["my-dict"].get("a") == 1 and host.shared["meta"].get("a") is None


def test_a_host_without_dictionaries_has_an_empty_hs_shared(host):
    assert dict(host.shared) == {}
    assert lua(host, "return hs.shared.meta == nil, type(hs.shared)") == [True, b"userdata"]
    assert host.stats()["shared"] == {}


@pytest.mark.parametrize("shared,message", [
    ({"": 1 << 16}, "needs a name"),
    ({"x" * 65: 1 << 16}, "longer than 64 bytes"),
    ({"meta": 8191}, "capacity 8191 bytes is below the minimum of 8192"),
    ({"meta": 0}, "below the minimum"),
    ({"meta": -1}, "out of range"),
    ({"meta": {"capacity": 1 << 16, "size": 1}}, "unknown option"),
])
def test_bad_dictionary_configs_are_usage_errors(make_host, shared, message):
    with pytest.raises(hostscript.UsageError, match=message):
        make_host(shared=shared)


@pytest.mark.parametrize("shared", [["meta"], {"meta": "1m"}, {"meta": 1.5}, {"meta": True},
                                    {"meta": None},
                                    {1: 1 << 16}])
def test_bad_dictionary_config_types_are_argument_type_errors(make_host, shared):
    with pytest.raises(hostscript.ArgumentTypeError):
        make_host(shared=shared)


def test_names_up_to_64_bytes_and_the_minimum_capacity_are_accepted(make_host):
    host = make_host(shared={"x" * 64: 8192, "mapped": {"capacity": 8192}})
    assert host.shared["x" * 64].capacity() == 8192
    assert host.shared["mapped"].capacity() == 8192


def test_a_name_declared_twice_is_refused_by_the_core(engine):
    # a Python mapping cannot hold a name twice: call hs_host_new itself
    from hostscript import _engine
    eng = _engine.load(engine)
    ffi, lib = eng.ffi, eng.lib
    hooks = [ffi.new("char[]", b"read_request")]
    names = [ffi.new("char[]", b"meta"), ffi.new("char[]", b"meta")]
    specs = ffi.new("hs_shared_spec[]", 2)
    for i in range(2):
        specs[i].name, specs[i].capacity = names[i], 1 << 16
    cfg = ffi.new("hs_config *")
    hook_arr = ffi.new("const char *[]", hooks)  # every cdata the config points at stays alive
    cfg.hooks, cfg.nhooks = hook_arr, 1
    cfg.shared, cfg.nshared = specs, 2
    err = ffi.new("hs_error *")
    assert lib.hs_host_new(cfg, err) == ffi.NULL
    assert err.kind == lib.HS_ERR_USAGE
    assert ffi.string(err.message) == b"shared dictionary 'meta' declared twice"
    names.append(ffi.new("char[]", b"other"))
    specs[1].name = names[-1]
    h = lib.hs_host_new(cfg, err)
    assert h != ffi.NULL
    assert lib.hs_host_shared(h, b"other") != ffi.NULL and lib.hs_host_shared(h, b"x") == ffi.NULL
    lib.hs_host_free(h)


# ---- get / set and value types ----


def test_set_and_get_from_lua(shost):
    assert lua(shost, """
        local ok, err, forcible = d:set("a", "hello")
        return ok, err, forcible, d:get("a")""") == [True, None, False, b"hello"]
    assert shost.shared["meta"].get("a") == b"hello"


def test_get_returns_flags_only_when_set(shost):
    assert lua(shost, """
        d:set("plain", 1)
        d:set("flagged", 2, 0, 42)
        local a, af = d:get("plain")
        return select('#', d:get("plain")), a, af, select('#', d:get("flagged")), d:get("flagged")
    """) == [1, 1, None, 2, 2, 42]
    assert shost.shared["meta"].get_with_flags("flagged") == (2, 42)
    assert shost.shared["meta"].get_with_flags("plain") == (1, 0)


def test_missing_keys_read_as_nil(shost):
    assert lua(shost, "return select('#', d:get('nope')), d:get('nope')") == [1, None]
    d = shost.shared["meta"]
    assert d.get("nope") is None and d.get("nope", 5) == 5 and d.get_with_flags("nope") is None
    assert d.get_stale("nope") is None


def test_value_types_round_trip_in_lua(shost, engine):
    got = lua_typed(shost, r"""
        d:set("s", "a\0b\255")
        d:set("i", 42)
        d:set("f", 1.5)
        d:set("big", 2^53)
        d:set("t", true)
        d:set("n", false)
        d:set("e", "")
        return d:get("s"), d:get("i"), d:get("f"), d:get("big"), d:get("t"), d:get("n"), d:get("e")""")
    num = "number" if engine == "luajit" else None
    assert got == [("string", b"a\0b\xff"), (num or "integer", 42), (num or "float", 1.5),
                   (num or "float", 2.0 ** 53), ("boolean", True), ("boolean", False),
                   ("string", b"")]


def test_lua_values_as_python_sees_them(shost, engine):
    lua(shost, r"""d:set("s", "a\0b") d:set("i", 42) d:set("f", 1.5) d:set("t", true)""")
    d = shost.shared["meta"]
    # Lua 5.4 keeps integers; LuaJIT has only doubles, stored as numbers
    assert d.get("i") == 42 and type(d.get("i")) is (float if engine == "luajit" else int)
    assert d.get("s") == b"a\0b" and d.get("f") == 1.5 and d.get("t") is True


def test_python_values_as_lua_sees_them(shost, engine):
    d = shost.shared["meta"]
    d.set("s", "héllo")
    d.set("b", b"\0\xff")
    d.set("i", -7)
    d.set("f", 0.25)
    d.set("t", False)
    d.set("huge", (1 << 62) + 1)
    got = lua_typed(shost, """
        return d:get("s"), d:get("b"), d:get("i"), d:get("f"), d:get("t"), d:get("huge")""")
    int_t = "number" if engine == "luajit" else "integer"
    float_t = "number" if engine == "luajit" else "float"
    assert got[:5] == [("string", "héllo".encode()), ("string", b"\0\xff"), (int_t, -7),
                       (float_t, 0.25), ("boolean", False)]
    if engine == "luajit":  # no exact representation: an error, not a rounded number
        assert lua(shost, "return d:get('huge')") == [None, b"the value is an integer beyond 2^53, "
                                                      b"which luajit cannot represent exactly"]
    else:
        assert got[5] == ("integer", (1 << 62) + 1)
    assert d.get("s") == "héllo".encode() and d.get("i") == -7 and type(d.get("f")) is float


def test_big_binary_values_round_trip(shost):
    d = shost.shared["meta"]
    blob = bytes(range(256)) * 1000  # 256 KB, larger than any first read buffer
    d.set("blob", blob)
    assert lua(shost, "local v = d:get('blob') return #v, v:byte(1), v:byte(-1), v:sub(257, 258)") \
        == [len(blob), 0, 255, b"\0\x01"]
    lua(shost, "d:set('blob2', string.rep('\\0z', 100000))")
    assert d.get("blob2") == b"\0z" * 100000 and d.get("blob") == blob


def test_set_nil_deletes(shost):
    d = shost.shared["meta"]
    d.set("a", 1)
    assert lua(shost, "local ok = d:set('a', nil) return ok, d:get('a')") == [True, None]
    assert d.get("a") is None


# ---- add, replace, delete ----


def test_add_only_when_absent(shost):
    assert lua(shost, """
        local a = {d:add("k", 1)}
        local b = {d:add("k", 2)}
        return a[1], a[2], b[1], b[2], b[3], d:get("k")""") == [True, None, False, b"exists", False, 1]
    d = shost.shared["meta"]
    assert d.add("k", 3) is False and d.add("k2", 3) is True and d.get("k2") == 3
    assert d.safe_add("k2", 4) is False and d.safe_add("k3", 4) is True


def test_add_over_an_expired_key_succeeds(shost):
    d = shost.shared["meta"]
    d.set("k", "old", ttl=0.02)
    time.sleep(0.05)
    assert lua(shost, "return d:add('k', 'new'), d:get('k')") == [True, b"new"]


def test_replace_only_when_present(shost):
    assert lua(shost, """
        local a = {d:replace("k", 1)}
        d:set("k", 1)
        local b = {d:replace("k", 2, 0, 9)}
        return a[1], a[2], b[1], d:get("k")""") == [False, b"not found", True, 2, 9]
    d = shost.shared["meta"]
    assert d.replace("absent", 1) is False and d.get("absent") is None
    assert d.replace("k", "x") is True and d.get("k") == b"x"


def test_delete(shost):
    d = shost.shared["meta"]
    d.set("k", 1)
    assert lua(shost, "return d:delete('k'), d:get('k'), d:delete('k')") == [True, None, True]
    d.set("k", 1)
    assert d.delete("k") is True and d.delete("k") is False


# ---- incr ----


def test_incr_without_init_needs_the_key(shost):
    assert lua(shost, "return d:incr('c', 1)") == [None, b"not found"]
    d = shost.shared["meta"]
    with pytest.raises(hostscript.SharedDictKeyError, match="not found") as exc:
        d.incr("c")
    assert isinstance(exc.value, KeyError) and isinstance(exc.value, hostscript.Error)


def test_incr_with_init(shost, engine):
    got = lua_typed(shost, """
        local a, err, forcible = d:incr('c', 1, 10)
        return a, err, forcible, d:incr('c', 5, 1000), d:get('c')""")
    int_t = "number" if engine == "luajit" else "integer"
    assert got == [(int_t, 11), ("nil", None), ("boolean", False), (int_t, 16), (int_t, 16)]
    assert shost.shared["meta"].incr("c", -6) == 10
    assert shost.shared["meta"].incr("new", 2, init=40) == 42


def test_incr_types(shost, engine):
    got = lua_typed(shost, """
        d:set('i', 1)
        d:set('f', 1.5)
        return d:incr('i', 2), d:incr('i', 0.5), d:incr('f', 1)""")
    if engine == "lua54":
        assert got == [("integer", 3), ("float", 3.5), ("float", 2.5), ("nil", None),
                       ("boolean", False)]
    else:
        assert got == [("number", 3), ("number", 3.5), ("number", 2.5), ("nil", None),
                       ("boolean", False)]
    d = shost.shared["meta"]
    d.set("pi", 5)
    assert d.incr("pi", 2) == 7 and type(d.incr("pi", 0)) is int
    assert d.incr("pi", 0.5) == 7.5 and type(d.get("pi")) is float


def test_incr_on_a_non_number(shost):
    d = shost.shared["meta"]
    d.set("s", "10")
    d.set("b", True)
    assert lua(shost, "return d:incr('s', 1), d:incr('b', 1)") == [None, None, b"not a number"]
    with pytest.raises(hostscript.SharedDictError, match="not a number"):
        d.incr("s")
    assert d.get("s") == b"10"


def test_incr_integer_overflow_is_refused(shost, engine):
    d = shost.shared["meta"]
    d.set("max", (1 << 63) - 1)
    with pytest.raises(hostscript.SharedDictError, match="integer overflow"):
        d.incr("max", 1)
    assert d.get("max") == (1 << 63) - 1
    if engine == "lua54":
        assert lua(shost, "return d:incr('max', 1)") == [None, b"integer overflow"]
    else:  # a LuaJIT increment is a double: the sum is a double
        assert lua(shost, "return d:incr('max', 1) == 2^63") == [True]


def test_incr_keeps_ttl_and_flags_and_init_ttl_expires(shost):
    d = shost.shared["meta"]
    d.set("c", 1, ttl=100, flags=3)
    d.incr("c", 1)
    assert d.get_with_flags("c") == (2, 3) and 99 < d.ttl("c") <= 100
    assert lua(shost, "return d:incr('t', 1, 0, 0.1), d:ttl('t') > 0") == [1, True]
    time.sleep(0.15)
    assert d.get("t") is None
    assert lua(shost, "return d:incr('t', 1)") == [None, b"not found"]
    assert lua(shost, "return d:incr('t', 1, 5)") == [6, None, False]  # re-initialized
    assert d.ttl("t") == 0


# ---- ttl, expire, expiry and stale reads ----


def test_ttl_and_expire(shost):
    d = shost.shared["meta"]
    got = lua(shost, """
        d:set("forever", 1)
        d:set("soon", 1, 10)
        local t = d:ttl("soon")
        return d:ttl("forever"), t > 9 and t <= 10, d:ttl("absent")""")
    assert got == [0, True, None, b"not found"]
    assert d.ttl("forever") == 0.0 and 9 < d.ttl("soon") <= 10 and d.ttl("absent") is None
    assert lua(shost, "return d:expire('forever', 5), d:expire('absent', 5)") == \
        [True, False, b"not found"]
    assert 4 < d.ttl("forever") <= 5
    assert d.expire("forever", 0) is True and d.ttl("forever") == 0.0
    assert d.expire("absent", 1) is False


def test_entries_expire_and_stay_readable_as_stale(make_host):
    shost = small_host(make_host, 1 << 20)  # Redis drops expired keys: see test_redis_*
    d = shost.shared["meta"]
    assert lua(shost, """
        d:set("k", "v", 0.2, 7)
        return d:get_stale("k")""") == [b"v", 7, False]
    assert "k" in d  # (a TTL long enough for a loaded machine to get here in time)
    time.sleep(0.3)
    assert lua(shost, "return d:get('k'), d:ttl('k'), d:get_stale('k')") == [None, None, b"v", 7, True]
    assert d.get("k") is None and "k" not in d and d.get_stale("k") == (b"v", 7, True)
    assert d.keys() == []
    with pytest.raises(hostscript.SharedDictKeyError):
        d["k"]


def test_flush_expired_reclaims_expired_entries(make_host):
    shost = small_host(make_host, 1 << 20)
    d = shost.shared["meta"]
    for i in range(5):
        d.set(f"old{i}", "x" * 100, ttl=0.02)
    d.set("live", 1)
    before = d.free_space()
    time.sleep(0.05)
    assert shost.stats()["shared"]["meta"]["keys"] == 6  # not reclaimed yet
    assert lua(shost, "return d:flush_expired(2)") == [2]
    assert d.flush_expired() == 3
    assert d.flush_expired() == 0
    assert d.get_stale("old0") is None and d.get("live") == 1
    assert d.free_space() == before + 5 * (ENTRY + 4 + 100)
    assert shost.stats()["shared"]["meta"]["keys"] == 1


def test_flush_all_expires_everything(make_host):
    shost = small_host(make_host, 1 << 20)
    d = shost.shared["meta"]
    d.set("a", 1)
    d.set("b", 2)
    assert lua(shost, "d:flush_all() return d:get('a'), d:get_stale('b')") == [None, 2, None, True]
    assert d.keys() == [] and d.get("b") is None
    assert d.free_space() < d.capacity()  # marked, not yet reclaimed
    d.flush_expired()
    assert d.free_space() == d.capacity()
    d.set("a", 3)
    d.flush_all()
    assert d.get("a") is None


# ---- get_keys ----


def test_get_keys(shost):
    d = shost.shared["meta"]
    for i in range(1500):
        d.set(f"k{i}", i)
    d.set("gone", 1, ttl=0.01)
    time.sleep(0.03)
    assert lua(shost, "return #d:get_keys(), #d:get_keys(0), #d:get_keys(3)") == [1024, 1500, 3]
    assert len(d.keys()) == 1024 and len(d.keys(1)) == 1
    every = d.keys(0)
    assert sorted(every) == sorted(f"k{i}" for i in range(1500))  # no expired, no repeats
    n, first, last = lua(shost, "local k = d:get_keys(10) return #k, k[1], k[10]")
    assert n == 10 and first != last and {first.decode(), last.decode()} <= set(every)


def test_get_keys_most_recently_used_first(make_host):
    shost = small_host(make_host, 1 << 20)  # on Redis the order is unspecified (SCAN)
    d = shost.shared["meta"]
    for i in range(20):
        d.set(f"k{i}", i)
    assert lua(shost, "local k = d:get_keys(2) return k[1], k[2]") == [b"k19", b"k18"]
    d.get("k0")  # now the most recently used
    assert d.keys(1) == ["k0"] and d.keys(3) == ["k0", "k19", "k18"]


def test_keys_with_binary_bytes(shost):
    d = shost.shared["meta"]
    d.set(b"\xff\x00k", 1)
    assert d.keys() == [b"\xff\x00k".decode("utf-8", "surrogateescape")]
    assert d.get(d.keys()[0]) == 1  # the str keys() gives finds the entry again
    assert lua(shost, "return d:get_keys()[1] == '\\255\\0k', d:get('\\255\\0k')") == [True, 1]


# ---- capacity, eviction, no memory ----


def test_capacity_and_free_space(make_host):
    host = small_host(make_host, 16384)
    d = host.shared["meta"]
    assert lua(host, "return d:capacity(), d:free_space()") == [16384, 16384]
    d.set("ab", "x" * 10)
    d.set("n", 1)
    used = (ENTRY + 2 + 10) + (ENTRY + 1)
    assert d.free_space() == 16384 - used
    assert lua(host, "return d:free_space()") == [16384 - used]
    st = host.stats()["shared"]["meta"]
    assert {k: st[k] for k in ("backend", "capacity", "free_space", "keys", "evictions")} == {
        "backend": "memory", "capacity": 16384, "free_space": 16384 - used, "keys": 2,
        "evictions": 0}
    assert [st[k] for k in REDIS_COUNTERS] == [0, 0, 0, 0, 0.0]


def _fill(d, n, size):
    for i in range(1, n + 1):
        assert d.set(f"k{i}", "v" * size) is False


def test_lru_eviction_order_and_forcible(make_host):
    host = small_host(make_host)
    d = host.shared["meta"]
    _fill(d, 7, 1000)  # 7 entries of 1098 bytes: 7686 of 8192
    assert d.get("k1") is not None  # k1 is now the most recently used; k2 the least
    got = lua(host, "return d:set('k8', string.rep('v', 1000))")
    assert got == [True, None, True]  # forcible: a live entry went
    assert "k2" not in d  # `in` does not count as a use
    assert all(f"k{i}" in d for i in (1, 3, 4, 5, 6, 7, 8))
    assert d.set("k9", "v" * 1000) is True
    assert "k3" not in d and "k1" in d  # the next least recently used
    assert host.stats()["shared"]["meta"]["evictions"] == 2


def test_expired_entries_make_room_before_live_ones(make_host):
    host = small_host(make_host)
    d = host.shared["meta"]
    _fill(d, 6, 1000)
    d.set("k7", "v" * 1000, ttl=0.02)
    d.get("k1")
    time.sleep(0.05)
    assert d.set("k8", "v" * 1000) is False  # not forcible: the expired k7 made room
    assert all(d.get(f"k{i}") is not None for i in range(1, 7))


def test_safe_set_and_safe_add_never_evict(make_host):
    host = small_host(make_host)
    d = host.shared["meta"]
    _fill(d, 7, 1000)
    assert lua(host, """
        local a = {d:safe_set('x', string.rep('v', 1000))}
        local b = {d:safe_add('y', string.rep('v', 1000))}
        return a[1], a[2], a[3], b[1], b[2]""") == [False, b"no memory", False, False, b"no memory"]
    with pytest.raises(hostscript.SharedDictFullError, match="no memory"):
        d.safe_set("x", "v" * 1000)
    with pytest.raises(hostscript.SharedDictFullError):
        d.safe_add("y", "v" * 1000)
    assert sorted(d.keys()) == sorted(f"k{i}" for i in range(1, 8))
    assert d.safe_set("k1", "small") is None  # replacing frees its own room
    assert d.safe_set("x", "v" * 500) is None
    assert host.stats()["shared"]["meta"]["evictions"] == 0


def test_safe_set_reclaims_expired_entries(make_host):
    host = small_host(make_host)
    d = host.shared["meta"]
    _fill(d, 7, 1000)
    d.expire("k3", 0.01)
    time.sleep(0.03)
    d.safe_set("x", "v" * 1000)
    assert d.get("x") is not None and d.get_stale("k3") is None


def test_an_entry_larger_than_the_capacity_fails_and_changes_nothing(make_host):
    host = small_host(make_host)
    d = host.shared["meta"]
    d.set("keep", 1)
    assert lua(host, "return d:set('big', string.rep('x', 8192))") == [False, b"no memory", False]
    with pytest.raises(hostscript.SharedDictFullError):
        d.set("big", b"x" * 8192)
    with pytest.raises(hostscript.SharedDictFullError):
        d.set("keep", b"x" * 8192)
    assert d.get("keep") == 1 and d.get("big") is None
    assert lua(host, "return d:set(string.rep('k', 65535), 1)") == [False, b"no memory", False]
    assert lua(host, "return d:incr(string.rep('k', 65535), 1, 0)") == [None, b"no memory"]
    assert d.free_space() == 8192 - (ENTRY + 4)


def test_replacing_a_key_with_a_bigger_value_evicts_others_not_itself(make_host):
    host = small_host(make_host)
    d = host.shared["meta"]
    _fill(d, 7, 1000)
    assert d.set("k1", "w" * 5000) is True
    assert d.get("k1") == b"w" * 5000
    assert len(d.keys(0)) < 7


# ---- bad arguments ----


def test_bad_keys_and_values_from_lua_give_nil_and_a_message(shost):
    assert lua(shost, """
        return select(2, d:get(nil)), select(2, d:get(5)), select(2, d:get("")),
               select(2, d:get(string.rep("k", 65536))), select(2, d:set("k", {})),
               select(2, d:set("k", print)), select(2, d:set(nil, 1)), select(2, d:incr({}, 1)),
               select(2, d:ttl("")), select(2, d:delete(true)), select(2, d:get_stale("")),
               select(2, d:add("", 1)), select(2, d:expire("", 1)), d:set("k", {}) == nil""") == [
        b"nil key", b"bad key type (a string is expected)", b"empty key", b"key too long",
        b"bad value type", b"bad value type", b"nil key", b"bad key type (a string is expected)",
        b"empty key", b"bad key type (a string is expected)", b"empty key", b"empty key",
        b"empty key", True]
    assert lua(shost, "return #d:get_keys()") == [0]


def test_a_key_of_the_maximum_length_works(shost):
    host = shost
    assert lua(host, """
        local k = string.rep("k", 65535)
        d:set(k, 1)
        return d:get(k)""") == [1]
    assert host.shared["meta"].get("k" * 65535) == 1


@pytest.mark.parametrize("call,message", [
    ("d:set('k', 1, -1)", "bad ttl"),
    ("d:set('k', 1, 0/0)", "bad ttl"),
    ("d:set('k', 1, 1/0)", "bad ttl"),
    ("d:set('k', 1, 'soon')", "bad ttl: a number of seconds expected"),
    ("d:set('k', 1, 0, -1)", "bad flags"),
    ("d:set('k', 1, 0, 2^32)", "bad flags"),
    ("d:set('k', 1, 0, 1.5)", "bad flags"),
    ("d:expire('k', -1)", "bad ttl"),
    ("d:expire('k')", "bad ttl"),
    ("d:incr('k', 'one')", "bad increment: a number expected, got string"),
    ("d:incr('k', 1, 'zero')", "bad init"),
    ("d:incr('k', 1, nil, 5)", "init_ttl"),
    ("d:incr('k', 1, 0, -5)", "bad init_ttl"),
    ("d:get_keys(-1)", "bad max"),
    ("d:flush_expired('all')", "bad max"),
    ("d.get('k')", "called with ':'"),
    ("d.set(hs.shared, 'k', 1)", "called with ':'"),
    ("hs.shared.meta.flush_all()", "called with ':'"),
])
def test_bad_number_arguments_and_calls_without_colon_raise(shost, call, message):
    assert message in lua_error(shost, call)


def test_bad_arguments_from_python(shost):
    d = shost.shared["meta"]
    with pytest.raises(hostscript.ArgumentTypeError):
        d.get(5)
    with pytest.raises(hostscript.UsageError, match="empty key"):
        d.get("")
    with pytest.raises(hostscript.UsageError, match="key too long"):
        d.set("k" * 65536, 1)
    with pytest.raises(hostscript.ArgumentTypeError, match="use delete"):
        d.set("k", None)
    with pytest.raises(hostscript.ArgumentTypeError):
        d.set("k", [1])
    with pytest.raises(hostscript.UsageError, match="64-bit"):
        d.set("k", 1 << 63)
    with pytest.raises(hostscript.UsageError):
        d.set("k", 1, ttl=-1)
    with pytest.raises(hostscript.UsageError):
        d.set("k", 1, ttl=float("nan"))
    with pytest.raises(hostscript.ArgumentTypeError):
        d.set("k", 1, ttl="1")
    with pytest.raises(hostscript.UsageError):
        d.set("k", 1, flags=1 << 32)
    with pytest.raises(hostscript.ArgumentTypeError):
        d.incr("k", "1")
    with pytest.raises(hostscript.UsageError, match="init_ttl"):
        d.incr("k", 1, init_ttl=5)
    with pytest.raises(hostscript.UsageError):
        d.keys(-1)
    assert d.keys() == []


# ---- the Python API ----


def test_mapping_conveniences(shost):
    d = shost.shared["meta"]
    d["a"] = "x"
    d[b"b"] = 2
    assert d["a"] == b"x" and d["b"] == 2 and "a" in d and b"b" in d and 5 not in d
    del d["a"]
    assert "a" not in d
    with pytest.raises(KeyError):
        d["a"]
    with pytest.raises(hostscript.SharedDictKeyError):
        del d["a"]
    with pytest.raises(TypeError):
        shost.shared["other"] = d
    assert repr(d) == "<hostscript.SharedDict 'meta'>" and d.name == "meta"


def test_a_dictionary_after_close_raises_closed_error(shost, request):
    host = shost
    d = host.shared["meta"]
    d.set("a", 1)
    host.close()
    for call in (lambda: d.get("a"), lambda: d.set("a", 2), lambda: d.incr("a"), d.keys,
                 d.flush_all, d.flush_expired, lambda: d.ttl("a"), lambda: "a" in d):
        with pytest.raises(hostscript.ClosedError):
            call()
    if d.backend == "redis":
        request.applymarker(pytest.mark.xfail(
            strict=True, reason="core bug: SharedDict.capacity()/free_space() of a Redis "
            "dictionary return None without checking the host (shared.py says a dictionary "
            "used after close raises ClosedError)"))
    for call in (d.capacity, d.free_space):
        with pytest.raises(hostscript.ClosedError):
            call()


def test_lua_and_python_see_the_same_entries(shost):
    d = shost.shared["meta"]
    d.set("from-py", "p", flags=1)
    lua(shost, "d:set('from-lua', 'l', 0, 2) d:incr('n', 5, 0)")
    assert d.get_with_flags("from-lua") == (b"l", 2)
    assert d.incr("n", 1) == 6
    assert lua(shost, "return d:get('from-py'), d:get('n')") == [b"p", 6]
    assert lua(shost, "return d:get('from-py')") == [b"p", 1]
    assert sorted(d.keys()) == ["from-lua", "from-py", "n"]


def test_every_state_sees_the_same_dictionary(shost):
    host = shost
    host.load(RUNNER % "return d:incr('n', 1, 0)", name="runner.lua")

    def fire():
        txn = Transaction()
        host.fire("read_request", txn)
        return txn.ctx["r"][0]["v"]

    seen = []
    for _ in range(4):
        t = threading.Thread(target=lambda: seen.append(fire()))
        t.start()
        t.join(30)
    assert sorted(seen) == [1, 2, 3, 4]
    assert host.stats()["states"] >= 1


# ---- the Redis backend: configuration, what differs, what other clients see ----


def fails_with_redis_error(fn):
    """The message of the SharedDictError FN raised: a backend failure, "redis: ..."."""
    with pytest.raises(hostscript.SharedDictError) as exc:
        fn()
    assert exc.type is hostscript.SharedDictError, exc.type  # neither Full nor KeyError
    assert exc.value.message.startswith("redis: "), exc.value.message
    return exc.value.message


def succeeds(fn):
    """Whether FN ran without a SharedDictError."""
    try:
        fn()
        return True
    except hostscript.SharedDictError:
        return False


def test_a_redis_url_makes_a_redis_dictionary(make_host, redis_server, redis_prefix):
    host = make_host(shared={
        "meta": redis_server.url(prefix=redis_prefix),
        "mapped": {"url": redis_server.url(prefix=redis_prefix + "m:"), "capacity": 8192},
        "mem": 1 << 16})
    assert [host.shared[n].backend for n in ("meta", "mapped", "mem")] == ["redis", "redis", "memory"]
    m = host.shared["mapped"]
    m.set("big", b"x" * 100_000)  # larger than the capacity, which a URL ignores
    assert m.get("big") == b"x" * 100_000
    assert lua(host, "return hs.shared.mapped:get('big') == string.rep('x', 100000), "
                     "hs.shared.mem:get('big')") == [True, None]
    assert redis_server.cmd("EXISTS", redis_prefix + "m:big") == 1
    assert redis_server.cmd("EXISTS", redis_prefix + "big") == 0


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:6379/0",
    "redis://127.0.0.1:notaport/0",
    "redis://127.0.0.1:70000/0",
    "redis://127.0.0.1:6379/db",
    "redis://127.0.0.1:6379/0?timeout=-1",
    "redis://127.0.0.1:6379/0?timeout=soon",
    "redis://127.0.0.1:6379/0?connect_timeout=nan",
    "redis://127.0.0.1:6379/0?max_reply=-5",
    "redis://127.0.0.1:6379/0?bogus=1",
])
def test_bad_redis_urls_are_usage_errors_naming_the_dictionary(make_host, url):
    with pytest.raises(hostscript.UsageError, match="meta"):
        make_host(shared={"meta": url})
    with pytest.raises(hostscript.UsageError, match="meta"):
        make_host(shared={"meta": {"url": url, "capacity": 1 << 16}})


def test_a_host_is_made_while_redis_is_down_and_works_once_it_is_up(make_host, own_redis):
    own_redis.kill()
    host = make_host(shared={"meta": own_redis.url(prefix="t:", timeout=0.2, connect_timeout=0.2)})
    d = host.shared["meta"]
    assert "refused" in fails_with_redis_error(lambda: d.get("k"))
    assert lua(host, "return d:get('k')")[1].startswith(b"redis: ")
    own_redis.start()
    assert wait_for(lambda: succeeds(lambda: d.set("k", 1)), 3)
    assert d.get("k") == 1 and own_redis.cmd("GET", "t:k") == b"1"


def test_keys_in_redis_are_the_prefix_then_the_key(rhost, redis_server, redis_prefix):
    d = rhost.shared["meta"]
    d.set("k", "v")
    d.set(b"\xff\x00bin", "v", ttl=10)
    lua(rhost, "d:set('from-lua', 1, 20)")
    raw = redis_server.scan_keys(redis_prefix.encode() + b"*")
    assert raw == sorted(redis_prefix.encode() + k for k in (b"k", b"\xff\x00bin", b"from-lua"))
    assert 9000 < redis_server.cmd("PTTL", redis_prefix.encode() + b"\xff\x00bin") <= 10000
    assert 19000 < redis_server.cmd("PTTL", redis_prefix + "from-lua") <= 20000
    assert redis_server.cmd("PTTL", redis_prefix + "k") == -1  # no ttl
    d.expire("k", 5)
    assert 4000 < redis_server.cmd("PTTL", redis_prefix + "k") <= 5000
    d.expire("k", 0)
    assert redis_server.cmd("PTTL", redis_prefix + "k") == -1
    d.delete("k")
    assert redis_server.cmd("EXISTS", redis_prefix + "k") == 0


def test_the_default_prefix_is_hs_name(make_host, redis_server, redis_prefix):
    name = "d" + redis_prefix.replace(":", "")  # a name of this test alone
    host = make_host(shared={name: redis_server.url()})
    host.shared[name].set("k", 7)
    assert redis_server.cmd("GET", f"hs:{name}:k") == b"7"
    assert lua(host, f"return hs.shared['{name}']:get('k')") == [7]


def test_the_url_selects_the_database(make_host, redis_server, redis_prefix):
    host = make_host(shared={"meta": redis_server.url(prefix=redis_prefix, db=3)})
    host.shared["meta"].set("k", 5)
    assert lua(host, "return d:get('k')") == [5]
    assert redis_server.cmd("GET", redis_prefix + "k", db=3) == b"5"
    assert redis_server.cmd("EXISTS", redis_prefix + "k") == 0  # not in db 0


@pytest.mark.parametrize("user", [None, "default"])
def test_a_password_in_the_url(make_host, own_redis, user):
    own_redis.cmd("CONFIG", "SET", "requirepass", "s3cret")
    own_redis.password = "s3cret"
    host = make_host(shared={
        "meta": own_redis.url(prefix="t:", password="s3cret", user=user),
        "anon": own_redis.url(prefix="a:", timeout=0.5)})
    host.shared["meta"].set("k", 1)
    assert lua(host, "return (d:incr('k', 1))") == [2]
    assert host.shared["meta"].incr("k", 1) == 3
    assert own_redis.cmd("GET", "t:k") in (b"3", b"\0n0:3")  # LuaJIT's incr: a double
    with pytest.raises(hostscript.SharedDictError, match="redis: ") as exc:
        host.shared["anon"].get("k")
    assert "NOAUTH" in exc.value.message or "auth" in exc.value.message.lower()


def test_ints_with_flags_0_are_plain_decimal_for_other_clients(rhost, redis_server, redis_prefix,
                                                              engine):
    d = rhost.shared["meta"]
    d.set("n", 5)
    d.set("neg", -3)
    d.set("max", (1 << 63) - 1)
    d.incr("counted", 1, init=41)
    lua(rhost, "d:set('from-lua', 12) d:incr('lua-counted', 1, 41)")
    get = [(k, redis_server.cmd("GET", redis_prefix + k)) for k in ("n", "neg", "max", "counted")]
    assert get == [("n", b"5"), ("neg", b"-3"), ("max", b"9223372036854775807"),
                   ("counted", b"42")]
    if engine == "lua54":  # LuaJIT's numbers are doubles: stored as numbers, tagged
        assert redis_server.cmd("GET", redis_prefix + "from-lua") == b"12"
        assert redis_server.cmd("GET", redis_prefix + "lua-counted") == b"42"
    # another client's INCRBY is what get reads, from Python and Lua, as an integer
    assert redis_server.cmd("INCRBY", redis_prefix + "n", 10) == 15
    assert d.get("n") == 15 and type(d.get("n")) is int
    int_t = "number" if engine == "luajit" else "integer"
    assert lua_typed(rhost, "return d:get('n')") == [(int_t, 15)]
    assert d.incr("n", 1) == 16 and redis_server.cmd("GET", redis_prefix + "n") == b"16"
    if engine == "lua54":  # (a LuaJIT increment is a double: so is the sum, tagged)
        assert lua_typed(rhost, "return (d:incr('n', 1))") == [("integer", 17)]
        assert redis_server.cmd("GET", redis_prefix + "n") == b"17"
    # a value another client wrote as a decimal reads as an integer too
    redis_server.cmd("SET", redis_prefix + "ext", "-77")
    assert d.get("ext") == -77 and d.incr("ext", 7) == -70


def test_other_values_are_tagged(rhost, redis_server, redis_prefix):
    d = rhost.shared["meta"]
    d.set("flagged", 5, flags=1)
    d.set("s", "5")  # a string, not a number: incr must refuse it
    d.set("f", 1.5)
    d.set("b", True)
    d.set("e", "")
    for k in ("flagged", "s", "f", "b", "e"):
        raw = redis_server.cmd("GET", redis_prefix + k)
        assert raw[:1] == b"\0", (k, raw)
    assert d.get_with_flags("flagged") == (5, 1) and d.get("s") == b"5" and d.get("e") == b""
    with pytest.raises(hostscript.SharedDictError, match="not a number"):
        d.incr("s", 1)
    assert d.incr("flagged", 1) == 6 and d.get_with_flags("flagged") == (6, 1)


def test_capacity_is_none_and_set_is_never_forcible_on_redis(rhost):
    d = rhost.shared["meta"]
    assert d.capacity() is None and d.free_space() is None
    for call in ("d:capacity()", "d:free_space()"):
        none, message = lua(rhost, "return " + call)
        assert none is None and message.startswith(b"redis: no capacity"), message
    assert d.set("k", "v" * 10_000) is False
    assert lua(rhost, "return d:set('k2', string.rep('v', 10000))") == [True, None, False]
    assert lua(rhost, "return d:incr('c', 1, 0)") == [1, None, False]
    st = rhost.stats()["shared"]["meta"]
    assert st["backend"] == "redis"


def test_ttls_expire_on_redis(rhost):
    d = rhost.shared["meta"]
    d.set("py", "v", ttl=0.05)
    assert lua(rhost, "return d:set('lua', 'v', 0.05, 3), d:incr('n', 1, 0, 0.05)") == \
        [True, 1, None, False]
    assert "py" in d and d.get_with_flags("lua") == (b"v", 3) and 0 < d.ttl("n") <= 0.05
    time.sleep(0.12)
    assert d.get("py") is None and "lua" not in d and d.ttl("n") is None
    assert lua(rhost, "return d:get('lua'), d:ttl('py'), d:incr('n', 1)") == \
        [None, None, None, b"not found"]
    assert d.keys(0) == []


def test_get_stale_on_redis_never_returns_expired_entries(rhost):
    d = rhost.shared["meta"]
    d.set("k", "v", ttl=0.05, flags=7)
    assert d.get_stale("k") == (b"v", 7, False)
    assert lua(rhost, "return d:get_stale('k')") == [b"v", 7, False]
    time.sleep(0.12)
    assert d.get_stale("k") is None
    assert lua(rhost, "return d:get_stale('k')") == [None]


def test_flush_all_on_redis_deletes_only_the_prefix(make_host, redis_server, redis_prefix):
    # a prefix with glob characters: SCAN MATCH must escape them, else the pattern
    # "a*[b]:*" matches "aXYZb:k" too
    prefix = redis_prefix + "a*[b]:"
    host = make_host(shared={"meta": redis_server.url(prefix=prefix)})
    d = host.shared["meta"]
    outside = [redis_prefix + "aXYZb:k", redis_prefix + "ab:k", redis_prefix + "a*b:k",
               redis_prefix + "a*[b]", "other:k"]
    for k in outside:
        redis_server.cmd("SET", k, "keep")
    for i in range(2500):  # more than one SCAN batch
        d.set(f"k{i}", i)
    assert len(d.keys(0)) == 2500  # keys() lists only the prefix's keys, without it
    assert sorted(d.keys(0)) == sorted(f"k{i}" for i in range(2500))
    assert lua(host, "d:flush_all() return d:get('k1'), #d:get_keys(0), d:flush_expired()") == \
        [None, 0, 0]
    assert redis_server.cmd("EXISTS", *[prefix + f"k{i}" for i in range(2500)]) == 0
    assert [redis_server.cmd("GET", k) for k in outside] == [b"keep"] * len(outside)
    d.set("again", 1)
    d.flush_all()
    assert d.get("again") is None and d.flush_expired() == 0
    assert redis_server.cmd("DEL", *outside) == len(outside)


def test_two_hosts_on_one_redis_url_share_entries_with_their_types(make_host, redis_server,
                                                                   redis_prefix, engine):
    # two hosts stand for two processes; the other one runs the other engine too
    url = redis_server.url(prefix=redis_prefix)
    other = "lua54" if engine == "luajit" else "luajit"
    a = make_host(shared={"meta": url}, engine=other)
    b = make_host(shared={"meta": url})
    da = a.shared["meta"]
    da.set("s", b"a\0b")
    da.set("i", -7)
    da.set("f", 0.25)
    da.set("t", False)
    da.set("fl", "x", flags=9)
    int_t = "number" if engine == "luajit" else "integer"
    float_t = "number" if engine == "luajit" else "float"
    assert lua_typed(b, """
        return d:get("s"), d:get("i"), d:get("f"), d:get("t"), d:get("fl")""") == [
        ("string", b"a\0b"), (int_t, -7), (float_t, 0.25), ("boolean", False), ("string", b"x"),
        (int_t, 9)]
    lua(b, r"""d:set("ls", "l\0") d:set("li", 3) d:set("lf", 2.5) d:set("lt", true)
               d:set("lfl", "y", 0, 4) d:incr("i", 10)""")
    assert (da.get("ls"), da.get("li"), da.get("lf"), da.get("lt"), da.get_with_flags("lfl"),
            da.get("i")) == (b"l\0", 3, 2.5, True, (b"y", 4), 3)
    assert type(da.get("lf")) is float and type(da.get("lt")) is bool
    assert lua(a, "return d:get('lf'), d:get('ls')") == [2.5, b"l\0"]


# ---- threads ----


INCR = """
local C = {}
function C:on_read_request(txn)
    local d = hs.shared.meta
    for _ = 1, %d do d:incr("hits", 1, 0) end
end
return C
"""


@pytest.mark.parametrize("per_fire", [1, 1000])
def test_8_threads_of_lua_incr_count_exactly(make_host, per_fire):
    # one incr per fire: fires this short keep the GIL, so threads take turns; a
    # thousand per fire under a time limit: the count hook lets go of the GIL once a
    # fire runs 50 us, and the threads' Lua runs at the same time
    host = make_host(shared={"meta": 1 << 16}, time_limit=30 if per_fire > 1 else None)
    host.load(INCR % per_fire, name="incr.lua")
    n, per = 8, 10_000
    errors = []

    def worker():
        txn = Transaction()
        for _ in range(per // per_fire):
            out = host.fire("read_request", txn)
            if out.status is not Status.CONTINUE:
                errors.append(out.error)
                return

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads) and not errors
    assert host.shared["meta"].get("hits") == n * per
    if per_fire > 1:
        assert host.stats()["releases"] > 0  # Lua ran without the GIL, in parallel


def test_lua_and_python_threads_incr_the_same_key(make_host):
    host = make_host(shared={"meta": 1 << 16})
    host.load(INCR % 1, name="incr.lua")
    d = host.shared["meta"]
    per = 5_000

    def lua_worker():
        txn = Transaction()
        for _ in range(per):
            host.fire("read_request", txn)

    def py_worker():
        for _ in range(per):
            d.incr("hits", 1, init=0)

    threads = [threading.Thread(target=f) for f in (lua_worker, py_worker) * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert d.get("hits") == 8 * per


# ---- hostile scripts ----


@pytest.mark.parametrize("sandbox", [True, False])
def test_scripts_cannot_change_hs_shared_or_a_dictionarys_methods(make_host, sandbox):
    host = make_host(shared={"meta": 1 << 16}, sandbox=sandbox)
    for attack in (
        "hs.shared.meta = {}",
        "hs.shared.other = hs.shared.meta",
        "d.get = function() return 'evil' end",
        "d.set = nil",
        "rawset(hs.shared, 'meta', {})",
        "rawset(d, 'get', print)",
        "setmetatable(d, {})",
        "setmetatable(hs.shared, {})",
        "getmetatable(d).__index.get = print",
        "getmetatable(hs.shared).__index.meta = {}",
    ):
        lua_error(host, attack)
    assert lua(host, "return getmetatable(d), getmetatable(hs.shared)") == \
        [b"shared dictionary", b"hs.shared"]
    host.shared["meta"].set("k", "v")
    assert lua(host, "return d:get('k'), hs.shared.meta == d, type(d.get)") == \
        [b"v", True, b"function"]


# ---- memory limits ----


MEMORY_CHILD = r"""
import json, logging, os, sys, threading
import hostscript
logging.disable(logging.CRITICAL)
engine, read, runner = sys.argv[1], sys.argv[2], sys.argv[3]
host = hostscript.Host(["read_request"], engine=engine, shared={"meta": 32 << 20},
                       memory_limit=2 << 20)
d = host.shared["meta"]
if read in ("get", "get_stale"):
    d.set("big", b"x" * (12 << 20))
    body = "return #d:%s('big')" % read
elif read == "get_keys_buffer":  # the keys alone pass the limit
    for i in range(60000):
        d.set("%040d" % i, 1)
    body = "return #d:get_keys(0)"
else:  # the keys fit; the Lua strings and table made of them do not
    for i in range(100000):
        d.set("%06d" % i, 1)
    body = "return #d:get_keys(0)"

def in_thread(what, fn):
    # a call stuck on a lock it cannot get fails here after 10 s if it let go of the
    # GIL (Python's calls do), else the parent's timeout catches the frozen process
    box = {}
    t = threading.Thread(target=lambda: box.update(r=fn()), daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():
        print(json.dumps({"stuck": what}), flush=True)
        os._exit(3)
    return box["r"]

def fire(src):
    host.load(runner % src, name="runner.lua")
    txn = hostscript.Transaction()
    out = host.fire("read_request", txn)
    return out.status.name, out.error.kind if out.error else None, txn.ctx

res = {}
res["failed"] = in_thread("the failing fire", lambda: fire(body))[:2]
res["python"] = in_thread("Python's incr", lambda: d.incr("after", 1, init=0))
res["keys"] = in_thread("Python's keys", lambda: d.keys(1))
status, _, ctx = in_thread("a Lua fire on another thread",
                           lambda: fire("d:set('after', 1) return d:incr('after', 1), d:get_stale('after')"))
res["lua"] = [status] + [r.get("v") for r in ctx.get("r", [])]
status, _, ctx = fire("return d:incr('after', 1)")  # the thread whose fire failed, too
res["same_thread"] = [status, ctx["r"][0]["v"]]
print(json.dumps(res))
"""


@pytest.mark.parametrize("read", ["get", "get_stale", "get_keys_buffer", "get_keys_table"])
def test_memory_limit_while_reading_leaves_the_dictionary_usable(engine, read):
    # in a subprocess: a lock left held would freeze a fire that holds the GIL
    try:
        proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, engine, read, RUNNER],
                              capture_output=True, text=True, timeout=90, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail("the process froze: a dictionary lock was left held")
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stdout} {proc.stderr[-3000:]}"
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["failed"] == ["ERROR", "memory"], res
    assert res["python"] == 1 and res["keys"] == ["after"], res
    assert res["lua"] == ["CONTINUE", 2, 2, None, False], res
    assert res["same_thread"] == ["CONTINUE", 3], res


# ---- the C API from C, under threads ----


def test_c_program_hammers_one_dictionary_from_8_threads(engine, tmp_path):
    exe = build_c_program(engine, "shared_stress.c", tmp_path / f"shared_stress_{engine}",
                          "-O1", "-g")
    proc = subprocess.run([str(exe), "20000"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.startswith("ok"), proc.stdout + proc.stderr[-2000:]
