"""Host.watch: a script edited on disk is live within a second; a broken edit keeps
the running program and logs file:line; a file deleted and created again is
reloaded; stop() stops. And ``hostscript serve --watch``."""
from __future__ import annotations

import logging
import os
import time

import pytest

import hostscript
from helpers import wait_for
from test_proxy_cli import Serve

VERSION = ('local C = {{}}\nfunction C:on_read_request(txn) return txn:respond(200, "{v}") end\n'
           'return C\n')
BROKEN = "local C = {}\nfunction C:on_read_request(txn)\n  if then end\nend\nreturn C\n"
NO_CLASS = "local C = {}\nfunction C:on_read_request(txn) end\nreturn 42\n"
LIVE = 1.0  # seconds: an edit is live within this


def answer(host: hostscript.Host) -> bytes:
    txn = hostscript.Transaction("GET", "/", [("Host", "a")])
    host.fire("read_request", txn)
    return txn.response.body


def edit(path, text: str) -> None:
    """Write like an editor that saves in place; bump the mtime so no change is lost
    to a coarse clock."""
    path.write_text(text)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def live(host: hostscript.Host, body: bytes, timeout: float = LIVE) -> bool:
    return bool(wait_for(lambda: answer(host) == body, timeout))


@pytest.fixture
def script(make_host, tmp_path):
    p = tmp_path / "version.lua"
    p.write_text(VERSION.format(v=1))
    host = make_host(("read_request",))
    host.load_file(p)
    assert answer(host) == b"1"
    return host, p


def test_an_edit_is_live_within_a_second(script):
    host, p = script
    with host.watch() as w:
        for v in (2, 3):
            t0 = time.monotonic()
            edit(p, VERSION.format(v=v))
            assert live(host, str(v).encode()), f"version {v} not live after {LIVE} s"
            assert time.monotonic() - t0 < LIVE
        assert host.scripts == [str(p)]  # reloaded in place, not loaded beside it
        assert w.running
    assert not w.running


def test_a_broken_edit_keeps_the_running_program_and_logs_file_and_line(script, caplog):
    host, p = script
    caplog.set_level(logging.INFO, logger="hostscript")
    with host.watch():
        edit(p, BROKEN)
        assert wait_for(lambda: any(r.levelno == logging.ERROR for r in caplog.records), 3)
        errors = [r.getMessage() for r in caplog.records
                  if r.name == "hostscript" and r.levelno == logging.ERROR]
        assert errors == [f"reload failed, keeping the running version: {p}:3: "
                          "unexpected symbol near 'then'"]
        for _ in range(5):
            assert answer(host) == b"1"
        # a class-level error has no line from the core: the listing gives it
        edit(p, NO_CLASS)
        assert wait_for(lambda: sum(r.levelno == logging.ERROR for r in caplog.records) == 2, 3)
        assert caplog.records[-1].getMessage() == (
            f"reload failed, keeping the running version: {p}:3: the script must return a "
            "handler class (a table) or register one with hs.register, not number")
        assert answer(host) == b"1"
        edit(p, VERSION.format(v=2))
        assert live(host, b"2")


def test_a_deleted_then_recreated_file_is_reloaded(script, caplog):
    host, p = script
    caplog.set_level(logging.INFO, logger="hostscript")
    with host.watch():
        p.unlink()
        assert wait_for(lambda: any("was removed" in r.getMessage() for r in caplog.records), 3)
        assert answer(host) == b"1"  # the loaded version runs on
        p.write_text(VERSION.format(v=2))
        assert live(host, b"2")
        # replaced by a rename, as editors save
        tmp = p.with_name("version.lua.tmp")
        tmp.write_text(VERSION.format(v=3))
        os.replace(tmp, p)
        assert live(host, b"3")
    assert host.scripts == [str(p)]


def test_stop_stops(script):
    host, p = script
    w = host.watch(str(p), debounce=0.05)
    edit(p, VERSION.format(v=2))
    assert live(host, b"2")
    w.stop()
    assert not w.running
    edit(p, VERSION.format(v=3))
    time.sleep(0.5)
    assert answer(host) == b"2"
    w.stop()  # again: nothing to do


def test_a_path_spelled_differently_reloads_the_loaded_script(script, tmp_path, monkeypatch):
    host, p = script
    monkeypatch.chdir(tmp_path)
    with host.watch(["version.lua"]) as w:
        assert w.paths == [str(p)]
        edit(p, VERSION.format(v=2))
        assert live(host, b"2")
    assert host.scripts == [str(p)]


def test_a_closed_host_ends_the_watch(make_host, tmp_path):
    p = tmp_path / "v.lua"
    p.write_text(VERSION.format(v=1))
    host = make_host(("read_request",))
    host.load_file(p)
    w = host.watch()
    assert w.running
    host.close()
    assert wait_for(lambda: not w.running, 3)


def test_bad_arguments(make_host, tmp_path):
    host = make_host(("read_request",))
    with pytest.raises(hostscript.UsageError, match="nothing to watch"):
        host.watch()
    with pytest.raises(hostscript.UsageError, match="not a directory"):
        host.watch([str(tmp_path / "nowhere" / "a.lua")])
    with pytest.raises(hostscript.UsageError, match="debounce"):
        host.watch([str(tmp_path / "a.lua")], debounce=0)


def test_serve_watch_reloads_on_change(engine, origin, tmp_path):
    script = tmp_path / "version.lua"
    script.write_text('local C = {}\nfunction C:on_send_response(txn) '
                      'txn.resp.headers["x-version"] = "1" end\nreturn C\n')
    s = Serve("--listen", "127.0.0.1:0", "--upstream", origin.url, "--script", str(script),
              "--engine", engine, "--threads", "2", "--watch")
    try:
        s.started()
        assert s.get("/v").getheader("x-version") == "1"
        edit(script, BROKEN.replace("on_read_request", "on_send_response"))
        assert s.logged(f"reload failed, keeping the running version: {script}:3:", 5), \
            "\n".join(s.lines)
        assert s.get("/v").getheader("x-version") == "1"
        edit(script, script.read_text().replace("if then end", 'txn.resp.headers["x-version"] = "2"'))
        assert s.logged(f"reloaded {script}", 5), "\n".join(s.lines)
        assert wait_for(lambda: s.get("/v").getheader("x-version") == "2", 5)
    finally:
        assert s.stop() == 0, "\n".join(s.lines)
