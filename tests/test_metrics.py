"""Prometheus metrics: ``host.metrics()`` and hostscript.metrics' collectors, parsed
back with prometheus-client's own parser and checked against ``host.stats()``, and
``GET /metrics`` on a real ``hostscript serve`` admin listener.

Every test runs on both engines (the ``engine`` fixture in conftest.py)."""
from __future__ import annotations

import http.client
import json
import subprocess
import sys
import textwrap
import time

import pytest

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.openmetrics import exposition as om_exposition  # noqa: E402
from prometheus_client.openmetrics import parser as om_parser  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import hostscript  # noqa: E402
from hostscript import Outcome, Transaction  # noqa: E402
from hostscript import metrics as hmetrics  # noqa: E402
from hostscript.host import LATENCY_BOUNDS  # noqa: E402
from helpers import ROOT  # noqa: E402
from test_proxy_cli import VERSION, Serve  # noqa: E402

HOOKS = ("read_request", "send_response", "log")

SCRIPT = """
local C = {}
function C:on_read_request(txn)
  local h = txn.req.headers
  if h["x-fail"] then error("boom") end
  if h["x-spin"] then while true do end end
  if h["x-bomb"] then
    local s = string.rep("x", 67108864)  -- one 64 MiB allocation: over the limit at once
  end
end
function C:on_log(txn) end
return C
"""


def parse(text):
    """{(sample name, ((label, value), ...)): value} and {family name: type}."""
    samples, types = {}, {}
    for fam in text_string_to_metric_families(text):
        assert fam.name not in types, f"family {fam.name} appears twice"
        types[fam.name] = fam.type
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"sample {key} appears twice"
            samples[key] = s.value
    return samples, types


def val(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def fire(host, hook, *headers):
    return host.fire(hook, Transaction(headers=[(h, "1") for h in headers]))


@pytest.fixture
def busy_host(make_host):
    """A host fired a known number of times: 5 clean read_request fires, 2 errors, a
    timeout and a memory error on read_request, and 3 log fires."""
    host = make_host(HOOKS, time_limit=0.05, memory_limit=8 << 20)
    host.load(SCRIPT, name="s.lua")
    for _ in range(5):
        assert fire(host, "read_request").status is Outcome.CONTINUE
    for _ in range(2):
        assert fire(host, "read_request", "x-fail").error.kind == "runtime"
    assert fire(host, "read_request", "x-spin").error.kind == "timeout"
    assert fire(host, "read_request", "x-bomb").error.kind == "memory"
    for _ in range(3):
        assert fire(host, "log").status is Outcome.CONTINUE
    return host


# ---- host.metrics() against host.stats() ----

def test_host_counters_match_stats(busy_host):
    text = busy_host.metrics()
    st = busy_host.stats()  # nothing fires in between: the same numbers
    m, types = parse(text)
    h = {"host": "default"}
    # the known numbers
    assert val(m, "hostscript_fires_total", **h) == 5 + 2 + 1 + 1 + 3
    assert val(m, "hostscript_errors_total", **h) == 4
    assert val(m, "hostscript_timeouts_total", **h) == 1
    assert val(m, "hostscript_memory_errors_total", **h) == 1
    assert val(m, "hostscript_compilations_total", **h) == 1
    # and every host-level number is stats()'s
    for name, key in [("hostscript_fires_total", "fires"), ("hostscript_errors_total", "errors"),
                      ("hostscript_timeouts_total", "timeouts"),
                      ("hostscript_memory_errors_total", "memory_errors"),
                      ("hostscript_rehydrations_total", "rehydrations"),
                      ("hostscript_releases_total", "releases"),
                      ("hostscript_compilations_total", "compilations"),
                      ("hostscript_pool_hits_total", "pool_hits"),
                      ("hostscript_states", "states"), ("hostscript_pooled_states", "pooled"),
                      ("hostscript_heap_bytes", "heap_bytes"),
                      ("hostscript_heap_max_bytes", "heap_max"),
                      ("hostscript_program_generation", "generation")]:
        assert val(m, name, **h) == st[key], name
    assert st["heap_bytes"] > 0 and st["states"] >= 1
    assert types["hostscript_fires"] == "counter" and types["hostscript_heap_bytes"] == "gauge"
    assert val(m, "hostscript_host_info", engine=busy_host.engine, **h) == 1


def test_per_hook_counters_and_latency(busy_host):
    m, types = parse(busy_host.metrics())
    st = busy_host.stats()["hooks"]
    assert types["hostscript_hook_duration_seconds"] == "histogram"
    expect = {"read_request": (9, 4), "send_response": (0, 0), "log": (3, 0)}
    for hook, (fires, errors) in expect.items():
        lab = {"host": "default", "hook": hook}
        assert val(m, "hostscript_hook_fires_total", **lab) == fires == st[hook]["fires"]
        assert val(m, "hostscript_hook_errors_total", **lab) == errors == st[hook]["errors"]
        assert val(m, "hostscript_hook_duration_seconds_count", **lab) == fires == sum(st[hook]["buckets"])
        assert val(m, "hostscript_hook_duration_seconds_bucket", le="+Inf", **lab) == fires
        assert val(m, "hostscript_hook_duration_seconds_sum", **lab) == pytest.approx(
            st[hook]["total_ns"] / 1e9, rel=1e-9, abs=1e-12)
        counts = [val(m, "hostscript_hook_duration_seconds_bucket", le=repr(b), **lab)
                  for b in LATENCY_BOUNDS]
        assert counts == sorted(counts)  # cumulative
    # the timeout alone ran 0.05 s of read_request; log's empty handler far less
    rr = {"host": "default", "hook": "read_request"}
    assert val(m, "hostscript_hook_duration_seconds_sum", **rr) >= 0.05
    assert val(m, "hostscript_hook_duration_seconds_sum", host="default", hook="log") < 0.05
    # the timed-out fire is in a bucket above 10 ms; the log fires are all below it
    assert val(m, "hostscript_hook_duration_seconds_bucket", le="0.01", **rr) <= 8
    assert val(m, "hostscript_hook_duration_seconds_bucket", le="0.01", host="default", hook="log") == 3


def test_latency_bounds_are_the_cores(engine):
    from hostscript._engine import load
    lib = load(engine).lib
    bounds = lib.hs_latency_bounds_ns()
    assert tuple(bounds[i] / 1e9 for i in range(len(LATENCY_BOUNDS))) == LATENCY_BOUNDS
    assert lib.HS_LATENCY_BUCKETS == len(LATENCY_BOUNDS) + 1


def test_the_name_labels_every_sample(busy_host):
    m, _ = parse(busy_host.metrics(name="api"))
    assert m and all(dict(labels).get("host") == "api" for _, labels in m)


# ---- shared dictionaries ----

def test_in_memory_shared_dictionary_usage(make_host):
    host = make_host(HOOKS, shared={"small": 1 << 16, "idle": 1 << 20})
    host.load("""
        local C = {}
        function C:on_read_request(txn)
          for i = 1, 100 do hs.shared.small:set("k" .. i, string.rep("v", 2000)) end
          hs.shared.idle:set("a", "1") hs.shared.idle:set("b", "2")
        end
        return C""", name="fill.lua")
    assert fire(host, "read_request").status is Outcome.CONTINUE
    m, _ = parse(host.metrics())
    st = host.stats()["shared"]
    assert st["small"]["evictions"] > 0  # 100 x 2000 bytes do not fit in 64 KiB
    for d, cap in (("small", 1 << 16), ("idle", 1 << 20)):
        lab = {"host": "default", "dict": d, "backend": "memory"}
        assert val(m, "hostscript_shared_capacity_bytes", **lab) == cap == st[d]["capacity"]
        assert val(m, "hostscript_shared_free_bytes", **lab) == st[d]["free_space"]
        assert val(m, "hostscript_shared_keys", **lab) == st[d]["keys"]
        assert val(m, "hostscript_shared_evictions_total", **lab) == st[d]["evictions"]
    assert val(m, "hostscript_shared_keys", host="default", dict="idle", backend="memory") == 2
    assert val(m, "hostscript_shared_free_bytes", host="default", dict="idle",
               backend="memory") < 1 << 20
    # Redis round trips are not reported for in-memory dictionaries
    assert not [name for name, _ in m if "redis" in name]


def test_redis_dictionary_round_trips(rhost):
    rhost.load("""
        local C = {}
        function C:on_read_request(txn)
          hs.shared.meta:set("k", "v") assert(hs.shared.meta:get("k") == "v")
        end
        return C""", name="r.lua")
    for _ in range(3):
        assert fire(rhost, "read_request").status is Outcome.CONTINUE
    m, _ = parse(rhost.metrics())
    st = rhost.stats()["shared"]["meta"]
    lab = {"host": "default", "dict": "meta", "backend": "redis"}
    assert st["calls"] >= 6
    for name, key in [("calls", "calls"), ("errors", "errors"), ("timeouts", "timeouts"),
                      ("reconnects", "reconnects"), ("seconds", "seconds")]:
        assert val(m, f"hostscript_shared_redis_{name}_total", **lab) == pytest.approx(st[key]), name
    assert val(m, "hostscript_shared_redis_seconds_total", **lab) > 0
    # capacity, free space, keys and evictions are None in Redis: no samples
    assert not [name for name, labels in m
                if dict(labels).get("dict") == "meta" and "redis" not in name]


# ---- plugging into a registry ----

def test_two_hosts_share_one_registry(make_host):
    a, b = make_host(HOOKS), make_host(HOOKS)
    for h in (a, b):
        h.load("local C = {} function C:on_log(txn) end return C", name="l.lua")
    for _ in range(3):
        fire(a, "log")
    fire(b, "log")
    reg = CollectorRegistry()
    reg.register(hmetrics.HostCollector(a, name="a").add(b, name="b"))
    text = generate_latest(reg).decode()
    m, _ = parse(text)  # asserts each family appears once
    assert val(m, "hostscript_fires_total", host="a") == 3
    assert val(m, "hostscript_fires_total", host="b") == 1
    assert val(m, "hostscript_hook_fires_total", host="b", hook="log") == 1
    assert text.count("# TYPE hostscript_fires_total counter") == 1
    # valid OpenMetrics too (which rejects a family split in two groups)
    fams = list(om_parser.text_string_to_metric_families(om_exposition.generate_latest(reg).decode()))
    assert {s.labels["host"] for f in fams if f.name == "hostscript_fires" for s in f.samples} \
        == {"a", "b"}
    # a second HostCollector would split every family in two: the registry refuses it
    with pytest.raises(ValueError, match="Duplicated"):
        reg.register(hmetrics.HostCollector(b, name="c"))
    with pytest.raises(hostscript.Error, match="already has a host named 'a'"):
        hmetrics.HostCollector(a, name="a").add(b, name="a")
    # a closed host drops out of the next scrape; the other stays
    b.close()
    m, _ = parse(generate_latest(reg).decode())
    assert {dict(labels)["host"] for _, labels in m} == {"a"}


def test_register_adds_hosts_to_one_collector_per_registry(make_host):
    a, b = make_host(HOOKS), make_host(HOOKS)
    fire(a, "log")
    reg = CollectorRegistry()
    c1 = hmetrics.register(a, name="a", registry=reg)
    c2 = hmetrics.register(b, name="b", registry=reg)
    assert c1 is c2
    m, _ = parse(generate_latest(reg).decode())
    assert val(m, "hostscript_hook_fires_total", host="a", hook="log") == 1
    assert val(m, "hostscript_hook_fires_total", host="b", hook="log") == 0


def test_metrics_without_prometheus_client_is_a_clear_error(engine):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["prometheus_client"] = None   # as if it were not installed
        import hostscript
        h = hostscript.Host(engine={engine!r})
        try:
            h.metrics()
        except hostscript.Error as exc:
            print(type(exc).__name__, isinstance(exc, ImportError), exc)
        else:
            print("no error")
        """)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("MetricsUnavailable True "), p.stdout
    assert "pip install prometheus-client" in p.stdout


# ---- hostscript serve --admin: GET /metrics ----

def test_serve_admin_exposes_metrics(engine, origin, tmp_path):
    script = tmp_path / "v.lua"
    script.write_text(VERSION.format(v=3))
    s = Serve("--listen", "127.0.0.1:0", "--upstream", origin.url, "--script", str(script),
              "--engine", engine, "--admin", "127.0.0.1:0", "--cache-size", "1M")
    try:
        s.started()
        admin = s.admin_port()
        for _ in range(2):
            assert s.get("/m?cc=max-age=60").status == 200
        assert s.get("/missing?status=404").status == 404

        c = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
        c.request("GET", "/metrics")
        r = c.getresponse()
        body = r.read().decode()
        assert r.status == 200
        assert r.getheader("Content-Type").startswith("text/plain; version=0.0.4")
        c.request("GET", "/-/stats")
        doc = json.loads(c.getresponse().read())
        c.request("GET", "/nope")
        r404 = c.getresponse()
        assert r404.status == 404 and "/metrics" in r404.read().decode()
        c.close()

        got, _ = parse(body)
        h, p = {"host": "default"}, {"proxy": "default"}
        fires = doc["host"]["hooks"]["send_response"]["fires"]
        assert fires >= 2
        assert val(got, "hostscript_hook_fires_total", hook="send_response", **h) == fires
        assert val(got, "hostscript_fires_total", **h) == doc["host"]["fires"]
        assert val(got, "hostscript_proxy_requests_total", **p) == doc["proxy"]["requests"] == 3
        assert val(got, "hostscript_proxy_responses_total", code="2xx", **p) == 2
        assert val(got, "hostscript_proxy_responses_total", code="4xx", **p) == 1
        assert val(got, "hostscript_proxy_cache_hits_total", **p) == doc["proxy"]["cache"]["hits"] == 1
        assert val(got, "hostscript_proxy_x_cache_total", status="HIT", **p) == 1
        assert val(got, "hostscript_proxy_workers", **p) == doc["proxy"]["workers"]
        assert val(got, "hostscript_proxy_upstream_connects_total", **p) \
            == doc["proxy"]["upstream"]["connects"] >= 1
    finally:
        assert s.stop() == 0


def test_proxy_without_cache_has_no_cache_metrics(start_proxy, origin):
    p = start_proxy("local C = {} function C:on_log(txn) end return C", admin="127.0.0.1:0",
                    cache_size=0)
    c = http.client.HTTPConnection(*p.address, timeout=5)
    c.request("GET", "/x")
    assert c.getresponse().read() is not None
    c.close()
    # the proxy counts a request once it is done, after the client may have its answer
    deadline = time.monotonic() + 5
    while True:
        a = http.client.HTTPConnection(*p.admin_address, timeout=5)
        a.request("GET", "/metrics")
        r = a.getresponse()
        text = r.read().decode()
        got, _ = parse(text)
        a.close()
        if val(got, "hostscript_proxy_requests_total", proxy="default") or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert r.status == 200
    assert val(got, "hostscript_proxy_requests_total", proxy="default") == 1
    assert val(got, "hostscript_hook_fires_total", host="default", hook="log") == 1
    assert "hostscript_proxy_cache_" not in text  # not even an empty family


def test_admin_metrics_without_prometheus_client_is_501(start_proxy, monkeypatch):
    p = start_proxy("local C = {} function C:on_log(txn) end return C", admin="127.0.0.1:0")
    monkeypatch.setattr(hmetrics, "_prom", None)  # as if prometheus-client were missing
    a = http.client.HTTPConnection(*p.admin_address, timeout=5)
    a.request("GET", "/metrics")
    r = a.getresponse()
    doc = json.loads(r.read())
    a.request("GET", "/-/stats")  # the JSON counters do not need it
    assert a.getresponse().status == 200
    a.close()
    assert r.status == 501
    assert "pip install prometheus-client" in doc["error"]
