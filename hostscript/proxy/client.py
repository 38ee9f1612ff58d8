"""One client connection: its socket, its request parser, and blocking I/O for the
worker that holds it (the selector thread does its own non-blocking reads)."""
from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Optional

from .config import Limits
from .http import HttpError, RequestMessage, RequestReader

RECV = 65536


class ClientGone(Exception):
    """The client closed the connection, reset it, or stopped reading."""


class ClientConnection:
    """A client's socket and parser. Owned by the selector thread while it waits for
    a request head, by one worker while that serves it."""

    __slots__ = ("sock", "peer", "reader", "deadline", "opened", "requests", "fd", "closed",
                 "limits", "tx_start", "tx_bytes")

    def __init__(self, sock: socket.socket, peer: str, limits: Limits) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.reader = RequestReader(limits)
        self.opened = time.monotonic()
        self.deadline = self.opened + limits.idle_timeout
        self.requests = 0
        self.closed = False
        self.limits = limits
        self.begin_response()

    def next_ready(self) -> Optional[RequestMessage]:
        """The next request if its head is complete (or it failed), else None."""
        msgs = self.reader.messages
        return msgs[0] if msgs and msgs[0].ready else None

    def close(self) -> bool:
        """Close the socket; False when it already was."""
        if self.closed:
            return False
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass
        return True

    def linger(self, timeout: float = 0.5, limit: int = 1 << 20) -> None:
        """Before closing with request bytes unread: stop sending and discard what
        still comes (up to *limit* bytes, *timeout* seconds), so the kernel does not
        answer those bytes with a reset that can destroy the response in flight."""
        end = time.monotonic() + timeout
        n = 0
        try:
            self.sock.shutdown(socket.SHUT_WR)
            while n < limit:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self.sock.settimeout(left)
                data = self.sock.recv(RECV)
                if not data:
                    break
                n += len(data)
        except OSError:
            pass

    # ---- worker-side blocking I/O ----

    def begin_response(self) -> None:
        """Start the clock of Limits.min_rate for the response about to be sent."""
        self.tx_start = time.monotonic()
        self.tx_bytes = 0

    def send(self, data: bytes) -> None:
        """Send DATA within send_timeout, and keep the response's average rate at or
        above min_rate (after a grace of send_timeout); else ClientGone."""
        lim = self.limits
        n = len(data)
        behind = self.tx_start + lim.send_timeout + (self.tx_bytes + n) / lim.min_rate - time.monotonic()
        if behind <= 0:
            raise ClientGone(f"the client reads slower than {lim.min_rate} bytes/s")
        self.sock.settimeout(min(behind, lim.send_timeout))  # one write: send_timeout at most
        try:
            self.sock.sendall(data)
        except (socket.timeout, OSError) as exc:
            raise ClientGone(str(exc)) from None
        self.tx_bytes += n

    def body(self, msg: RequestMessage, limits: Limits) -> Iterator[bytes]:
        """The rest of *msg*'s body, piece by piece, reading the socket as needed.
        Raises HttpError (408: too slow; 413, 400: refused by the parser) or
        ClientGone."""
        sent_continue = False
        started, got = time.monotonic(), 0
        while True:
            while msg.chunks:
                yield msg.chunks.popleft()
            if msg.error is not None:
                raise msg.error
            if msg.complete:
                return
            if msg.expect_continue and not sent_continue and msg.version == "1.1":
                self.begin_response()
                self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                sent_continue = True
            # no byte for body_timeout, or on average slower than min_rate: 408
            behind = started + limits.body_timeout + got / limits.min_rate - time.monotonic()
            if behind <= 0:
                raise HttpError(408, f"request body slower than {limits.min_rate} bytes/s")
            self.sock.settimeout(min(behind, limits.body_timeout))
            try:
                data = self.sock.recv(RECV)
            except socket.timeout:
                raise HttpError(408, f"request body: no byte for {limits.body_timeout:g} s, or "
                                     f"slower than {limits.min_rate} bytes/s") from None
            except OSError as exc:
                raise ClientGone(str(exc)) from None
            finally:
                self.sock.settimeout(limits.send_timeout)
            if not data:
                raise ClientGone("the client closed the connection mid-body")
            got += len(data)
            self.reader.feed(data)
