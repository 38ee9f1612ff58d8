"""``hostscript serve`` as a process: the start-up line, SIGHUP reloads (a broken
script keeps the running program), SIGTERM drains requests in flight and exits 0."""
from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
from typing import List, Optional

import pytest

from helpers import ROOT, wait_for

VERSION = """
local C = {{}}
function C:on_send_response(txn) txn.resp.headers["x-version"] = "{v}" end
return C
"""
BROKEN = """local C = {}
function C:on_send_response(txn)
  if then end
end
return C
"""


class Serve:
    """``python -m hostscript serve ...`` with its stderr collected line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "hostscript", "serve", *args],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: List[str] = []
        self._t = threading.Thread(target=self._drain, daemon=True)
        self._t.start()
        self.port: Optional[int] = None

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def started(self, timeout: float = 20) -> int:
        found = wait_for(lambda: next((m for m in map(re.compile(
            r"listening on http://127\.0\.0\.1:(\d+)").search, self.lines) if m), None)
            or self.proc.poll() is not None, timeout)
        assert found and self.proc.poll() is None, "\n".join(self.lines)
        self.port = int(found.group(1))
        return self.port

    def admin_port(self) -> int:
        """The admin listener's port, from the start-up line (after started())."""
        m = next((re.search(r"admin http://127\.0\.0\.1:(\d+)/-/stats", line) for line in self.lines
                  if "listening on" in line), None)
        assert m, self.lines
        return int(m.group(1))

    def logged(self, text: str, timeout: float = 10) -> bool:
        return bool(wait_for(lambda: any(text in line for line in self.lines), timeout))

    def get(self, path: str, timeout: float = 10) -> http.client.HTTPResponse:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        c.request("GET", path)
        r = c.getresponse()
        r.body = r.read()  # type: ignore[attr-defined]
        c.close()
        return r

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._t.join(5)


def test_sighup_reloads_and_a_broken_script_keeps_the_old_program(engine, origin, tmp_path):
    script = tmp_path / "version.lua"
    script.write_text(VERSION.format(v=1))
    access = tmp_path / "access.log"
    s = Serve("--listen", "127.0.0.1:0", "--upstream", origin.url, "--script", str(script),
              "--engine", engine, "--threads", "4", "--access-log", str(access))
    try:
        s.started()
        start = next(line for line in s.lines if "listening on" in line)
        assert f"{engine} engine" in start and str(script) in start and "send_response" in start
        assert s.get("/v").getheader("x-version") == "1"

        script.write_text(BROKEN)
        s.proc.send_signal(signal.SIGHUP)
        assert s.logged(f"reload of {script} failed"), "\n".join(s.lines)
        failed = next(line for line in s.lines if "reload of" in line)
        assert f"{script}:3:" in failed  # the ScriptError names the file and line
        for _ in range(3):
            assert s.get("/v").getheader("x-version") == "1"  # the old program serves on

        script.write_text(VERSION.format(v=2))
        s.proc.send_signal(signal.SIGHUP)
        assert s.logged(f"reloaded {script}")
        assert wait_for(lambda: s.get("/v").getheader("x-version") == "2", 5)
    finally:
        assert s.stop() == 0, "\n".join(s.lines)
    lines = access.read_text().splitlines()
    assert len(lines) >= 5 and all('"GET /v HTTP/1.1" 200 ' in line for line in lines)


def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(engine, origin):
    s = Serve("--listen", "127.0.0.1:0", "--upstream", origin.url, "--script",
              str(ROOT / "examples" / "stamp.lua"), "--engine", engine, "--upstream-timeout", "10")
    try:
        s.started()
        box = {}

        def slow() -> None:
            try:
                box["r"] = s.get("/slow?delay=1.5&size=100000")
            except Exception as e:  # noqa: BLE001
                box["e"] = e

        t = threading.Thread(target=slow)
        t.start()
        assert wait_for(lambda: origin.count("/slow?delay=1.5&size=100000") == 1, 10)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        t.join(15)
        assert "e" not in box, box
        r = box["r"]
        assert r.status == 200 and r.body == b"x" * 100000
        assert r.getheader("connection") == "close"  # draining: no keep-alive
        assert s.proc.wait(15) == 0
        assert time.monotonic() - t0 < 8
        assert s.logged("SIGTERM: stopping") and s.logged("stopped")
        with pytest.raises(OSError):
            s.get("/after")
    finally:
        s.stop()


def test_a_broken_script_at_start_is_reported_with_its_line(engine, origin, tmp_path):
    bad = tmp_path / "bad.lua"
    bad.write_text(BROKEN)
    p = subprocess.run([sys.executable, "-m", "hostscript", "serve", "--listen", "127.0.0.1:0",
                        "--upstream", origin.url, "--script", str(bad), "--engine", engine],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and f"{bad}:3:" in p.stderr


def test_admin_option_serves_stats(engine, origin, tmp_path):
    script = tmp_path / "v.lua"
    script.write_text(VERSION.format(v=7))
    s = Serve("--listen", "127.0.0.1:0", "--upstream", origin.url, "--script", str(script),
              "--engine", engine, "--admin", "127.0.0.1:0", "--cache-size", "1M")
    try:
        s.started()
        admin = s.admin_port()
        assert s.get("/a?cc=max-age=60").getheader("x-version") == "7"
        assert s.get("/a?cc=max-age=60").getheader("x-cache") == "HIT"
        c = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
        c.request("GET", "/-/stats")
        doc = json.loads(c.getresponse().read())
        assert doc["proxy"]["cache"]["hits"] == 1
        assert doc["host"]["hooks"]["send_response"]["fires"] >= 2
    finally:
        assert s.stop() == 0


def test_shared_option(engine, origin, tmp_path):
    script = tmp_path / "count.lua"
    script.write_text("""
        local C = {}
        function C:on_send_response(txn)
            txn.resp.headers["x-count"] = tostring(hs.shared.counters:incr("n", 1, 0))
        end
        return C""")
    s = Serve("--listen", "127.0.0.1:0", "--upstream", origin.url, "--script", str(script),
              "--engine", engine, "--shared", "counters=1M")
    try:
        s.started()
        got = [s.get("/s").getheader("x-count") for _ in range(3)]
        assert got == ["1", "2", "3"]
    finally:
        assert s.stop() == 0


def test_limit_options_reach_the_proxy(engine, origin, tmp_path):
    script = tmp_path / "v.lua"
    script.write_text(VERSION.format(v=1))
    s = Serve("--listen", "127.0.0.1:0", "--upstream", origin.url, "--script", str(script),
              "--engine", engine, "--max-request-line", "100", "--max-headers", "5",
              "--max-body", "10")
    try:
        s.started()
        assert s.get("/" + "a" * 99).status == 200
        assert s.get("/" + "a" * 150).status == 414
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
        c.request("GET", "/h", headers={f"X-{i}": "v" for i in range(8)})
        assert c.getresponse().status == 431
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
        c.request("POST", "/b", body=b"x" * 11)
        assert c.getresponse().status == 413
    finally:
        assert s.stop() == 0
    p = subprocess.run([sys.executable, "-m", "hostscript", "serve", "--upstream", "ftp://x",
                        "--script", str(script)], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "only http:// upstreams" in p.stderr
