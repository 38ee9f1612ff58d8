"""The reference proxy's response cache: in memory, bounded in bytes, LRU.

A shared cache in the sense of RFC 9111, reduced to what a reverse proxy with no
revalidation needs:

- Keyed by method + URL + the secondary key a handler set (``txn:set_cache_key``),
  then by the request's values of the fields the response's ``Vary`` names: one key
  may hold several variants.
- Stores only GET responses with a status cacheable by default and an explicit
  freshness lifetime (``s-maxage``, else ``max-age``, else ``Expires`` − ``Date``);
  no heuristic freshness. HEAD is answered from the GET entry.
- Never stores ``no-store``, ``private``, ``no-cache`` (it cannot revalidate),
  ``Vary: *``, responses that set cookies, nor, for requests with ``Authorization``,
  responses without ``s-maxage`` or ``public``. A request's ``no-store`` keeps its
  response out; its ``no-cache`` (or ``max-age=0``, or ``Pragma: no-cache``) skips
  the lookup.
- ``Age`` follows RFC 9111 §4.2.3: the upstream's ``Age`` plus the time resident here.

Thread-safe: one lock, held only for dictionary work.
"""
from __future__ import annotations

import email.utils
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

Pairs = List[Tuple[str, str]]

# RFC 9110 §15.1: statuses "heuristically cacheable" are the ones a cache may store
# by default; this cache still requires explicit freshness for them.
CACHEABLE_STATUS = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
# Variants (Vary) kept per key, the oldest dropped first: Vary on a field the client
# picks (User-Agent, say) must not grow one key's list, which lookups walk under the lock
MAX_VARIANTS = 32
ENTRY_OVERHEAD = 256  # bytes charged per entry beyond its headers and body
# Headers the cache never replays: per-connection ones and those it computes itself.
_NOT_STORED = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                         "transfer-encoding", "upgrade", "proxy-authenticate",
                         "proxy-authorization", "age", "x-cache"})


class CachedResponse(NamedTuple):
    """A fresh stored response, as lookup() hands it out (a named tuple: made on
    every hit, so it costs less than a frozen dataclass)."""

    status: int
    headers: Pairs
    body: bytes
    age: int  # whole seconds, for the Age header


@dataclass
class _Entry:
    key: Tuple[str, str, bytes]
    vary: Tuple[Tuple[str, str], ...]  # (field, the stored request's value)
    status: int
    headers: Pairs
    body: bytes
    stored_at: float
    initial_age: float
    lifetime: float
    size: int


def cache_control(values: Iterable[str]) -> Dict[str, Optional[str]]:
    """Parse Cache-Control field values into {directive: argument or None}; names are
    lowercased, quoted arguments unquoted, the first of duplicate directives wins."""
    out: Dict[str, Optional[str]] = {}
    for value in values:
        for part in _split_commas(value):
            name, eq, arg = part.partition("=")
            name = name.strip().lower()
            if not name or name in out:
                continue
            arg = arg.strip()
            if len(arg) >= 2 and arg[0] == arg[-1] == '"':
                arg = arg[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            out[name] = arg if eq else None
    return out


def _split_commas(value: str) -> List[str]:
    """Split a list-valued field at commas outside quoted strings."""
    parts, cur, quoted, escaped = [], [], False, False
    for ch in value:
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur).strip())
    return [p for p in parts if p]


def _seconds(arg: Optional[str]) -> Optional[int]:
    """A delta-seconds argument; None when absent or malformed."""
    if arg is None or not arg.isdigit():
        return None
    return int(arg)


def _all(headers: Pairs, name: str) -> List[str]:
    return [v for k, v in headers if k.lower() == name]


def _http_date(value: Optional[str]) -> Optional[float]:
    if value is None:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def freshness_lifetime(headers: Pairs, cc: Dict[str, Optional[str]], now_wall: float) -> float:
    """Seconds the response is fresh for from its Date (0 when not explicitly fresh)."""
    for directive in ("s-maxage", "max-age"):
        if directive in cc:
            return float(_seconds(cc[directive]) or 0)
    expires = _all(headers, "expires")
    if not expires:
        return 0.0
    when = _http_date(expires[0])
    if when is None:  # an invalid Expires means "already expired" (RFC 9111 §5.3)
        return 0.0
    date = _http_date(next(iter(_all(headers, "date")), None))
    return max(0.0, when - (date if date is not None else now_wall))


def _vary_fields(headers: Pairs) -> Optional[Tuple[str, ...]]:
    """The field names Vary lists, lowercased and sorted; None for ``Vary: *``."""
    names = set()
    for value in _all(headers, "vary"):
        for part in value.split(","):
            part = part.strip().lower()
            if part == "*":
                return None
            if part:
                names.add(part)
    return tuple(sorted(names))


def _request_value(request_headers: Pairs, field: str) -> str:
    # RFC 9111 §4.1: values are compared after combining lines and normalizing OWS
    return ",".join(" ".join(v.split()) for v in _all(request_headers, field))


def vary_agrees(response_headers: Pairs, lookup_headers: Pairs, sent_headers: Pairs) -> bool:
    """Whether every field the response's Vary names has the same value in the request
    as looked up and as sent upstream. The proxy (Host, X-Forwarded-For, Via) and
    ``send_request`` handlers change the request in between; a variant keyed by a
    value the origin never saw would be served to requests it does not fit."""
    fields = _vary_fields(response_headers) or ()
    return all(_request_value(lookup_headers, f) == _request_value(sent_headers, f)
               for f in fields)


class ResponseCache:
    """The proxy's response cache. See the module comment for what it stores."""

    def __init__(self, max_bytes: int = 64 << 20, max_object: int = 8 << 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes < 0 or max_object < 0:
            raise ValueError("cache sizes must not be negative")
        self.max_bytes = max_bytes
        self.max_object = min(max_object, max_bytes)
        self._clock = clock
        self._lock = threading.Lock()
        # LRU over entries; a key's variants are found through _variants
        self._lru: "OrderedDict[int, _Entry]" = OrderedDict()
        self._variants: Dict[Tuple[str, str, bytes], List[_Entry]] = {}
        self._bytes = 0
        self._counts = {"hits": 0, "misses": 0, "stores": 0, "evictions": 0}

    # ---- the request side ----

    def lookup(self, method: str, url: str, secondary: bytes,
               request_headers: Pairs) -> Optional[CachedResponse]:
        """A fresh stored response for this request, or None (a miss)."""
        if method not in ("GET", "HEAD") or self.max_bytes == 0:
            return None
        cc_values: List[str] = []
        pragma: List[str] = []
        for k, v in request_headers:  # one pass: every request goes through here
            low = k.lower()
            if low == "cache-control":
                cc_values.append(v)
            elif low == "pragma":
                pragma.append(v)
        bypass = False
        if cc_values:
            req_cc = cache_control(cc_values)
            bypass = "no-cache" in req_cc or _seconds(req_cc.get("max-age", "")) == 0
        elif pragma:
            bypass = any("no-cache" in v.lower() for v in pragma)
        key = ("GET", url, secondary)
        now = self._clock()
        with self._lock:
            found = None
            if not bypass:
                for e in self._variants.get(key, ()):
                    if all(_request_value(request_headers, f) == v for f, v in e.vary):
                        found = e
                        break
            if found is not None:
                age = found.initial_age + (now - found.stored_at)
                if age >= found.lifetime:  # stale: this cache does not revalidate
                    self._drop(found)
                    found = None
            if found is None:
                self._counts["misses"] += 1
                return None
            self._lru.move_to_end(id(found))
            self._counts["hits"] += 1
        return CachedResponse(found.status, list(found.headers), found.body, int(age))

    # ---- the response side ----

    def storable(self, method: str, request_headers: Pairs, status: int,
                 response_headers: Pairs) -> bool:
        """Whether a response may be stored, judged from its head (before the body)."""
        return self._lifetime(method, request_headers, status, response_headers) is not None

    def _lifetime(self, method: str, request_headers: Pairs, status: int,
                  response_headers: Pairs) -> Optional[float]:
        if method != "GET" or status not in CACHEABLE_STATUS or self.max_bytes == 0:
            return None
        req_cc = cache_control(_all(request_headers, "cache-control"))
        cc = cache_control(_all(response_headers, "cache-control"))
        if "no-store" in req_cc or {"no-store", "private", "no-cache"} & cc.keys():
            return None
        if _all(response_headers, "set-cookie") or _vary_fields(response_headers) is None:
            return None
        if _all(request_headers, "authorization") and not ({"s-maxage", "public"} & cc.keys()):
            return None
        lifetime = freshness_lifetime(response_headers, cc, time.time())
        age = _seconds(next(iter(_all(response_headers, "age")), None)) or 0
        return lifetime if lifetime > age else None

    def store(self, method: str, url: str, secondary: bytes, request_headers: Pairs,
              status: int, response_headers: Pairs, body: bytes) -> bool:
        """Store a complete response if it is storable and fits; whether it was stored."""
        lifetime = self._lifetime(method, request_headers, status, response_headers)
        if lifetime is None or len(body) > self.max_object:
            return False
        kept = [(k, v) for k, v in response_headers if k.lower() not in _NOT_STORED]
        fields = _vary_fields(response_headers) or ()
        vary = tuple((f, _request_value(request_headers, f)) for f in fields)
        size = len(body) + sum(len(k) + len(v) + 4 for k, v in kept) + len(url) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return False
        initial_age = float(_seconds(next(iter(_all(response_headers, "age")), None)) or 0)
        key = ("GET", url, bytes(secondary))
        entry = _Entry(key, vary, status, kept, bytes(body), self._clock(), initial_age,
                       lifetime, size)
        with self._lock:
            for old in [e for e in self._variants.get(key, ()) if e.vary == vary]:
                self._drop(old)
            while len(self._variants.get(key, ())) >= MAX_VARIANTS:
                self._drop(self._variants[key][0])
                self._counts["evictions"] += 1
            while self._bytes + size > self.max_bytes and self._lru:
                self._drop(next(iter(self._lru.values())))
                self._counts["evictions"] += 1
            self._lru[id(entry)] = entry
            self._variants.setdefault(key, []).append(entry)
            self._bytes += size
            self._counts["stores"] += 1
        return True

    def _drop(self, e: _Entry) -> None:  # with the lock held
        del self._lru[id(e)]
        variants = self._variants[e.key]
        variants.remove(e)
        if not variants:
            del self._variants[e.key]
        self._bytes -= e.size

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()
            self._variants.clear()
            self._bytes = 0

    def stats(self) -> Dict[str, int]:
        """hits, misses, stores, evictions, bytes (charged, incl. overhead), entries."""
        with self._lock:
            return dict(self._counts, bytes=self._bytes, entries=len(self._lru))
