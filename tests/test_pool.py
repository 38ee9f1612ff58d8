"""The pool of idle states: a thread that ends hands its state to the host's pool,
and the next new thread that fires takes it over instead of creating a state.

Every test runs on both engines (the ``engine`` fixture in conftest.py), with real
threads. A thread's state reaches the pool in the thread's exit destructor, which
runs just after ``join()`` returns, so the tests wait for ``pooled`` to settle
before starting the next threads; that makes every count exact.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest

import hostscript
from hostscript import Outcome, Transaction
from helpers import ROOT, rss_bytes, wait_for

COUNTER = """
local n = 0               -- module-level: lives as long as the state
local C = {}
function C:on_read_request(txn)
  n = n + 1
  txn.ctx.n = n
  txn.ctx.pad = string.rep("x", 200)  -- some garbage per fire
end
return C
"""


def settled(host, pooled, states):
    """Wait until the ended threads' states are pooled or closed; return the stats."""
    assert wait_for(lambda: (host.stats()["pooled"], host.stats()["states"]) == (pooled, states)), \
        host.stats()
    return host.stats()


def fire_in_threads(host, count, hook="read_request"):
    """Start COUNT threads at once, each firing HOOK once and staying alive until all
    have fired (so they hold COUNT distinct states); return what each saw in ctx."""
    all_fired = threading.Barrier(count)
    seen, errors = [], []

    def one():
        try:
            txn = Transaction()
            out = host.fire(hook, txn)
            if out.status is not Outcome.CONTINUE:
                errors.append(repr(out))
            seen.append(dict(txn.ctx))
        except BaseException as e:
            errors.append(repr(e))
        finally:
            all_fired.wait(60)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    return seen


# ---- churn: many short-lived threads reuse a bounded set of states ----

def test_short_lived_threads_take_pooled_states_and_memory_stays_flat(make_host):
    pool, batch, nthreads = 3, 5, 5000
    host = make_host(state_pool=pool)
    host.load(COUNTER, name="counter.lua")
    nbatches = nthreads // batch
    fresh = 0  # threads that saw n == 1: a state made for them
    max_states = 0
    rss_warm = None
    for i in range(nbatches):
        seen = fire_in_threads(host, batch)
        fresh += sum(1 for c in seen if c["n"] == 1)
        max_states = max(max_states, host.stats()["states"])
        # each batch's states: `pool` of them go back to the pool, the others close
        settled(host, pool, pool)
        if i == nbatches // 10:
            rss_warm = rss_bytes()
    st = host.stats()
    # every batch but the first took `pool` states from the pool, created the rest
    assert st["pool_hits"] == pool * (nbatches - 1)
    assert fresh == nthreads - st["pool_hits"]
    assert st["fires"] == nthreads
    assert st["errors"] == 0
    assert max_states <= pool + batch
    assert st["states"] == pool and st["pooled"] == pool
    growth = rss_bytes() - rss_warm
    assert growth < 4 << 20, f"RSS grew by {growth / 1048576:.1f} MiB over {nthreads} threads"


def test_pool_is_bounded_by_state_pool_and_defaults_to_16(make_host):
    host = make_host()
    assert host.state_pool == 16
    host.load(COUNTER, name="counter.lua")
    seen = fire_in_threads(host, 20)
    assert sorted(c["n"] for c in seen) == [1] * 20
    st = settled(host, 16, 16)  # four closed at thread end, sixteen kept
    assert st["pool_hits"] == 0
    assert st["heap_bytes"] > 0  # pooled states keep their Lua heap: they are live
    # the next 20 threads: 16 take a pooled state (n continues), 4 get new ones
    seen = fire_in_threads(host, 20)
    assert sorted(c["n"] for c in seen) == [1] * 4 + [2] * 16
    st = settled(host, 16, 16)
    assert st["pool_hits"] == 16
    assert st["fires"] == 40


# ---- what a pooled state carries over ----

def test_module_level_locals_continue_in_the_next_thread(make_host):
    host = make_host(state_pool=4)
    host.load(COUNTER, name="counter.lua")

    def fires(k):
        seen = []
        for _ in range(k):
            txn = Transaction()
            assert host.fire("read_request", txn).status is Outcome.CONTINUE
            seen.append(txn.ctx["n"])
        return seen

    for expected in ([1, 2, 3], [4, 5], [6]):
        t_out = []
        t = threading.Thread(target=lambda k=len(expected): t_out.extend(fires(k)))
        t.start()
        t.join(60)
        assert t_out == expected  # one state, handed from thread to thread
        settled(host, 1, 1)
    assert host.stats()["pool_hits"] == 2
    # a state serves one thread at a time: two live threads, one pooled state
    seen = fire_in_threads(host, 2)
    assert sorted(c["n"] for c in seen) == [1, 7]
    st = settled(host, 2, 2)
    assert st["pool_hits"] == 3


def test_pooled_state_rehydrates_only_the_changed_script(make_host):
    host = make_host(state_pool=4)
    host.load(COUNTER, name="counter.lua")
    host.load('local C = {} function C:on_read_request(txn) txn.ctx.v = "v1" end return C',
              name="version.lua")
    (a,) = fire_in_threads(host, 1)
    assert a == {"n": 1, "pad": "x" * 200, "v": "v1"}
    st = settled(host, 1, 1)
    assert st["rehydrations"] == 2
    host.load('local C = {} function C:on_read_request(txn) txn.ctx.v = "v2" end return C',
              name="version.lua")
    (b,) = fire_in_threads(host, 1)
    assert b["v"] == "v2"
    assert b["n"] == 2  # the same state: counter.lua was kept, not loaded again
    st = settled(host, 1, 1)
    assert st["rehydrations"] == 3  # only version.lua
    assert st["pool_hits"] == 1
    # an unloaded script stops running in a pooled state too
    host.unload("version.lua")
    (c,) = fire_in_threads(host, 1)
    assert c == {"n": 3, "pad": "x" * 200}


def test_a_new_thread_does_not_inherit_the_last_error(make_host):
    host = make_host(state_pool=4)
    host.load('local C = {} function C:on_read_request(txn) '
              '  if txn.req.headers["x-fail"] then error("failed on purpose") end '
              '  txn.ctx.ok = true end return C', name="maybe.lua")
    out = []
    t = threading.Thread(target=lambda: out.append(
        host.fire("read_request", Transaction(headers=[("x-fail", "1")]))))
    t.start()
    t.join(60)
    assert out[0].status is Outcome.ERROR
    assert "failed on purpose" in out[0].error.message
    settled(host, 1, 1)

    def fire_then_last_error():
        txn = Transaction()
        status = host.fire("read_request", txn).status
        return status, txn.ctx, host._last_error().message

    box = []
    t = threading.Thread(target=lambda: box.append(fire_then_last_error()))
    t.start()
    t.join(60)
    assert box == [(Outcome.CONTINUE, {"ok": True}, "")]
    assert host.stats()["pool_hits"] == 1


# ---- no pool ----

def test_state_pool_0_closes_states_at_thread_end(make_host):
    host = make_host(state_pool=0)
    host.load(COUNTER, name="counter.lua")
    for _ in range(3):
        seen = fire_in_threads(host, 4)
        assert [c["n"] for c in seen] == [1] * 4  # always a fresh state
        st = settled(host, 0, 0)
    assert st["pool_hits"] == 0
    assert st["heap_bytes"] == 0
    assert st["fires"] == 12
    assert st["rehydrations"] == 12


@pytest.mark.parametrize("bad", [-1, -16, 1.5, "4", None, True, 1 << 31])
def test_state_pool_must_be_a_non_negative_int(engine, bad):
    with pytest.raises(ValueError, match="state_pool"):
        hostscript.Host(("read_request",), engine=engine, state_pool=bad)


# ---- closing the host: pooled states, and threads ending at the same moment ----

CLOSE_CHILD = textwrap.dedent("""
    import sys, threading, time
    import hostscript
    from hostscript import Transaction
    engine = sys.argv[1]
    SRC = ("local n = 0 local C = {} function C:on_read_request(txn) n = n + 1 "
           "txn.ctx.n = n txn.ctx.pad = string.rep('y', 1000) end return C")

    def burst(host, count):
        # COUNT threads fire at once and wait for each other, then end together
        gate = threading.Barrier(count + 1)
        def one():
            host.fire("read_request", Transaction())
            gate.wait(60)
        ts = [threading.Thread(target=one) for _ in range(count)]
        for t in ts:
            t.start()
        gate.wait(60)  # all have fired; they are ending from here on
        return ts

    # 1. close a host whose pool is full
    h = hostscript.Host(("read_request",), engine=engine, state_pool=4)
    h.load(SRC, name="a.lua")
    for t in burst(h, 6):
        t.join()
    end = time.monotonic() + 15  # the exit destructors run just after join returns
    while (h.stats()["pooled"], h.stats()["states"]) != (4, 4) and time.monotonic() < end:
        time.sleep(0.001)
    st = h.stats()
    assert (st["pooled"], st["states"]) == (4, 4), st
    h.close()
    try:
        h.stats()
        raise SystemExit("stats after close")
    except hostscript.Error:
        pass

    # 2. close while the threads are ending: some states pooled, some on their way
    for rnd in range(60):
        h = hostscript.Host(("read_request",), engine=engine, state_pool=3)
        h.load(SRC, name="a.lua")
        ts = burst(h, 6)
        h.close()  # races the threads' exit destructors
        for t in ts:
            t.join()

    # 3. the threads of a closed host's pool era are gone; a new host works
    h = hostscript.Host(("read_request",), engine=engine, state_pool=2)
    h.load(SRC, name="a.lua")
    for t in burst(h, 2):
        t.join()
    out = []
    t = threading.Thread(target=lambda: out.append(h.fire("read_request", Transaction())))
    t.start()
    t.join()
    assert out[0].status is hostscript.Outcome.CONTINUE
    h.close()
    print("ok")
""")


def test_close_with_pooled_states_and_while_threads_end(engine):
    p = subprocess.run([sys.executable, "-c", CLOSE_CHILD, engine], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, f"exit {p.returncode} (negative: killed by signal)\n{p.stderr[-3000:]}"
    assert p.stdout.strip() == "ok"
