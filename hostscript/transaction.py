"""Transaction: one request's method, URI, headers, response and ctx, as the host sees it.

The Python objects are the host's view; the C transaction is what handlers see.
Changes cross in one call per direction: what Python changed is pushed, packed,
before a fire; what Lua changed is only marked after it and pulled, packed, when
Python first reads that part — a hook chain that never looks at a field in Python
never copies it.
"""
from __future__ import annotations

import itertools
import re
from typing import TYPE_CHECKING, Iterable, Iterator, List, Optional, Tuple, Union

from . import _bridge

if TYPE_CHECKING:
    from ._engine import Engine

# what a fire changed (native/hostscript.h HS_CH_*) and the fields to read (HS_T_*)
CH_REQ_HEADERS, CH_RESP_HEADERS, CH_METHOD, CH_URI, CH_STATUS, CH_BODY, CH_CTX, CH_LOGS = (
    1 << i for i in range(8))
_ALL = CH_REQ_HEADERS | CH_RESP_HEADERS | CH_METHOD | CH_URI | CH_STATUS | CH_BODY | CH_CTX
_T_METHOD, _T_URI, _T_BODY, _T_REQ_HEADERS, _T_RESP_HEADERS, _T_CTX = range(6)

_NAMES_OK = re.compile(r"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+\n)*[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z").match
_NAME_OK = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z").match
_VALUE_BAD = re.compile(r"[\r\n\0]|[^\x00-\xff]").search


def _validated(items: Iterable[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """The (name, value) pairs as a list, checked all at once: names are tokens,
    values latin-1 text without CR, LF or NUL."""
    out = [(k, v) for k, v in items]
    if not out:
        return out
    try:
        names = "\n".join([k for k, _ in out])
        values = "".join([v for _, v in out])
    except TypeError:
        raise TypeError("header names and values must be str") from None
    if not _NAMES_OK(names) or names.count("\n") != len(out) - 1 or _VALUE_BAD(values):
        for k, v in out:  # find the culprit for the message
            if not isinstance(k, str) or not _NAME_OK(k):
                raise ValueError(f"invalid header name: {k!r}")
            if _VALUE_BAD(v):
                raise ValueError(f"invalid header value for {k}: {v!r} (CR, LF, NUL or non-latin-1)")
    return out


class Headers:
    """A case-insensitive multi-map of HTTP header fields, in order.

    ``h[name]`` is the first value (KeyError when absent), ``h.get_all(name)`` every
    value, ``h[name] = v`` replaces, ``h.add(name, v)`` appends, ``del h[name]``
    removes all. Iteration yields ``(name, value)`` pairs.
    """

    __slots__ = ("_items", "_owner", "_bit")

    def __init__(self, items: Iterable[Tuple[str, str]] = (), *, _owner: Optional["Transaction"] = None,
                 _bit: int = 0) -> None:
        self._items: List[Tuple[str, str]] = _validated(items)
        self._owner = _owner  # the transaction whose _dirty/_stale bit _bit these headers are
        self._bit = _bit

    def _changed(self) -> None:
        if self._owner is not None:
            self._owner._dirty |= self._bit

    def _fresh(self) -> List[Tuple[str, str]]:
        o = self._owner
        if o is not None and o._stale & self._bit:
            o._pull(self._bit)
        return self._items

    def __getitem__(self, name: str) -> str:
        low = name.lower()
        for k, v in self._fresh():
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
        return [v for k, v in self._fresh() if k.lower() == low]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        low = name.lower()
        return any(k.lower() == low for k, _ in self._fresh())

    def __setitem__(self, name: str, value: str) -> None:
        _validated([(name, value)])
        low = name.lower()
        out, done = [], False
        for k, v in self._fresh():
            if k.lower() == low:
                if not done:
                    out.append((k, value))
                    done = True
                continue
            out.append((k, v))
        if not done:
            out.append((name, value))
        self._items = out
        self._changed()

    def add(self, name: str, value: str) -> None:
        self._fresh().extend(_validated([(name, value)]))
        self._changed()

    def remove(self, name: str) -> None:
        low = name.lower()
        self._items = [(k, v) for k, v in self._fresh() if k.lower() != low]
        self._changed()

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self.remove(name)

    def items(self) -> List[Tuple[str, str]]:
        return list(self._fresh())

    def __iter__(self) -> Iterator[Tuple[str, str]]:
        return iter(list(self._fresh()))

    def __len__(self) -> int:
        return len(self._fresh())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Headers):
            return self._fresh() == other._fresh()
        if isinstance(other, (list, tuple)):
            return self._fresh() == [tuple(p) for p in other]
        return NotImplemented

    def __repr__(self) -> str:
        return f"Headers({self._fresh()!r})"

    def _pack(self) -> bytes:
        return "\0".join(itertools.chain.from_iterable(self._items)).encode("latin-1")

    def _unpack(self, data: bytes) -> None:
        if data:
            it = iter(data.decode("latin-1").split("\0"))
            self._items = list(zip(it, it))
        else:
            self._items = []


class _Part:
    """A part of a transaction whose fields Lua may have changed: read them fresh."""

    __slots__ = ("_txn",)
    _txn: "Transaction"

    def _get(self, bit: int) -> None:
        if self._txn._stale & bit:
            self._txn._pull(bit)


class Request(_Part):
    """The request as handlers see it: ``method``, ``uri``, ``headers``."""

    __slots__ = ("_method", "_uri", "_headers")

    def __init__(self, txn: "Transaction", method: str, uri: str, headers: Headers) -> None:
        self._txn = txn
        self._method = method
        self._uri = uri
        self._headers = headers

    @property
    def method(self) -> str:
        self._get(CH_METHOD)
        return self._method

    @method.setter
    def method(self, value: str) -> None:
        self._txn._stale &= ~CH_METHOD
        self._method = value
        self._txn._dirty |= CH_METHOD

    @property
    def uri(self) -> str:
        self._get(CH_URI)
        return self._uri

    @uri.setter
    def uri(self, value: str) -> None:
        self._txn._stale &= ~CH_URI
        self._uri = value
        self._txn._dirty |= CH_URI

    @property
    def headers(self) -> Headers:
        self._get(CH_REQ_HEADERS)
        return self._headers

    def __repr__(self) -> str:
        return f"Request({self.method!r}, {self.uri!r}, {self.headers!r})"


class Response(_Part):
    """The response: ``status`` (None until set), ``headers``, ``body`` (bytes)."""

    __slots__ = ("_status", "_body", "_headers")

    def __init__(self, txn: "Transaction", status: Optional[int], headers: Headers, body: bytes) -> None:
        self._txn = txn
        self._status = status
        self._body = body
        self._headers = headers

    @property
    def status(self) -> Optional[int]:
        self._get(CH_STATUS)
        return self._status

    @status.setter
    def status(self, value: Optional[int]) -> None:
        self._txn._stale &= ~CH_STATUS
        self._status = value
        self._txn._dirty |= CH_STATUS

    @property
    def body(self) -> bytes:
        self._get(CH_BODY)
        return self._body

    @body.setter
    def body(self, value: Union[bytes, str]) -> None:
        self._txn._stale &= ~CH_BODY
        self._body = value.encode() if isinstance(value, str) else bytes(value)
        self._txn._dirty |= CH_BODY

    @property
    def headers(self) -> Headers:
        self._get(CH_RESP_HEADERS)
        return self._headers

    def __repr__(self) -> str:
        return f"Response({self.status!r}, {self.headers!r}, {self.body!r})"


class Transaction(_bridge.TxnBase):
    """One request passing through the host's hooks. Fire its hooks from any thread,
    one fire at a time; ``ctx`` (handlers' ``txn.ctx``) follows it across threads.

    The C base keeps ``_addr`` (the C transaction), ``_engine``, ``_dirty`` (HS_CH_*
    bits Python changed, headers included) and ``_stale`` (bits Lua changed) where
    the C fast path of Host.fire reads them."""

    __slots__ = ("request", "response", "_ctx_bytes", "_ctx", "__weakref__")
    _engine: Optional["Engine"]

    def __init__(self, method: str = "GET", uri: str = "/",
                 headers: Iterable[Tuple[str, str]] = (), *, status: Optional[int] = None,
                 response_headers: Iterable[Tuple[str, str]] = (), body: Union[bytes, str] = b"") -> None:
        self._dirty = _ALL & ~CH_CTX  # everything is to push on the first fire
        self.request = Request(self, method, uri, Headers(headers, _owner=self, _bit=CH_REQ_HEADERS))
        self.response = Response(self, status,
                                 Headers(response_headers, _owner=self, _bit=CH_RESP_HEADERS),
                                 body.encode() if isinstance(body, str) else bytes(body))
        self._ctx_bytes = b""
        self._ctx: Optional[dict] = None

    def __del__(self) -> None:
        if self._addr:
            self._engine.bridge.txn_free(self._addr)  # type: ignore[union-attr]
            self._addr = 0

    @property
    def ctx(self) -> dict:
        """A snapshot of the handlers' ``txn.ctx``: sequences become lists, tables dicts."""
        if self._stale & CH_CTX:
            self._pull(CH_CTX)
        if self._ctx is None:
            self._ctx = _bridge.ctx_decode(self._ctx_bytes)
        return self._ctx

    def __repr__(self) -> str:
        return f"Transaction({self.request!r}, {self.response!r})"

    # ---- crossing into C (used by Host.fire) ----

    def _prepare(self, engine: "Engine") -> None:
        """Make the C transaction of ENGINE hold everything Python changed."""
        req, resp = self.request, self.response
        if self._engine is not engine:
            if self._stale:
                self._pull(self._stale)
            old, addr = self._engine, self._addr
            self._addr = engine.bridge.txn_new()
            self._engine = engine
            if addr:
                old.bridge.txn_free(addr)  # type: ignore[union-attr]
            self._dirty = _ALL  # a new C transaction: everything is to push (again if this fails)
        what = self._dirty
        if what:
            engine.bridge.txn_load(
                self._addr, what,
                req._method.encode("latin-1") if what & CH_METHOD else None,
                req._uri.encode("latin-1") if what & CH_URI else None,
                resp._status or 0,
                resp._body if what & CH_BODY else None,
                req._headers._pack() if what & CH_REQ_HEADERS else None,
                resp._headers._pack() if what & CH_RESP_HEADERS else None,
                self._ctx_bytes if what & CH_CTX else None)
            self._dirty = 0

    def _pull(self, bits: int) -> None:
        """Copy the fields in BITS back from the C transaction."""
        b, a = self._engine.bridge, self._addr  # type: ignore[union-attr]
        self._stale &= ~bits
        if bits & CH_REQ_HEADERS:
            self.request._headers._unpack(b.txn_field(a, _T_REQ_HEADERS))
        if bits & CH_RESP_HEADERS:
            self.response._headers._unpack(b.txn_field(a, _T_RESP_HEADERS))
        if bits & CH_METHOD:
            self.request._method = b.txn_field(a, _T_METHOD).decode("latin-1")
        if bits & CH_URI:
            self.request._uri = b.txn_field(a, _T_URI).decode("latin-1")
        if bits & CH_STATUS:
            self.response._status = b.txn_status(a) or None
        if bits & CH_BODY:
            self.response._body = b.txn_field(a, _T_BODY)
        if bits & CH_CTX:
            self._ctx_bytes = b.txn_field(a, _T_CTX)
            self._ctx = None
