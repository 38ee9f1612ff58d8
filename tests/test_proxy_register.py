"""hs.register through the reference proxy: ``hostscript serve`` running
examples/event_system.lua (docs/register.md). A request with ``x-event-system: on``
registers a class handling send_request, read_response and send_response; every
worker thread runs it from its next fire on."""
from __future__ import annotations

import http.client
import json
import logging
import shutil
import signal
import threading
from typing import Dict, List, Optional, Tuple

import pytest

from hostscript import Transaction

from helpers import ROOT, wait_for
from origin import header
from test_proxy_cli import Serve

SCRIPT = "examples/event_system.lua"  # relative to ROOT, where Serve runs: the script's name
CLASS = SCRIPT + "#events"
VERSION = "events-1.0"
THREADS = 4
ON = {"x-event-system": "on"}


def get(s: Serve, path: str, headers: Optional[Dict[str, str]] = None
        ) -> Tuple[int, http.client.HTTPResponse, dict]:
    """GET PATH on a connection of its own: status, response, the origin's echo (or {})."""
    c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        body = r.read()
    finally:
        c.close()
    try:
        echo = json.loads(body)
    except ValueError:
        echo = {}
    return r.status, r, echo


def events(r: http.client.HTTPResponse, echo: dict) -> List[Optional[str]]:
    """The three x-on_* values: the one the origin got, the two the client got."""
    sent = header(echo, "x-on_send_request") if echo else []
    return [sent[0] if sent else None, r.getheader("x-on_read_response"),
            r.getheader("x-on_send_response")]


def at_once(s: Serve, n: int) -> List[Tuple[int, http.client.HTTPResponse, dict]]:
    """N requests together, each on a new connection, each held 0.4 s by the origin:
    with N == THREADS, each one occupies a worker thread of its own."""
    out: List[object] = [None] * n

    def one(i: int) -> None:
        try:
            out[i] = get(s, f"/together/{i}?delay=0.4")
        except OSError as exc:
            out[i] = exc

    ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert all(isinstance(o, tuple) for o in out), out
    return out  # type: ignore[return-value]


def serve(origin, engine: str, script: str = SCRIPT) -> Serve:
    s = Serve("--listen", "127.0.0.1:0", "--upstream", origin.url, "--script", script,
              "--engine", engine, "--threads", str(THREADS), "--log-level", "info")
    s.started()
    return s


def test_event_system_registers_a_class_every_thread_runs(engine, origin):
    s = serve(origin, engine)
    try:
        start = next(line for line in s.lines if "listening on" in line)
        assert "(hooks: read_request)" in start  # the script alone handles read_request only

        # before the trigger: nothing, on any thread
        for st, r, echo in at_once(s, THREADS):
            assert st == 200 and events(r, echo) == [None, None, None]

        # the trigger: its read_request registers; the proxy fires a request's later
        # hooks only if some script handled them when it began, so not this one's
        st, r, echo = get(s, "/trigger", ON)
        assert st == 200 and events(r, echo) == [None, None, None]
        assert s.logged(f"registered {CLASS} (hooks: send_request, read_response, "
                        f"send_response) from {SCRIPT} in read_request"), "\n".join(s.lines)

        # after: every request, on every thread, over new connections (4 held together
        # by the origin: one per worker; the trigger's thread is one of them at most)
        for st, r, echo in at_once(s, THREADS):
            assert st == 200 and events(r, echo) == [VERSION] * 3, (r.getheaders(), echo)
        for i in range(4):
            st, r, echo = get(s, f"/after/{i}")
            assert st == 200 and events(r, echo) == [VERSION] * 3

        # read_response ran before the store: a cache hit keeps x-on_read_response;
        # send_request does not fire for a hit, send_response does
        st, r, echo = get(s, "/cached?cc=max-age=60")
        assert r.getheader("x-cache") == "MISS" and events(r, echo) == [VERSION] * 3
        st, r, _ = get(s, "/cached?cc=max-age=60")
        assert r.getheader("x-cache") == "HIT"
        assert [r.getheader("x-on_read_response"), r.getheader("x-on_send_response")] == [VERSION] * 2
        assert origin.count("/cached?cc=max-age=60") == 1

        # one registration: a later trigger on a thread that registered does nothing
        # (another thread may register the same class again: a replacement)
        assert sum(f"registered {CLASS}" in line for line in s.lines) <= THREADS
        assert not any("Traceback" in line or " ERROR " in line for line in s.lines), s.lines
    finally:
        assert s.stop() == 0, "\n".join(s.lines)


def test_sighup_after_a_registration_reloads_and_keeps_the_class(engine, origin, tmp_path):
    # docs/register.md: reloading a script keeps the classes its handlers registered
    script = tmp_path / "event_system.lua"
    shutil.copy(ROOT / SCRIPT, script)
    s = serve(origin, engine, str(script))
    try:
        st, r, echo = get(s, "/trigger", ON)
        assert s.logged(f"registered {script}#events")
        assert wait_for(lambda: events(*get(s, "/x")[1:]) == [VERSION] * 3, 5)
        s.proc.send_signal(signal.SIGHUP)
        assert s.logged(f"reloaded {script}", timeout=5), "\n".join(s.lines)
        assert not s.logged("Traceback", timeout=0.5), "\n".join(s.lines)
        for st, r, echo in at_once(s, THREADS):
            assert st == 200 and events(r, echo) == [VERSION] * 3
    finally:
        assert s.stop() == 0, "\n".join(s.lines)


# ---- what tests/c/register_stress.c met, in its shortest form ----

SLOW_REGISTRATION = """
local K = {}
function K:on_send_response(txn) txn.resp.headers["x-k"] = "1" end
return {on_read_request = function(self, txn)
  hs.register(K, {name = "k"})
  local t = hs.now()
  while hs.now() - t < 0.6 do end -- the script is unloaded meanwhile
end}
"""


def test_a_registration_in_flight_when_its_script_unloads_is_dropped(make_host, caplog):
    # docs/register.md: unloading a script removes the classes its handlers registered;
    # one registered by a fire that began before the unload and ended after it, too
    caplog.set_level(logging.INFO, logger="hostscript")
    host = make_host(("read_request", "send_response"), time_limit=5)
    host.load(SLOW_REGISTRATION, name="s.lua")
    timer = threading.Timer(0.05, host.unload, ["s.lua"])
    timer.start()
    assert host.fire("read_request", Transaction("GET", "/", [])).error is None
    timer.join()
    t = Transaction("GET", "/", [])
    host.fire("send_response", t)
    assert host.scripts == [] and host.stats()["registered"] == 0, host.scripts
    assert t.response.headers.get("x-k") is None
    assert any("registration of s.lua#k dropped: its script was unloaded" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
