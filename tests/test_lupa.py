"""hostscript and lupa in one process (the engines link Lua statically with hidden symbols).

lupa's extension modules export every ``lua_*`` symbol; loading one with RTLD_GLOBAL
(``lupa.allow_lua_module_loading()``) puts those symbols in the global scope, where a
library that leaves its own Lua symbols open to interposition would bind to lupa's
Lua and crash (lupa #246). hostscript links a static Lua into each engine module with
hidden symbols, so both engines and lupa must live together in one process.

Every scenario runs in a fresh subprocess: the dlopen flags and the set of loaded
libraries are process-wide and cannot be undone.

Note on lupa itself: lupa's own modules clash with *each other* once one of them is
loaded RTLD_GLOBAL (e.g. lupa.lua55 global, then lupa.lua54 -> segfault): that is
lupa #246 and not hostscript's business, so each subprocess loads exactly one lupa
module, and the variants are covered by parametrization.

In lupa >= 2.0, ``allow_lua_module_loading`` is a context manager that sets
RTLD_NOW | RTLD_GLOBAL around the import of a ``lupa.luaXY`` module.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import lupa  # the `test` extra installs it: a missing lupa is a failure, not a skip
import pytest

import hostscript

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# How the subprocess gets its lupa runtime:
#   "default"  -> lupa.LuaRuntime() (the newest Lua lupa ships), imported inside the
#                 allow_lua_module_loading() block so its symbols are RTLD_GLOBAL
#   "lua54"    -> lupa.lua54.LuaRuntime(), RTLD_GLOBAL; the same Lua version as our
#                 lua54 engine: the most likely symbol clash
#   "luajit21" -> lupa.luajit21.LuaRuntime(), RTLD_GLOBAL; same as our luajit engine
LUPA_VARIANTS = ["default", "lua54", "luajit21"]

_PRELUDE = r'''
import json, sys, threading
import lupa

def lupa_runtime(variant):
    """Import one lupa Lua module with its symbols RTLD_GLOBAL; return a LuaRuntime."""
    allow = getattr(lupa, "allow_lua_module_loading", None)
    assert allow is not None, "lupa >= 2.0 offers allow_lua_module_loading"
    with allow():
        if variant == "default":
            return lupa.LuaRuntime()
        mod = __import__("lupa." + variant, fromlist=["LuaRuntime"])
        return mod.LuaRuntime()

def exercise_lupa(rt, tag):
    """Run Lua that touches tables, strings, closures, pcall, coroutines and Python
    callbacks; return a dict of results."""
    fn = rt.eval("""
      function(py_add, n)
        local t = {}
        for i = 1, n do t[i] = i * i end
        local s = 0
        for _, v in ipairs(t) do s = s + v end
        local ok, err = pcall(error, "boom")
        local co = coroutine.wrap(function(a) local b = coroutine.yield(a + 1); return b * 2 end)
        local c1 = co(1)
        local c2 = co(21)
        local parts = {}
        for w in string.gmatch("a,b,c", "[^,]+") do parts[#parts + 1] = w:upper() end
        return s, py_add(40, 2), ok, tostring(err):match("boom") ~= nil,
               c1, c2, table.concat(parts, "-"), _VERSION
      end
    """)
    s, added, ok, has_boom, c1, c2, joined, version = fn(lambda a, b: a + b, 10)
    return {"tag": tag, "sum": s, "added": added, "pcall_ok": ok, "has_boom": has_boom,
            "co": [c1, c2], "joined": joined, "version": version}

SCRIPT = r"""
local calls = 0   -- module-level local: one per thread state
local C = {}
function C:on_read_request(txn)
  calls = calls + 1
  txn.resp.headers["x-out"] = (txn.req.headers["x-in"] or "none") .. ":" .. _VERSION
  txn.resp.headers["x-calls"] = calls
  txn.ctx.n = (txn.ctx.n or 0) + 1
end
return C
"""

def exercise_hostscript(engine, nthreads=2, nfires=200):
    """Both engines: load a script, fire from NTHREADS threads; return what they saw."""
    import hostscript
    host = hostscript.Host(("read_request", "log"), engine=engine)
    try:
        host.load(SCRIPT, name="clash.lua")
        results = {}
        errors = []
        # no thread ends before the others are done: an ended thread's state would go
        # to the host's pool and serve another thread, module-level locals included
        all_done = threading.Barrier(nthreads)

        def worker(k):
            try:
                last = None
                for i in range(nfires):
                    txn = hostscript.Transaction(headers=[("X-In", "t%d-%d" % (k, i))])
                    out = host.fire("read_request", txn)
                    if out.status is not hostscript.Outcome.CONTINUE:
                        errors.append(repr(out))
                        return
                    last = (txn.response.headers["x-out"], txn.response.headers["x-calls"],
                            txn.ctx)
                results[k] = last
            except BaseException as exc:  # reported in the output, asserted by the test
                errors.append(repr(exc))
            finally:
                try:
                    all_done.wait(120)
                except threading.BrokenBarrierError:
                    errors.append("a worker did not finish")

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(nthreads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        st = host.stats()
        return {"engine": engine, "errors": errors,
                "results": {str(k): list(v) for k, v in sorted(results.items())},
                "fires": st["fires"], "states": st["states"]}
    finally:
        host.close()
'''

_LUPA_FIRST = r'''
rt = lupa_runtime(VARIANT)
out = {"before": exercise_lupa(rt, "before")}
out["hostscript"] = [exercise_hostscript(e) for e in ("luajit", "lua54")]
out["after"] = exercise_lupa(rt, "after")
# and a brand-new lupa runtime after hostscript ran
out["fresh"] = exercise_lupa(type(rt)(), "fresh")
print("RESULT " + json.dumps(out))
'''

_HOSTSCRIPT_GLOBAL_FIRST = r'''
# The engine modules themselves loaded RTLD_GLOBAL first: if they exported their
# Lua (or hs_*) symbols, lupa's module loaded afterwards would bind to them.
with lupa.allow_lua_module_loading():
    import hostscript._luajit, hostscript._lua54
out = {"hostscript_before": [exercise_hostscript(e) for e in ("luajit", "lua54")]}
rt = lupa_runtime(VARIANT)
out["lupa"] = exercise_lupa(rt, "lupa")
out["hostscript"] = [exercise_hostscript(e) for e in ("luajit", "lua54")]
out["after"] = exercise_lupa(rt, "after")
print("RESULT " + json.dumps(out))
'''


def _require_variant(variant: str) -> None:
    # lupa.lua54 / lupa.luajit21 are used "if present" in the installed lupa build
    if variant != "default" and importlib.util.find_spec(f"lupa.{variant}") is None:
        pytest.skip(f"this lupa build has no lupa.{variant}")


def _run(body: str, variant: str) -> dict:
    _require_variant(variant)
    code = _PRELUDE + f"\nVARIANT = {variant!r}\n" + body
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, (
        f"subprocess exited {proc.returncode} (negative = killed by signal)\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout + proc.stderr
    return json.loads(lines[0][len("RESULT "):])


def _expected_lua_version(variant: str) -> str:
    return {"lua54": "Lua 5.4", "luajit21": "Lua 5.1"}.get(variant, "")


def _check_lupa(res: dict, variant: str) -> None:
    assert res["sum"] == sum(i * i for i in range(1, 11))
    assert res["added"] == 42
    assert res["pcall_ok"] is False and res["has_boom"] is True
    assert res["co"] == [2, 42]
    assert res["joined"] == "A-B-C"
    want = _expected_lua_version(variant)
    if want:
        assert res["version"] == want
    else:
        assert res["version"].startswith("Lua 5.")


def _check_hostscript(runs: list, nthreads: int = 2, nfires: int = 200) -> None:
    assert [r["engine"] for r in runs] == ["luajit", "lua54"]
    for r in runs:
        version = "Lua 5.1" if r["engine"] == "luajit" else "Lua 5.4"
        assert r["errors"] == [], r
        assert r["fires"] == nthreads * nfires
        assert sorted(r["results"]) == [str(k) for k in range(nthreads)]
        for k, (x_out, x_calls, ctx) in r["results"].items():
            assert x_out == f"t{k}-{nfires - 1}:{version}"
            # per-thread module local: each thread counted exactly its own fires
            assert x_calls == str(nfires)
            assert ctx == {"n": 1}


@pytest.mark.parametrize("variant", LUPA_VARIANTS)
def test_lupa_global_symbols_then_both_engines_from_two_threads_then_lupa_again(variant):
    out = _run(_LUPA_FIRST, variant)
    _check_lupa(out["before"], variant)
    _check_hostscript(out["hostscript"])
    _check_lupa(out["after"], variant)
    _check_lupa(out["fresh"], variant)


@pytest.mark.parametrize("variant", ["lua54", "luajit21"])
def test_engine_modules_loaded_global_first_do_not_capture_lupa(variant):
    out = _run(_HOSTSCRIPT_GLOBAL_FIRST, variant)
    _check_hostscript(out["hostscript_before"])
    _check_lupa(out["lupa"], variant)
    _check_hostscript(out["hostscript"])
    _check_lupa(out["after"], variant)


def test_installed_lupa_offers_global_module_loading():
    # The clash tests above rely on it; lupa >= 2.0 (the `test` extra) has it.
    assert callable(getattr(lupa, "allow_lua_module_loading", None))


# ---- the dynamic symbol tables of the engine modules ----

_LUA_SYMBOL = re.compile(r"^(lua_|luaL_|luaopen_|luaJIT_)")


def _dynamic_symbols(path: str, *flags: str) -> list:
    proc = subprocess.run(["nm", "-D", *flags, path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    names = []
    for line in proc.stdout.splitlines():
        parts = line.split()
        if parts:
            names.append(parts[-1].split("@")[0])
    return names


def _engine_files() -> list:
    import hostscript._lua54
    import hostscript._luajit
    return [hostscript._lua54.__file__, hostscript._luajit.__file__]


@pytest.mark.parametrize("module", ["_lua54", "_luajit"])
def test_engine_module_exports_no_lua_symbols(module):
    path = dict(zip(["_lua54", "_luajit"], _engine_files()))[module]
    defined = _dynamic_symbols(path, "--defined-only")
    assert any(n.startswith("PyInit_") for n in defined), defined  # we did read the table
    leaked = [n for n in defined if _LUA_SYMBOL.match(n)]
    assert leaked == [], f"{path} exports Lua symbols: {leaked[:20]}"


@pytest.mark.parametrize("module", ["_lua54", "_luajit"])
def test_engine_module_imports_no_lua_symbols(module):
    # an undefined lua_* would be resolved against whatever Lua is global (lupa's)
    path = dict(zip(["_lua54", "_luajit"], _engine_files()))[module]
    undefined = _dynamic_symbols(path, "--undefined-only")
    assert [n for n in undefined if _LUA_SYMBOL.match(n)] == []


@pytest.mark.parametrize("module", ["_lua54", "_luajit"])
def test_engine_module_exports_no_core_symbols(module):
    # both modules compile the same core: exported hs_* names would let one engine's
    # calls bind to the other's core when a module is loaded RTLD_GLOBAL
    path = dict(zip(["_lua54", "_luajit"], _engine_files()))[module]
    defined = _dynamic_symbols(path, "--defined-only")
    assert [n for n in defined if n.startswith("hs_")] == []


def test_both_engines_are_built():
    assert sorted(hostscript.engines()) == ["lua54", "luajit"]
