"""``Proxy``: the listening socket, the selector thread and the worker pool.

One selector thread (``selector.py``) owns the listening socket and every
connection that waits for a request head (a new one, or an idle keep-alive one). A
connection whose head is complete goes to a queue served by a fixed pool of worker
threads, which run the hooks, talk to the upstream and write the response
(``flow.py``), then hand the connection back to the selector (keep-alive) or close
it. A slow client therefore holds a worker only while its request is being served,
never while it dribbles a head in.
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from typing import Any, Dict, List, Optional, TextIO, Tuple, Union

from .. import Host
from .accesslog import AccessLog
from .cache import ResponseCache
from .client import ClientConnection
from .config import Limits
from .flow import Exchange
from .selector import Selector
from .stats import ProxyStats
from .upstream import Origin, UpstreamPool

log = logging.getLogger("hostscript.proxy")

Address = Tuple[str, int]


def default_threads() -> int:
    """Twice the cores, at least 4."""
    return max(4, 2 * (os.cpu_count() or 1))


def parse_address(text: Union[str, Address]) -> Address:
    """``HOST:PORT`` (``[v6]:PORT``) or a (host, port) pair."""
    if isinstance(text, tuple):
        return text[0], int(text[1])
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class Proxy:
    """A caching HTTP/1.1 reverse proxy firing *host*'s hooks for each request.

    ::

        with Proxy(host, upstream="http://127.0.0.1:9000", listen="127.0.0.1:0") as p:
            print(p.address)        # (host, port) it listens on

    *cache*: a ``ResponseCache`` to use; by default one of *cache_size* bytes is made
    (0 turns caching off). *access_log*: a path, ``"-"`` or a text stream.
    *admin*: ``HOST:PORT`` of the stats listener (``GET /-/stats``). The *host* is
    the caller's: ``shutdown`` does not close it.
    """

    def __init__(self, host: Host, upstream: str, listen: Union[str, Address] = "127.0.0.1:0", *,
                 threads: Optional[int] = None, limits: Limits = Limits(),
                 cache: Optional[ResponseCache] = None, cache_size: int = 64 << 20,
                 access_log: Union[None, str, TextIO] = None,
                 admin: Union[None, str, Address] = None) -> None:
        self.host = host
        self.origin = Origin.parse(upstream)
        self.limits = limits
        self.threads = threads or default_threads()
        if self.threads < 1:
            raise ValueError("threads must be at least 1")
        if cache is None and cache_size > 0:
            cache = ResponseCache(max_bytes=cache_size, max_object=min(8 << 20, cache_size))
        self.cache = cache
        self.pool = UpstreamPool(self.origin, limits)
        self.counters = ProxyStats()
        self.access_log = AccessLog(access_log) if access_log is not None else None
        self._listen_addr = parse_address(listen)
        self._admin_addr = parse_address(admin) if admin is not None else None
        self.admin_address: Optional[Address] = None
        self._admin: Any = None

        self._jobs: "queue.SimpleQueue[Optional[ClientConnection]]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._busy = 0        # workers serving a connection
        self._queued = 0      # connections handed over, not yet taken by a worker
        self._selector: Optional[Selector] = None
        self._workers: List[threading.Thread] = []
        self.draining = False
        self._stopping = False
        self._started = False
        self._closed = False
        self.address: Address = ("", 0)

    # ---- lifecycle ----

    def start(self) -> "Proxy":
        if self._started:
            return self
        sock = socket.create_server(self._listen_addr, backlog=1024)
        sock.setblocking(False)
        self.address = sock.getsockname()[:2]
        self._started = True
        for i in range(self.threads):
            t = threading.Thread(target=self._worker, name=f"proxy-worker-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        self._selector = Selector(sock, self.limits, self.counters, self._dispatch, self._close)
        self._selector.thread.start()
        if self._admin_addr is not None:
            from .admin import AdminServer

            self._admin = AdminServer(self._admin_addr, self)
            self.admin_address = self._admin.address
            self._admin.start()
        return self

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        """Stop accepting, close idle connections, let requests in flight finish
        (up to *timeout*, by default ``limits.drain_timeout``), stop the threads.
        True when every request in flight finished."""
        if self._closed or not self._started:
            self._closed = True
            return True
        self._closed = True
        timeout = self.limits.drain_timeout if timeout is None else timeout
        self.draining = True
        assert self._selector is not None
        self._selector.drain()
        end = time.monotonic() + timeout
        drained = True
        while True:
            with self._lock:
                idle = self._busy == 0 and self._queued == 0
            if idle:
                break
            if time.monotonic() >= end:
                drained = False
                log.warning("shutdown: %d request(s) still in flight after %.1f s", self._busy, timeout)
                break
            time.sleep(0.005)
        self._stopping = True
        self._selector.stop()
        for _ in self._workers:
            self._jobs.put(None)
        for t in self._workers:
            t.join(0.5 if not drained else 5)
        if self._admin is not None:
            self._admin.stop()
        self.pool.close()
        if self.access_log is not None:
            self.access_log.close()
        return drained

    def __enter__(self) -> "Proxy":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def stats(self) -> Dict[str, Any]:
        """The proxy's counters, with the cache's and the upstream pool's."""
        out = self.counters.snapshot()
        with self._lock:
            out["in_flight"] = self._busy
            out["queued"] = self._queued
        out["workers"] = self.threads
        out["cache"] = self.cache.stats() if self.cache is not None else None
        out["upstream"] = {"connects": self.pool.connects, "reuses": self.pool.reuses,
                           "retries": self.pool.retries, "idle": self.pool.idle}
        return out

    # ---- hand-over between the selector and the workers ----

    def _dispatch(self, c: ClientConnection) -> None:
        with self._lock:
            self._queued += 1
        self._jobs.put(c)

    def _close(self, c: ClientConnection) -> None:
        if c.close():
            self.counters.connection(-1)

    # ---- workers ----

    def _worker(self) -> None:
        while True:
            c = self._jobs.get()
            if c is None:
                return
            with self._lock:
                self._queued -= 1
                self._busy += 1
            try:
                self._serve(c)
            except Exception:
                log.exception("serving a connection failed")
                self._close(c)
            finally:
                with self._lock:
                    self._busy -= 1

    def _serve(self, c: ClientConnection) -> None:
        c.sock.settimeout(self.limits.send_timeout)
        while True:
            msg = c.reader.messages.popleft()
            c.requests += 1
            keep = Exchange(self, c, msg).run()
            if not keep or self.draining or self._stopping:
                if msg.head_done and not msg.complete and not c.closed:
                    c.linger()  # so the client reads the answer, not a reset
                self._close(c)
                return
            if c.next_ready() is None:
                break
        c.sock.setblocking(False)
        assert self._selector is not None
        self._selector.give_back(c)
