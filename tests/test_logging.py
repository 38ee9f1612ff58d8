"""hs.log / print reach Python logging on the `hostscript` logger."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import pytest

from hostscript import Outcome, ScriptError, Transaction


@pytest.fixture
def records(caplog):
    caplog.set_level(logging.DEBUG, logger="hostscript")

    def get(level=None):
        return [r for r in caplog.records
                if r.name == "hostscript" and (level is None or r.levelno == level)]

    return get


LEVELS = """
local L = {}
function L:on_send_response(txn)
  hs.log.debug("dbg message")
  hs.log.info("info message")
  hs.log.warn("warn message")
  hs.log.error("error message")
end
return L
"""


def test_hs_log_levels_messages_script_and_hook(host, records):
    host.load(LEVELS, name="levels.lua")
    out = host.fire("send_response", Transaction())
    assert out.status is Outcome.CONTINUE
    got = [(r.levelno, r.levelname, r.getMessage(), r.script, r.hook) for r in records()]
    assert got == [
        (10, "DEBUG", "[levels.lua] dbg message", "levels.lua", "send_response"),
        (20, "INFO", "[levels.lua] info message", "levels.lua", "send_response"),
        (30, "WARNING", "[levels.lua] warn message", "levels.lua", "send_response"),
        (40, "ERROR", "[levels.lua] error message", "levels.lua", "send_response"),
    ]


def test_log_record_hook_is_the_fired_hook(host, records):
    host.load("""
local L = {}
function L:on_read_request(txn) hs.log.info("in", "read_request") end
function L:on_log(txn) hs.log.info("in", "log") end
return L
""", name="hooks.lua")
    txn = Transaction()
    host.fire("read_request", txn)
    host.fire("log", txn)
    got = [(r.hook, r.getMessage()) for r in records()]
    assert got == [("read_request", "[hooks.lua] in read_request"), ("log", "[hooks.lua] in log")]


def test_log_record_script_is_the_script_that_logged(host, records):
    for name in ("first.lua", "second.lua"):
        host.load(f"""
local L = {{}}
function L:on_read_request(txn) hs.log.warn("from {name}") end
return L
""", name=name)
    host.fire("read_request", Transaction())
    got = [(r.script, r.getMessage()) for r in records(logging.WARNING)]
    assert got == [("first.lua", "[first.lua] from first.lua"),
                   ("second.lua", "[second.lua] from second.lua")]


def test_log_args_joined_with_spaces_and_converted_with_tostring(host, records):
    host.load("""
local L = {}
function L:on_read_request(txn)
  local obj = setmetatable({}, {__tostring = function() return "<obj>" end})
  hs.log.info("a", 1, nil, true, false, 2.5, obj, "z")
  hs.log.info()
  hs.log.info("single")
end
return L
""", name="args.lua")
    assert host.fire("read_request", Transaction()).status is Outcome.CONTINUE
    assert [r.getMessage() for r in records(logging.INFO)] == [
        "[args.lua] a 1 nil true false 2.5 <obj> z",
        "[args.lua] ",
        "[args.lua] single",
    ]


def test_log_of_table_uses_tostring(host, records):
    host.load("""
local L = {}
function L:on_read_request(txn) hs.log.info({}, print) end
return L
""", name="t.lua")
    host.fire("read_request", Transaction())
    (rec,) = records(logging.INFO)
    msg = rec.getMessage()
    assert msg.startswith("[t.lua] table: ")
    assert " function: " in msg or " builtin" in msg


def test_print_logs_at_info(host, records, capsys):
    host.load("""
local L = {}
function L:on_read_request(txn) print("printed", 42, nil) end
return L
""", name="p.lua")
    assert host.fire("read_request", Transaction()).status is Outcome.CONTINUE
    got = [(r.levelno, r.getMessage(), r.script, r.hook) for r in records()]
    assert got == [(20, "[p.lua] printed 42 nil", "p.lua", "read_request")]
    assert "printed" not in capsys.readouterr().out


def test_logs_made_while_chunk_runs_at_load_time_are_emitted(host, records):
    host.load("""
hs.log.info("loading", "chunk")
print("printed at load")
local L = {}
function L.new()
  hs.log.debug("new called")
  return L
end
return L
""", name="chunk.lua")
    # emitted by host.load itself, before any fire
    got = [(r.levelno, r.getMessage(), r.script, r.hook) for r in records()]
    assert got == [
        (20, "[chunk.lua] loading chunk", "chunk.lua", "load"),
        (20, "[chunk.lua] printed at load", "chunk.lua", "load"),
        (10, "[chunk.lua] new called", "chunk.lua", "load"),
    ]


def test_logs_of_a_chunk_that_fails_are_emitted_before_the_error(host, records):
    with pytest.raises(ScriptError) as ei:
        host.load('hs.log.warn("about to fail")\nerror("nope")\n', name="fail.lua")
    assert ei.value.line == 2
    warn = [(r.getMessage(), r.script) for r in records(logging.WARNING)]
    assert warn == [("[fail.lua] about to fail", "fail.lua")]


def test_handler_error_logged_at_error_with_traceback(host, records):
    host.load("""
local L = {}
local function helper()
  error("handler exploded")
end
function L:on_read_request(txn)
  hs.log.info("before")
  helper()
end
return L
""", name="boom.lua")
    out = host.fire("read_request", Transaction())
    assert out.status is Outcome.ERROR
    info = [r.getMessage() for r in records(logging.INFO)]
    assert info == ["[boom.lua] before"]
    (err,) = records(logging.ERROR)
    msg = err.getMessage()
    assert err.name == "hostscript"
    assert err.script == "boom.lua"
    assert err.hook == "read_request"
    assert "boom.lua in read_request" in msg
    assert "boom.lua:4: handler exploded" in msg
    assert "stack traceback" in msg
    assert out.error.traceback in msg
    assert "boom.lua:8" in msg  # the caller's frame is in the traceback


def test_handler_error_logged_even_when_fire_raises(make_host, records):
    host = make_host(on_error="raise")
    host.load("""
local L = {}
function L:on_log(txn) hs.log.warn("last words"); error("bad") end
return L
""", name="raise.lua")
    with pytest.raises(Exception):
        host.fire("log", Transaction())
    assert [r.getMessage() for r in records(logging.WARNING)] == ["[raise.lua] last words"]
    (err,) = records(logging.ERROR)
    assert "raise.lua:3: bad" in err.getMessage()
    assert "stack traceback" in err.getMessage()
    assert (err.script, err.hook) == ("raise.lua", "log")


def test_logs_respect_the_logger_level(host, caplog):
    caplog.set_level(logging.WARNING, logger="hostscript")
    host.load(LEVELS, name="levels.lua")
    host.fire("send_response", Transaction())
    got = [r.levelno for r in caplog.records if r.name == "hostscript"]
    assert got == [30, 40]


# A long first argument makes the message buffer grow exactly where the separator
# is added. Run in a child process: a memory error there must fail this test, not
# take the test session down.
LONG_ARGS_CHILD = textwrap.dedent("""
    import json, logging, sys
    import hostscript
    engine = sys.argv[1]
    got = []
    class Keep(logging.Handler):
        def emit(self, record):
            got.append(record.getMessage())
    lg = logging.getLogger("hostscript")
    lg.addHandler(Keep())
    lg.setLevel(logging.DEBUG)
    host = hostscript.Host(engine=engine)
    host.load('''
    local L = {}
    function L:on_read_request(txn)
      hs.log.info(string.rep("x", tonumber(txn.req.headers["x-n"])), "y", "z")
    end
    return L
    ''', name="long.lua")
    for n in (100, 1024, 4000, 8192):
        got.clear()
        out = host.fire("read_request", hostscript.Transaction(headers=[("x-n", str(n))]))
        ok = got == ["[long.lua] " + "x" * n + " y z"]
        print(json.dumps({"n": n, "status": out.status.name, "ok": ok,
                          "head": got[0][:30] if got else None,
                          "tail": got[0][-10:] if got else None}), flush=True)
""")


def test_long_log_arguments_are_joined_intact(engine):
    proc = subprocess.run([sys.executable, "-c", LONG_ARGS_CHILD, engine],
                          capture_output=True, text=True, timeout=20)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, (f"child died with {proc.returncode} after {results}; "
                                  f"stderr: {proc.stderr[-500:]}")
    assert [r["n"] for r in results] == [100, 1024, 4000, 8192]
    bad = [r for r in results if not (r["ok"] and r["status"] == "CONTINUE")]
    assert bad == []


def test_logs_over_the_per_fire_budget_are_dropped_and_counted(make_host, caplog):
    host = make_host(("read_request",))
    host.load("""local C = {}
function C:on_read_request(txn)
  for i = 1, 2000 do hs.log.info(string.rep("x", 100), i) end
end
return C""", name="chatty.lua")
    with caplog.at_level(logging.DEBUG, logger="hostscript"):
        out = host.fire("read_request", Transaction())
    assert out.status is Outcome.CONTINUE
    kept = [r for r in caplog.records if getattr(r, "script", None) == "chatty.lua"]
    dropped = [r for r in caplog.records if "log messages dropped" in r.getMessage()]
    assert 0 < len(kept) < 2000
    assert len(dropped) == 1 and dropped[0].levelno == logging.WARNING
    assert f"{2000 - len(kept)} log messages dropped" in dropped[0].getMessage()
