"""Transaction: one request's method, URI, headers, response and ctx, as the host sees it.

The Python objects are the host's view; the C transaction is what handlers see.
Changes cross in one packed buffer per direction and per fire: what Python changed
is pushed before a fire, what Lua changed is pulled back after it.
"""
from __future__ import annotations

import itertools
import re
from typing import Any, Iterable, Iterator, List, Optional, Tuple, Union

from . import _ctx

_BAD = ("\0", "\r", "\n")

# what a fire changed (native/hostscript.h HS_CH_*)
CH_REQ_HEADERS, CH_RESP_HEADERS, CH_METHOD, CH_URI, CH_STATUS, CH_BODY, CH_CTX, CH_LOGS = (
    1 << i for i in range(8))
_HS_REQ, _HS_RESP = 0, 1
_F_METHOD, _F_URI, _F_BODY = 0, 1, 2


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


def _check(kind: str, s: str) -> str:
    if not isinstance(s, str):
        raise TypeError(f"header {kind} must be str, not {type(s).__name__}")
    if kind == "name" and not _TOKEN.match(s):
        raise ValueError(f"invalid header name: {s!r}")
    if any(c in s for c in _BAD):
        raise ValueError(f"invalid header {kind}: {s!r}")
    try:
        s.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"header {kind} must be latin-1 text: {s!r}") from None
    return s


class Headers:
    """A case-insensitive multi-map of HTTP header fields, in order.

    ``h[name]`` is the first value (KeyError when absent), ``h.get_all(name)`` every
    value, ``h[name] = v`` replaces, ``h.add(name, v)`` appends, ``del h[name]``
    removes all. Iteration yields ``(name, value)`` pairs.
    """

    __slots__ = ("_items", "_dirty")

    def __init__(self, items: Iterable[Tuple[str, str]] = ()) -> None:
        self._items: List[Tuple[str, str]] = [(_check("name", k), _check("value", v)) for k, v in items]
        self._dirty = True

    def __getitem__(self, name: str) -> str:
        low = name.lower()
        for k, v in self._items:
            if k.lower() == low:
                return v
        raise KeyError(name)

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:
        try:
            return self[name]
        except KeyError:
            return default

    def get_all(self, name: str) -> List[str]:
        low = name.lower()
        return [v for k, v in self._items if k.lower() == low]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        low = name.lower()
        return any(k.lower() == low for k, _ in self._items)

    def __setitem__(self, name: str, value: str) -> None:
        _check("name", name)
        _check("value", value)
        low = name.lower()
        out, done = [], False
        for k, v in self._items:
            if k.lower() == low:
                if not done:
                    out.append((k, value))
                    done = True
                continue
            out.append((k, v))
        if not done:
            out.append((name, value))
        self._items = out
        self._dirty = True

    def add(self, name: str, value: str) -> None:
        self._items.append((_check("name", name), _check("value", value)))
        self._dirty = True

    def remove(self, name: str) -> None:
        low = name.lower()
        self._items = [(k, v) for k, v in self._items if k.lower() != low]
        self._dirty = True

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self.remove(name)

    def items(self) -> List[Tuple[str, str]]:
        return list(self._items)

    def __iter__(self) -> Iterator[Tuple[str, str]]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Headers):
            return self._items == other._items
        if isinstance(other, (list, tuple)):
            return self._items == [tuple(p) for p in other]
        return NotImplemented

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"

    def _pack(self) -> bytes:
        return "\0".join(itertools.chain.from_iterable(self._items)).encode("latin-1")

    def _unpack(self, data: bytes) -> None:
        if data:
            flat = data.decode("latin-1").split("\0")
            it = iter(flat)
            self._items = list(zip(it, it))
        else:
            self._items = []
        self._dirty = False


class Request:
    """The request as handlers see it: ``method``, ``uri``, ``headers``."""

    __slots__ = ("_txn", "_method", "_uri", "headers")

    def __init__(self, txn: "Transaction", method: str, uri: str, headers: Headers) -> None:
        self._txn = txn
        self._method = method
        self._uri = uri
        self.headers = headers

    @property
    def method(self) -> str:
        return self._method

    @method.setter
    def method(self, value: str) -> None:
        self._method = value
        self._txn._dirty |= CH_METHOD

    @property
    def uri(self) -> str:
        return self._uri

    @uri.setter
    def uri(self, value: str) -> None:
        self._uri = value
        self._txn._dirty |= CH_URI

    def __repr__(self) -> str:
        return f"Request({self._method!r}, {self._uri!r}, {self.headers!r})"


class Response:
    """The response: ``status`` (None until set), ``headers``, ``body`` (bytes)."""

    __slots__ = ("_txn", "_status", "_body", "headers")

    def __init__(self, txn: "Transaction", status: Optional[int], headers: Headers, body: bytes) -> None:
        self._txn = txn
        self._status = status
        self._body = body
        self.headers = headers

    @property
    def status(self) -> Optional[int]:
        return self._status

    @status.setter
    def status(self, value: Optional[int]) -> None:
        self._status = value
        self._txn._dirty |= CH_STATUS

    @property
    def body(self) -> bytes:
        return self._body

    @body.setter
    def body(self, value: Union[bytes, str]) -> None:
        self._body = value.encode() if isinstance(value, str) else bytes(value)
        self._txn._dirty |= CH_BODY

    def __repr__(self) -> str:
        return f"Response({self._status!r}, {self.headers!r}, {self._body!r})"


class Transaction:
    """One request passing through the host's hooks. Fire its hooks from any thread,
    one fire at a time; ``ctx`` (handlers' ``txn.ctx``) follows it across threads."""

    def __init__(self, method: str = "GET", uri: str = "/",
                 headers: Iterable[Tuple[str, str]] = (), *, status: Optional[int] = None,
                 response_headers: Iterable[Tuple[str, str]] = (), body: Union[bytes, str] = b"") -> None:
        self._dirty = CH_METHOD | CH_URI | CH_STATUS | CH_BODY
        self.request = Request(self, method, uri, Headers(headers))
        self.response = Response(self, status, Headers(response_headers),
                                 body.encode() if isinstance(body, str) else bytes(body))
        self._ctx_bytes = b""
        self._ctx: Optional[dict] = None
        self._lib: Any = None
        self._ffi: Any = None
        self._c: Any = None
        self._addr = 0

    @property
    def ctx(self) -> dict:
        """A snapshot of the handlers' ``txn.ctx``: sequences become lists, tables dicts."""
        if self._ctx is None:
            self._ctx = _ctx.decode(self._ctx_bytes)
        return self._ctx

    def __repr__(self) -> str:
        return f"Transaction({self.request!r}, {self.response!r})"

    # ---- crossing into C (used by Host.fire) ----

    def _prepare(self, ffi: Any, lib: Any) -> Any:
        if self._lib is not lib:
            self._ffi, self._lib = ffi, lib
            self._c = ffi.gc(lib.hs_txn_new(), lib.hs_txn_free)
            if self._c == ffi.NULL:
                raise MemoryError("cannot allocate a transaction")
            self._addr = int(ffi.cast("uintptr_t", self._c))
            self._dirty = CH_METHOD | CH_URI | CH_STATUS | CH_BODY
            self.request.headers._dirty = self.response.headers._dirty = True
            if self._ctx_bytes:
                lib.hs_txn_set_ctx(self._c, self._ctx_bytes, len(self._ctx_bytes))
        c, d = self._c, self._dirty
        if d:
            if d & CH_METHOD:
                m = self.request._method.encode("latin-1")
                lib.hs_txn_set(c, _F_METHOD, m, len(m))
            if d & CH_URI:
                u = self.request._uri.encode("latin-1")
                lib.hs_txn_set(c, _F_URI, u, len(u))
            if d & CH_STATUS:
                lib.hs_txn_set_status(c, self.response._status or 0)
            if d & CH_BODY:
                lib.hs_txn_set(c, _F_BODY, self.response._body, len(self.response._body))
            self._dirty = 0
        for which, hdrs in ((_HS_REQ, self.request.headers), (_HS_RESP, self.response.headers)):
            if hdrs._dirty:
                packed = hdrs._pack()
                if lib.hs_txn_set_headers(c, which, packed, len(packed)) != 0:
                    raise MemoryError("cannot copy headers")
                hdrs._dirty = False
        return c

    def _pull(self, changes: int) -> None:
        ffi, lib, c = self._ffi, self._lib, self._c
        n = ffi.new("size_t *")
        if changes & CH_REQ_HEADERS:
            p = lib.hs_txn_headers(c, _HS_REQ, n)
            self.request.headers._unpack(ffi.buffer(p, n[0])[:])
        if changes & CH_RESP_HEADERS:
            p = lib.hs_txn_headers(c, _HS_RESP, n)
            self.response.headers._unpack(ffi.buffer(p, n[0])[:])
        if changes & CH_METHOD:
            p = lib.hs_txn_get(c, _F_METHOD, n)
            self.request._method = ffi.buffer(p, n[0])[:].decode("latin-1")
        if changes & CH_URI:
            p = lib.hs_txn_get(c, _F_URI, n)
            self.request._uri = ffi.buffer(p, n[0])[:].decode("latin-1")
        if changes & CH_STATUS:
            self.response._status = lib.hs_txn_status(c) or None
        if changes & CH_BODY:
            p = lib.hs_txn_get(c, _F_BODY, n)
            self.response._body = ffi.buffer(p, n[0])[:]
        if changes & CH_CTX:
            p = lib.hs_txn_ctx(c, n)
            self._ctx_bytes = ffi.buffer(p, n[0])[:] if n[0] else b""
            self._ctx = None
