"""Host and transaction lifetime under shutdown: close() while other threads fire,
the interpreter exiting while daemon threads are inside long fires, a transaction
fired from two threads at once. A server under shutdown does exactly these things;
each must end cleanly. The crash-prone cases run in a subprocess."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SLOW = """local C = {}
function C:on_read_request(txn)
  local t0 = os.clock() while os.clock() - t0 < %s do end
  txn.resp.headers["x-done"] = "yes"
end return C"""


def run_child(engine: str, body: str, timeout: float = 60) -> subprocess.CompletedProcess:
    code = "import hostscript, threading, time, sys\nENGINE = %r\n" % engine + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def test_close_waits_for_fires_running_in_other_threads(engine):
    proc = run_child(engine, """
        host = hostscript.Host(engine=ENGINE, time_limit=5)  # the long fire runs without the GIL
        host.load(%r, name="slow.lua")
        txn = hostscript.Transaction()
        results = []
        worker = threading.Thread(target=lambda: results.append(host.fire("read_request", txn)))
        worker.start()
        while host.stats()["fires"] == 0:
            time.sleep(0.001)
        host.close()  # returns once the running fire returned
        worker.join()
        assert results[0].status is hostscript.Outcome.CONTINUE
        assert txn.response.headers["x-done"] == "yes"
        try:
            host.fire("read_request", hostscript.Transaction())
        except hostscript.ClosedError:
            print("ok")
    """ % (SLOW % 0.3))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-3000:]


def test_close_with_a_timeout_gives_up_without_freeing_a_running_state(engine):
    proc = run_child(engine, """
        host = hostscript.Host(engine=ENGINE, time_limit=30)
        host.load("local C = {} function C:on_read_request(txn) while true do end end return C", name="spin.lua")
        t = threading.Thread(target=host.fire, args=("read_request", hostscript.Transaction()), daemon=True)
        t.start()
        while host.stats()["fires"] == 0:
            time.sleep(0.001)
        t0 = time.monotonic()
        host.close(timeout=0.2)
        waited = time.monotonic() - t0
        assert host.closed and 0.15 < waited < 5, waited
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-3000:]
    assert "still running" in proc.stderr


@pytest.mark.parametrize("threads", [1, 4])
def test_interpreter_exit_during_long_fires_in_daemon_threads_is_clean(engine, threads):
    proc = run_child(engine, """
        hostscript.host.EXIT_WAIT = 0.3
        host = hostscript.Host(engine=ENGINE, time_limit=30)
        host.load("local C = {} function C:on_read_request(txn) while true do txn.ctx.n = 1 end end return C",
                  name="spin.lua")
        for _ in range(%d):
            threading.Thread(target=host.fire, args=("read_request", hostscript.Transaction()),
                             daemon=True).start()
        while host.stats()["fires"] < %d:
            time.sleep(0.001)
        print("exiting", flush=True)
    """ % (threads, threads))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.strip() == "exiting"


def test_interpreter_exit_after_fires_finished_frees_quietly(engine):
    proc = run_child(engine, """
        host = hostscript.Host(engine=ENGINE)
        host.load("local C = {} function C:on_read_request(txn) txn.ctx.a = 1 end return C", name="a.lua")
        for _ in range(3):
            threading.Thread(target=host.fire, args=("read_request", hostscript.Transaction())).start()
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    assert "still running" not in proc.stderr


def test_closing_while_many_threads_fire_short_hooks_never_crashes(engine):
    proc = run_child(engine, """
        for round in range(20):
            host = hostscript.Host(engine=ENGINE)
            host.load("local C = {} function C:on_read_request(txn) txn.resp.headers['x'] = '1' end return C",
                      name="a.lua")
            stop = False
            def work():
                while True:
                    try:
                        host.fire("read_request", hostscript.Transaction())
                    except hostscript.ClosedError:
                        return
            ts = [threading.Thread(target=work) for _ in range(4)]
            for t in ts:
                t.start()
            time.sleep(0.01)
            host.close()
            for t in ts:
                t.join()
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-3000:]
