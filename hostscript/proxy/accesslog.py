"""The access log: one line per request, in the common log format plus the cache
status and the duration in milliseconds::

    127.0.0.1 - - [06/Mar/2025:10:12:01 +0000] "GET /a HTTP/1.1" 200 1432 MISS 2.871
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Optional, TextIO, Union


class AccessLog:
    """Writes to a file path (appended, one flush per line), ``-`` (stdout), or an
    open text stream."""

    def __init__(self, target: Union[str, TextIO]) -> None:
        self._own = False
        if target == "-":
            self._out: TextIO = sys.stdout
        elif isinstance(target, str):
            self._out = open(target, "a", encoding="latin-1", buffering=1)
            self._own = True
        else:
            self._out = target
        self._lock = threading.Lock()

    def write(self, peer: str, request_line: str, status: int, size: int, cache: Optional[str],
              duration: float) -> None:
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z")
        # a target may hold quotes: escaped as Apache does, so the line parses back
        request_line = request_line.replace("\\", "\\\\").replace('"', '\\"')
        line = (f'{peer} - - [{stamp}] "{request_line}" {status} {size or "-"} '
                f'{cache or "-"} {duration * 1e3:.3f}\n')
        with self._lock:
            try:
                self._out.write(line)
                self._out.flush()
            except (OSError, ValueError):
                pass  # a closed or full log never fails a request

    def close(self) -> None:
        if self._own:
            self._out.close()
