"""Everything that runs Lua runs protected and under the deadline, at load time and
on the worker threads: the chunk, reading the class's fields (which may run an
__index), Class.new(), turning an error value into a message. A script cannot make
host.load() hang, nor kill the process by failing oddly. Hang and crash cases run
in a subprocess."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import hostscript
from hostscript import Outcome, Transaction

CHILD = textwrap.dedent(r"""
    import json, sys, time, logging
    import hostscript
    logging.disable(logging.CRITICAL)
    engine, src = sys.argv[1], sys.argv[2]
    host = hostscript.Host(engine=engine, time_limit=0.05, memory_limit=4 << 20)
    out = {}
    t0 = time.perf_counter()
    try:
        host.load(src, name="evil.lua")
        out["loaded"] = True
    except hostscript.ScriptError as e:
        out.update(loaded=False, kind=e.kind, message=e.message)
    out["elapsed"] = time.perf_counter() - t0
    host.load("local C = {} function C:on_read_request(txn) txn.resp.status = 204 end return C", name="ok.lua")
    txn = hostscript.Transaction()
    r = host.fire("read_request", txn)
    out["next"] = r.status.name == "CONTINUE" and txn.response.status == 204
    print(json.dumps(out))
""")


def run_child(engine: str, src: str) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, engine, src], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"exit {p.returncode}: {p.stderr[-2000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


LOOPING_CLASSES = {
    "index-loops": "return setmetatable({}, {__index = function() while true do end end})",
    "index-loops-after-new": "local n = 0 return setmetatable({on_read_request = function() end}, "
                             "{__index = function(t, k) if k ~= 'new' then while true do end end end})",
    "new-loops": "return {new = function() while true do end end}",
    "index-recurses": "local C C = setmetatable({}, {__index = function(t, k) return C[k .. 'x'] end}) return C",
}


@pytest.mark.parametrize("case", list(LOOPING_CLASSES))
def test_reading_a_class_cannot_outlast_the_time_limit_at_load(engine, case):
    res = run_child(engine, LOOPING_CLASSES[case])
    assert res["loaded"] is False, res
    assert res["kind"] in ("timeout", "script", "memory"), res
    assert res["elapsed"] < 5, res
    assert res["next"], res


def test_a_number_raised_with_the_heap_full_is_reported_not_fatal(engine):
    src = """
    local hog = {}
    for i = 1, 100000 do hog[i] = false end
    local n = 0
    local function fill() while true do n = n + 1; hog[n] = string.rep("x", 16) .. n end end
    return setmetatable({}, {__index = function() pcall(fill) error(12345) end})
    """
    res = run_child(engine, src)
    assert res["loaded"] is False and res["next"], res


def test_a_non_function_handler_is_a_load_error_naming_it(host):
    with pytest.raises(hostscript.ScriptError, match="on_read_request must be a function, not string"):
        host.load("return {on_read_request = 'oops'}", name="bad.lua")
    assert host.scripts == []


def test_a_ctx_with_a_metatable_is_refused_not_silently_emptied(host):
    host.load("local C = {} function C:on_read_request(txn) "
              "txn.ctx = setmetatable({}, {__index = {a = 1}}) end return C", name="m.lua")
    out = host.fire("read_request", Transaction())
    assert out.status is Outcome.ERROR and "plain table" in out.error.message


def test_each_script_keeps_its_own_time_limit_when_a_thread_rehydrates_many(make_host):
    # every chunk takes ~20% of the limit; rehydrating six of them in one fire (120%
    # together) must not add up to a timeout (wall time, as the limit: os.clock is the
    # process's CPU time, which a loaded machine stretches past the limit; 80 ms of
    # slack per chunk for a busy CI machine to deschedule the thread)
    host = make_host(time_limit=0.1)
    for i in range(6):
        host.load("local t0 = hs.now() while hs.now() - t0 < 0.02 do end "
                  "local C = {} function C:on_read_request(txn) end return C", name=f"s{i}.lua")
    from helpers import run_in_thread
    out = run_in_thread(host.fire, "read_request", Transaction())
    assert out.status is Outcome.CONTINUE, out.error


CACHE = """
local cache = {}
for i = 1, %d do cache[i] = string.rep("v%d", 20) .. i end
local C = {}
function C:on_read_request(txn) txn.resp.headers["x-version"] = "%d" txn.resp.headers["x-n"] = tostring(#cache) end
return C
"""


def test_reloading_a_script_with_a_big_cache_under_the_memory_limit_does_not_brick_the_thread(make_host):
    # each version's module-level cache takes ~60% of the limit: old and new cannot
    # live side by side in one state while the new one loads
    limit = 8 << 20
    host = make_host(memory_limit=limit)
    n = 60000
    host.load(CACHE % (n, 1, 1), name="cache.lua")
    host.load("local D = {} function D:on_send_response(txn) txn.resp.headers['x-d'] = '1' end return D",
              name="other.lua")
    from helpers import run_in_thread

    def serve_many():
        seen = []
        for version in (1, 2, 3):
            if version > 1:
                host.load(CACHE % (n, version, version), name="cache.lua")
            txn = Transaction()
            out = host.fire("read_request", txn)
            assert out.status is Outcome.CONTINUE, out.error
            host.fire("send_response", txn)
            seen.append((txn.response.headers["x-version"], txn.response.headers["x-d"]))
        return seen

    assert run_in_thread(serve_many) == [("1", "1"), ("2", "1"), ("3", "1")]
    assert host.stats()["errors"] == 0  # the thread served every request


def test_util_trim_and_split_are_linear_on_long_runs_of_spaces(make_host):
    # "^%s*(.-)%s*$" retried its tail at every position: 32 KiB of spaces took seconds
    host = make_host(time_limit=0.5)
    host.load("""local util = require "hs.util"
    local C = {}
    function C:on_read_request(txn)
      local v = txn.req.headers["accept"]
      txn.resp.headers["x-n"] = tostring(#util.split(v, ","))
      txn.resp.headers["x-t"] = util.trim(v):sub(1, 3)
    end
    return C""", name="u.lua")
    spaces = " " * (32 << 10)
    txn = Transaction(headers=[("Accept", spaces + "a" + spaces + ",b" + spaces + "x")])
    out = host.fire("read_request", txn)
    assert out.status is Outcome.CONTINUE, out.error
    assert txn.response.headers["x-n"] == "2"
    assert txn.response.headers["x-t"] == "a  "


def test_strict_globals_error_names_no_api_that_does_not_exist(host):
    host.load("local C = {} function C:on_read_request(txn) counter = 1 end return C", name="g.lua")
    out = host.fire("read_request", Transaction())
    assert out.status is Outcome.ERROR
    assert "undeclared global 'counter'" in out.error.message
    assert "hs.shared" not in out.error.message and "txn.ctx" in out.error.message
