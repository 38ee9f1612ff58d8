"""WSGI middleware: Lua handlers around any WSGI application (PEP 3333).

    from hostscript.wsgi import Middleware
    app = Middleware(app, ["examples/stamp.lua"])      # or Middleware(app, host)

Three hooks, on the server's worker thread that runs the request:

- ``read_request`` before the application, with a Transaction built from the
  environ (method, URI as on the wire, headers). What the handlers change is written
  back into the environ; when a handler answers (``txn:respond``), the application is
  not called and the handler's status, headers and body are the response.
- ``send_response`` when the application calls ``start_response`` (and before a
  handler's own answer is sent): ``txn.resp.status`` and ``txn.resp.headers`` are the
  application's; what the handlers leave there goes to the server. Setting a body
  (``txn.resp.body``, ``txn:respond``) replaces the application's body.
- ``log`` once the response iterable has been closed — always, also when the
  application raised (``txn.resp.status`` is then 500 unless something was sent).

A handler error never changes the response (the error is logged by the
``hostscript`` logger, counted in ``Middleware.errors`` and in ``host.stats()``);
the request goes on as if the failed hook had not been fired. docs/wsgi.md.
"""
from __future__ import annotations

import http
import logging
import os
import threading
from typing import (Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union)
from urllib.parse import quote, unquote, urlsplit

from .errors import ArgumentTypeError, ClosedError, Error, HandlerError, UsageError
from .host import Host, Status
from .transaction import Transaction

__all__ = ["Middleware", "HOOKS"]

log = logging.getLogger("hostscript")

HOOKS = ("read_request", "send_response", "log")

# What a WSGI application may not send (PEP 3333: hop-by-hop headers are the server's).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade"})
_SPECIAL = {"CONTENT_TYPE": "content-type", "CONTENT_LENGTH": "content-length"}
_SAFE_PATH = "/;=,~!$&'()*+:@-._"  # kept as they are when quoting PATH_INFO

StartResponse = Callable[..., Callable[[bytes], Any]]
WSGIApp = Callable[[dict, StartResponse], Iterable[bytes]]
Header = Tuple[str, str]


def environ_uri(environ: dict) -> str:
    """The request target as it came on the wire: ``RAW_URI`` / ``REQUEST_URI`` when the
    server gives it (an absolute-form target reduced to path and query), else
    ``SCRIPT_NAME + PATH_INFO`` quoted, plus ``?QUERY_STRING``."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        if raw.startswith("/") or raw == "*":
            return raw
        if "://" in raw:
            parts = urlsplit(raw)
            return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    uri = quote(path.encode("latin-1", "replace"), safe=_SAFE_PATH) or "/"
    qs = environ.get("QUERY_STRING")
    return f"{uri}?{qs}" if qs else uri


def environ_headers(environ: dict) -> List[Header]:
    """The request's headers from ``HTTP_*``, ``CONTENT_TYPE`` and ``CONTENT_LENGTH``,
    with their names restored (``HTTP_X_FOO`` -> ``x-foo``)."""
    names = _NAMES
    out = []
    for key, value in environ.items():
        name = names.get(key)
        if name is None:
            if key[:5] != "HTTP_":
                continue
            name = key[5:].replace("_", "-").lower()
            if len(names) < _NAMES_MAX:
                names[key] = name
        out.append((name, value))
    ct, cl = environ.get("CONTENT_TYPE"), environ.get("CONTENT_LENGTH")
    if ct:
        out.append(("content-type", ct))
    if cl:
        out.append(("content-length", cl))
    return out


# environ key -> header name and back, for the names seen (bounded: names are the
# client's choice)
_NAMES: dict = {}
_KEYS: dict = {}
_NAMES_MAX = 4096


def _environ_key(name: str) -> str:
    key = _KEYS.get(name)
    if key is None:
        key = name.upper().replace("-", "_")
        if key not in _SPECIAL:
            key = "HTTP_" + key
        if len(_KEYS) < _NAMES_MAX:
            _KEYS[name] = key
    return key


def _as_environ(headers: Iterable[Header]) -> dict:
    """Header pairs as environ entries; repeated headers are joined as a server does
    (``, ``; ``; `` for Cookie)."""
    out: dict = {}
    for name, value in headers:
        key = _environ_key(name)
        if key in out:
            out[key] += ("; " if key == "HTTP_COOKIE" else ", ") + value
        else:
            out[key] = value
    return out


def _status_line(code: int, app_status: Optional[str] = None) -> str:
    """``"NNN Reason"``: the application's reason when the code is its own."""
    if app_status is not None and app_status[:3] == str(code):
        return app_status
    try:
        return f"{code} {http.HTTPStatus(code).phrase}"
    except ValueError:
        return f"{code} Unknown"


class Middleware:
    """``Middleware(app, host_or_scripts)``: a WSGI application running Lua handlers
    at ``read_request``, ``send_response`` and ``log`` around *app*.

    *host_or_scripts* is a :class:`hostscript.Host` whose hooks include those three
    (the middleware does not close it), or a list of script paths: a Host is then
    created with exactly those hooks and *host_options* (``engine``, ``time_limit``,
    ``memory_limit``, ``shared``...), the scripts are loaded, and :meth:`close` closes
    it. Only hooks some loaded script handles are fired.

    ``errors`` counts the handler errors (and transactions that could not be built
    from a request) seen by this middleware; each also goes to the ``hostscript``
    logger. The Transaction of a request is in ``environ["hostscript.txn"]`` for the
    application (``txn.ctx`` holds what the handlers stored).
    """

    def __init__(self, app: WSGIApp, host_or_scripts: Union[Host, Sequence[Union[str, os.PathLike]]],
                 **host_options: Any) -> None:
        if not callable(app):
            raise ArgumentTypeError(f"app must be a WSGI application (callable), "
                                    f"not {type(app).__name__}")
        self.app = app
        self._own = False
        if isinstance(host_or_scripts, Host):
            if host_options:
                raise UsageError(f"host options {sorted(host_options)} are for a host the "
                                 f"middleware creates; pass script paths, or configure your Host")
            if host_or_scripts.closed:
                raise UsageError("the host is closed")
            missing = [h for h in HOOKS if h not in host_or_scripts.hooks]
            if missing:
                raise UsageError(f"the host does not declare the hook(s) {missing}; "
                                 f"the middleware fires {list(HOOKS)}")
            self.host = host_or_scripts
        else:
            if isinstance(host_or_scripts, (str, bytes, os.PathLike)) or not isinstance(
                    host_or_scripts, (list, tuple)):
                raise ArgumentTypeError(f"host_or_scripts must be a hostscript.Host or a list of "
                                        f"script paths, not {type(host_or_scripts).__name__}")
            paths = list(host_or_scripts)
            for p in paths:
                if not isinstance(p, (str, os.PathLike)):
                    raise ArgumentTypeError(f"script paths must be str or os.PathLike, "
                                            f"not {type(p).__name__}")
            host_options.setdefault("hooks", HOOKS)
            host = Host(**host_options)
            try:
                missing = [h for h in HOOKS if h not in host.hooks]
                if missing:
                    raise UsageError(f"hooks must include {list(HOOKS)} (missing {missing})")
                for p in paths:
                    host.load_file(p)
            except BaseException:
                host.close()
                raise
            self.host = host
            self._own = True
        self._errors = 0
        self._lock = threading.Lock()

    @property
    def errors(self) -> int:
        """Handler errors seen by this middleware (each logged by ``hostscript``)."""
        return self._errors

    def _error(self, hook: str, what: str = "") -> None:
        with self._lock:
            self._errors += 1
        if what:  # a handler error was logged by the host already
            log.error("wsgi %s: %s", hook, what, extra={"hook": hook})

    def close(self) -> None:
        """Close the host if the middleware created it. Idempotent."""
        if self._own:
            self.host.close()

    def __enter__(self) -> "Middleware":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<hostscript.wsgi.Middleware app={self.app!r} host={self.host!r}>"

    # ---- one request ----

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        try:
            hooks = self.host.handled_hooks
        except ClosedError:  # the handlers are gone; the application is not
            self._error("read_request", "the host is closed; request passed through")
            return self.app(environ, start_response)
        if not hooks:
            return self.app(environ, start_response)
        try:
            txn = Transaction(environ.get("REQUEST_METHOD", "GET"), environ_uri(environ),
                              environ_headers(environ))
        except Error as exc:
            self._error("read_request", f"request not seen by the handlers: {exc}")
            return self.app(environ, start_response)
        environ["hostscript.txn"] = txn
        return _Exchange(self, hooks, txn, environ, start_response).run()


class _Exchange:
    """One request through the hooks and the application."""

    __slots__ = ("mw", "hooks", "txn", "environ", "server_start", "app_status", "body",
                 "sent", "inner", "closed")

    def __init__(self, mw: Middleware, hooks: frozenset, txn: Transaction, environ: dict,
                 start_response: StartResponse) -> None:
        self.mw = mw
        self.hooks = hooks
        self.txn = txn
        self.environ = environ
        self.server_start = start_response
        self.app_status: Optional[str] = None  # what the application gave start_response
        self.body: Optional[bytes] = None      # a body a handler set, replacing the app's
        self.sent = False                      # a non-empty chunk went to the server
        self.inner: Any = None                 # the application's iterable
        self.closed = False

    def fire(self, hook: str) -> Optional[Status]:
        """Fire *hook* if handled: its status, or None if not fired or it failed."""
        if hook not in self.hooks:
            return None
        try:
            out = self.mw.host.fire(hook, self.txn)
        except Exception as exc:  # on_error="raise", the host closed meanwhile...
            if not isinstance(exc, HandlerError):  # (a HandlerError was logged by the host)
                log.exception("wsgi: firing %s failed", hook, extra={"hook": hook})
            self.mw._error(hook)
            return None
        if out.status is Status.ERROR:
            self.mw._error(hook)
            return None
        return out.status

    def run(self) -> Iterable[bytes]:
        txn = self.txn
        try:
            if "read_request" in self.hooks:
                req = txn.request
                before = (req.method, req.uri, req.headers.items())
                st = self.fire("read_request")
                if st is Status.DONE and txn.response.status is not None:
                    return self.answer()
                if st is not None:
                    self.write_back(before)
            self.inner = self.mw.app(self.environ, self.start_response)
        except BaseException:
            if not self.sent:
                self.set_status(500)
            self.close()
            raise
        return _Body(self)

    def write_back(self, before: Tuple[str, str, List[Header]]) -> None:
        """What read_request's handlers changed, into the environ."""
        req, env = self.txn.request, self.environ
        method, uri, headers = req.method, req.uri, req.headers.items()
        if method != before[0]:
            env["REQUEST_METHOD"] = method
        if uri != before[1]:
            path, _, query = uri.partition("?")
            path = unquote(path, encoding="latin-1")
            script = env.get("SCRIPT_NAME", "")
            if script and (path == script or path.startswith(script + "/")):
                env["PATH_INFO"] = path[len(script):]
            else:
                env["SCRIPT_NAME"], env["PATH_INFO"] = "", path
            env["QUERY_STRING"] = query
            for k in ("RAW_URI", "REQUEST_URI"):
                if k in env:
                    env[k] = uri
        if headers != before[2]:
            # the environ still holds what the old headers came from: set what differs,
            # delete the keys of headers that are gone
            new = _as_environ(headers)
            for name, _ in before[2]:
                key = _environ_key(name)
                if key not in new:
                    env.pop(key, None)
            for k, v in new.items():
                if env.get(k) != v:
                    env[k] = v

    def answer(self) -> Iterable[bytes]:
        """A read_request handler answered: send its response, the app is not called."""
        txn = self.txn
        self.body = txn.response.body
        status = txn.response.status
        assert status is not None
        self.send_response(_status_line(status), self.clean(txn.response.headers.items(), []),
                           None, answered=True)
        return _Body(self)

    def start_response(self, status: str, headers: List[Header],
                       exc_info: Any = None) -> Callable[[bytes], Any]:
        """The application's start_response: send_response, then the server's."""
        if exc_info is not None:
            try:
                if self.sent:  # PEP 3333: too late to change the response
                    raise exc_info[1].with_traceback(exc_info[2])
                self.app_status = status
                return self.send_response(status, headers, exc_info)
            finally:
                exc_info = None  # no cycle through the traceback
        if self.app_status is not None:
            raise AssertionError("start_response called a second time without exc_info")
        self.app_status = status
        return self.send_response(status, headers, None)

    def send_response(self, status: str, headers: List[Header], exc_info: Any,
                      answered: bool = False) -> Callable[[bytes], Any]:
        txn = self.txn
        out_status, out_headers = status, headers
        if not answered:
            self.body = None  # a second start_response (exc_info) starts over
        if "send_response" in self.hooks:
            try:
                code = int(status[:3])
                resp = txn.response
                resp.status = code
                resp.headers = headers
                if not answered:
                    resp.body = b""
                before = headers if type(headers) is list else resp.headers.items()
            except (Error, ValueError) as exc:
                self.mw._error("send_response", f"response not seen by the handlers: {exc}")
            else:
                st = self.fire("send_response")
                if st is not None:
                    body = resp.body
                    if body or answered or (st is Status.DONE and resp.status != code):
                        self.body = body
                    if resp.status != code:
                        out_status = _status_line(resp.status, status)
                    after = resp.headers.items()
                    if after != before:
                        out_headers = self.clean(after, headers)
        if self.body is not None:
            out_headers = [(n, v) for n, v in out_headers if n.lower() != "content-length"]
            out_headers.append(("Content-Length", str(len(self.body))))
        if not answered:
            try:
                txn.response.status = int(out_status[:3])
            except (Error, ValueError):
                pass
        try:
            write = (self.server_start(out_status, out_headers, exc_info) if exc_info is not None
                     else self.server_start(out_status, out_headers))
        finally:
            exc_info = None
        return self.writer(write)

    def clean(self, after: List[Header], app_headers: List[Header]) -> List[Header]:
        """The handlers' headers minus the hop-by-hop ones the application did not send."""
        app_names = {n.lower() for n, _ in app_headers}
        out = []
        for n, v in after:
            if n.lower() in HOP_BY_HOP and n.lower() not in app_names:
                log.warning("wsgi: hop-by-hop header %r from a handler dropped (the server's)", n)
                continue
            out.append((n, v))
        return out

    def writer(self, write: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
        def wsgi_write(data: bytes) -> Any:
            if self.body is not None:  # a handler replaced the body
                return None
            if data:
                self.sent = True
            return write(data)
        return wsgi_write

    def set_status(self, code: int) -> None:
        try:
            self.txn.response.status = code
        except Error:
            pass

    def close(self) -> None:
        """Close the application's iterable (once), then fire log."""
        if self.closed:
            return
        self.closed = True
        inner, self.inner = self.inner, None
        try:
            close = getattr(inner, "close", None)
            if close is not None:
                close()
        finally:
            if "log" in self.hooks:
                self.fire("log")


class _Body:
    """The response iterable handed to the server: the application's chunks as they
    come, or the handlers' body instead; close() -> the app's close(), then ``log``.

    The body is chosen at each step, not when iteration starts: a generator
    application calls start_response (and so send_response) at its first step."""

    __slots__ = ("x", "it", "done")

    def __init__(self, x: _Exchange) -> None:
        self.x = x
        self.it: Optional[Iterator[bytes]] = None
        self.done = False  # the handlers' body was handed out

    def __iter__(self) -> "_Body":
        return self

    def __next__(self) -> bytes:
        x = self.x
        if self.done:
            raise StopIteration
        if x.body is None:  # not replaced (yet: a generator app has not started)
            try:
                it = self.it
                if it is None:
                    it = self.it = iter(x.inner if x.inner is not None else ())
                data = next(it)
            except StopIteration:
                if x.body is None:
                    raise
                data = b""
            except BaseException:
                if not x.sent:
                    x.set_status(500)
                raise
            if x.body is None:
                if data:
                    x.sent = True
                return data
        # a handler's body replaces the application's: what the app yields is dropped
        self.done = True
        if x.body:
            x.sent = True
            return x.body
        raise StopIteration

    def close(self) -> None:
        self.x.close()
