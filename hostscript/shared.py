"""Shared dictionaries: ``host.shared[NAME]``, the Python side of ``hs.shared.NAME``.

A host declares them by name and capacity (``Host(hooks, shared={"meta": 1 << 20})``);
Lua handlers on every thread and Python code see the same entries. The semantics
are those of OpenResty's ``ngx.shared.DICT`` (see ``native/hostscript.h``): typed
values, user flags, TTLs, LRU eviction when full, and ``safe_*`` variants that
never evict.

A dictionary declared by URL (``shared={"keys": "redis://127.0.0.1:6379/0?prefix=hs:keys:"}``)
lives in Redis: the same calls, shared by every process that names the URL. There
``capacity()`` and ``free_space()`` are None, ``set`` never reports eviction, and
``get_stale`` sees live entries only; a failed round trip (Redis down, a timeout)
raises SharedDictError with a message beginning "redis: ". See docs/redis.md.

Python's view of the types: keys are ``str`` (UTF-8; ``surrogateescape`` keeps
undecodable bytes) or bytes, and ``keys()`` gives ``str``. Values are ``bytes``
(a ``str`` is stored as UTF-8 and read back as ``bytes``, as Lua sees a string),
``int`` (64-bit), ``float`` or ``bool``.

Every call is one atomic operation of the C core, made under the host's lock, so
a dictionary used after ``host.close()`` raises ClosedError.
"""
from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING, Any, List, Optional, Tuple, Union

from .errors import (ArgumentTypeError, ClosedError, SharedDictError, SharedDictFullError,
                     SharedDictKeyError, UsageError)

if TYPE_CHECKING:
    from .host import Host

Key = Union[str, bytes, bytearray, memoryview]
Value = Union[bytes, int, float, bool]
ValueIn = Union[str, bytes, bytearray, memoryview, int, float, bool]

_INLINE = 256   # bytes of the first read buffer; longer values take a second call
_U32 = struct.Struct("=I")
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


class SharedDict:
    """One shared dictionary of a host. Get it from ``host.shared[name]``."""

    __slots__ = ("name", "backend", "_host", "_d", "_ffi", "_lib")

    def __init__(self, host: "Host", handle: Any, name: str) -> None:
        self.name = name
        self._host = host
        self._d = handle
        self._ffi = host._ffi
        self._lib = host._lib
        info = self._ffi.new("hs_shared_info *")
        self._lib.hs_shared_stats(handle, info)
        #: "memory" (in this process) or "redis"
        self.backend = "redis" if info.backend == self._lib.HS_SHARED_REDIS else "memory"

    # ---- reading ----

    def get(self, key: Key, default: Any = None) -> Any:
        """The value of *key*, or *default* when it is absent or expired."""
        got = self._read(key, False)
        return default if got is None else got[0]

    def get_with_flags(self, key: Key) -> Optional[Tuple[Value, int]]:
        """``(value, flags)`` of *key*, or None when it is absent or expired."""
        got = self._read(key, False)
        return None if got is None else (got[0], got[1])

    def get_stale(self, key: Key) -> Optional[Tuple[Value, int, bool]]:
        """``(value, flags, stale)``: an expired entry too, until it is reclaimed
        (``stale`` True); None when there is none."""
        return self._read(key, True)

    def ttl(self, key: Key) -> Optional[float]:
        """Seconds *key* has left (0.0: it never expires); None when absent or expired."""
        k = _key(key)
        out = self._ffi.new("double *")
        rc = self._call(self._lib.hs_shared_ttl, k, len(k), out)
        if rc == self._lib.HS_SHARED_NOT_FOUND:
            return None
        self._check(rc)
        return float(out[0])

    def keys(self, max: int = 1024) -> List[str]:
        """Live keys, most recently used first; at most *max* (0: all)."""
        n = _count("max", max)
        ffi, lib = self._ffi, self._lib
        cap = 4096
        count = ffi.new("int *")
        while True:
            buf = ffi.new("char[]", cap)
            need = self._call(lib.hs_shared_keys, n, buf, cap, count)
            if count[0] < 0:
                self._check(lib.HS_SHARED_BACKEND)
            if need <= cap:
                break
            cap = need + need // 8 + 64
        data = ffi.buffer(buf, need)[:]
        out, pos = [], 0
        for _ in range(count[0]):
            (klen,) = _U32.unpack_from(data, pos)
            out.append(data[pos + 4:pos + 4 + klen].decode("utf-8", "surrogateescape"))
            pos += 4 + klen
        return out

    def capacity(self) -> Optional[int]:
        """Bytes the entries may take (key + string value + a fixed overhead each);
        None in Redis, which has no capacity of its own (its maxmemory rules)."""
        info = self._info()  # ClosedError after host.close(), whatever the backend
        return None if self.backend == "redis" else int(info.capacity)

    def free_space(self) -> Optional[int]:
        """Bytes not taken by entries (expired ones not yet reclaimed count as taken);
        None in Redis."""
        info = self._info()
        return None if self.backend == "redis" else int(info.free_space)

    # ---- writing ----

    def set(self, key: Key, value: ValueIn, ttl: float = 0, flags: int = 0) -> bool:
        """Store *value* under *key* for *ttl* seconds (0: no expiry), evicting the least
        recently used entries when full. Returns whether live entries were evicted
        ("forcible"). SharedDictFullError when the entry is larger than the capacity."""
        rc, forcible = self._store(self._lib.HS_STORE_SET, key, value, ttl, flags)
        self._check(rc)
        return forcible

    def safe_set(self, key: Key, value: ValueIn, ttl: float = 0, flags: int = 0) -> None:
        """Like set, but never evicts a live entry: SharedDictFullError instead."""
        rc, _ = self._store(self._lib.HS_STORE_SAFE_SET, key, value, ttl, flags)
        self._check(rc)

    def add(self, key: Key, value: ValueIn, ttl: float = 0, flags: int = 0) -> bool:
        """Store only when *key* is absent or expired: True stored, False it exists."""
        return self._store_unless(self._lib.HS_STORE_ADD, self._lib.HS_SHARED_EXISTS,
                                  key, value, ttl, flags)

    def safe_add(self, key: Key, value: ValueIn, ttl: float = 0, flags: int = 0) -> bool:
        """Like add, but never evicts a live entry: SharedDictFullError instead."""
        return self._store_unless(self._lib.HS_STORE_SAFE_ADD, self._lib.HS_SHARED_EXISTS,
                                  key, value, ttl, flags)

    def replace(self, key: Key, value: ValueIn, ttl: float = 0, flags: int = 0) -> bool:
        """Store only when *key* is present: True stored, False it is absent or expired."""
        return self._store_unless(self._lib.HS_STORE_REPLACE, self._lib.HS_SHARED_NOT_FOUND,
                                  key, value, ttl, flags)

    def _store_unless(self, mode: int, refusal: int, key: Key, value: ValueIn, ttl: float,
                      flags: int) -> bool:
        """Store in MODE: False when the dictionary answers REFUSAL, True when stored."""
        rc, _ = self._store(mode, key, value, ttl, flags)
        if rc == refusal:
            return False
        self._check(rc)
        return True

    def delete(self, key: Key) -> bool:
        """Remove *key*; whether it was there (and not expired)."""
        k = _key(key)
        rc = self._call(self._lib.hs_shared_delete, k, len(k))
        if rc == self._lib.HS_SHARED_NOT_FOUND:
            return False
        self._check(rc)
        return True

    def incr(self, key: Key, n: Union[int, float] = 1, init: Optional[Union[int, float]] = None,
             init_ttl: float = 0) -> Union[int, float]:
        """Add *n* to the number under *key* and return the result: an int when both are
        ints, else a float. An absent or expired key is SharedDictKeyError, unless
        *init* is given: then ``init + n`` is stored, for *init_ttl* seconds."""
        ffi, lib = self._ffi, self._lib
        k = _key(key)
        delta = ffi.new("hs_value *")
        _number(lib, "n", n, delta)
        pinit = ffi.NULL
        if init is not None:
            pinit = ffi.new("hs_value *")
            _number(lib, "init", init, pinit)
        elif init_ttl:
            raise UsageError("init_ttl applies to init, which is missing")
        ttl = _seconds("init_ttl", init_ttl)
        out = ffi.new("hs_value *")
        rc = self._call(lib.hs_shared_incr, k, len(k), delta, pinit, ttl, out, ffi.NULL)
        self._check(rc)
        return int(out.i) if out.type == lib.HS_VAL_INTEGER else float(out.n)

    def expire(self, key: Key, ttl: float) -> bool:
        """Give a live *key* a new TTL (0: none); False when absent or expired."""
        k = _key(key)
        rc = self._call(self._lib.hs_shared_expire, k, len(k), _seconds("ttl", ttl))
        if rc == self._lib.HS_SHARED_NOT_FOUND:
            return False
        self._check(rc)
        return True

    def flush_all(self) -> None:
        """Mark every entry expired (get_stale still sees them until reclaimed); in
        Redis, delete every key under the dictionary's prefix."""
        self._check(self._call(self._lib.hs_shared_flush_all))

    def flush_expired(self, max: int = 0) -> int:
        """Reclaim expired entries, at most *max* (0: all); how many were."""
        return int(self._call(self._lib.hs_shared_flush_expired, _count("max", max)))

    # ---- mapping conveniences ----

    def __getitem__(self, key: Key) -> Value:
        got = self._read(key, False)
        if got is None:
            raise SharedDictKeyError(self.name, f"{key!r} not found")
        return got[0]

    def __setitem__(self, key: Key, value: ValueIn) -> None:
        self.set(key, value)

    def __delitem__(self, key: Key) -> None:
        if not self.delete(key):
            raise SharedDictKeyError(self.name, f"{key!r} not found")

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, (str, bytes, bytearray, memoryview)):
            return False
        return self.ttl(key) is not None

    def __repr__(self) -> str:
        return f"<hostscript.SharedDict {self.name!r}>"

    # ---- plumbing ----

    def _call(self, fn: Any, *args: Any) -> Any:
        host = self._host
        if self.backend == "redis":  # a round trip: counted, not under the host's lock
            with host._lock:
                if host._h is None:
                    raise ClosedError(f"shared dictionary {self.name!r}: the host is closed")
                with host._waits_lock:
                    host._waits += 1  # close() waits for it
            try:
                return fn(self._d, *args)
            finally:
                with host._waits_lock:
                    host._waits -= 1
        with host._lock:  # close() may not free the host meanwhile
            if host._h is None:
                raise ClosedError(f"shared dictionary {self.name!r}: the host is closed")
            return fn(self._d, *args)

    def _check(self, rc: int) -> None:
        lib = self._lib
        if rc == lib.HS_SHARED_OK:
            return
        msg = self._ffi.string(lib.hs_shared_strerror(rc)).decode()
        if rc == lib.HS_SHARED_NO_MEMORY:
            raise SharedDictFullError(self.name, msg)
        if rc == lib.HS_SHARED_NOT_FOUND:
            raise SharedDictKeyError(self.name, msg)
        if rc in (lib.HS_SHARED_EMPTY_KEY, lib.HS_SHARED_KEY_TOO_LONG, lib.HS_SHARED_BAD_VALUE,
                  lib.HS_SHARED_BAD_TTL):
            raise UsageError(f"shared dictionary {self.name!r}: {msg}")
        raise SharedDictError(self.name, msg)

    def _info(self) -> Any:
        info = self._ffi.new("hs_shared_info *")
        self._call(self._lib.hs_shared_stats, info)
        return info

    def _read(self, key: Key, stale: bool) -> Optional[Tuple[Any, int, bool]]:
        ffi, lib = self._ffi, self._lib
        k = _key(key)
        out = ffi.new("hs_value *")
        pstale = ffi.new("int *") if stale else ffi.NULL
        cap = _INLINE
        while True:
            buf = ffi.new("char[]", cap)
            rc = self._call(lib.hs_shared_get, k, len(k), out, buf, cap, pstale)
            if rc != lib.HS_SHARED_BUFFER:
                break
            cap = max(int(out.len), 1)  # the value grew between the calls: again
        if rc == lib.HS_SHARED_NOT_FOUND:
            return None
        self._check(rc)
        t = out.type
        if t == lib.HS_VAL_STRING:
            value: Any = ffi.buffer(out.s, out.len)[:]
        elif t == lib.HS_VAL_INTEGER:
            value = int(out.i)
        elif t == lib.HS_VAL_NUMBER:
            value = float(out.n)
        else:
            value = bool(out.i)
        return value, int(out.flags), bool(stale and pstale[0])

    def _store(self, mode: int, key: Key, value: ValueIn, ttl: float, flags: int) -> Tuple[int, bool]:
        ffi, lib = self._ffi, self._lib
        k = _key(key)
        v = ffi.new("hs_value *")
        keep = _value(ffi, lib, value, v)
        v.flags = _flags(flags)
        forcible = ffi.new("int *")
        rc = self._call(lib.hs_shared_store, mode, k, len(k), v, _seconds("ttl", ttl), forcible)
        del keep
        return rc, bool(forcible[0])


def _key(key: Any) -> bytes:
    if isinstance(key, str):
        try:
            return key.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as exc:
            raise UsageError(f"a key cannot be encoded as UTF-8: {exc.reason}") from None
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    raise ArgumentTypeError(f"a key must be str or bytes, not {type(key).__name__}")


def _value(ffi: Any, lib: Any, value: Any, v: Any) -> Any:
    """Fill hs_value V from VALUE; returns what must stay alive while V is used."""
    if isinstance(value, bool):
        v.type, v.i = lib.HS_VAL_BOOLEAN, int(value)
        return None
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise UsageError(f"integer {value} is beyond the 64-bit range a shared dictionary holds")
        v.type, v.i = lib.HS_VAL_INTEGER, value
        return None
    if isinstance(value, float):
        v.type, v.n = lib.HS_VAL_NUMBER, value
        return None
    if isinstance(value, str):
        try:
            value = value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise UsageError(f"a value cannot be encoded as UTF-8: {exc.reason}") from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        keep = ffi.from_buffer(data)
        v.type, v.s, v.len = lib.HS_VAL_STRING, keep, len(data)
        return (data, keep)
    if value is None:
        raise ArgumentTypeError("a shared dictionary cannot store None: use delete()")
    raise ArgumentTypeError(f"a shared dictionary stores str, bytes, int, float or bool, "
                            f"not {type(value).__name__}")


def _number(lib: Any, what: str, n: Any, v: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        raise ArgumentTypeError(f"{what} must be an int or float, not {type(n).__name__}")
    if isinstance(n, int):
        if not _INT64_MIN <= n <= _INT64_MAX:
            raise UsageError(f"{what} {n} is beyond the 64-bit integer range")
        v.type, v.i = lib.HS_VAL_INTEGER, n
    else:
        v.type, v.n = lib.HS_VAL_NUMBER, n


def _seconds(what: str, ttl: Any) -> float:
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise ArgumentTypeError(f"{what} must be a number of seconds, not {type(ttl).__name__}")
    try:
        seconds = float(ttl)
    except OverflowError:  # an int past a float's range
        seconds = math.inf
    if not 0 <= seconds < math.inf:
        raise UsageError(f"{what} must be a number of seconds >= 0 (0: no expiry), not {ttl!r}")
    return seconds


def _flags(flags: Any) -> int:
    if isinstance(flags, bool) or not isinstance(flags, int):
        raise ArgumentTypeError(f"flags must be an int, not {type(flags).__name__}")
    if not 0 <= flags <= 0xFFFFFFFF:
        raise UsageError(f"flags must be from 0 to 2**32-1, not {flags}")
    return flags


def _count(what: str, n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise ArgumentTypeError(f"{what} must be an int, not {type(n).__name__}")
    if n < 0:
        raise UsageError(f"{what} must be >= 0 (0: all), not {n}")
    return n if n <= 0x7FFFFFFF else 0
