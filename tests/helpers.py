"""Helpers shared by the test files."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading
import time
from typing import Any, Callable, List

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run fn(*args) in a new thread; return its result (re-raise its exception)."""
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # pragma: no cover - re-raised below
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join(60)
    assert not t.is_alive(), "worker thread did not finish"
    if "error" in box:
        raise box["error"]
    return box.get("result")


def build_c_program(engine: str, source: str, exe: pathlib.Path, *cflags: str) -> pathlib.Path:
    """Compile tests/c/SOURCE against the core for ENGINE (tools/build_c.py) into EXE."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "build_c.py"), engine, str(exe),
                           str(ROOT / "tests" / "c" / source), *cflags],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


def rss_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def wait_for(pred: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll pred() until it is true or TIMEOUT passes; its last value. (Thread-exit
    destructors run just after join returns.)"""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > end:
            return v
        time.sleep(0.0005)


class Heartbeat:
    """A thread that wakes every INTERVAL seconds and records the gaps between its
    wake-ups: a long gap means something held the GIL. Use as a context manager."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.gaps: List[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            time.sleep(self.interval)
            now = time.monotonic()
            self.gaps.append(now - last)
            last = now

    @property
    def max_gap(self) -> float:
        return max(self.gaps, default=0.0)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
