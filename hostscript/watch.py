"""Reload scripts when their files change: ``Host.watch`` (docs/check.md).

The watching is watchfiles' (inotify on Linux, through its ``watch()`` generator),
run in a daemon thread and stopped by its stop event. The directories holding the
files are watched, not the files themselves, so an editor's save by rename, or a
file deleted and created again, is seen. A change reloads that script with
``host.load_file``; a failed reload publishes nothing — the running version stays —
and the error is logged (logger ``hostscript``) with the file and line.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Union

import watchfiles

from . import check as _check
from .errors import ClosedError, ScriptError, UsageError

if TYPE_CHECKING:
    from .host import Host

log = logging.getLogger("hostscript")

PathArg = Union[str, "os.PathLike[str]"]


class Watcher:
    """Watches script files for a host; a context manager. ``stop()`` ends it."""

    def __init__(self, host: "Host", paths: Optional[Union[PathArg, Iterable[PathArg]]] = None, *,
                 debounce: float = 0.1, ready_timeout: float = 5.0) -> None:
        if isinstance(debounce, bool) or not isinstance(debounce, (int, float)) or not 0 < debounce <= 60:
            raise UsageError(f"debounce must be a number of seconds in (0, 60], not {debounce!r}")
        self.host = host
        loaded = {os.path.realpath(p): name for name, p in host._paths.items() if p is not None}
        if paths is None:
            given: List[str] = list(loaded.values())
        elif isinstance(paths, (str, os.PathLike)):
            given = [os.fspath(paths)]
        else:
            given = [os.fspath(p) for p in paths]
        if not given:
            raise UsageError("nothing to watch: no script was loaded from a file")
        # real path of the file -> the path load_file is called with (a loaded
        # script's own name, so that a reload replaces it instead of adding one)
        self._targets: Dict[str, str] = {}
        for p in given:
            real = os.path.realpath(p)
            self._targets[real] = loaded.get(real, p)
        dirs = sorted({os.path.dirname(r) for r in self._targets})
        for d in dirs:
            if not os.path.isdir(d):
                raise UsageError(f"cannot watch {d}: not a directory")
        self.paths = list(self._targets.values())
        self.debounce = float(debounce)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._failed: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, args=(dirs,), daemon=True,
                                        name="hostscript-watch")
        self._thread.start()
        # watchfiles sets its watches up before its first yield (a timeout's empty
        # set): from then on no change is missed
        self._ready.wait(ready_timeout)
        if self._failed is not None:
            raise UsageError(f"cannot watch {', '.join(dirs)}: {self._failed}")

    def _run(self, dirs: List[str]) -> None:
        ms = max(1, int(self.debounce * 1000))
        try:
            for changes in watchfiles.watch(
                    *dirs, watch_filter=lambda _change, path: os.path.realpath(path) in self._targets,
                    debounce=ms, step=min(50, ms), stop_event=self._stop, rust_timeout=100,
                    yield_on_timeout=True, raise_interrupt=False, recursive=False):
                self._ready.set()
                if self._stop.is_set() or self.host.closed:
                    break
                for real in sorted({os.path.realpath(p) for _, p in changes}):
                    if not self._reload(self._targets[real]):
                        return
        except Exception as exc:  # the watch could not start, or died
            self._failed = exc
            log.error("watching %s failed: %s", ", ".join(dirs), exc)
        finally:
            self._ready.set()

    def _reload(self, path: str) -> bool:
        """Load PATH again; False when the host is closed (the watch ends)."""
        if not os.path.exists(path):
            log.warning("%s was removed; the loaded version keeps running", path)
            return True
        try:
            self.host.load_file(path)
        except ClosedError:
            return False
        except ScriptError as exc:
            where = exc.message
            if not exc.line:  # a class-level error: its line from the listing, when there is one
                line = _check.locate(path, _unprefixed(exc.message, path))
                if line is not None:
                    where = f"{path}:{line}: {_unprefixed(exc.message, path)}"
            log.error("reload failed, keeping the running version: %s", where)
            return True
        log.info("reloaded %s", path)
        return True

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: Optional[float] = 5.0) -> None:
        """Stop watching; returns once the watching thread ended (or *timeout* passed)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> "Watcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<hostscript.Watcher {'running' if self.running else 'stopped'} {self.paths}>"


def _unprefixed(message: str, path: str) -> str:
    return message[len(path) + 2:] if message.startswith(path + ": ") else message
