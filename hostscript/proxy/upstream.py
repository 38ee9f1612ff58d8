"""The upstream (origin) side: its address, a pool of keep-alive connections, and
one request/response exchange on it.

``UpstreamPool.exchange`` sends a request and returns once the response head is in
(``UpstreamResponse``), whose body the caller reads piece by piece, then
``finish``es (the connection goes back to the pool when it can carry another
request) or ``abort``s (closed). A pooled connection that turns out to be stale —
the upstream closed it while idle — is retried once on a fresh connection, for an
idempotent request whose body is in memory.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Deque, Iterable, List, Optional, Tuple, Union
from urllib.parse import urlsplit

from .config import Limits
from .http import (IDEMPOTENT, LAST_CHUNK, BadUpstreamResponse, Header, ResponseReader, chunk,
                   serialize_head)

log = logging.getLogger("hostscript.proxy")

RECV = 65536
HEAD_MAX = 256 << 10  # an upstream response head larger than this is refused (502)
Body = Union[None, bytes, Iterator[bytes]]


class UpstreamError(Exception):
    """The upstream failed: *status* is 502 (refused, reset, malformed) or 504 (timed out)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Origin:
    """Where requests go: ``http://host:port``."""

    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> "Origin":
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http":
            raise ValueError(f"upstream {url!r}: only http:// upstreams are supported")
        if not parts.hostname or parts.path not in ("", "/") or parts.query:
            raise ValueError(f"upstream {url!r}: expected http://HOST[:PORT]")
        return cls(parts.hostname, parts.port or 80)

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 80 else f"{host}:{self.port}"

    @property
    def base(self) -> str:
        return f"http://{self.netloc}"


class UpstreamConnection:
    __slots__ = ("sock", "idle_since", "requests")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.idle_since = time.monotonic()
        self.requests = 0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def looks_alive(self) -> bool:
        """An idle pooled connection the upstream has neither closed nor written to
        (a peek that would block)."""
        try:
            self.sock.settimeout(0.0)
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False  # end of stream, or bytes nobody asked for


class UpstreamResponse:
    """A response whose head has arrived; ``read()`` its body, then ``finish()``."""

    def __init__(self, pool: "UpstreamPool", conn: UpstreamConnection, reader: ResponseReader,
                 head_request: bool) -> None:
        self._pool = pool
        self._conn: Optional[UpstreamConnection] = conn
        self._reader = reader
        self._head_request = head_request
        self.head_request = head_request
        self.status = reader.status
        self.headers: List[Header] = reader.headers
        self.content_length = reader.content_length
        self.chunked = reader.chunked

    @property
    def complete(self) -> bool:
        return self._reader.complete and not self._reader.chunks

    def read(self) -> bytes:
        """The next piece of the body; b"" at its end. Raises UpstreamError."""
        r = self._reader
        while not r.chunks:
            if r.complete or self._conn is None:
                return b""
            data = self._pool._recv(self._conn)
            if not data:
                if not r.feed_eof():
                    self.abort()
                    raise UpstreamError(502, "the upstream closed the connection mid-body")
                continue
            try:
                r.feed(data)
            except BadUpstreamResponse as exc:
                self.abort()
                raise UpstreamError(502, str(exc)) from None
        return r.chunks.popleft()

    def buffered(self, limit: int) -> bytes:
        """Body bytes already read and parsed, up to about *limit*: no I/O, never
        raises. What can go out with the response head in one write."""
        chunks = self._reader.chunks
        parts: List[bytes] = []
        size = 0
        while chunks and size < limit:
            piece = chunks.popleft()
            parts.append(piece)
            size += len(piece)
        return b"".join(parts)

    def finish(self) -> None:
        """Done with it: a fully read response's connection goes back to the pool."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        r = self._reader
        if r.complete and r.keep_alive and not r.extra and not self._head_request:
            self._pool.release(conn)
        else:
            conn.close()

    def abort(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class UpstreamPool:
    """Keep-alive connections to one origin: at most ``limits.pool_size`` idle ones,
    most recently used first; one idle longer than ``pool_idle_timeout`` is closed."""

    def __init__(self, origin: Origin, limits: Limits) -> None:
        self.origin = origin
        self.limits = limits
        self._idle: Deque[UpstreamConnection] = deque()
        self._lock = threading.Lock()
        self._closed = False
        self.connects = 0
        self.reuses = 0
        self.retries = 0

    # ---- connections ----

    def _connect(self) -> UpstreamConnection:
        lim = self.limits
        try:
            sock = socket.create_connection((self.origin.host, self.origin.port),
                                            timeout=lim.connect_timeout)
        except socket.timeout:
            raise UpstreamError(504, f"connecting to the upstream {self.origin.netloc} timed out") from None
        except OSError as exc:
            raise UpstreamError(502, f"cannot connect to the upstream {self.origin.netloc}: "
                                     f"{exc.strerror or exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(lim.upstream_timeout)
        with self._lock:
            self.connects += 1
        return UpstreamConnection(sock)

    def acquire(self) -> Tuple[UpstreamConnection, bool]:
        """A connection, and whether it was pooled (it may be stale then)."""
        now = time.monotonic()
        stale: List[UpstreamConnection] = []
        conn = None
        with self._lock:
            while self._idle:
                c = self._idle.pop()
                if now - c.idle_since > self.limits.pool_idle_timeout:
                    stale.append(c)
                    continue
                conn = c
                break
        for c in stale:
            c.close()
        if conn is not None:
            if conn.looks_alive():
                conn.sock.settimeout(self.limits.upstream_timeout)
                with self._lock:
                    self.reuses += 1
                return conn, True
            conn.close()
        return self._connect(), False

    def release(self, conn: UpstreamConnection) -> None:
        conn.idle_since = time.monotonic()
        with self._lock:
            if not self._closed and len(self._idle) < self.limits.pool_size:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = list(self._idle), deque()
        for c in idle:
            c.close()

    @property
    def idle(self) -> int:
        return len(self._idle)

    def _recv(self, conn: UpstreamConnection) -> bytes:
        try:
            return conn.sock.recv(RECV)
        except socket.timeout:
            conn.close()
            raise self._timed_out() from None
        except OSError as exc:
            conn.close()
            raise UpstreamError(502, f"reading from the upstream failed: {exc.strerror or exc}") from None

    def _timed_out(self) -> UpstreamError:
        return UpstreamError(504, f"the upstream {self.origin.netloc} did not answer within "
                                  f"{self.limits.upstream_timeout:g} s")

    # ---- one exchange ----

    def exchange(self, method: str, target: str, headers: Iterable[Header], body: Body,
                 length: Optional[int]) -> UpstreamResponse:
        """Send the request, wait for the response head.

        *headers* carry no framing: it is added here — ``Content-Length: length``, or
        chunked when *length* is None and there is a *body*. *body* is None, bytes,
        or an iterator of pieces (streamed from the client; errors it raises
        propagate unchanged). A stale pooled connection is retried once on a fresh
        one when the body is replayable (not an iterator) and the method idempotent."""
        heads = list(headers)
        chunked = body is not None and length is None
        if chunked:
            heads.append(("Transfer-Encoding", "chunked"))
        elif length is not None:
            heads.append(("Content-Length", str(length)))
        head = serialize_head(f"{method} {target} HTTP/1.1", heads)
        replayable = not isinstance(body, Iterator) and method in IDEMPOTENT
        head_request = method == "HEAD"
        for attempt in (0, 1):
            conn, reused = self.acquire()
            conn.requests += 1
            got = False
            try:
                self._send(conn, head, body, chunked)
                reader = ResponseReader(head_request)
                received = 0
                while not reader.head_done and not reader.complete:
                    if received > HEAD_MAX:
                        raise BadUpstreamResponse(f"the upstream response head passed {HEAD_MAX} bytes")
                    data = conn.sock.recv(RECV)
                    if not data:
                        if reader.feed_eof():
                            break
                        raise ConnectionResetError("the upstream closed the connection"
                                                   + (" mid-head" if got else ""))
                    got = True
                    received += len(data)
                    reader.feed(data)
                if not reader.head_done:
                    raise BadUpstreamResponse("the upstream response ended before its head")
                return UpstreamResponse(self, conn, reader, head_request)
            except socket.timeout:
                conn.close()
                raise self._timed_out() from None
            except BadUpstreamResponse as exc:
                conn.close()
                raise UpstreamError(502, str(exc)) from None
            except OSError as exc:
                conn.close()
                if reused and attempt == 0 and replayable and not got:
                    log.debug("stale pooled upstream connection (%s); retrying on a fresh one", exc)
                    with self._lock:
                        self.retries += 1
                    continue
                raise UpstreamError(502, f"the upstream {self.origin.netloc} failed: "
                                         f"{exc.strerror or exc}") from None
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    def _send(self, conn: UpstreamConnection, head: bytes, body: Body, chunked: bool) -> None:
        sock = conn.sock
        if body is None:
            sock.sendall(head)
        elif isinstance(body, bytes):
            if chunked:
                sock.sendall(head + (chunk(body) if body else b"") + LAST_CHUNK)
            else:
                sock.sendall(head + body)
        else:
            sock.sendall(head)
            for piece in body:  # client errors (ClientGone, HttpError) propagate
                if piece:
                    sock.sendall(chunk(piece) if chunked else piece)
            if chunked:
                sock.sendall(LAST_CHUNK)
