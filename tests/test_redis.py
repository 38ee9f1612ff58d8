"""hs.redis(NAME) — the Redis connection of a Redis-backed shared dictionary, in Lua
handlers: the reply mapping, pipelines, the commands refused on a pooled
connection; and the Redis backend under load and failure: threads of two hosts
counting on one key, Redis killed and restarted mid-traffic, paused (timeouts), the
GIL while a handler waits, replies over the bound, and Redis out of memory.

The dictionary semantics on Redis are in test_shared.py (its `shost` runs on both
backends); tests/redis_server.py starts the servers."""
from __future__ import annotations

import threading
import time

import pytest
from helpers import Heartbeat, wait_for
from redis_server import RedisReplyError
from test_shared import (
    RUNNER,
    fails_with_redis_error,
    lua,
    lua_error,
    lua_typed,
    succeeds,
)

import hostscript
from hostscript import Status, Transaction

FAST = {"timeout": 0.2, "connect_timeout": 0.2}  # the failure tests' URL options


def deep(v):
    """A reply as Python got it through txn.ctx, normalized: strings as bytes, an
    empty table (which ctx decodes as {}) as []."""
    if isinstance(v, str):
        return v.encode()
    if isinstance(v, list):
        return [deep(x) for x in v]
    if isinstance(v, dict):
        return [] if not v else {k: deep(x) for k, x in v.items()}
    return v


def int_type(engine):
    return "number" if engine == "luajit" else "integer"


# ---- the reply mapping ----


def test_scalar_replies(rhost, engine):
    got = lua_typed(rhost, r"""
        local r = hs.redis("meta")
        local p = r.prefix
        r:call("SET", p .. "s", "hello")
        r:call("SET", p .. "e", "")
        r:call("SET", p .. "b", "a\0b\255")
        r:call("RPUSH", p .. "l", "x")
        return r:call("INCRBY", p .. "n", 41),  -- integer
               r:call("DECRBY", p .. "m", 5),   -- a negative one
               r:call("GET", p .. "s"),         -- bulk string
               r:call("GET", p .. "e"),         -- empty bulk
               r:call("GET", p .. "b"),         -- binary bulk
               r:call("PING"),                  -- status
               r:call("TYPE", p .. "l"),        -- status
               r:call("SET", p .. "x", "y"),    -- status
               r:call("GET", p .. "missing"),   -- nil bulk
               select(2, r:call("GET", p .. "missing")) == nil""")
    int_t = int_type(engine)
    assert got == [(int_t, 41), (int_t, -5), ("string", b"hello"), ("string", b""),
                   ("string", b"a\0b\xff"), ("string", b"PONG"), ("string", b"list"),
                   ("string", b"OK"), ("nil", None), ("boolean", True)]


def test_array_replies(rhost, redis_server, redis_prefix):
    redis_server.cmd("SET", redis_prefix + "s", "hello")
    redis_server.cmd("RPUSH", redis_prefix + "l", "x", b"\0y", "")
    got = lua(rhost, r"""
        local r = hs.redis("meta")
        local p = r.prefix
        local empty = r:call("LRANGE", p .. "nope", 0, -1)
        local mget = r:call("MGET", p .. "s", p .. "missing", p .. "s")
        return r:call("LRANGE", p .. "l", 0, -1), mget, #mget,
               r:call("EVAL", "return {1, false, {2, 'x', false, {}}, 'y', -3}", 0),
               type(empty), next(empty) == nil""")
    assert [deep(v) for v in got] == [
        [b"x", b"\0y", b""], [b"hello", False, b"hello"], 3,
        [1, False, [2, b"x", False, []], b"y", -3], b"table", True]


def test_a_scan_reply_nests_an_array(rhost, redis_server, redis_prefix):
    for i in range(3):
        redis_server.cmd("SET", f"{redis_prefix}k{i}", i)
    got = lua(rhost, """
        local r = hs.redis("meta")
        local cursor, seen = "0", {}
        repeat
            local reply = r:call("SCAN", cursor, "MATCH", r.prefix .. "*", "COUNT", 1000)
            cursor = reply[1]
            for _, k in ipairs(reply[2]) do seen[#seen + 1] = k end
        until cursor == "0"
        table.sort(seen)
        return seen""")
    assert deep(got) == [[f"{redis_prefix}k{i}".encode() for i in range(3)]]


def test_big_integers(rhost, engine):
    if engine == "lua54":
        assert lua_typed(rhost, """
            local r = hs.redis("meta")
            return r:call("INCRBY", r.prefix .. "n", (1 << 62) + 1), r:call("GET", r.prefix .. "n")""") \
            == [("integer", (1 << 62) + 1), ("string", b"4611686018427387905")]
    else:  # 2^53 is still exact in a double, and printed as an integer
        assert lua(rhost, """
            local r = hs.redis("meta")
            return r:call("INCRBY", r.prefix .. "n", 2^53), r:call("GET", r.prefix .. "n")""") \
            == [2 ** 53, b"9007199254740992"]


def test_error_replies_are_nil_and_the_servers_message(rhost):
    got = lua(rhost, """
        local r = hs.redis("meta")
        local p = r.prefix
        r:call("SET", p .. "s", "hello")
        r:call("RPUSH", p .. "l", "x")
        local a, ea = r:call("INCR", p .. "s")
        local b, eb = r:call("GET", p .. "l")
        local c, ec = r:call("NOSUCHCMD", "arg")
        local d, ed = r:call("GET")
        return a, ea, b, eb, c, ec, d, ed, r:call("GET", p .. "s")""")
    assert got == [
        None, b"ERR value is not an integer or out of range",
        None, b"WRONGTYPE Operation against a key holding the wrong kind of value",
        None, b"ERR unknown command 'NOSUCHCMD', with args beginning with: 'arg' ",
        None, b"ERR wrong number of arguments for 'get' command",
        b"hello"]  # and the connection is still in step


def test_number_arguments_are_printed_as_redis_reads_them(rhost):
    assert lua(rhost, """
        local r = hs.redis("meta")
        local p = r.prefix
        r:call("SET", p .. "i", 42)
        r:call("SET", p .. "neg", -7)
        r:call("SET", p .. "f", 1.5)
        r:call("SET", p .. "z", 0)
        return r:call("GET", p .. "i"), r:call("GET", p .. "neg"), r:call("GET", p .. "f"),
               r:call("GET", p .. "z"), r:call("INCRBY", p .. "i", 8),
               r:call("LRANGE", p .. "nope", 0, -1)[1]""") == [b"42", b"-7", b"1.5", b"0", 50, None]


# ---- pipelines ----


def test_a_pipeline_keeps_the_order_of_mixed_replies(rhost):
    got = lua(rhost, """
        local r = hs.redis("meta")
        local k, missing = r.prefix .. "a", r.prefix .. "missing"
        local res = r:pipeline(function(p)
            p:call("SET", k, "1")
            p:call("INCR", k)
            p:call("LPUSH", k, "x")  -- an error reply, in the middle
            p:call("GET", missing)
            p:call("GET", k)
            p:call("MGET", k, missing)
            p:call("PING")
        end)
        return res.n, #res, res[1], res[2], type(res[3]), res[3].err, res[4], res[5], res[6],
               res[7], r:call("GET", k)""")
    assert [deep(v) for v in got] == [
        7, 7, b"OK", 2, b"table", b"WRONGTYPE Operation against a key holding the wrong kind of value",
        False, b"2", [b"2", False], b"PONG", b"2"]


def test_a_pipeline_of_1000_commands(rhost, redis_server, redis_prefix):
    assert lua(rhost, """
        local r = hs.redis("meta")
        local k = r.prefix .. "n"
        local incrs = r:pipeline(function(p) for _ = 1, 1000 do p:call("INCR", k) end end)
        local echoes = r:pipeline(function(p) for i = 1, 1000 do p:call("ECHO", "v" .. i) end end)
        local wrong = 0
        for i = 1, 1000 do
            if incrs[i] ~= i then wrong = wrong + 1 end
            if echoes[i] ~= "v" .. i then wrong = wrong + 1 end
        end
        return incrs.n, echoes.n, #incrs, wrong, r:call("GET", k)""") == [1000, 1000, 1000, 0, b"1000"]
    assert redis_server.cmd("GET", redis_prefix + "n") == b"1000"


def test_an_empty_pipeline_is_an_empty_table(rhost):
    assert lua(rhost, """
        local r = hs.redis("meta")
        local res, err = r:pipeline(function(p) end)
        return type(res), res[1], #res, res.n == nil or res.n == 0, err, r:call("PING")""") == \
        [b"table", None, 0, True, None, b"PONG"]


def test_a_pipeline_sent_takes_no_more_commands(rhost):
    assert "sent already" in lua_error(rhost, """
        local r, kept = hs.redis("meta"), nil
        r:pipeline(function(p) kept = p p:call("PING") end)
        kept:call("PING")""")
    # an error in the function sends nothing
    assert "boom" in lua_error(rhost, """
        local r = hs.redis("meta")
        r:pipeline(function(p) p:call("SET", r.prefix .. "k", "v") error("boom") end)""")
    assert lua(rhost, 'local r = hs.redis("meta") return r:call("EXISTS", r.prefix .. "k")') == [0]


# ---- what hs.redis refuses ----


REFUSED = ["SELECT", "auth", "Hello", "QUIT", "reset", "MULTI", "exec", "Discard", "WATCH",
           "unwatch", "SUBSCRIBE", "psubscribe", "SSubscribe", "UNSUBSCRIBE", "punsubscribe",
           "sunsubscribe", "monitor", "SYNC", "psync", "client", "SHUTDOWN", "Debug", "config",
           "FLUSHALL", "flushdb", "REPLICAOF", "slaveof", "ACL", "module", "SAVE", "bgsave",
           "BGREWRITEAOF", "failover", "CLUSTER"]


@pytest.mark.parametrize("command", REFUSED)
def test_commands_that_change_the_connection_or_the_server_are_refused(rhost, redis_server,
                                                                      redis_prefix, command):
    redis_server.cmd("SET", redis_prefix + "k", "v")
    assert "not allowed" in lua_error(rhost, f'hs.redis("meta"):call("{command}", "1")')
    assert "not allowed" in lua_error(
        rhost, f'hs.redis("meta"):pipeline(function(p) p:call("PING") p:call("{command}", "1") end)')
    # nothing reached the server: the key and the connection's database are as they were
    assert redis_server.cmd("GET", redis_prefix + "k") == b"v"
    assert lua(rhost, 'local r = hs.redis("meta") return r:call("GET", r.prefix .. "k")') == [b"v"]


@pytest.mark.parametrize("call", [
    'r:call("GET", {})',
    'r:call("SET", r.prefix .. "k", true)',
    'r:call("SET", r.prefix .. "k", print)',
    'r:call("SET", nil, "v")',
    'r:call({})',
    'r:call()',
    'r.call("PING")',
    'r:pipeline()',
    'r:pipeline("PING")',
    'r:pipeline(function(p) p:call("GET", {}) end)',
])
def test_bad_arguments_raise(rhost, redis_server, redis_prefix, call):
    assert lua_error(rhost, f'local r = hs.redis("meta") {call}')
    assert redis_server.cmd("EXISTS", redis_prefix + "k") == 0


def test_hs_redis_needs_a_redis_dictionary_of_that_name(make_host, redis_server, redis_prefix):
    host = make_host(shared={"meta": redis_server.url(prefix=redis_prefix), "mem": 1 << 16})
    assert "nope" in lua_error(host, 'hs.redis("nope")')
    assert "mem" in lua_error(host, 'hs.redis("mem")')  # in process: no connection
    lua_error(host, "hs.redis()")
    lua_error(host, "hs.redis({})")
    assert lua(host, 'return type(hs.redis("meta"))') != [b"nil"]


def test_prefix_is_the_dictionarys(make_host, redis_server, redis_prefix):
    name = "d" + redis_prefix.replace(":", "")
    host = make_host(shared={"meta": redis_server.url(prefix=redis_prefix),
                             name: redis_server.url()})
    assert lua(host, f'return hs.redis("meta").prefix, hs.redis("{name}").prefix') == \
        [redis_prefix.encode(), f"hs:{name}:".encode()]
    # the client and the dictionary see the same keys
    d = host.shared["meta"]
    d.set("from-dict", "x")
    assert lua(host, """
        local r = hs.redis("meta")
        r:call("SET", r.prefix .. "from-call", 5)
        return r:call("EXISTS", r.prefix .. "from-dict")""") == [1]
    assert d.get("from-call") == 5


# ---- many threads, two hosts, one key ----


COUNT = """
local C = {}
function C:on_read_request(txn)
    local d, r = hs.shared.meta, hs.redis("meta")
    for _ = 1, %d do
        local v, err = %s
        if not v then error(err) end
    end
end
return C
"""
OPS = {"incr": 'd:incr("hits", 1, 0)',
       "INCRBY": 'r:call("INCRBY", r.prefix .. "hits", 1)'}


@pytest.mark.parametrize("op,per_fire", [("incr", 1), ("incr", 250), ("INCRBY", 250)])
def test_8_threads_on_each_of_2_hosts_count_exactly(make_host, redis_server, redis_prefix, engine,
                                                    op, per_fire):
    # two hosts (standing for two processes, one on each engine) on one URL
    url = redis_server.url(prefix=redis_prefix)
    other = "lua54" if engine == "luajit" else "luajit"
    hosts = [make_host(shared={"meta": url}), make_host(shared={"meta": url}, engine=other)]
    for h in hosts:
        h.load(COUNT % (per_fire, OPS[op]), name="count.lua")
    threads_per_host, per_thread = 8, 2000
    errors = []

    def worker(host):
        txn = Transaction()
        try:
            for _ in range(per_thread // per_fire):
                out = host.fire("read_request", txn)
                if out.status is not Status.CONTINUE:
                    errors.append(out.error.message)
                    return
        except BaseException as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(h,)) for h in hosts
               for _ in range(threads_per_host)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads) and not errors, errors[:3]
    total = 2 * threads_per_host * per_thread
    if op == "INCRBY":
        assert redis_server.cmd("GET", redis_prefix + "hits") == str(total).encode()
    assert hosts[0].shared["meta"].get("hits") == total == hosts[1].shared["meta"].get("hits")


# ---- failures: Redis killed, restarted, paused ----


MIXED = """
local C = {}
local n = 0
function C:on_read_request(txn)
    local d = hs.shared.meta
    n = n + 1
    local v, err
    if n % 2 == 0 then v, err = d:incr("n", 1, 0) else v, err = d:get("n") end
    txn.ctx.err = err or false
end
return C
"""


def test_redis_killed_mid_traffic_then_restarted(make_host, own_redis, engine):
    timeout = FAST["timeout"]
    host = make_host(shared={"meta": own_redis.url(prefix="t:", **FAST)})
    host.load(MIXED, name="mixed.lua")
    d = host.shared["meta"]
    stop = threading.Event()
    fires = {i: [] for i in range(4)}  # thread -> [(start, seconds, error or False)]
    py_calls = []  # (start, error message or None)
    escaped = []

    def lua_worker(i):
        txn = Transaction()
        try:
            while not stop.is_set():
                t0 = time.monotonic()
                out = host.fire("read_request", txn)
                dt = time.monotonic() - t0
                if out.status is not Status.CONTINUE:
                    escaped.append(out.error.message)
                    return
                fires[i].append((t0, dt, txn.ctx["err"]))
                time.sleep(0.001)
        except BaseException as exc:
            escaped.append(repr(exc))

    def py_worker():
        try:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    d.incr("p", 1, init=0)
                    py_calls.append((t0, None))
                except hostscript.SharedDictError as exc:
                    py_calls.append((t0, exc.message))
                time.sleep(0.001)
        except BaseException as exc:
            escaped.append(repr(exc))

    threads = [threading.Thread(target=lua_worker, args=(i,)) for i in fires]
    threads.append(threading.Thread(target=py_worker))
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        t_kill = time.monotonic()
        own_redis.kill()
        time.sleep(0.6)
        own_redis.start()
        t_up = time.monotonic()
        # every thread succeeds again, on the same Host objects
        recovered = wait_for(lambda: all(any(t0 > t_up and not err for t0, _, err in f)
                                         for f in fires.values())
                             and any(t0 > t_up and err is None for t0, err in py_calls), 2.5)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not any(t.is_alive() for t in threads), "a thread wedged"
    assert not escaped, escaped[:3]
    every = [r for f in fires.values() for r in f]
    assert all(not err for t0, _, err in every if t0 < t_kill - 0.05)  # fine before
    failed = [err for _, _, err in every if err]
    assert failed and all(err.startswith("redis: ") for err in failed), set(failed)
    py_failed = [err for _, err in py_calls if err]
    assert py_failed and all(err.startswith("redis: ") for err in py_failed), set(py_failed)
    slowest = max(dt for _, dt, _ in every)
    assert slowest < timeout + 0.5, f"a fire took {slowest:.3f} s"
    assert recovered, "calls did not succeed again within 2.5 s of the restart"
    first_ok = max(min(t0 for t0, _, err in f if t0 > t_up and not err) for f in fires.values())
    assert first_ok - t_up < 2.0
    st = host.stats()["shared"]["meta"]
    assert st["errors"] > 0 and st["reconnects"] > 0, st
    # (the restarted server is empty, and a thread's first success may have been a get)
    assert d.incr("n", 1, init=0) >= 1 and lua(host, "return d:incr('n', 1) > 1") == [True]


def test_a_restart_while_idle_costs_no_failed_call(make_host, own_redis):
    host = make_host(shared={"meta": own_redis.url(prefix="t:", timeout=1)})
    d = host.shared["meta"]
    # 8 calls at once while the server holds its clients: 8 connections in the pool
    own_redis.cmd("CLIENT", "PAUSE", 300)
    threads = [threading.Thread(target=d.get, args=("k",)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    clients = own_redis.cmd("CLIENT", "LIST").count(b"\n") - 1  # less the raw client
    assert clients >= 8, clients
    own_redis.kill()
    own_redis.start()
    for i in range(10):  # the idle connections are dead: each is dropped before use
        d.set("k", i)
    assert d.get("k") == 9
    st = host.stats()["shared"]["meta"]
    assert st["errors"] == 0 and st["reconnects"] >= 1, st


def test_every_method_fails_with_a_redis_message_while_redis_is_down(make_host, own_redis):
    host = make_host(shared={"meta": own_redis.url(prefix="t:", **FAST)})
    d = host.shared["meta"]
    d.set("k", 1)
    own_redis.kill()
    for fn in (lambda: d.get("k"), lambda: d.get_with_flags("k"), lambda: d.get_stale("k"),
               lambda: d.set("k", 2), lambda: d.safe_set("k", 2), lambda: d.add("n", 1),
               lambda: d.safe_add("n", 1), lambda: d.replace("k", 2), lambda: d.delete("k"),
               lambda: d.incr("k", 1), lambda: d.incr("n", 1, init=0), lambda: d.ttl("k"),
               lambda: d.expire("k", 1), lambda: d.keys(), lambda: "k" in d, lambda: d["k"],
               d.flush_all):
        fails_with_redis_error(fn)
    got = deep(lua(host, """
        local r = hs.redis("meta")
        local calls = {
            get = function() return d:get("k") end,
            get_stale = function() return d:get_stale("k") end,
            set = function() return d:set("k", 2) end,
            safe_set = function() return d:safe_set("k", 2) end,
            add = function() return d:add("n", 1) end,
            safe_add = function() return d:safe_add("n", 1) end,
            replace = function() return d:replace("k", 2) end,
            delete = function() return d:delete("k") end,
            incr = function() return d:incr("k", 1, 0) end,
            ttl = function() return d:ttl("k") end,
            expire = function() return d:expire("k", 1) end,
            get_keys = function() return d:get_keys() end,
            flush_all = function() return d:flush_all() end,
            call = function() return r:call("PING") end,
            pipeline = function() return r:pipeline(function(p) p:call("PING") end) end,
        }
        local out = {}
        for name, f in pairs(calls) do
            local a, b, c = f()
            out[name] = {not a, b or "(none)", c == nil or c == false}
        end
        return out""")[0])
    assert len(got) == 15
    bad = {name: r for name, r in got.items()
           if not (r[0] is True and r[1].startswith(b"redis: ") and r[2] is True)}
    assert not bad, bad
    # capacity has no Redis call to fail
    none, message = lua(host, "return d:capacity()")
    assert none is None and message.startswith(b"redis: no capacity")


def test_while_connecting_fails_calls_fail_at_once_then_recover(make_host, own_redis):
    host = make_host(shared={"meta": own_redis.url(prefix="t:", **FAST)})
    d = host.shared["meta"]
    d.set("k", 1)
    own_redis.kill()
    messages, slowest = [], 0.0
    end = time.monotonic() + 1.6  # the back-off grows to 800 ms meanwhile
    while time.monotonic() < end:
        t0 = time.monotonic()
        messages.append(fails_with_redis_error(lambda: d.get("k")))
        slowest = max(slowest, time.monotonic() - t0)
        time.sleep(0.005)
    assert slowest < 0.1, f"a call took {slowest:.3f} s"
    # after the first failures (the connection lost) every call gives the last reason
    assert all("refused" in m for m in messages[3:]), set(messages)
    assert any(m.endswith("(reconnecting)") for m in messages), set(messages)
    own_redis.start()
    t_up = time.monotonic()
    assert wait_for(lambda: succeeds(lambda: d.get("k")), 2.0)
    assert time.monotonic() - t_up < 1.5  # within the 1 s back-off and a margin


def test_a_paused_redis_times_out_and_late_replies_are_not_taken(make_host, own_redis):
    timeout = FAST["timeout"]
    host = make_host(shared={"meta": own_redis.url(prefix="t:", **FAST)})
    d = host.shared["meta"]
    d.set("a", "A")
    d.set("b", "B")
    own_redis.pause()
    try:
        t0 = time.monotonic()
        assert lua(host, "return d:get('a')") == [None, b"redis: timeout"]
        waited = time.monotonic() - t0
        assert timeout * 0.9 < waited < timeout + 0.5, waited
        for fn in (lambda: d.get("a"), lambda: d.set("c", 1)):
            t0 = time.monotonic()
            assert fails_with_redis_error(fn) == "redis: timeout"
            assert time.monotonic() - t0 < timeout + 0.5
        assert lua(host, """
            local r = hs.redis("meta")
            local v, err = r:call("GET", r.prefix .. "a")
            return v, err, r:pipeline(function(p) p:call("GET", r.prefix .. "b") end)""") == \
            [None, b"redis: timeout", None, b"redis: timeout"]
    finally:
        own_redis.resume()
    # the commands sent before are answered now: no reply may be taken for another's
    assert wait_for(lambda: succeeds(lambda: d.get("b")), 2.5)
    assert [d.get("b"), d.get("a")] == [b"B", b"A"]
    assert lua(host, """
        local r = hs.redis("meta")
        return d:get("b"), d:get("a"), r:call("ECHO", "e"), r:call("ECHO", "f")""") == \
        [b"B", b"A", b"e", b"f"]
    st = host.stats()["shared"]["meta"]
    assert st["timeouts"] > 0 and st["errors"] >= st["timeouts"], st


def test_stats_of_a_redis_dictionary(make_host, own_redis):
    host = make_host(shared={"meta": own_redis.url(prefix="t:", **FAST), "mem": 1 << 16})
    st = host.stats()["shared"]
    assert st["meta"]["backend"] == "redis" and st["mem"]["backend"] == "memory"
    counters = ("calls", "errors", "timeouts", "reconnects")
    assert [st["meta"][k] for k in counters] == [0, 0, 0, 0] and st["meta"]["seconds"] == 0
    d = host.shared["meta"]
    for i in range(10):
        d.set(f"k{i}", i)
    assert lua(host, "hs.shared.mem:set('x', 1) return d:get('k3')") == [3]
    st = host.stats()["shared"]
    m = st["meta"]
    assert m["calls"] >= 11 and m["errors"] == 0 and m["timeouts"] == 0
    assert type(m["seconds"]) is float and 0 < m["seconds"] < 5
    assert all(type(m[k]) is int for k in counters)
    assert [st["mem"][k] for k in counters] == [0, 0, 0, 0] and st["mem"]["seconds"] == 0
    own_redis.kill()
    fails_with_redis_error(lambda: d.get("k1"))
    assert host.stats()["shared"]["meta"]["errors"] >= 1


# ---- the GIL while a handler waits on Redis ----


@pytest.mark.parametrize("via", ["dictionary", "call", "python"])
def test_waiting_on_redis_does_not_hold_the_gil(make_host, own_redis, via):
    host = make_host(shared={"meta": own_redis.url(prefix="t:", timeout=1, connect_timeout=1)})
    d = host.shared["meta"]
    d.set("k", 1)  # connected
    body = {"dictionary": "return d:get('k')",
            "call": "local r = hs.redis('meta') return r:call('GET', r.prefix .. 'k')"}.get(via)
    if body:
        host.load(RUNNER % body, name="runner.lua")

    def wait_on_redis():
        if via == "python":
            return fails_with_redis_error(lambda: d.get("k"))
        txn = Transaction()
        out = host.fire("read_request", txn)
        assert out.status is Status.CONTINUE, out.error
        return txn.ctx["r"][1]["v"]

    own_redis.pause()
    try:
        with Heartbeat() as beat:
            time.sleep(0.05)
            t0 = time.monotonic()
            message = wait_on_redis()
            waited = time.monotonic() - t0
    finally:
        own_redis.resume()
    assert message == "redis: timeout" and 0.9 < waited < 1.6, (message, waited)
    assert len(beat.gaps) > 50 and beat.max_gap < 0.1, f"the heartbeat stalled {beat.max_gap:.3f} s"


def test_a_fires_time_limit_bounds_its_wait_on_redis(make_host, own_redis):
    host = make_host(shared={"meta": own_redis.url(prefix="t:", timeout=2)}, time_limit=0.3)
    host.shared["meta"].set("k", 1)
    host.load(RUNNER % "return d:get('k')", name="runner.lua")
    own_redis.pause()
    try:
        t0 = time.monotonic()
        txn = Transaction()
        out = host.fire("read_request", txn)
        waited = time.monotonic() - t0
    finally:
        own_redis.resume()
    assert waited < 1.0, f"the fire waited {waited:.3f} s (its time limit is 0.3 s)"
    assert out.status is Status.ERROR or txn.ctx["r"][1]["v"].startswith("redis: "), out


def test_a_wait_cut_by_the_time_limit_leaves_time_for_the_fallback(make_host, own_redis):
    # the wait ends a tenth of the limit early: the handler logs and takes its fallback
    host = make_host(shared={"meta": own_redis.url(prefix="t:", timeout=2)}, time_limit=0.3)
    host.shared["meta"].set("k", 1)
    host.load("""
        local C = {}
        function C:on_read_request(txn)
            local v, err = hs.shared.meta:get("k")
            if err then
                hs.log.warn("falling back: ", err)
                local t0, n = hs.now(), 0
                while hs.now() - t0 < 0.01 do n = n + 1 end  -- 10 ms of fallback work
                txn.ctx.fallback = err
            end
        end
        return C""", name="fallback.lua")
    own_redis.pause()
    try:
        txn = Transaction()
        t0 = time.monotonic()
        out = host.fire("read_request", txn)
        waited = time.monotonic() - t0
    finally:
        own_redis.resume()
    assert out.status is Status.CONTINUE, out.error
    assert txn.ctx["fallback"] == "redis: timeout" and 0.2 < waited < 0.35, waited


def test_close_waits_for_calls_waiting_on_redis(make_host, own_redis):
    host = make_host(shared={"meta": own_redis.url(prefix="t:", timeout=0.5)})
    d = host.shared["meta"]
    d.set("k", 1)
    host.load(RUNNER % "return d:get('k')", name="runner.lua")
    got = {}

    def python_call():
        try:
            d.get("k")
            got["python"] = "returned"
        except hostscript.Error as exc:
            got["python"] = exc

    def lua_fire():
        txn = Transaction()
        out = host.fire("read_request", txn)
        got["lua"] = (out.status, txn.ctx.get("r"))

    own_redis.pause()
    threads = [threading.Thread(target=python_call), threading.Thread(target=lua_fire)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.1)  # both are waiting on Redis now
        t0 = time.monotonic()
        host.close()
        closing = time.monotonic() - t0
        for t in threads:
            t.join(5)
    finally:
        own_redis.resume()
    assert not any(t.is_alive() for t in threads)
    assert 0.2 < closing < 1.5, closing  # it waited for them, and not for ever
    assert isinstance(got["python"], hostscript.SharedDictError), got
    assert got["python"].message == "redis: timeout"
    assert got["lua"][0] is Status.CONTINUE and got["lua"][1][1]["v"] == "redis: timeout", got
    with pytest.raises(hostscript.ClosedError):
        d.get("k")


# ---- a reply over the bound ----


def test_a_reply_too_large_is_an_error_and_the_next_call_works(make_host, redis_server,
                                                              redis_prefix):
    host = make_host(shared={"meta": redis_server.url(prefix=redis_prefix, max_reply=100000)})
    redis_server.cmd("SET", redis_prefix + "big", b"x" * 200_000)
    redis_server.cmd("SET", redis_prefix + "small", b"y" * 50_000)
    assert lua(host, """
        local r = hs.redis("meta")
        local v, err = r:call("GET", r.prefix .. "big")
        return v, err, #r:call("GET", r.prefix .. "small"), r:call("STRLEN", r.prefix .. "big"),
               r:call("PING")""") == [None, b"redis: reply too large", 50_000, 200_000, b"PONG"]
    assert lua(host, """
        local r = hs.redis("meta")
        local v, err = r:pipeline(function(p) p:call("PING") p:call("GET", r.prefix .. "big") end)
        return v, err, r:call("ECHO", "next")""") == [None, b"redis: reply too large", b"next"]
    # the bound is on the whole reply: an array of many small strings too
    redis_server.cmd("RPUSH", redis_prefix + "list", *[b"z" * 100] * 2000)
    assert lua(host, """
        local r = hs.redis("meta")
        local v, err = r:call("LRANGE", r.prefix .. "list", 0, -1)
        return v, err, #r:call("LRANGE", r.prefix .. "list", 0, 99)""") == \
        [None, b"redis: reply too large", 100]
    assert host.stats()["shared"]["meta"]["reconnects"] >= 1


@pytest.mark.parametrize("how", ["call", "pipeline"])
def test_a_command_over_max_reply_is_refused_before_it_is_sent(make_host, redis_server,
                                                               redis_prefix, how):
    host = make_host(shared={"meta": redis_server.url(prefix=redis_prefix, max_reply=100000)})
    command = 'p:call("SET", r.prefix .. "sent", string.rep("s", 200000))'
    if how == "pipeline":
        command = f"r:pipeline(function(p) {command} end)"
    message = lua_error(host, f'local r = hs.redis("meta") local p = r {command}')
    assert "the commands are larger than max_reply (100000 bytes)" in message, message
    assert redis_server.cmd("EXISTS", redis_prefix + "sent") == 0
    assert lua(host, 'return hs.redis("meta"):call("PING")') == [b"PONG"]


# ---- Redis out of memory ----


def test_redis_out_of_memory_is_no_memory(make_host, own_redis):
    host = make_host(shared={"meta": own_redis.url(prefix="t:")})
    d = host.shared["meta"]
    d.set("before", 1)
    own_redis.cmd("CONFIG", "SET", "maxmemory-policy", "noeviction")
    own_redis.cmd("CONFIG", "SET", "maxmemory", own_redis.used_memory() + (1 << 20))
    for i in range(100):  # another client fills it until Redis refuses writes
        try:
            own_redis.cmd("SET", f"fill{i}", b"f" * (64 << 10))
        except RedisReplyError as exc:
            assert str(exc).startswith("OOM"), exc
            break
    else:
        pytest.fail("Redis never ran out of memory")
    with pytest.raises(hostscript.SharedDictFullError, match="no memory"):
        d.set("k", b"x" * 200_000)
    with pytest.raises(hostscript.SharedDictFullError, match="no memory"):
        d.incr("c", 1, init=0)
    got = lua(host, """
        local r = hs.redis("meta")
        local ok, err, forcible = d:set("k", string.rep("x", 200000))
        local _, call_err = r:call("SET", r.prefix .. "k", "x")
        return ok, err, forcible, select(2, d:incr("c", 1, 0)), call_err:sub(1, 4), d:get("before")""")
    assert got == [False, b"no memory", False, b"no memory", b"OOM ", 1]
    assert d.get("k") is None
    own_redis.cmd("CONFIG", "SET", "maxmemory", 0)
    assert d.set("k", b"x" * 200_000) is False and len(d.get("k")) == 200_000
