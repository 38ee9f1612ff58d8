"""Helpers shared by the test files."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading
import time
from typing import Any, Callable

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
