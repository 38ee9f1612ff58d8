"""The selector thread: the listening socket and every client connection waiting
for a request head.

It never blocks on a client: it reads what arrived (non-blocking), feeds the
connection's parser, and hands a connection whose head is complete (or refused) to
the workers. Deadlines: a head must be complete ``head_timeout`` after its first
byte (else it is refused with 408 — by a worker, so that ``log`` fires), and a
connection with nothing under way is closed after ``idle_timeout``. Workers give
keep-alive connections back through ``give_back``.
"""
from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections import deque
from typing import Callable, Deque, Dict, Optional

from .client import RECV, ClientConnection
from .config import Limits
from .http import HttpError
from .stats import ProxyStats

log = logging.getLogger("hostscript.proxy")


class Selector:
    """Runs in its own thread (``run``) until ``stop``; ``drain`` stops accepting
    and closes every connection it holds."""

    def __init__(self, listening: socket.socket, limits: Limits, counters: ProxyStats,
                 dispatch: Callable[[ClientConnection], None],
                 close: Callable[[ClientConnection], None]) -> None:
        self.limits = limits
        self.counters = counters
        self._dispatch = dispatch
        self._close = close
        self._listening: Optional[socket.socket] = listening
        self._accepting = True
        self._sel = selectors.DefaultSelector()
        self._waiting: Dict[int, ClientConnection] = {}
        self._returned: Deque[ClientConnection] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._draining = False
        self._stopping = False
        self._sweep_every = min(0.5, limits.head_timeout / 4, limits.idle_timeout / 4)
        self.thread = threading.Thread(target=self.run, name="proxy-selector", daemon=True)

    # ---- from other threads ----

    def give_back(self, c: ClientConnection) -> None:
        """A worker is done with *c*, which may carry another request."""
        if self._stopping:
            self._close(c)
            return
        self._returned.append(c)
        self._wake()

    def drain(self) -> None:
        self._draining = True
        self._wake()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # already awake (the buffer is full), or closed

    # ---- the thread ----

    def run(self) -> None:
        sel = self._sel
        assert self._listening is not None
        sel.register(self._listening, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        next_sweep = time.monotonic() + self._sweep_every
        try:
            while not self._stopping:
                try:
                    self._step(max(0.0, next_sweep - time.monotonic()))
                    now = time.monotonic()
                    if now >= next_sweep:
                        next_sweep = now + self._sweep_every
                        self._sweep(now)
                except Exception:  # one connection's trouble must not stop the proxy
                    log.exception("the proxy's selector loop failed; going on")
                    time.sleep(0.01)
        finally:
            for c in self._waiting.values():
                self._close(c)
            self._waiting.clear()
            while self._returned:
                self._close(self._returned.popleft())
            if self._listening is not None:
                self._listening.close()
            sel.close()
            self._wake_r.close()
            self._wake_w.close()

    def _step(self, timeout: float) -> None:
        if self._draining and self._listening is not None:
            self._stop_listening()
        for key, _ in self._sel.select(timeout):
            obj = key.fileobj
            if obj is self._listening:
                self._accept()
            elif obj is self._wake_r:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except OSError:
                    pass
            else:
                c = self._waiting.get(key.fd)
                if c is not None:
                    self._readable(c)
        while self._returned:
            c = self._returned.popleft()
            if self._draining:
                self._close(c)
            elif c.next_ready() is not None:
                self._dispatch(c)
            else:
                self._wait(c)
        self._pace_accepting()

    def _stop_listening(self) -> None:
        assert self._listening is not None
        if self._accepting:
            self._sel.unregister(self._listening)
        self._listening.close()
        self._listening = None
        self._accepting = False
        for c in list(self._waiting.values()):
            self._forget(c)
            self._close(c)

    def _pace_accepting(self) -> None:
        """Pause accepting at ``max_connections`` open, resume below."""
        if self._listening is None:
            return
        full = self.counters.connections >= self.limits.max_connections
        if full and self._accepting:
            self._sel.unregister(self._listening)
            self._accepting = False
        elif not full and not self._accepting:
            self._sel.register(self._listening, selectors.EVENT_READ, None)
            self._accepting = True

    def _accept(self) -> None:
        assert self._listening is not None
        for _ in range(64):
            if self.counters.connections >= self.limits.max_connections:
                return
            try:
                sock, addr = self._listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: try again later
                log.warning("accept failed: %s", exc)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.counters.connection(+1)
            self._wait(ClientConnection(sock, addr[0], self.limits))

    def _wait(self, c: ClientConnection) -> None:
        """Hold *c* until its next request head is complete."""
        if c.reader.in_progress:
            self._head_deadline(c)
        else:  # not extended by bytes that start no request
            c.deadline = time.monotonic() + self.limits.idle_timeout
        self._waiting[c.fd] = c
        self._sel.register(c.sock, selectors.EVENT_READ, None)

    def _forget(self, c: ClientConnection) -> None:
        self._sel.unregister(c.sock)
        del self._waiting[c.fd]

    def _readable(self, c: ClientConnection) -> None:
        try:
            data = c.sock.recv(RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client closed (nothing to answer)
            self._forget(c)
            self._close(c)
            return
        c.reader.feed(data)
        if c.next_ready() is not None:
            self._forget(c)
            self._dispatch(c)
        elif c.reader.in_progress:
            self._head_deadline(c)

    def _head_deadline(self, c: ClientConnection) -> None:
        """The head must be complete ``head_timeout`` after its first byte."""
        c.deadline = c.reader.messages[-1].started + self.limits.head_timeout

    def _sweep(self, now: float) -> None:
        for c in [c for c in self._waiting.values() if c.deadline <= now]:
            self._forget(c)
            if c.reader.in_progress:
                c.reader.fail(HttpError(408, f"request head not complete within "
                                             f"{self.limits.head_timeout:g} s"))
                self._dispatch(c)
            else:
                self._close(c)
