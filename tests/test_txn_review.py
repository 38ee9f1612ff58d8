"""Review of the C Transaction (hostscript/_transaction.c, _ctx.c, _bridge.c and the
core's txn.c / ctx.c). Each test fails while the problem it names is present.

Crash-prone cases run in a child process (under PYTHONMALLOC=debug, or glibc's
MALLOC_PERTURB_, so that a use-after-free or an overflow shows deterministically),
so a segfault fails the test instead of ending the pytest session.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref

import pytest

import hostscript
from hostscript import Outcome, Transaction

from helpers import ROOT


def run_child(code: str, *args: str, env: dict = None, timeout: float = 60) -> dict:
    """Run CODE in a fresh interpreter (with ARGS in sys.argv[1:]); the last stdout line
    is JSON. A crash fails the calling test with the child's stderr."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=str(ROOT),
                       env=e, capture_output=True, text=True, errors="replace", timeout=timeout)
    assert p.returncode == 0, (f"the child process died (exit {p.returncode}):\n"
                               f"{p.stdout[-1500:]}\n{p.stderr[-2500:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# =====================================================================================
# 1. Python code running inside HostCore.fire before the fire marks the txn busy
# =====================================================================================

# A list subclass in txn.ctx runs its __iter__ while fire() encodes ctx
# (PySequence_Fast is only a no-op for exact lists/tuples). fire() passes the cached
# ctx dict to the encoder as a borrowed reference (hs_py_txn_flush_ctx), and the
# transaction is not busy yet, so that code can replace txn.ctx, or fire the same
# transaction again (whose own flush drops the dict): the outer encoder then walks a
# freed dict.
FLUSH_UAF = """
    import json, sys
    import hostscript
    from hostscript import Transaction
    engine, how = sys.argv[1], sys.argv[2]
    h = hostscript.Host(engine=engine)
    h.load("local C={} function C:on_read_request(txn) txn.ctx.x = 1 end return C", name="a")
    freed, armed = [], []
    class D(dict):
        def __del__(self):
            freed.append(1)
    t = Transaction()
    class L(list):
        def __iter__(self):
            if armed:
                armed.clear()
                if how == "assign":
                    t.ctx = {}
                else:
                    h.fire("read_request", t)
                out["freed_while_encoding"] = bool(freed)
            return super().__iter__()
    out = {}
    d = D({f"k{i}": i for i in range(20)})
    d["a"] = L([1, 2])
    t.ctx = d
    del d
    armed.append(1)
    try:
        out["status"] = h.fire("read_request", t).status.name
    except hostscript.Error as e:
        out["raised"] = type(e).__name__
    print(json.dumps(out))
"""


@pytest.mark.parametrize("how", ["assign", "nested_fire"])
def test_fire_does_not_encode_a_ctx_dict_freed_by_code_run_during_encoding(engine, how):
    # _bridge.c:105 / _transaction.c:802: store_ctx(x->t, x->ctx) with x->ctx borrowed
    res = run_child(FLUSH_UAF, engine, how, env={"PYTHONMALLOC": "debug"})
    assert not res.get("freed_while_encoding"), (
        "the ctx dict being encoded was freed under the encoder (use after free)")


CLOSE_DURING_FLUSH = """
    import json, sys
    import hostscript
    from hostscript import Transaction
    h = hostscript.Host(engine=sys.argv[1])
    h.load("local C={} function C:on_read_request(txn) txn.ctx.x = 1 end return C", name="a")
    class L(list):
        def __iter__(self):
            h.close()
            return super().__iter__()
    t = Transaction()
    t.ctx["a"] = L([1])
    out = {}
    try:
        out["status"] = h.fire("read_request", t).status.name
    except hostscript.Error as e:
        out["raised"] = type(e).__name__
    print(json.dumps(out))
"""


def test_host_closed_while_fire_encodes_ctx_raises_closed_error_not_a_crash(engine):
    # _bridge.c:90 checks self->host, then :105 runs Python code (ctx flush), then :106
    # calls self->fire(self->host, ...) with a host that is now NULL (and freed).
    res = run_child(CLOSE_DURING_FLUSH, engine)
    assert res.get("raised") == "ClosedError"


# =====================================================================================
# 2. Setters check "busy" first, run Python code, then write (check-then-act)
# =====================================================================================

# The setter checks BusyError, then calls Python code (a mapping's items(), a list
# subclass's __iter__); meanwhile another thread starts a long fire on the same
# transaction (busy, GIL released); the setter then writes the storage the running
# handler is reading (hs_hdrs_move frees the arena Lua reads from; store_ctx frees
# t->ctx that the fire rewrites at its end).
SETTER_RACE = """
    import json, sys, threading, time
    import hostscript
    from hostscript import Transaction, BusyError
    engine, what = sys.argv[1], sys.argv[2]
    h = hostscript.Host(engine=engine, time_limit=None)
    h.load('''local C = {} function C:on_read_request(txn)
      local t0, first = hs.now(), txn.req.headers["x"]
      local seen = first
      while hs.now() - t0 < 0.5 do
        local v = txn.req.headers["x"]
        if v ~= first then seen = v end
      end
      txn.ctx.seen = seen
    end return C''', name="a")
    t = Transaction(headers=[("x", "orig")])
    out = {}
    go, warmed = threading.Event(), threading.Event()
    def work():
        h.fire("read_request", Transaction())  # this thread's fires run long: release the GIL
        warmed.set()
        go.wait()
        try:
            out["fire"] = h.fire("read_request", t).status.name
        except BusyError:
            out["fire"] = "BusyError"
    th = threading.Thread(target=work)
    th.start()
    warmed.wait()
    def let_the_fire_start():
        go.set()
        time.sleep(0.2)
    class Src:
        def items(self):
            let_the_fire_start()
            return [("x", "changed")]
    class L(list):
        def __iter__(self):
            let_the_fire_start()
            return super().__iter__()
    try:
        if what == "headers":
            t.request.headers = Src()
        elif what == "headers_list":
            t.request.headers = L([("x", "changed")])
        else:
            t.ctx = {"a": L([1])}
        out["setter"] = "ok"
    except BusyError:
        out["setter"] = "BusyError"
    th.join()
    out["seen"] = t.ctx.get("seen")
    print(json.dumps(out))
"""


@pytest.mark.parametrize("what", ["headers", "headers_list", "ctx"])
def test_a_setter_does_not_write_a_transaction_a_fire_started_on_meanwhile(engine, what):
    # _transaction.c:541-545 (part_set_headers), :793-800 (txn_set_ctx)
    res = run_child(SETTER_RACE, engine, what)
    assert not (res["setter"] == "ok" and res["fire"] == "CONTINUE"), (
        f"the setter wrote the transaction while a fire ran on it: {res}")
    assert res["seen"] in ("orig", None), f"the handler saw headers change mid-fire: {res}"


# =====================================================================================
# 3. C pointers into the transaction held across allocations that can run a GC
# =====================================================================================

# headers_items sizes its list from hs->n, then allocates a tuple per field: a
# GC-tracked allocation, which can run finalizers (__del__, weakref callbacks). One
# that adds fields makes the loop write past the list's item array.
ITEMS_OVERFLOW = """
    import gc, json
    from hostscript import Transaction
    t = Transaction(headers=[("a", "1"), ("b", "2")])
    h = t.request.headers
    class Fin:
        def __del__(self):
            for i in range(200):
                h.add(f"x{i}", "v")
    gc.collect()
    gc.set_threshold(1)
    a = Fin(); a.me = a; del a   # cyclic garbage: the next GC-tracked allocation frees it
    items = h.items()
    gc.set_threshold(700)
    print(json.dumps({"n_items": len(items), "n_after": len(h), "items_ok": all(
        isinstance(p, tuple) for p in items)}))
"""


def test_headers_items_is_safe_when_a_finalizer_changes_the_headers():
    # _transaction.c:343-357: PyList_New(hs->n) then PyTuple_New per field, reading
    # hs->n and hs->e[i] after each allocation. Under PYTHONMALLOC=debug the overflow
    # of the list's item array aborts the child ("bad trailing pad byte").
    res = run_child(ITEMS_OVERFLOW, env={"PYTHONMALLOC": "debug"})
    assert res["items_ok"] and res["n_items"] in (2, 202)


# txn.ctx decodes straight out of t->ctx; decoding builds dicts (GC-tracked), a
# finalizer run by that GC assigns txn.ctx, store_ctx frees t->ctx, and the decoder
# goes on reading the freed buffer (MALLOC_PERTURB_ makes it garbage: "corrupt").
CTX_DECODE_UAF = """
    import gc, json, sys
    import hostscript
    from hostscript import Transaction
    h = hostscript.Host(engine=sys.argv[1])
    h.load("local C={} function C:on_read_request(txn) txn.ctx.x = 1 end return C", name="a")
    t = Transaction()
    t.ctx = {f"k{i}": {"v": "s" * 100, "n": i} for i in range(300)}
    h.fire("read_request", t)        # the ctx now lives only in the C transaction
    class Fin:
        def __del__(self):
            t.ctx = {"replaced": True}
    gc.collect()
    gc.set_threshold(1)
    a = Fin(); a.me = a; del a
    try:
        got = t.ctx
        out = {"keys": len(got), "replaced": "replaced" in got}
    except hostscript.Error as e:
        out = {"raised": f"{type(e).__name__}: {e}"}
    gc.set_threshold(700)
    print(json.dumps(out))
"""


def test_reading_ctx_is_safe_when_a_finalizer_assigns_ctx(engine):
    # _transaction.c:776 hs_py_ctx_decode(x->t->ctx.p, ...) reads the C buffer while
    # allocating Python objects
    res = run_child(CTX_DECODE_UAF, engine, env={"MALLOC_PERTURB_": "165"})
    assert "raised" not in res, f"the decoder read a freed buffer: {res}"


# =====================================================================================
# 4. Reference cycles through txn.ctx are never collected
# =====================================================================================

class _SubTxn(Transaction):
    pass


@pytest.mark.parametrize("via", ["txn", "request", "headers", "subclass"])
def test_a_transaction_in_a_cycle_through_its_ctx_is_collected(via):
    # Transaction, Request, Response and Headers have no Py_TPFLAGS_HAVE_GC /
    # tp_traverse: txn -> ctx dict -> (txn | view -> txn) is invisible to the GC.
    # The pure-Python Transaction this replaced was collectable.
    t = _SubTxn() if via == "subclass" else Transaction()
    target = {"txn": t, "subclass": t, "request": t.request, "headers": t.request.headers}[via]
    t.ctx["back"] = target
    del target
    ref = weakref.ref(t)
    del t
    gc.collect()
    assert ref() is None, "the transaction leaked (a cycle the GC cannot see)"


# =====================================================================================
# 5. ctx data that changes or vanishes without an error
# =====================================================================================

def test_reading_ctx_in_python_does_not_change_what_lua_sees(make_host):
    # txn.ctx read in Python caches the decoded dict, and the next fire re-encodes it
    # (_bridge.c:105) although nothing was changed: the decoding is lossy for a
    # table with [1] and [true] (the boolean key becomes the string "true"), so a
    # mere read (logging txn.ctx, say) changes the handlers' ctx.
    host = make_host()
    host.load('local C = {} '
              'function C:on_read_request(txn) txn.ctx.m = {[1] = "one", [true] = "yes"} end '
              'function C:on_send_response(txn) '
              '  txn.ctx.r = {txn.ctx.m[1] == "one", txn.ctx.m[true] == "yes"} end '
              'return C', name="t.lua")
    txn = Transaction()
    assert host.fire("read_request", txn).status is Outcome.CONTINUE
    _ = txn.ctx  # only a read
    assert host.fire("send_response", txn).status is Outcome.CONTINUE
    assert txn.ctx["r"] == [True, True]


def test_ctx_str_and_bytes_keys_that_are_one_lua_key_are_not_silently_merged(make_host):
    # _ctx.c enc_string: {"a": 1, b"a": 2} are two Python keys and one Lua key; one
    # value is dropped without a word ("anything else is refused")
    host = make_host()
    host.load('local C = {} function C:on_read_request(txn) local n = 0 '
              'for _ in pairs(txn.ctx) do n = n + 1 end txn.ctx.n = n end return C', name="t.lua")
    txn = Transaction()
    try:
        txn.ctx = {"a": 1, b"a": 2}
        out = host.fire("read_request", txn)
    except hostscript.Error:
        return  # refused: fine
    if out.status is Outcome.ERROR:
        return
    assert txn.ctx["n"] == 3, f"a ctx value was lost: {txn.ctx!r}"


def test_ctx_integers_are_not_silently_changed_or_merged(make_host, engine):
    # native/ctx.c dec_value 'i' on LuaJIT: lua_pushnumber((double)i): integers past
    # 2^53 change value and become floats, and two such keys become one (a value is
    # lost). Python accepts them as "int (64-bit)".
    host = make_host()
    host.load("local C = {} function C:on_read_request(txn) txn.ctx.touched = true end return C",
              name="t.lua")
    txn = Transaction()
    sent = {"v": 2 ** 53 + 1, "neg": -(2 ** 62), 2 ** 53: "a", 2 ** 53 + 1: "b"}
    try:
        txn.ctx = dict(sent)
        out = host.fire("read_request", txn)
    except hostscript.Error:
        return
    if out.status is Outcome.ERROR:
        return  # a clear error is acceptable
    got = dict(txn.ctx)
    got.pop("touched")
    assert got == sent and all(type(k) is type(s) for k, s in zip(sorted(got, key=str),
                                                                  sorted(sent, key=str)))


# =====================================================================================
# 6. The 8 MiB ctx bound
# =====================================================================================

def test_lua_ctx_of_numbers_is_bounded_at_8_mib_like_any_other(make_host):
    # native/ctx.c: the HS_CTX_MAX check runs on entering a table and for strings
    # only, so a flat table of numbers (or booleans) saves far past 8 MiB
    host = make_host()
    host.load("local C = {} function C:on_read_request(txn) local t = {} "
              "for i = 1, 1000000 do t[i] = i end txn.ctx.t = t end return C", name="t.lua")
    out = host.fire("read_request", Transaction())
    assert out.status is Outcome.ERROR and out.error.kind == "ctx", (
        "an 18 MB ctx was saved past the 8 MiB bound")


def test_python_ctx_over_the_bound_is_refused_up_front_not_blamed_on_a_handler(make_host):
    # _ctx.c has no size bound: Python may store 9 MiB, which Lua reads fine but any
    # handler that touches txn.ctx then fails with a ctx error of its own
    host = make_host()
    host.load("local C = {} function C:on_read_request(txn) txn.ctx.n = 1 end return C",
              name="t.lua")
    txn = Transaction()
    try:
        txn.ctx = {"big": "x" * (9 << 20)}
    except hostscript.UsageError:
        return
    out = host.fire("read_request", txn)
    assert out.status is Outcome.CONTINUE, out.error


# =====================================================================================
# 7. Errors that are not hostscript errors
# =====================================================================================

def test_non_contiguous_memoryview_headers_raise_a_hostscript_error():
    # _transaction.c:120: PyObject_GetBuffer's BufferError escapes as is (the body
    # setter turns the same case into ArgumentTypeError)
    mv = memoryview(b"a: b\r\nc: d\r\n")[::2]
    with pytest.raises(hostscript.Error):
        Transaction(headers=mv)


@pytest.mark.parametrize("call", ["__new__", "subclass"])
def test_transaction_new_and_subclasses_raise_the_same_errors_as_the_call(call):
    # txn_vectorcall raises ArgumentTypeError; txn_new (used by Transaction.__new__
    # and by every subclass, as tp_vectorcall is not inherited) raises plain TypeError
    make = (lambda **kw: Transaction.__new__(Transaction, **kw)) if call == "__new__" else _SubTxn
    with pytest.raises(hostscript.ArgumentTypeError):
        Transaction(foo=1)
    with pytest.raises(hostscript.ArgumentTypeError):
        make(foo=1)


def test_ctx_with_a_table_key_is_reported_as_corrupt_not_type_error():
    # _ctx.c ctx_set: a 'T' key (a C host's hs_txn_set_ctx can store one; Lua keeps
    # it) becomes an unhashable dict: TypeError instead of "corrupt txn.ctx data"
    from hostscript import _bridge
    data = b"T\x01\x00\x00\x00" + b"T\x00\x00\x00\x00" + b"t"
    with pytest.raises(ValueError, match="corrupt|table key"):
        _bridge.ctx_decode(data)
