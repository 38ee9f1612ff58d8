"""One request's way through the proxy, on a worker thread: the hooks, the cache,
the upstream, and the response written to the client.

    read_request ─ answered (txn:respond) ─────────────────────────┐
        │                                                          │
    cache lookup ─ HIT (Age, X-Cache: HIT) ────────────────────────┤
        │ MISS                                                     │
    send_request ─ answered ───────────────────────────────────────┤
        │                                                          │
    upstream → read_response → store if storable (X-Cache: MISS) ──┤
                                                                   │
                                     send_response → write → log ◄─┘

Only the hooks some script handles are fired. A handler error in any hook before
``log`` answers 500 (if nothing was written yet); ``log`` fires on every path,
including the errors the proxy answers itself (then with the status it sent).
"""
from __future__ import annotations

import logging
import time
from urllib.parse import urlsplit
from typing import TYPE_CHECKING, FrozenSet, List, Optional, Tuple

from .. import Status, Transaction, UsageError
from .cache import vary_agrees
from .client import ClientConnection, ClientGone
from .http import (FRAMING, LAST_CHUNK, Header, HttpError, RequestMessage, chunk, end_to_end,
                   http_date, reason, serialize_head)
from .upstream import Body, UpstreamError, UpstreamResponse

if TYPE_CHECKING:
    from .server import Proxy

log = logging.getLogger("hostscript.proxy")

VIA = "1.1 hostscript"  # responses (the upstream is spoken to in HTTP/1.1)
NO_BODY_STATUS = frozenset({204, 304})
UPSTREAM_SET = frozenset({"host", "expect", "x-forwarded-for"})  # set by the proxy upstream
CLIENT_GONE = 499  # the status logged when the client left before its response
COALESCE = 64 << 10  # at most this many body bytes already read go out with the head


def origin_form(target: str) -> Optional[str]:
    """The request target as the upstream gets it: origin-form (``/path?query``) or
    ``*``; an absolute-form target (``http://host/path``) is reduced to its path and
    query. None for anything else."""
    if target.startswith("/") or target == "*":
        return target
    if "://" in target:
        parts = urlsplit(target)
        if parts.scheme.lower() in ("http", "https") and parts.netloc:
            return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return None


class Exchange:
    """Serves one request (``run``), then says whether the connection may go on."""

    def __init__(self, proxy: "Proxy", conn: ClientConnection, msg: RequestMessage) -> None:
        self.px = proxy
        self.host = proxy.host
        self.conn = conn
        self.msg = msg
        self.txn: Optional[Transaction] = None
        self.hooks: FrozenSet[str] = frozenset()
        self.keep_alive = msg.keep_alive
        self.body: bytes = b""                      # the body to send, unless streaming
        self.stream: Optional[UpstreamResponse] = None
        self.prefix: List[bytes] = []               # streamed body already read (cache overflow)
        self.cache_status: Optional[str] = None     # HIT / MISS, for X-Cache and the access log
        self.head_sent = False
        self.status = 0                             # what the client was sent
        self.sent = 0                               # body bytes written
        self.handler_errors = 0
        self.upstream_error = False
        self.client_error = False
        self.done = False                           # the last hook fired ended DONE

    # ---- the whole request ----

    def run(self) -> bool:
        started = time.monotonic()
        try:
            self._serve()
        except ClientGone as exc:
            log.debug("client %s gone: %s", self.conn.peer, exc)
            self.keep_alive = False
        except Exception:
            log.exception("internal error serving %s %s", self.msg.method, self.msg.target)
            self.handler_errors += 1
            self.keep_alive = False
            if not self.head_sent:
                try:
                    self._fail(500, "internal error")
                    self._write()
                except Exception:
                    pass
        finally:
            if self.stream is not None:
                self.stream.abort()
                self.stream = None
            self._log(started)
        return self.keep_alive

    def _serve(self) -> None:
        msg = self.msg
        if msg.error is not None:  # refused before its head was complete: log, no other hook
            self._refuse(msg.error)
            return
        target = origin_form(msg.target)
        if target is None:
            self._refuse(HttpError(400, f"invalid request target {msg.target[:100]!r}"))
            return
        try:
            self.txn = Transaction(msg.method, target, msg.headers)
        except UsageError as exc:
            self._refuse(HttpError(400, f"invalid request: {exc}"))
            return
        self.hooks = self.host.handled_hooks
        if self._fire("read_request") and not self._answered():
            self._forward()
        self._send_response()

    # ---- hooks ----

    def _fire(self, hook: str) -> bool:
        """Fire *hook* if handled; False after a handler error (a 500 is then set)."""
        self.done = False
        if hook not in self.hooks:
            return True
        txn = self.txn
        assert txn is not None
        out = self.host.fire(hook, txn)
        if out.status is Status.ERROR:
            self.handler_errors += 1
            self._fail(500, f"handler error in {hook}")
            return False
        self.done = out.status is Status.DONE
        return True

    def _answered(self) -> bool:
        """The last hook answered with txn:respond (DONE and a status set)."""
        txn = self.txn
        assert txn is not None
        if self.done and txn.response.status is not None:
            self.body = txn.response.body
            return True
        return False

    # ---- cache and upstream ----

    def _forward(self) -> None:
        txn, px = self.txn, self.px
        assert txn is not None
        method = txn.request.method
        req_headers = txn.request.headers.items()
        url = px.origin.base + txn.request.uri
        cache = px.cache
        if cache is not None and method in ("GET", "HEAD"):
            hit = cache.lookup(method, url, txn.cache_key, req_headers)
            if hit is not None:
                self.cache_status = "HIT"
                txn.response.status = hit.status
                txn.response.headers = hit.headers
                txn.response.headers["Age"] = str(hit.age)
                txn.response.headers["X-Cache"] = "HIT"
                self.body = hit.body
                return
        self.cache_status = "MISS"

        # the request as it goes upstream, for send_request to see and change
        xff = [v.strip() for n, v in req_headers if n.lower() == "x-forwarded-for" and v.strip()]
        txn.request.headers = ([("Host", px.origin.netloc)]
                               + end_to_end(req_headers, drop=UPSTREAM_SET)
                               + [("Via", f"{self.msg.version} hostscript"),
                                  ("X-Forwarded-For", ", ".join(xff + [self.conn.peer]))])
        if not self._fire("send_request") or self._answered():
            return

        method = txn.request.method
        headers = end_to_end(txn.request.headers.items(), drop=FRAMING)
        body, length = self._request_body()
        try:
            resp = px.pool.exchange(method, txn.request.uri, headers, body, length)
        except UpstreamError as exc:
            log.warning("upstream error for %s %s: %s", method, txn.request.uri, exc)
            self.upstream_error = True
            self._fail(exc.status, str(exc))
            return
        except HttpError as exc:  # the client's body: too slow, too large, malformed
            log.info("request body from %s refused: %d %s", self.conn.peer, exc.status, exc)
            self._fail(exc.status, str(exc))
            return
        self.stream = resp
        try:
            txn.response.status = resp.status
            txn.response.headers = end_to_end(resp.headers)
        except UsageError as exc:
            self.upstream_error = True
            self._fail(502, f"invalid upstream response: {exc}")
            return
        if not self._fire("read_response"):
            return
        replaced = txn.response.body
        if replaced:  # a handler set the body (txn:respond or txn.resp.body)
            self.body = replaced
            self._drop_stream()
        elif (cache is not None and method == "GET" and resp.status not in NO_BODY_STATUS
              and not self.msg.has_body  # the key has no body: a "fat GET" is not stored
              and (resp.content_length is None or resp.content_length <= cache.max_object)
              # judged on the request as looked up and as sent (a handler may have
              # added Authorization or no-store on the way up)
              and cache.storable(method, req_headers + headers, resp.status,
                                 txn.response.headers.items())
              and vary_agrees(txn.response.headers.items(), req_headers, headers)):
            # stored under the secondary key as read_response left it: a handler that
            # learns how to key this resource from the response (the Key header) keys
            # the response it learnt it from
            self._buffer_and_store(url, txn.cache_key, req_headers)
        txn.response.headers["X-Cache"] = "MISS"

    def _request_body(self) -> Tuple[Body, Optional[int]]:
        """What goes upstream as the body, and its length (None: chunked)."""
        msg = self.msg
        if not msg.has_body:
            return None, msg.content_length  # None, or an explicit 0
        if msg.complete:  # all of it arrived with the head: replayable, length known
            data = b"".join(msg.chunks)
            msg.chunks.clear()
            return data, len(data)
        return self.conn.body(msg, self.px.limits), msg.content_length

    def _buffer_and_store(self, url: str, secondary: bytes, req_headers: List[Header]) -> None:
        """Read the body up to the cache's object size: store it if it fits, else
        keep what was read as the prefix of a streamed body."""
        txn, resp, cache = self.txn, self.stream, self.px.cache
        assert txn is not None and resp is not None and cache is not None
        parts: List[bytes] = []
        size = 0
        try:
            while True:
                piece = resp.read()
                if not piece:
                    break
                parts.append(piece)
                size += len(piece)
                if size > cache.max_object:
                    self.prefix = parts
                    return
        except UpstreamError as exc:
            log.warning("upstream error reading %s: %s", url, exc)
            self.upstream_error = True
            self._fail(exc.status, str(exc))
            return
        self.body = b"".join(parts)
        resp.finish()
        self.stream = None
        cache.store("GET", url, secondary, req_headers, resp.status, txn.response.headers.items(),
                    self.body)

    def _drop_stream(self) -> None:
        if self.stream is not None:
            self.stream.abort()
            self.stream = None
            self.prefix = []

    # ---- answers the proxy makes itself ----

    def _fail(self, status: int, message: str) -> None:
        """Answer *status* instead of whatever was under way."""
        self._drop_stream()
        self.body = f"{status} {reason(status)}\n".encode()
        if self.txn is None:  # failed before the request made a transaction
            self.txn = Transaction(self.msg.method or "-", "-", ())
        txn = self.txn
        txn.response.status = status
        txn.response.headers = [("Content-Type", "text/plain; charset=utf-8")]
        txn.response.body = self.body
        if status in (400, 408, 413, 414, 431, 501):
            self.client_error = True
            self.keep_alive = False

    def _refuse(self, err: HttpError) -> None:
        """A request refused before any hook could see it (malformed, too large, too
        slow): answer, close, and let ``log`` see a transaction of what was read."""
        msg = self.msg
        log.info("refused request from %s: %d %s", self.conn.peer, err.status, err)
        try:
            self.txn = Transaction(msg.method or "-", msg.target or "-", msg.headers)
        except UsageError:
            self.txn = Transaction("-", "-", ())
        self.hooks = self.host.handled_hooks
        self._fail(err.status, str(err))
        self.keep_alive = False
        self._write()

    # ---- the response ----

    def _send_response(self) -> None:
        txn = self.txn
        assert txn is not None
        txn.response.headers.add("Via", VIA)
        if "send_response" in self.hooks:
            out = self.host.fire("send_response", txn)
            if out.status is Status.ERROR:
                self.handler_errors += 1
                self._fail(500, "handler error in send_response")
            else:
                replaced = txn.response.body
                if replaced and replaced != self.body:
                    self.body = replaced
                    self._drop_stream()
        self._write()

    def _write(self) -> None:
        txn, msg = self.txn, self.msg
        assert txn is not None
        status = txn.response.status or 502
        if status < 200:  # an interim status ends no exchange: only a handler sets one
            log.warning("a handler answered %s %s with the interim status %d",
                        msg.method, msg.target, status)
            self.handler_errors += 1
            self._fail(500, f"handler status {status}")
            status = 500
        self.status = status
        no_body = msg.method == "HEAD" or status in NO_BODY_STATUS
        headers = end_to_end(txn.response.headers.items(), drop=FRAMING)
        stream = self.stream
        chunked = False
        if stream is not None:
            length = stream.content_length
            if not no_body and (stream.head_request or stream.status in NO_BODY_STATUS):
                length = 0  # no body follows (send_request made it HEAD, a handler changed the status)
            if length is not None and status != 204:
                headers.append(("Content-Length", str(length)))
            elif not no_body:
                if msg.version == "1.1":
                    chunked = True
                    headers.append(("Transfer-Encoding", "chunked"))
                else:
                    self.keep_alive = False  # the end of the body is the end of the connection
        elif status >= 200 and status not in NO_BODY_STATUS:
            headers.append(("Content-Length", str(len(self.body))))
        # the request must have been read to its end for the connection to go on
        if not msg.complete or self.px.draining:
            self.keep_alive = False
        if self.keep_alive:
            if msg.version == "1.0":
                headers.append(("Connection", "keep-alive"))
        else:
            headers.append(("Connection", "close"))
        if not any(n.lower() == "date" for n, _ in headers):
            headers.append(("Date", http_date()))
        head = serialize_head(f"HTTP/1.1 {status} {reason(status)}", headers)
        conn = self.conn
        conn.begin_response()
        if stream is None or no_body:
            data = b"" if no_body else self.body
            conn.send(head + data)
            self.head_sent = True
            self.sent = len(data)
            if stream is not None:
                stream.finish()
                self.stream = None
            return
        # the body bytes already read go out with the head: one write, and one
        # segment, for a small response (never a wait on the upstream before the head)
        first = b"" if self.prefix else stream.buffered(COALESCE)
        conn.send(head + (chunk(first) if chunked and first else first))
        self.head_sent = True
        self.sent += len(first)
        try:
            for piece in self.prefix:
                conn.send(chunk(piece) if chunked else piece)
                self.sent += len(piece)
            self.prefix = []
            while True:
                piece = stream.read()
                if not piece:
                    break
                conn.send(chunk(piece) if chunked else piece)
                self.sent += len(piece)
        except UpstreamError as exc:
            # too late for an error status: cut the client's connection short
            log.warning("upstream error mid-body for %s: %s", txn.request.uri, exc)
            self.upstream_error = True
            self.keep_alive = False
            return
        if chunked:
            conn.send(LAST_CHUNK)
        stream.finish()
        self.stream = None

    # ---- log ----

    def _log(self, started: float) -> None:
        txn = self.txn
        px = self.px
        if not self.head_sent:  # the client left before its response
            self.status = CLIENT_GONE
        status = self.status
        if txn is not None:
            try:
                if self.status:
                    txn.response.status = self.status
                if "log" in self.hooks:
                    out = self.host.fire("log", txn)
                    if out.status is Status.ERROR:
                        self.handler_errors += 1
            except Exception:
                log.exception("firing log")
        msg = self.msg
        duration = time.monotonic() - started
        px.counters.request_done(status, self.cache_status or "-", self.sent, self.handler_errors,
                              self.upstream_error, self.client_error)
        if px.access_log is not None:
            line = f"{msg.method} {msg.target} HTTP/{msg.version}" if msg.method else "-"
            px.access_log.write(self.conn.peer, line, status, self.sent, self.cache_status,
                                duration)
