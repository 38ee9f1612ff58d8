"""Helpers shared by the test files."""
from __future__ import annotations

import threading
from typing import Any, Callable


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
