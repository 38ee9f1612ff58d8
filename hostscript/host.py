"""Host: declares hook points, loads handler scripts, fires hooks from any thread."""
from __future__ import annotations

import atexit
import enum
import logging
import os
import struct
import threading
import time
import weakref
from dataclasses import dataclass
import types
from typing import Any, ClassVar, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Union

from . import _bridge, _engine
from .errors import ArgumentTypeError, ClosedError, HandlerError, ScriptError, UsageError
from .shared import SharedDict
from .transaction import Transaction

log = logging.getLogger("hostscript")

DEFAULT_HOOKS = ("read_request", "send_request", "read_response", "send_response", "log")

#: Upper bounds (seconds) of the per-hook latency buckets of ``stats()["hooks"][h]["buckets"]``
#: (the core's hs_latency_bounds_ns; the last bucket counts the slower fires).
LATENCY_BOUNDS = (10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 100e-3)

# A fire whose hook ran longer than this recently (on its thread) releases the GIL;
# shorter ones keep it, since handing the GIL over costs more than they do.
RELEASE_GIL_AFTER = 50e-6

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class Status(enum.Enum):
    CONTINUE = 0  # every handler ran; go on
    DONE = 1      # a handler answered (txn:respond) or returned hs.DONE
    ERROR = 2     # a handler failed; see Outcome.error


@dataclass(frozen=True)
class Outcome:
    """What a fire ended with: ``status`` and, for ``Outcome.ERROR``, ``error``."""

    status: Status
    error: Optional[HandlerError] = None

    CONTINUE: ClassVar[Status] = Status.CONTINUE
    DONE: ClassVar[Status] = Status.DONE
    ERROR: ClassVar[Status] = Status.ERROR


_OUT_CONTINUE = Outcome(Status.CONTINUE)
_OUT_DONE = Outcome(Status.DONE)


@dataclass(frozen=True)
class Script:
    """A loaded script: its name, and the file it came from (None for source strings)."""

    name: str
    path: Optional[str] = None


def _free_host(lib: Any, holder: List[Any]) -> None:
    if holder and holder[0] is not None:
        lib.hs_host_free(holder[0])
        holder[0] = None


# Hosts still open when the interpreter exits: closed by one atexit handler, which
# waits a bounded time for fires still running in daemon threads.
_open_hosts: "weakref.WeakSet[Host]" = weakref.WeakSet()
EXIT_WAIT = 1.0  # seconds the interpreter's exit waits for fires still running


@atexit.register
def _close_open_hosts() -> None:
    for host in list(_open_hosts):
        host.close(timeout=EXIT_WAIT)


class Host(_bridge.HostCore):
    """A set of hook points and the Lua handler scripts loaded for them.

    ``fire(hook, txn)`` (implemented in C, in the base class) may be called from any
    number of threads at once; each thread runs Lua in its own state. ``close`` waits
    for fires running in other threads, and new ones raise ClosedError.

    When a thread that fired ends, its state waits in a pool of up to *state_pool*
    idle states (0: closed at once) for the next new thread, which takes it over,
    module-level locals included, instead of paying to create one.

    *shared* declares shared dictionaries, ``{name: capacity in bytes}``: Lua sees
    them as ``hs.shared.NAME`` on every thread, Python as ``host.shared[name]``
    (hostscript.shared.SharedDict). A dictionary given by URL instead of a capacity,
    ``{"keys": "redis://127.0.0.1:6379/0?prefix=hs:keys:"}``, lives in Redis and is
    shared by every process naming the URL (docs/redis.md); ``hs.redis("keys")``
    is then a Redis client on the same server. ``{"capacity": bytes}`` and
    ``{"url": ...}`` are the long forms.

    A handler may register handler classes at run time (``hs.register(Class,
    {name = ...})`` inside a fire, docs/register.md): every thread runs them from
    its next fire on. *max_registrations* bounds how many such classes the host
    holds at once; ``runtime_register=False`` refuses them.
    """

    def __init__(self, hooks: Sequence[str] = DEFAULT_HOOKS, *, engine: Optional[str] = None,
                 time_limit: Optional[float] = None, memory_limit: Optional[int] = None,
                 sandbox: bool = True, lua_path: Iterable[Union[str, os.PathLike]] = (),
                 on_error: str = "return", state_pool: int = 16,
                 shared: Optional[Mapping[str, Any]] = None, runtime_register: bool = True,
                 max_registrations: int = 64) -> None:
        if isinstance(hooks, str):
            raise ArgumentTypeError("hooks must be a sequence of hook names, not a string")
        if on_error not in ("return", "raise"):
            raise UsageError("on_error must be 'return' or 'raise'")
        time_limit = _optional_number("time_limit", time_limit, float)
        memory_limit = _optional_number("memory_limit", memory_limit, int)
        if (not isinstance(state_pool, int) or isinstance(state_pool, bool)
                or not 0 <= state_pool <= 0x7FFFFFFF):
            raise UsageError(f"state_pool must be a non-negative int (idle states kept; 0 turns "
                             f"the pool off), not {state_pool!r}")
        if (not isinstance(max_registrations, int) or isinstance(max_registrations, bool)
                or not 1 <= max_registrations <= 0x7FFFFFFF):
            raise UsageError(f"max_registrations must be a positive int (classes handlers may "
                             f"register at run time), not {max_registrations!r}")
        self.engine = engine or _engine.default()
        self._eng = _engine.load(self.engine)
        ffi, lib = self._ffi, self._lib = self._eng.ffi, self._eng.lib
        self.hooks = tuple(hooks)
        for name in self.hooks:
            if not isinstance(name, str):
                raise ArgumentTypeError(f"hook names must be str, not {type(name).__name__}")
        self.time_limit = time_limit
        self.memory_limit = memory_limit
        self.sandbox = bool(sandbox)
        self.lua_path = tuple(os.fspath(p) for p in lua_path)
        self.on_error = on_error
        self.state_pool = state_pool
        self._kinds = {getattr(lib, f"HS_ERR_{k.upper()}"): k for k in (
            "syntax", "script", "runtime", "timeout", "memory", "ctx", "usage")}

        keep = [ffi.new("char[]", _encode(h, "a hook name")) for h in self.hooks]
        paths = [ffi.new("char[]", _encode(p, "a lua_path entry")) for p in self.lua_path]
        hook_arr = ffi.new("const char *[]", keep or [ffi.NULL])
        path_arr = ffi.new("const char *[]", paths or [ffi.NULL])
        cfg = ffi.new("hs_config *")
        cfg.hooks, cfg.nhooks = hook_arr, len(keep)
        cfg.time_limit = float(time_limit or 0)
        cfg.memory_limit = int(memory_limit or 0)
        cfg.sandbox = int(self.sandbox)
        cfg.lua_path, cfg.nlua_path = path_arr, len(paths)
        cfg.state_pool = state_pool
        self.runtime_register = bool(runtime_register)
        self.max_registrations = max_registrations
        cfg.max_registrations = max_registrations if self.runtime_register else -1
        specs = _shared_specs(shared)
        spec_keep = []
        if specs:
            arr = ffi.new("hs_shared_spec[]", len(specs))
            for i, (name, capacity, url) in enumerate(specs):
                spec_keep.append(ffi.new("char[]", _encode(name, "a shared dictionary name")))
                arr[i].name, arr[i].capacity = spec_keep[-1], capacity
                if url is not None:
                    spec_keep.append(ffi.new("char[]", _encode(url, "a shared dictionary url")))
                    arr[i].url = spec_keep[-1]
            cfg.shared, cfg.nshared = arr, len(specs)
        err = ffi.new("hs_error *")
        h = lib.hs_host_new(cfg, err)
        if h == ffi.NULL:
            raise UsageError(ffi.string(err.message).decode("utf-8", "replace"))
        self._holder: List[Any] = [h]
        self._h = h
        lib.hs_host_set_release(h, ffi.cast("void (*)(void)", _bridge.release_address()),
                                RELEASE_GIL_AFTER)
        # freed when the Host is collected (no fire can run then: a fire holds it);
        # at exit _close_open_hosts closes it first, waiting for running fires
        self._finalizer = weakref.finalize(self, _free_host, lib, self._holder)
        self._finalizer.atexit = False
        _open_hosts.add(self)
        self._index: Dict[str, int] = {name: i for i, name in enumerate(self.hooks)}
        self._bind(int(ffi.cast("uintptr_t", h)), self._eng.fire_address, self._index,
                   _OUT_CONTINUE, _OUT_DONE, self._finish)
        self._lock = threading.Lock()
        self._waits = 0  # Redis round trips of SharedDict running now (close waits for them)
        self._waits_lock = threading.Lock()
        self._paths: Dict[str, Optional[str]] = {}
        self._tls = threading.local()
        self._counter = 0
        self._handled_now: Optional[FrozenSet[str]] = None  # handled_hooks, until a load
        self.shared: Mapping[str, SharedDict] = types.MappingProxyType({
            name: SharedDict(self, lib.hs_host_shared(h, _encode(name, "a name")), name)
            for name, _, _ in specs})

    # ---- scripts ----

    def load(self, source: Union[str, bytes], name: Optional[str] = None) -> Script:
        """Compile Lua *source* as script *name* (replacing a script of that name).

        Raises ScriptError (name, line, message) and leaves the program unchanged
        when it does not compile, its chunk fails, or it returns no valid class."""
        if name is None:
            self._counter += 1
            name = f"<script {self._counter}>"
        return self._load(source, name, None)

    def load_file(self, path: Union[str, os.PathLike]) -> Script:
        """Load the script in *path*; its name is the path as given."""
        p = os.fspath(path)
        try:
            with open(p, "rb") as f:
                source = f.read()
        except OSError as exc:
            raise ScriptError(str(p), None, f"{p}: cannot read the script: {exc.strerror or exc}",
                              "io") from exc
        return self._load(source, p, p)

    def reload(self, name: str) -> Script:
        """Re-read the file script *name* came from and load it again."""
        path = self._paths.get(name)
        if name not in self._paths:
            raise UsageError(f"no script named {name!r} is loaded")
        if path is None:
            raise UsageError(f"script {name!r} was loaded from a string; load() its new source")
        return self.load_file(path)

    def watch(self, paths: Any = None, *, debounce: float = 0.1) -> Any:
        """Reload file scripts when their files change; *paths* (default: every
        script loaded from a file) are files. Returns a hostscript.watch.Watcher (a
        context manager; ``stop()`` ends it). A failed reload keeps the running
        version and logs the error (logger ``hostscript``)."""
        from .watch import Watcher

        return Watcher(self, paths, debounce=debounce)

    def unload(self, name: str) -> None:
        """Remove script *name* (and the classes its handlers registered at run time),
        or one class registered at run time, ``"<script>#<name>"``; handlers stop
        running at each thread's next fire."""
        with self._lock:
            h = self._live()
            done = self._lib.hs_unload(h, _encode(name, "a script name")) == 0
            if done:
                self._handled_now = None
                self._paths.pop(name, None)
        if not done:
            script = name.partition("#")[0]
            if "#" in name and name in self.scripts:
                raise UsageError(f"{name!r} is registered by {script!r} when it loads: unload "
                                 f"{script!r} or edit it")
            raise UsageError(f"no script named {name!r} is loaded")

    @property
    def scripts(self) -> List[str]:
        """Names of the loaded scripts in load order, each followed by the classes its
        chunk registers (``"<script>#<name>"``), and the classes handlers registered
        at run time. Handlers of a hook run in this order, unless a class was
        registered with an ``order``."""
        ffi, lib = self._ffi, self._lib
        with self._lock:  # close() may not free the host meanwhile
            h = self._live()
            need = lib.hs_scripts(h, ffi.NULL, 0)
            buf = ffi.new("char[]", need or 1)
            need = min(need, lib.hs_scripts(h, buf, need))
            data = ffi.buffer(buf, need)[:]
        return [n.decode() for n in data.split(b"\0")[:-1]]

    @property
    def handled_hooks(self) -> FrozenSet[str]:
        """The declared hooks some loaded script handles (``on_<hook>``): a server
        fires only these; firing another does nothing. Cheap: a server asks per request."""
        got = self._handled_now  # loads, unloads and fires that register reset it
        if got is not None and self._h is not None:
            return got
        with self._lock:  # close() may not free the host meanwhile
            mask = self._lib.hs_hooks_handled(self._live())
            got = frozenset(name for i, name in enumerate(self.hooks) if (mask >> i) & 1)
            self._handled_now = got
        return got

    def _load(self, source: Union[str, bytes], name: str, path: Optional[str]) -> Script:
        ffi, lib = self._ffi, self._lib
        if isinstance(source, str):
            data = _encode(source, "the source", "utf-8")
        elif isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
        else:
            raise ArgumentTypeError(f"source must be str or bytes, not {type(source).__name__}")
        bname = _encode(name, "a script name")
        err = ffi.new("hs_error *")
        with self._lock:
            h = self._live()
            rc = lib.hs_load(h, bname, data, len(data), err)
            n = ffi.new("size_t *")
            p = lib.hs_load_logs(h, n)
            logs = ffi.buffer(p, n[0])[:] if n[0] else b""
            if rc == 0:
                self._paths[name] = path
                self._handled_now = None
        if logs:
            self._emit_logs(logs, "load")
        if rc != 0:
            kind = self._kinds.get(err.kind, "script")
            raise ScriptError(ffi.string(err.script).decode("utf-8", "replace") or name,
                              err.line or None,
                              ffi.string(err.message).decode("utf-8", "replace"), kind,
                              ffi.string(err.traceback).decode("utf-8", "replace"))
        return Script(name, path)

    # ---- firing ----

    def _finish(self, r: int, hook: str, txn: Transaction) -> Outcome:
        """fire()'s C code hands over here when the fire left log records or failed."""
        if (r >> 2) & self._lib.HS_CH_PROGRAM:
            self._handled_now = None  # a handler registered or unregistered a class
        if (r >> 2) & self._lib.HS_CH_LOGS:
            n = self._ffi.new("size_t *")
            p = self._lib.hs_logs(self._h, n)
            self._emit_logs(self._ffi.buffer(p, n[0])[:], hook)
        status = r & 3
        if status != self._lib.HS_ERROR:
            return _OUT_DONE if status == self._lib.HS_DONE else _OUT_CONTINUE
        err = self._last_error()
        log.error("%s%s", err, f"\n{err.traceback}" if err.traceback else "",
                  extra={"script": err.script, "hook": err.hook})
        if self.on_error == "raise":
            raise err
        return Outcome(Status.ERROR, err)

    def _last_error(self) -> HandlerError:
        ffi = self._ffi
        buf = getattr(self._tls, "err", None)
        if buf is None:
            buf = self._tls.err = ffi.new("hs_error *")
        self._lib.hs_last_error(self._h, buf)
        s = lambda f: ffi.string(f).decode("utf-8", "replace")  # noqa: E731
        return HandlerError(s(buf.script), s(buf.hook), s(buf.message), s(buf.traceback),
                            self._kinds.get(buf.kind, "runtime"))

    def _emit_logs(self, data: bytes, hook: str) -> None:
        pos, end = 0, len(data)
        while pos < end:
            level = data[pos]
            (sl,) = _U16.unpack_from(data, pos + 1)
            script = data[pos + 3:pos + 3 + sl].decode("utf-8", "replace")
            pos += 3 + sl
            (ml,) = _U32.unpack_from(data, pos)
            msg = data[pos + 4:pos + 4 + ml].decode("utf-8", "replace")
            pos += 4 + ml
            log.log(level, "[%s] %s", script, msg, extra={"script": script, "hook": hook})

    # ---- lifecycle and introspection ----

    def stats(self) -> Dict[str, Any]:
        """Counters over all thread states: fires, errors, timeouts, memory_errors,
        rehydrations, releases (fires that ran long and let go of the GIL),
        compilations, states (live, pooled ones included), heap_bytes, heap_max,
        generation, pooled (idle states in the pool now), pool_hits (new threads that
        took a pooled state), registered (classes registered at run time in the
        program now), registrations, unregistrations and registrations_refused (past
        max_registrations) since the host began, ``hooks``: {name: {fires, errors, total_ns, buckets}}
        (buckets: fires by latency, ``LATENCY_BOUNDS`` seconds then one more), and
        ``shared``: {name: {backend, capacity, free_space, keys, evictions, calls,
        errors, timeouts, reconnects, seconds}} per shared dictionary (keys counts
        expired entries not yet reclaimed; evictions, the live entries evicted to make
        room — None in Redis; calls, errors, timeouts, reconnects and seconds count
        the round trips to Redis — 0 in memory)."""
        ffi, lib = self._ffi, self._lib
        st = ffi.new("hs_stats *")
        hk = ffi.new("hs_hook_stats[]", len(self.hooks))
        info = ffi.new("hs_shared_info *")
        shared: Dict[str, Dict[str, Any]] = {}
        with self._lock:  # close() may not free the host meanwhile
            lib.hs_host_stats(self._live(), st, hk)
            for name, d in self.shared.items():
                lib.hs_shared_stats(d._d, info)
                mem = info.backend == lib.HS_SHARED_MEMORY
                shared[name] = {"backend": d.backend, **{
                    k: int(getattr(info, k)) if mem else None
                    for k in ("capacity", "free_space", "keys", "evictions")}, **{
                    k: int(getattr(info, k)) for k in ("calls", "errors", "timeouts", "reconnects")},
                    "seconds": info.wait_ns / 1e9}
        out: Dict[str, Any] = {k: int(getattr(st, k)) for k in (
            "fires", "errors", "timeouts", "memory_errors", "rehydrations", "releases", "compilations",
            "states", "heap_bytes", "heap_max", "generation", "pooled", "pool_hits", "registered",
            "registrations", "unregistrations", "registrations_refused")}
        out["hooks"] = {name: {"fires": int(hk[i].fires), "errors": int(hk[i].errors),
                               "total_ns": int(hk[i].total_ns), "buckets": list(hk[i].buckets)}
                        for i, name in enumerate(self.hooks)}
        out["shared"] = shared
        return out

    def metrics(self, name: str = "default") -> str:
        """``stats()`` in the Prometheus text exposition format (version 0.0.4), every
        sample labelled ``host=<name>``; built by hostscript.metrics.HostCollector,
        which also plugs into a prometheus-client registry. Needs prometheus-client
        (``pip install 'hostscript[metrics]'``): hostscript.metrics.MetricsUnavailable
        (a hostscript.Error) otherwise."""
        from . import metrics
        return metrics.exposition(metrics.HostCollector(self, name)).decode("utf-8")

    def close(self, timeout: Optional[float] = None) -> None:
        """Close every thread's Lua state and free the host. Idempotent.

        New fires raise ClosedError at once; fires already running (in other
        threads) finish first. With *timeout*, stop waiting for them after that many
        seconds: the host is then left to the process (its memory is not freed,
        nothing crashes) and a warning is logged."""
        with self._lock:
            if self._h is None:
                return
            self._unbind()
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._inflight or self._waits:
                if deadline is not None and time.monotonic() >= deadline:
                    log.warning("closing %r: %d fire(s) and %d Redis call(s) still running after "
                                "%.1f s; the host's memory is left to the process", self,
                                self._inflight, self._waits, timeout)
                    self._h = None
                    self._finalizer.detach()
                    return
                time.sleep(0.001)  # lets the running fires take the GIL and return
            self._h = None
            self._finalizer()
            _open_hosts.discard(self)

    @property
    def closed(self) -> bool:
        return self._h is None

    def _live(self) -> Any:
        if self._h is None:
            raise ClosedError("the host is closed")
        return self._h

    def __enter__(self) -> "Host":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._h is None else f"{len(self._paths)} scripts"
        return f"<hostscript.Host engine={self.engine} hooks={list(self.hooks)} {state}>"


def _encode(text: Any, what: str, encoding: str = "utf-8") -> bytes:
    """TEXT as bytes for the core: a str without NUL (which C would cut it at)."""
    if not isinstance(text, str):
        raise ArgumentTypeError(f"{what} must be str, not {type(text).__name__}")
    if "\0" in text:
        raise UsageError(f"{what} must not contain NUL: {text[:80]!r}")
    try:
        return text.encode(encoding)
    except UnicodeEncodeError as exc:
        raise UsageError(f"{what} cannot be encoded as {encoding}: {exc.reason}") from None


def _shared_specs(shared: Optional[Mapping[str, Any]]) -> List[Any]:
    """Host(shared=...) as (name, capacity, url) triples; the core checks the rest."""
    if shared is None:
        return []
    if not isinstance(shared, Mapping):
        raise ArgumentTypeError(f"shared must be a mapping of name to capacity in bytes, "
                                f"not {type(shared).__name__}")
    out = []
    for name, spec in shared.items():
        if not isinstance(name, str):
            raise ArgumentTypeError(f"shared dictionary names must be str, not {type(name).__name__}")
        url = None
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"capacity", "url"}
            if unknown:
                raise UsageError(f"shared dictionary {name!r}: unknown option(s) {sorted(unknown)}; "
                                 f"use capacity and url")
            url = spec.get("url")
            if url is not None and not isinstance(url, str):
                raise ArgumentTypeError(f"shared dictionary {name!r}: url must be str, "
                                        f"not {type(url).__name__}")
            spec = spec.get("capacity", 0 if url is not None else None)
        elif isinstance(spec, str):
            if "://" not in spec:
                raise ArgumentTypeError(f"shared dictionary {name!r}: {spec!r} is neither a capacity "
                                        f"(an int, bytes) nor a URL (redis://host:port/db)")
            url, spec = spec, 0
        if isinstance(spec, bool) or not isinstance(spec, int):
            raise ArgumentTypeError(f"shared dictionary {name!r}: the capacity must be an int "
                                    f"(bytes), not {type(spec).__name__}")
        if not 0 <= spec < 1 << 63:
            raise UsageError(f"shared dictionary {name!r}: capacity {spec} is out of range")
        out.append((name, spec, url))
    return out


def _optional_number(what: str, value: Any, kind: type) -> Any:
    """A positive limit or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and not isinstance(value, int)):
        raise ArgumentTypeError(f"{what} must be a positive {kind.__name__} or None, "
                                f"not {type(value).__name__}")
    if not value > 0 or value != value or value == float("inf"):
        raise UsageError(f"{what} must be positive, or None for no limit (got {value!r})")
    return kind(value)
