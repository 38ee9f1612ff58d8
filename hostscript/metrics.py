"""Prometheus metrics for hosts (and ``hostscript serve``'s proxy), through
prometheus-client's collector interface (``pip install 'hostscript[metrics]'``).

``host.metrics()`` answers the text exposition format of one host. To put hosts into
an existing registry, register a collector::

    from prometheus_client import REGISTRY
    from hostscript.metrics import HostCollector

    collector = HostCollector(host, name="api")      # every sample has host="api"
    collector.add(other_host, name="admin")           # more hosts: the same collector
    REGISTRY.register(collector)

or ``hostscript.metrics.register(host, name="api")`` (one collector per registry,
created on first use, with each further host added to it).

A registry must hold one ``HostCollector``: the text format wants each metric
family in one group, so a second collector with the same families would emit them
twice; prometheus-client refuses to register it ("Duplicated timeseries"). Add the
other hosts to the first collector instead (``add`` or ``register``).

Everything is read from ``Host.stats()`` at scrape time; nothing is recorded per
fire beyond what the core already counts. The per-hook latency is a histogram over
the core's buckets (``hostscript.host.LATENCY_BOUNDS``: 10 µs to 100 ms), counted in
C per fire.
"""
from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple

from .errors import Error
from .host import LATENCY_BOUNDS

if TYPE_CHECKING:
    from .host import Host

try:
    import prometheus_client as _prom
    from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                        HistogramMetricFamily)
except ImportError:  # the optional extra is not installed
    _prom = None  # type: ignore[assignment]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsUnavailable(Error, ImportError):
    """prometheus-client is not installed."""


def _require() -> None:
    if _prom is None:
        raise MetricsUnavailable(
            "hostscript metrics need the prometheus-client package: "
            "pip install prometheus-client (or pip install 'hostscript[metrics]')")


# name (without the prefix), type, help, key in Host.stats()
_HOST_COUNTERS = (
    ("fires", "Hook fires", "fires"),
    ("errors", "Fires that ended in a handler error (timeouts and memory errors included)",
     "errors"),
    ("timeouts", "Fires stopped by the time limit", "timeouts"),
    ("memory_errors", "Fires stopped by the memory limit", "memory_errors"),
    ("rehydrations", "Times a thread state loaded a newer program", "rehydrations"),
    ("releases", "Fires that ran long and released the GIL", "releases"),
    ("compilations", "Scripts compiled (loads)", "compilations"),
    ("pool_hits", "New threads that took over a pooled state", "pool_hits"),
    ("registrations", "Handler classes registered from inside a fire (hs.register)",
     "registrations"),
    ("unregistrations", "Handler classes unregistered from inside a fire (hs.unregister)",
     "unregistrations"),
    ("registrations_refused", "Run-time registrations refused past max_registrations",
     "registrations_refused"),
)
_HOST_GAUGES = (
    ("states", "Live Lua states, pooled ones included", "states"),
    ("pooled_states", "Idle Lua states waiting in the pool", "pooled"),
    ("heap_bytes", "Lua heap over all live states", "heap_bytes"),
    ("heap_max_bytes", "Largest Lua heap of one live state", "heap_max"),
    ("program_generation", "Generation of the published program (bumped by each load, unload "
     "and run-time registration)", "generation"),
    ("registered_classes", "Handler classes registered at run time in the published program",
     "registered"),
)
_SHARED_GAUGES = (
    ("shared_capacity_bytes", "Capacity of an in-memory shared dictionary", "capacity"),
    ("shared_free_bytes", "Free space of an in-memory shared dictionary", "free_space"),
    ("shared_keys", "Keys in an in-memory shared dictionary (expired ones not yet reclaimed "
     "included)", "keys"),
)
_SHARED_COUNTERS = (
    ("shared_evictions", "Live entries evicted to make room", "evictions"),
    ("shared_redis_calls", "Round trips to Redis", "calls"),
    ("shared_redis_errors", "Round trips to Redis that failed", "errors"),
    ("shared_redis_timeouts", "Round trips to Redis that timed out", "timeouts"),
    ("shared_redis_reconnects", "Reconnections to Redis", "reconnects"),
    ("shared_redis_seconds", "Time spent waiting on Redis round trips", "seconds"),
)
_P = "hostscript_"


class HostCollector:
    """A prometheus-client collector of one or more hosts' ``stats()``; each sample
    carries ``host=<name>``. Hosts are held weakly: a closed or collected host simply
    drops out of the next scrape."""

    def __init__(self, host: Optional["Host"] = None, name: str = "default") -> None:
        _require()
        self._lock = threading.Lock()
        self._hosts: Dict[str, "weakref.ref[Host]"] = {}
        if host is not None:
            self.add(host, name)

    def add(self, host: "Host", name: str = "default") -> "HostCollector":
        """Collect *host* too, as ``host=<name>`` (a name not already in use)."""
        if not isinstance(name, str) or not name:
            raise Error(f"a host's metrics name must be a non-empty str, not {name!r}")
        with self._lock:
            old = self._hosts.get(name)
            if old is not None and old() is not None and old() is not host:
                raise Error(f"this collector already has a host named {name!r}")
            self._hosts[name] = weakref.ref(host)
        return self

    def remove(self, name: str) -> None:
        with self._lock:
            self._hosts.pop(name, None)

    def _snapshots(self) -> List[Tuple[str, "Host", Dict[str, Any]]]:
        with self._lock:
            refs = sorted(self._hosts.items())
        out = []
        for name, ref in refs:
            host = ref()
            if host is None:
                self.remove(name)
                continue
            try:
                out.append((name, host, host.stats()))
            except Error:  # closed meanwhile
                continue
        return out

    def describe(self) -> Iterator[Any]:
        """The families collect() yields (so a registry can refuse duplicates)."""
        return iter(self._families([]))

    def collect(self) -> Iterator[Any]:
        # families without samples (no Redis dictionary, say) are left out
        return iter([f for f in self._families(self._snapshots()) if f.samples])

    @staticmethod
    def _families(snaps: List[Tuple[str, "Host", Dict[str, Any]]]) -> List[Any]:
        fams: List[Any] = []
        info = GaugeMetricFamily(_P + "host_info", "A host: its engine (always 1)",
                                 labels=["host", "engine"])
        for name, host, _ in snaps:
            info.add_metric([name, host.engine], 1)
        fams.append(info)
        for key, doc, field in _HOST_COUNTERS:
            f = CounterMetricFamily(_P + key, doc, labels=["host"])
            for name, _, st in snaps:
                f.add_metric([name], st[field])
            fams.append(f)
        for key, doc, field in _HOST_GAUGES:
            f = GaugeMetricFamily(_P + key, doc, labels=["host"])
            for name, _, st in snaps:
                f.add_metric([name], st[field])
            fams.append(f)
        hf = CounterMetricFamily(_P + "hook_fires", "Fires per hook", labels=["host", "hook"])
        he = CounterMetricFamily(_P + "hook_errors", "Fires per hook that ended in an error",
                                 labels=["host", "hook"])
        hd = HistogramMetricFamily(
            _P + "hook_duration_seconds",
            "Time spent running a hook's handlers (rehydration included), per fire that ran "
            "some (a fire of a hook no script handles is in hook_fires only)",
            labels=["host", "hook"])
        for name, _, st in snaps:
            for hook, h in st["hooks"].items():
                hf.add_metric([name, hook], h["fires"])
                he.add_metric([name, hook], h["errors"])
                cumulative, buckets = 0, []
                for bound, n in zip((*LATENCY_BOUNDS, float("inf")), h["buckets"]):
                    cumulative += n
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
                hd.add_metric([name, hook], buckets=buckets, sum_value=h["total_ns"] / 1e9)
        fams += [hf, he, hd]
        labels = ["host", "dict", "backend"]
        for key, doc, field in _SHARED_GAUGES:
            f = GaugeMetricFamily(_P + key, doc, labels=labels)
            for name, _, st in snaps:
                for d, s in st["shared"].items():
                    if s[field] is not None:
                        f.add_metric([name, d, s["backend"]], s[field])
            fams.append(f)
        for key, doc, field in _SHARED_COUNTERS:
            f = CounterMetricFamily(_P + key, doc, labels=labels)
            for name, _, st in snaps:
                for d, s in st["shared"].items():
                    # Redis round-trip counters are 0 in memory: left out there
                    if s[field] is not None and (field == "evictions" or s["backend"] != "memory"):
                        f.add_metric([name, d, s["backend"]], s[field])
            fams.append(f)
        return fams


# ---- the proxy of hostscript serve ----

class ProxyCollector:
    """The counters of a ``hostscript.proxy.Proxy`` (its ``stats()``)."""

    def __init__(self, proxy: Any, name: str = "default") -> None:
        _require()
        self._proxy = proxy
        self._name = name

    def describe(self) -> Iterator[Any]:
        return iter(self._families(None))

    def collect(self) -> Iterator[Any]:
        # families without samples (the cache's when it is off) are left out
        return iter([f for f in self._families(self._proxy.stats()) if f.samples])

    def _families(self, st: Optional[Dict[str, Any]]) -> List[Any]:
        n = [self._name]
        fams: List[Any] = []

        def one(kind: Any, key: str, doc: str, get: Any) -> None:
            f = kind(_P + "proxy_" + key, doc, labels=["proxy"])
            if st is not None and get(st) is not None:
                f.add_metric(n, get(st))
            fams.append(f)

        C, G = CounterMetricFamily, GaugeMetricFamily
        one(C, "requests", "Requests answered", lambda s: s["requests"])
        f = C(_P + "proxy_responses", "Responses by status class", labels=["proxy", "code"])
        for code, v in sorted((st or {}).get("responses", {}).items()):
            f.add_metric(n + [code], v)
        fams.append(f)
        one(C, "handler_errors", "Handler errors (and internal errors)", lambda s: s["errors"])
        one(C, "upstream_errors", "502/504s and upstream bodies cut short",
            lambda s: s["upstream_errors"])
        one(C, "client_errors", "Requests the proxy refused (400, 408, 413, 414, 431, 501)",
            lambda s: s["client_errors"])
        f = C(_P + "proxy_x_cache", "Responses by X-Cache status", labels=["proxy", "status"])
        for status, v in sorted((st or {}).get("x_cache", {}).items()):
            f.add_metric(n + [status], v)
        fams.append(f)
        one(G, "open_connections", "Client connections open now", lambda s: s["connections"])
        one(C, "connections", "Client connections accepted", lambda s: s["connections_total"])
        one(C, "sent_bytes", "Bytes sent to clients", lambda s: s["bytes_sent"])
        one(G, "in_flight", "Requests being handled now", lambda s: s["in_flight"])
        one(G, "queued", "Requests waiting for a worker", lambda s: s["queued"])
        one(G, "workers", "Worker threads", lambda s: s["workers"])
        cache = lambda k: lambda s: (s["cache"] or {}).get(k)  # noqa: E731
        one(C, "cache_hits", "Response cache hits", cache("hits"))
        one(C, "cache_misses", "Response cache misses", cache("misses"))
        one(C, "cache_stores", "Responses stored in the cache", cache("stores"))
        one(C, "cache_evictions", "Responses evicted from the cache", cache("evictions"))
        one(G, "cache_bytes", "Bytes the cache holds (overhead included)", cache("bytes"))
        one(G, "cache_entries", "Responses the cache holds", cache("entries"))
        up = lambda k: lambda s: s["upstream"][k]  # noqa: E731
        one(C, "upstream_connects", "Connections opened to the upstream", up("connects"))
        one(C, "upstream_reuses", "Upstream connections reused", up("reuses"))
        one(C, "upstream_retries", "Upstream requests retried", up("retries"))
        one(G, "upstream_idle", "Idle upstream connections", up("idle"))
        return fams


# ---- helpers ----

_by_registry: "weakref.WeakKeyDictionary[Any, HostCollector]" = weakref.WeakKeyDictionary()
_by_registry_lock = threading.Lock()


def register(host: "Host", name: str = "default", registry: Any = None) -> HostCollector:
    """Add *host* as ``host=<name>`` to *registry*'s (default: prometheus_client.REGISTRY)
    HostCollector, registering one on first use. Returns that collector."""
    _require()
    if registry is None:
        registry = _prom.REGISTRY
    with _by_registry_lock:
        c = _by_registry.get(registry)
        if c is None:
            c = HostCollector()
            registry.register(c)
            _by_registry[registry] = c
    return c.add(host, name)


def exposition(*collectors: Any) -> bytes:
    """The text format (version 0.0.4) of a private registry holding *collectors*."""
    _require()
    reg = _prom.CollectorRegistry(auto_describe=True)
    for c in collectors:
        reg.register(c)
    return _prom.generate_latest(reg)
