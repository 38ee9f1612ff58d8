"""Helpers shared by the test files."""
from __future__ import annotations

import pathlib
import subprocess
import sys
import threading
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
