"""The proxy's counters (``Proxy.stats()``, the admin listener's ``proxy`` part)."""
from __future__ import annotations

import threading
from typing import Any, Dict


class ProxyStats:
    """Thread-safe counters; a worker updates them once per request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.responses: Dict[str, int] = {f"{c}xx": 0 for c in range(1, 6)}
        self.errors = 0            # handler errors (a hook's Status.ERROR) and internal errors
        self.upstream_errors = 0   # 502/504: refused, reset, timed out, malformed, cut short
        self.client_errors = 0     # requests refused by the proxy: 400, 408, 413, 414, 431, 501
        self.cache_status: Dict[str, int] = {"HIT": 0, "MISS": 0}
        self.connections = 0       # client connections open now
        self.connections_total = 0
        self.bytes_sent = 0

    def request_done(self, status: int, cache: str, sent: int, handler_errors: int,
                     upstream_error: bool, client_error: bool) -> None:
        with self._lock:
            self.requests += 1
            key = f"{status // 100}xx"
            self.responses[key] = self.responses.get(key, 0) + 1
            if cache in self.cache_status:
                self.cache_status[cache] += 1
            self.bytes_sent += sent
            self.errors += handler_errors
            self.upstream_errors += upstream_error
            self.client_errors += client_error

    def connection(self, delta: int) -> None:
        with self._lock:
            self.connections += delta
            if delta > 0:
                self.connections_total += delta

    def snapshot(self) -> Dict[str, Any]:
        with self._lock:
            return {"requests": self.requests, "responses": dict(self.responses),
                    "errors": self.errors, "upstream_errors": self.upstream_errors,
                    "client_errors": self.client_errors, "x_cache": dict(self.cache_status),
                    "connections": self.connections,
                    "connections_total": self.connections_total, "bytes_sent": self.bytes_sent}
