"""HTTP/1.1 messages: parsing with httptools (llhttp), header rules, framing.

Requests and upstream responses are parsed by llhttp through httptools; nothing
here splits lines by hand. ``RequestReader`` parses one client connection's byte
stream (pipelined requests included) and enforces the request limits;
``ResponseReader`` parses one upstream response. The rest are the header rules a
proxy applies (hop-by-hop removal) and the bytes it writes (heads, chunks).
"""
from __future__ import annotations

import time
from collections import deque
from email.utils import formatdate
from http import HTTPStatus
from typing import Deque, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import httptools

from .config import Limits

Header = Tuple[str, str]

# RFC 9110 7.6.1, plus the old Proxy-Connection and Keep-Alive
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                        "transfer-encoding", "upgrade", "proxy-authenticate", "proxy-authorization"})
# decided by the proxy from the message it actually sends, never copied
FRAMING = frozenset({"content-length", "transfer-encoding"})
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class HttpError(Exception):
    """A request the proxy refuses or cannot serve: answered with *status*."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message or reason(status))
        self.status = status


class BadUpstreamResponse(HttpError):
    """The upstream's response is malformed (502)."""

    def __init__(self, message: str) -> None:
        super().__init__(502, message)


_REASONS = {s.value: s.phrase for s in HTTPStatus}


def reason(status: int) -> str:
    return _REASONS.get(status, "Unknown")


def http_date() -> str:
    return formatdate(time.time(), usegmt=True)


_SKIP: Dict[frozenset, frozenset] = {}  # drop -> HOP_BY_HOP | drop (callers pass a few constants)


def end_to_end(headers: Iterable[Header], drop: frozenset = frozenset()) -> List[Header]:
    """*headers* without the hop-by-hop ones (and those the Connection header names),
    nor any in *drop* (lower-case names). One pass (each name lowered once): a
    response goes through this on every request."""
    skip = _SKIP.get(drop)
    if skip is None:
        skip = HOP_BY_HOP | drop
        if len(_SKIP) < 32:
            _SKIP[drop] = skip
    out: List[Header] = []
    named: Optional[Set[str]] = None
    for n, v in headers:
        low = n.lower()
        if low in skip:
            if low == "connection":
                if named is None:
                    named = set()
                named.update(t.strip().lower() for t in v.split(",") if t.strip())
            continue
        out.append((n, v))
    if named:
        out = [(n, v) for n, v in out if n.lower() not in named]
    return out


def header_value(headers: Sequence[Header], name: str) -> Optional[str]:
    """The first value of *name* (lower case), or None."""
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


def serialize_head(start_line: str, headers: Iterable[Header]) -> bytes:
    parts = [start_line]
    parts.extend(f"{n}: {v}" for n, v in headers)
    parts.append("\r\n")
    return "\r\n".join(parts).encode("latin-1")


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (never empty: that would end the body)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def _decode(b: bytes) -> str:
    return b.decode("latin-1")


class RequestMessage:
    """One request on a client connection: its head once parsed, then its body as
    it arrives (``chunks``, decoded from chunked framing), ``complete`` at its end,
    or ``error`` when it was refused or malformed."""

    __slots__ = ("method", "target", "version", "headers", "keep_alive", "upgrade",
                 "content_length", "chunked", "expect_continue", "chunks", "body_bytes",
                 "head_done", "complete", "error", "head_bytes", "started")

    def __init__(self) -> None:
        self.method = ""
        self.target = ""
        self.version = "1.1"
        self.headers: List[Header] = []
        self.keep_alive = False
        self.upgrade = False
        self.content_length: Optional[int] = None
        self.chunked = False
        self.expect_continue = False
        self.chunks: Deque[bytes] = deque()
        self.body_bytes = 0
        self.head_done = False
        self.complete = False
        self.error: Optional[HttpError] = None
        self.head_bytes = 0
        self.started = time.monotonic()

    @property
    def ready(self) -> bool:
        """A worker can take it: the head is complete, or it failed."""
        return self.head_done or self.error is not None

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


class RequestReader:
    """The llhttp parser of one client connection's byte stream, enforcing *limits*.

    ``feed`` never raises: a malformed or refused request becomes a message with
    ``error`` set (the connection is closed after answering it) and the reader is
    ``dead`` from then on."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.messages: Deque[RequestMessage] = deque()
        self.dead = False
        self._parser = httptools.HttpRequestParser(self)
        self._cur: Optional[RequestMessage] = None
        self._url: List[bytes] = []
        self._url_len = 0
        self._hdr_bytes = 0

    # ---- feeding ----

    def feed(self, data: bytes) -> None:
        if self.dead or not data:
            return
        fed = len(data)
        while data:
            try:
                self._parser.feed_data(data)
                data = b""
            except httptools.HttpParserUpgrade as up:
                # llhttp stops after an upgrade request's head; the proxy does not
                # upgrade (Upgrade is hop-by-hop): serve it as a plain request and go
                # on parsing what follows, unless the request has a body llhttp skipped.
                msg = self.messages[-1] if self.messages else None
                if msg is None:
                    self.fail(HttpError(400, "malformed request"))
                    return
                if msg.method == "CONNECT" or msg.has_body:
                    msg.error = HttpError(501, "CONNECT is not supported" if msg.method == "CONNECT"
                                          else "an Upgrade request with a body is not supported")
                    self.dead = True
                    self._cur = None
                    return
                msg.upgrade = False
                data = data[up.args[0]:] if up.args else b""
            except httptools.HttpParserCallbackError as exc:
                ctx = exc.__context__
                self.fail(ctx if isinstance(ctx, HttpError)
                           else HttpError(400, f"malformed request: {exc}"))
                return
            except httptools.HttpParserError as exc:
                self.fail(HttpError(400, f"malformed request: {exc}"))
                return
        # the callbacks bound the target and the fields; this bounds a head still
        # incomplete (one long field llhttp is still collecting)
        cur = self._cur
        if cur is not None and not cur.head_done:
            cur.head_bytes += fed
            lim = self.limits
            if cur.head_bytes > lim.max_request_line + lim.max_header_bytes + 4096:
                self.fail(HttpError(431, "request header block too large"))

    def fail(self, err: HttpError) -> None:
        """Refuse the request being read (or the next one) with *err*; stop parsing."""
        self.dead = True
        cur = self._cur
        if cur is not None and not cur.complete:
            if not cur.target and self._url and self._url_len <= self.limits.max_request_line:
                cur.target = _decode(b"".join(self._url))  # for the log
            cur.error = err
        else:
            msg = RequestMessage()
            msg.error = err
            self.messages.append(msg)
        self._cur = None

    @property
    def in_progress(self) -> bool:
        """Bytes of a request not yet ready have been read (the head deadline runs)."""
        return self._cur is not None and not self._cur.head_done

    # ---- llhttp callbacks ----

    def on_message_begin(self) -> None:
        msg = RequestMessage()
        self.messages.append(msg)
        self._cur = msg
        self._url = []
        self._url_len = 0
        self._hdr_bytes = 0

    def on_url(self, part: bytes) -> None:
        if not self._url and self._cur is not None:
            self._cur.method = _decode(self._parser.get_method())  # parsed before the target
        self._url_len += len(part)
        if self._url_len > self.limits.max_request_line:
            raise HttpError(414, f"request target longer than {self.limits.max_request_line} bytes")
        self._url.append(part)

    def on_header(self, name: bytes, value: bytes) -> None:
        msg = self._cur
        assert msg is not None
        self._hdr_bytes += len(name) + len(value) + 4
        if len(msg.headers) >= self.limits.max_headers:
            raise HttpError(431, f"more than {self.limits.max_headers} header fields")
        if self._hdr_bytes > self.limits.max_header_bytes:
            raise HttpError(431, f"header block larger than {self.limits.max_header_bytes} bytes")
        if msg.head_done:  # a trailer field of a chunked body: dropped, never a header
            return
        msg.headers.append((_decode(name), _decode(value)))

    def on_headers_complete(self) -> None:
        msg = self._cur
        assert msg is not None
        p = self._parser
        msg.method = _decode(p.get_method())
        msg.target = _decode(b"".join(self._url))
        msg.version = p.get_http_version()
        msg.keep_alive = p.should_keep_alive()
        msg.upgrade = p.should_upgrade()
        for name, value in msg.headers:
            low = name.lower()
            if low == "content-length":
                msg.content_length = int(value.strip())  # llhttp has checked it
            elif low == "transfer-encoding":
                msg.chunked = True  # llhttp refuses a request whose last coding is not chunked
            elif low == "expect" and value.strip().lower() == "100-continue":
                msg.expect_continue = True
        msg.head_done = True
        if msg.content_length is not None and msg.content_length > self.limits.max_body:
            raise HttpError(413, f"request body larger than {self.limits.max_body} bytes")

    def on_body(self, data: bytes) -> None:
        msg = self._cur
        assert msg is not None
        msg.body_bytes += len(data)
        if msg.body_bytes > self.limits.max_body:
            raise HttpError(413, f"request body larger than {self.limits.max_body} bytes")
        msg.chunks.append(data)

    def on_message_complete(self) -> None:
        if self._cur is not None:
            self._cur.complete = True
        self._cur = None


class ResponseReader:
    """The llhttp parser of one upstream response (a new one per exchange: after a
    HEAD request the head is the whole message, which llhttp cannot be told).

    1xx interim responses are skipped. The body arrives in ``chunks``; ``complete``
    at its end; ``eof`` ends a body delimited by the connection's close."""

    class _HeadOnly(Exception):
        pass

    def __init__(self, head_request: bool) -> None:
        self.head_request = head_request
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: List[Header] = []
        self.keep_alive = False
        self.head_done = False
        self.complete = False
        self.content_length: Optional[int] = None
        self.chunked = False
        self.chunks: Deque[bytes] = deque()
        self.extra = False  # bytes past the message: the connection cannot be reused
        self._messages = 0

    def feed(self, data: bytes) -> None:
        """Parse *data*; raises BadUpstreamResponse for a malformed response."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, ResponseReader._HeadOnly):
                self.complete = True
                return
            raise BadUpstreamResponse(f"malformed upstream response: {exc}") from None
        except httptools.HttpParserUpgrade:
            raise BadUpstreamResponse("the upstream switched protocols") from None
        except httptools.HttpParserError as exc:
            raise BadUpstreamResponse(f"malformed upstream response: {exc}") from None

    def feed_eof(self) -> bool:
        """The upstream closed: True when that ends the message (a body without
        length), False when the message is cut short."""
        if self.complete:
            return True
        if self.head_done and self.content_length is None and not self.chunked:
            self.complete = True
            self.keep_alive = False
            return True
        return False

    # ---- llhttp callbacks ----

    def on_message_begin(self) -> None:
        self._messages += 1
        if self.head_done:  # a second final response on one exchange
            self.extra = True
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:
            self.headers.append((_decode(name), _decode(value)))

    def on_headers_complete(self) -> None:
        if self.head_done:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            return  # interim: the final response follows
        self.status = status
        self.keep_alive = self._parser.should_keep_alive()
        for name, value in self.headers:
            low = name.lower()
            if low == "content-length":
                self.content_length = int(value.strip())
            elif low == "transfer-encoding":  # chunked only as the last coding (RFC 9112 6.3)
                self.chunked = value.rsplit(",", 1)[-1].strip().lower() == "chunked"
        self.head_done = True
        if self.head_request:
            raise ResponseReader._HeadOnly()

    def on_body(self, data: bytes) -> None:
        if not self.complete:
            self.chunks.append(data)

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True
