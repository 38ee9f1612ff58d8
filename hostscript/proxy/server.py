"""``Proxy``: the listening socket, the selector thread and the worker pool.

One selector thread owns the listening socket and every connection that waits for
a request head (a new one, or an idle keep-alive one): it reads non-blockingly and
feeds each connection's parser, under a deadline per connection — a head must be
complete ``head_timeout`` after its first byte (else 408), an idle connection is
closed after ``idle_timeout``. A connection whose head is complete goes to a queue
served by a fixed pool of worker threads, which run the hooks, talk to the
upstream and write the response, then hand the connection back to the selector
(keep-alive) or close it. A slow client therefore holds a worker only while its
request is being served, never while it dribbles a head in.
"""
from __future__ import annotations

import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, TextIO, Tuple, Union

from .. import Host
from .accesslog import AccessLog
from .cache import ResponseCache
from .client import RECV, ClientConnection
from .config import Limits
from .flow import Exchange
from .http import HttpError
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
        self._returned: Deque[ClientConnection] = deque()
        self._lock = threading.Lock()
        self._busy = 0        # workers serving a connection
        self._queued = 0      # connections handed over, not yet taken by a worker
        self._sock: Optional[socket.socket] = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector_thread: Optional[threading.Thread] = None
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
        sock = socket.create_server(self._listen_addr, backlog=1024, reuse_port=False)
        sock.setblocking(False)
        self._sock = sock
        self.address = sock.getsockname()[:2]
        self._started = True
        for i in range(self.threads):
            t = threading.Thread(target=self._worker, name=f"proxy-worker-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        self._selector_thread = threading.Thread(target=self._select_loop, name="proxy-selector",
                                                 daemon=True)
        self._selector_thread.start()
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
            if not self._closed:
                self._closed = True
                self._wake_r.close()
                self._wake_w.close()
            return True
        self._closed = True
        timeout = self.limits.drain_timeout if timeout is None else timeout
        self.draining = True
        self._wake()
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
        self._wake()
        if self._selector_thread is not None:
            self._selector_thread.join(5)
        for _ in self._workers:
            self._jobs.put(None)
        for t in self._workers:
            t.join(0.5 if not drained else 5)
        if self._admin is not None:
            self._admin.stop()
        self.pool.close()
        if self.access_log is not None:
            self.access_log.close()
        self._wake_r.close()
        self._wake_w.close()
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

    # ---- selector thread ----

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already awake (the buffer is full) or shut down

    def _select_loop(self) -> None:
        sel = selectors.DefaultSelector()
        assert self._sock is not None
        listening = self._sock
        sel.register(listening, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        waiting: Dict[int, ClientConnection] = {}
        lim = self.limits
        sweep_every = min(0.5, lim.head_timeout / 4, lim.idle_timeout / 4)
        next_sweep = time.monotonic() + sweep_every
        accepting = True
        try:
            while not self._stopping:
                if self.draining and listening is not None:
                    sel.unregister(listening)
                    listening.close()
                    listening = None
                    accepting = False
                    for c in list(waiting.values()):
                        sel.unregister(c.sock)
                        self._close(c)
                    waiting.clear()
                timeout = max(0.0, next_sweep - time.monotonic())
                for key, _ in sel.select(timeout):
                    obj = key.fileobj
                    if obj is listening:
                        self._accept(listening, sel, waiting)
                    elif obj is self._wake_r:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except (BlockingIOError, OSError):
                            pass
                    else:
                        self._readable(waiting[key.fd], sel, waiting)
                while self._returned:
                    c = self._returned.popleft()
                    if self.draining:
                        self._close(c)
                        continue
                    self._wait_for_head(c, sel, waiting)
                if listening is not None:
                    full = self.counters.connections >= lim.max_connections
                    if full and accepting:
                        sel.unregister(listening)
                        accepting = False
                    elif not full and not accepting:
                        sel.register(listening, selectors.EVENT_READ, None)
                        accepting = True
                now = time.monotonic()
                if now >= next_sweep:
                    next_sweep = now + sweep_every
                    for c in [c for c in waiting.values() if c.deadline <= now]:
                        sel.unregister(c.sock)
                        del waiting[c.fd]
                        if c.reader.in_progress:
                            c.reader.fail(HttpError(408, f"request head not complete within "
                                                         f"{lim.head_timeout:g} s"))
                            self._dispatch(c)
                        else:
                            self._close(c)
        except Exception:
            log.exception("the proxy's selector thread failed")
        finally:
            for c in waiting.values():
                self._close(c)
            if listening is not None:
                listening.close()
            sel.close()

    def _accept(self, listening: socket.socket, sel: selectors.BaseSelector,
                waiting: Dict[int, ClientConnection]) -> None:
        for _ in range(64):
            try:
                sock, addr = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = ClientConnection(sock, addr[0], self.limits)
            self.counters.connection(+1)
            waiting[c.fd] = c
            sel.register(sock, selectors.EVENT_READ, None)

    def _readable(self, c: ClientConnection, sel: selectors.BaseSelector,
                  waiting: Dict[int, ClientConnection]) -> None:
        try:
            data = c.sock.recv(RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # closed by the client (nothing to answer)
            sel.unregister(c.sock)
            del waiting[c.fd]
            self._close(c)
            return
        c.reader.feed(data)
        if c.next_ready() is not None:
            sel.unregister(c.sock)
            del waiting[c.fd]
            self._dispatch(c)
        else:
            self._set_deadline(c)

    def _set_deadline(self, c: ClientConnection) -> None:
        msgs = c.reader.messages
        if c.reader.in_progress and msgs:
            c.deadline = msgs[-1].started + self.limits.head_timeout
        else:
            c.deadline = time.monotonic() + self.limits.idle_timeout

    def _wait_for_head(self, c: ClientConnection, sel: selectors.BaseSelector,
                       waiting: Dict[int, ClientConnection]) -> None:
        if c.next_ready() is not None:
            self._dispatch(c)
            return
        self._set_deadline(c)
        waiting[c.fd] = c
        sel.register(c.sock, selectors.EVENT_READ, None)

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
        self._returned.append(c)
        self._wake()
