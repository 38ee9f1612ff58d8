"""Per-thread Lua states, compile-once programs and transactions crossing threads.

Every test runs on both engines (the ``engine`` fixture in conftest.py).
"""
from __future__ import annotations

import threading

import pytest

import hostscript
from hostscript import Outcome, Transaction
from helpers import run_in_thread, wait_for


class Worker:
    """A thread that runs the callables it is given, one at a time, and stays alive."""

    def __init__(self):
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._job = None
        self._result = None
        self._done = False
        self._stop = False
        self.ident = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.ident = threading.get_ident()
        while True:
            with self._cv:
                while self._job is None and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                job = self._job
            try:
                res = ("ok", job())
            except BaseException as e:
                res = ("error", e)
            with self._cv:
                self._job = None
                self._result = res
                self._done = True
                self._cv.notify_all()

    def call(self, fn):
        with self._cv:
            self._done = False
            self._job = fn
            self._cv.notify_all()
            assert self._cv.wait_for(lambda: self._done, 60), "worker did not answer"
            kind, value = self._result
        if kind == "error":
            raise value
        return value

    def stop(self):
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self.thread.join(30)
        assert not self.thread.is_alive()


def fire_ok(host, hook="read_request", txn=None):
    txn = txn if txn is not None else Transaction()
    out = host.fire(hook, txn)
    assert out.status is Outcome.CONTINUE, out.error
    return txn


COUNTER = """
local count = 0            -- module-level: one per thread state
local C = {}
function C:on_read_request(txn)
  count = count + 1
  txn.ctx.%(key)s = count
end
return C
"""


# ---- compile once, rehydrate elsewhere ----

def test_other_thread_rehydrates_bytecode_without_compiling(make_host):
    host = make_host(state_pool=0)  # every thread a fresh state (test_pool.py: pooled ones)
    host.load(COUNTER % {"key": "a"}, name="a.lua")
    host.load(COUNTER % {"key": "b"}, name="b.lua")
    host.load("local C = {} function C:on_send_response(txn) txn.ctx.c = 1 end return C",
              name="c.lua")
    before = host.stats()
    assert before["compilations"] == 3
    assert before["rehydrations"] == 0
    assert before["states"] == 0  # loading compiles on a scratch state, not a worker state

    def first_fire():
        txn = fire_ok(host)
        return dict(txn.ctx), host.stats()

    ctx, after = run_in_thread(first_fire)
    assert ctx == {"a": 1, "b": 1}
    assert after["compilations"] == before["compilations"]
    assert after["rehydrations"] == before["rehydrations"] + 3
    assert after["generation"] == before["generation"]

    # a second fire on another fresh thread rehydrates again, still no compilation
    ctx2, after2 = run_in_thread(first_fire)
    assert ctx2 == {"a": 1, "b": 1}
    assert after2["compilations"] == 3
    assert after2["rehydrations"] == before["rehydrations"] + 6


def test_a_thread_rehydrates_once_per_program_version(make_host):
    host = make_host()
    host.load(COUNTER % {"key": "a"}, name="a.lua")
    host.load(COUNTER % {"key": "b"}, name="b.lua")
    w = Worker()
    try:
        for _ in range(5):
            w.call(lambda: fire_ok(host))
        assert host.stats()["rehydrations"] == 2
        host.load(COUNTER % {"key": "b"}, name="b.lua")  # one changed script
        for _ in range(5):
            w.call(lambda: fire_ok(host))
        st = host.stats()
        assert st["rehydrations"] == 3  # only b.lua was loaded again on the worker
        assert st["compilations"] == 3
    finally:
        w.stop()


# ---- module-level state is per thread ----

def test_module_level_locals_are_per_thread(make_host):
    host = make_host()
    host.load(COUNTER % {"key": "n"}, name="counter.lua")
    a, b = Worker(), Worker()
    try:
        seen_a = [a.call(lambda: fire_ok(host).ctx["n"]) for _ in range(3)]
        seen_b = [b.call(lambda: fire_ok(host).ctx["n"])]
        seen_a.append(a.call(lambda: fire_ok(host).ctx["n"]))
        assert seen_a == [1, 2, 3, 4]
        assert seen_b == [1]
        assert host.stats()["states"] == 2
    finally:
        a.stop()
        b.stop()


def test_class_new_is_called_once_per_thread(make_host):
    host = make_host()
    host.load("""
local news = 0
local C = {}
C.__index = C
function C.new()
  news = news + 1
  return setmetatable({fires = 0, token = tostring({})}, C)
end
function C:on_read_request(txn)
  self.fires = self.fires + 1
  txn.ctx.news = news
  txn.ctx.fires = self.fires
  txn.ctx.token = self.token
end
return C
""", name="cls.lua")
    a, b = Worker(), Worker()
    try:
        ra = [a.call(lambda: dict(fire_ok(host).ctx)) for _ in range(3)]
        rb = [b.call(lambda: dict(fire_ok(host).ctx)) for _ in range(2)]
    finally:
        a.stop()
        b.stop()
    assert [r["news"] for r in ra] == [1, 1, 1]
    assert [r["fires"] for r in ra] == [1, 2, 3]
    assert [r["news"] for r in rb] == [1, 1]
    assert [r["fires"] for r in rb] == [1, 2]
    # one self per thread, and a different one on each thread
    assert len({r["token"] for r in ra}) == 1
    assert len({r["token"] for r in rb}) == 1
    assert ra[0]["token"] != rb[0]["token"]


def test_reloading_one_script_keeps_other_scripts_module_state(make_host):
    host = make_host()
    host.load(COUNTER % {"key": "a"}, name="a.lua")
    host.load(COUNTER % {"key": "b"}, name="b.lua")
    w = Worker()
    try:
        seen = [w.call(lambda: dict(fire_ok(host).ctx)) for _ in range(3)]
        assert seen[-1] == {"a": 3, "b": 3}
        host.load((COUNTER % {"key": "b"}).replace("local count = 0", "local count = 100"),
                  name="b.lua")
        after = [w.call(lambda: dict(fire_ok(host).ctx)) for _ in range(2)]
    finally:
        w.stop()
    # a.lua keeps counting on the same thread; b.lua starts over with its new source
    assert after == [{"a": 4, "b": 101}, {"a": 5, "b": 102}]
    assert host.scripts == ["a.lua", "b.lua"]


# ---- one program per fire, under reload ----

VERSIONED = """
local VERSION = %(version)d
local C = {}
function C:on_read_request(txn)
  txn.ctx.%(key)s = VERSION
end
return C
"""


def test_concurrent_fires_never_see_half_a_reload(make_host):
    host = make_host()
    host.load(VERSIONED % {"version": 0, "key": "v1"}, name="s1.lua")
    host.load(VERSIONED % {"version": 0, "key": "v2"}, name="s2.lua")
    nthreads, reloads = 8, 200
    stop = threading.Event()
    counts = [0] * nthreads
    bad = [[] for _ in range(nthreads)]
    versions = [set() for _ in range(nthreads)]

    def worker(i):
        while not stop.is_set():
            txn = Transaction()
            out = host.fire("read_request", txn)
            if out.status is not Outcome.CONTINUE:
                bad[i].append(("outcome", out.status, str(out.error)))
                continue
            ctx = txn.ctx
            v1, v2 = ctx.get("v1"), ctx.get("v2")
            if not (isinstance(v1, int) and isinstance(v2, int) and v1 - v2 in (0, 1)):
                bad[i].append(("mixed", v1, v2))
            versions[i].add(v1)
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(nthreads)]
    for t in threads:
        t.start()
    stalled = []
    try:
        last = list(counts)
        for k in range(1, reloads + 1):
            host.load(VERSIONED % {"version": k, "key": "v1"}, name="s1.lua")
            host.load(VERSIONED % {"version": k, "key": "v2"}, name="s2.lua")
            if k % 20 == 0:
                # every thread keeps firing throughout the reloads
                if not wait_for(lambda: all(c > prev for c, prev in zip(counts, last)), 20):
                    stalled.append((k, [i for i in range(nthreads) if counts[i] <= last[i]]))
                last = list(counts)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert [b[:5] for b in bad] == [[] for _ in range(nthreads)]
    assert stalled == []
    assert all(c > 0 for c in counts)
    # each thread went through several program versions, and fires after the last
    # reload see the final program
    assert all(len(v) >= 3 for v in versions), [sorted(v)[:5] for v in versions]
    assert fire_ok(host).ctx == {"v1": reloads, "v2": reloads}
    st = host.stats()
    assert st["errors"] == 0
    assert st["compilations"] == 2 + 2 * reloads
    assert st["fires"] == sum(counts) + 1


# ---- txn.ctx crosses threads ----

def test_ctx_set_on_one_thread_is_read_on_another(make_host):
    host = make_host(state_pool=0)  # B must not take over A's state once A ended
    host.load("""
local token = tostring(math.random())   -- differs per state (each is seeded on its own)
local C = {}
function C:on_read_request(txn)
  local c = txn.ctx
  c.s = "hello\\0world"
  c.i = 42
  c.neg = -7
  c.f = 1.5
  c.yes, c.no = true, false
  c.list = {"a", "b", "c"}
  c.nested = {x = {y = {z = "deep"}}, n = 3}
  c.mixed = {10, 20, k = "v"}
  c.state = token
end
function C:on_send_response(txn)
  local c = txn.ctx
  local h = txn.resp.headers
  h["x-s"] = (c.s == "hello\\0world") and "ok" or "bad"
  h["x-i"] = tostring(c.i + 1)
  h["x-f"] = tostring(c.f * 2)
  h["x-bool"] = tostring(c.yes) .. "," .. tostring(c.no)
  h["x-list"] = #c.list .. ":" .. table.concat(c.list, ",")
  h["x-deep"] = c.nested.x.y.z .. c.nested.n
  h["x-same-state"] = tostring(c.state == token)
  c.seen_by_b = true
  c.i = c.i + 100
end
return C
""", name="ctx.lua")
    txn = Transaction()
    a_ctx = run_in_thread(lambda: dict(fire_ok(host, "read_request", txn).ctx))
    assert a_ctx["i"] == 42
    run_in_thread(lambda: fire_ok(host, "send_response", txn))

    h = txn.response.headers
    assert h["x-s"] == "ok"
    assert h["x-i"] == "43"
    assert h["x-f"] == "3" or h["x-f"] == "3.0"
    assert h["x-bool"] == "true,false"
    assert h["x-list"] == "3:a,b,c"
    assert h["x-deep"] == "deep3"
    assert h["x-same-state"] == "false"  # really another thread's state

    ctx = txn.ctx
    assert ctx["s"] == "hello\0world"
    assert ctx["i"] == 142 and type(ctx["i"]) is int
    assert ctx["neg"] == -7 and type(ctx["neg"]) is int
    assert ctx["f"] == 1.5 and type(ctx["f"]) is float
    assert ctx["yes"] is True and ctx["no"] is False
    assert ctx["list"] == ["a", "b", "c"]
    assert ctx["nested"] == {"x": {"y": {"z": "deep"}}, "n": 3}
    assert ctx["mixed"] == {1: 10, 2: 20, "k": "v"}
    assert ctx["seen_by_b"] is True


@pytest.mark.parametrize("value, typename", [
    ("function() end", "function"),
    ("coroutine.create(function() end)", "thread"),
])
def test_non_plain_value_in_ctx_is_a_ctx_error_naming_the_path(make_host, value, typename):
    host = make_host()
    host.load("""
local C = {}
function C:on_read_request(txn)
  local mode = txn.req.headers["x-mode"]
  if mode == "top" then
    txn.ctx.keep = "changed"
    txn.ctx.cb = %(value)s
  elseif mode == "nested" then
    txn.ctx.keep = "changed"
    txn.ctx.a = {b = {%(value)s}}
  else
    txn.ctx.keep = "kept"
  end
end
function C:on_send_response(txn)
  txn.resp.headers["x-keep"] = tostring(txn.ctx.keep)
end
return C
""" % {"value": value}, name="bad.lua")
    txn = Transaction()
    fire_ok(host, "read_request", txn)
    assert txn.ctx == {"keep": "kept"}

    for mode, path in (("top", "txn.ctx.cb"), ("nested", "txn.ctx.a.b[1]")):
        txn.request.headers["x-mode"] = mode
        out = host.fire("read_request", txn)
        assert out.status is Outcome.ERROR
        assert out.error.kind == "ctx"
        assert out.error.script == "bad.lua"
        assert out.error.hook == "read_request"
        assert path in out.error.message
        assert typename in out.error.message
        # the previous ctx is kept, in Python and for the next hook (on another thread)
        assert txn.ctx == {"keep": "kept"}
        run_in_thread(lambda: fire_ok(host, "send_response", txn))
        assert txn.response.headers["x-keep"] == "kept"
    assert host.stats()["errors"] == 2


# ---- states follow threads ----

def test_states_of_short_lived_threads_are_freed(make_host):
    host = make_host(state_pool=0)  # closed at thread end (test_pool.py: pooled)
    host.load(COUNTER % {"key": "n"}, name="a.lua")
    host.load("local C = {} function C:on_read_request(txn) txn.ctx.big = string.rep('x', 1000) end "
              "return C", name="b.lua")
    fire_ok(host)  # the main thread keeps its state
    base = host.stats()
    assert base["states"] == 1
    nthreads, batch = 2000, 16
    results = []

    def one():
        txn = Transaction()
        out = host.fire("read_request", txn)
        results.append((out.status, txn.ctx.get("n")))

    for start in range(0, nthreads, batch):
        ts = [threading.Thread(target=one) for _ in range(batch)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert len(results) == nthreads
    assert all(r == (Outcome.CONTINUE, 1) for r in results)
    # the thread-exit destructor runs just after join() returns: poll briefly
    assert wait_for(lambda: host.stats()["states"] == base["states"]), host.stats()["states"]
    st = host.stats()
    assert st["heap_bytes"] == base["heap_bytes"]
    assert st["fires"] == base["fires"] + nthreads  # counters of ended states are kept
    assert st["rehydrations"] == base["rehydrations"] + 2 * nthreads
    assert st["errors"] == 0


def test_states_count_live_threads_only(make_host):
    host = make_host(state_pool=0)  # a pool would keep the ended threads' states
    host.load(COUNTER % {"key": "n"}, name="a.lua")
    workers = [Worker() for _ in range(4)]
    try:
        for w in workers:
            w.call(lambda: fire_ok(host))
        st = host.stats()
        assert st["states"] == 4
        assert st["heap_bytes"] > 0
        one_heap = st["heap_max"]
        workers[0].stop()
        workers[1].stop()
        assert wait_for(lambda: host.stats()["states"] == 2)
        assert host.stats()["heap_bytes"] <= 2 * one_heap
    finally:
        for w in workers[2:]:
            w.stop()
    assert wait_for(lambda: host.stats()["states"] == 0)
    assert host.stats()["heap_bytes"] == 0


def test_two_hosts_in_one_thread_have_separate_states(make_host):
    # no pool: the main thread's fire below must get a fresh state, not the thread's
    h1 = make_host(state_pool=0)
    h2 = make_host(state_pool=0)
    h1.load(COUNTER % {"key": "n"}, name="counter.lua")
    h2.load(COUNTER % {"key": "n"}, name="counter.lua")

    def body():
        one = [fire_ok(h1).ctx["n"] for _ in range(3)]
        two = [fire_ok(h2).ctx["n"]]
        one.append(fire_ok(h1).ctx["n"])
        return one, two, h1.stats()["states"], h2.stats()["states"]

    one, two, s1, s2 = run_in_thread(body)
    assert one == [1, 2, 3, 4]
    assert two == [1]
    assert (s1, s2) == (1, 1)
    # and in the main thread, each host gets yet another state
    assert fire_ok(h2).ctx["n"] == 1
    assert wait_for(lambda: h1.stats()["states"] == 0)
    assert h2.stats()["states"] == 1


def test_close_with_idle_worker_threads_then_threads_end(make_host, engine):
    host = hostscript.Host(("read_request",), engine=engine)
    host.load(COUNTER % {"key": "n"}, name="a.lua")
    workers = [Worker() for _ in range(4)]
    try:
        for w in workers:
            assert w.call(lambda: fire_ok(host).ctx["n"]) == 1
        assert host.stats()["states"] == 4
        host.close()
        assert host.closed
        with pytest.raises(hostscript.Error):
            host.fire("read_request", Transaction())
        with pytest.raises(hostscript.Error):
            workers[0].call(lambda: host.fire("read_request", Transaction()))

        # a new host (possibly reusing the old thread-key slot) works in those threads
        host2 = make_host(hooks=("read_request",), state_pool=0)  # states close at thread end
        host2.load(COUNTER % {"key": "m"}, name="b.lua")
        for w in workers:
            assert w.call(lambda: dict(fire_ok(host2).ctx)) == {"m": 1}
        assert host2.stats()["states"] == 4
    finally:
        for w in workers:
            w.stop()  # threads end after their states were freed by close(): no crash
    assert wait_for(lambda: host2.stats()["states"] == 0)
    # the process is still healthy
    assert fire_ok(host2).ctx == {"m": 1}
