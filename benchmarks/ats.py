"""A1-A4: hostscript inside Apache Traffic Server, against Traffic Server alone and
against the two ways Traffic Server already offers to do the same work — the
header_rewrite plugin (rules) and the ts_lua plugin (Lua) — under wrk.

    python benchmarks/ats.py [--quick] [--engine E] [--rounds 5] [--seconds 10]
                             [--warmup 3] [--threads 2] [--decompose] [--json out.json]
    hostscript bench --ats [--quick] [--engine E]          (the same, as rows A1-A4)

The work (benchmarks/ats/): three hooks of header work — read_request reads
User-Agent and Host and sets one request header from them (``X-Bench-Client``),
send_request sets one header on the request to the origin (``X-Bench-Send``),
send_response one on the response to the client (``X-Bench-Out``):

- ``hostscript.lua``        the handler class, for hostscript_ats_<engine>.so
- ``header_rewrite.config`` three rule sets, for header_rewrite.so (global plugin)
- ``ts_lua.lua``            do_global_read_request / _send_request / _send_response,
                            for tslua.so (global plugin)

Processes: an origin (nginx, one worker, a 100-byte body, keep-alive without a
request limit), and one private traffic_server per contestant (tests/ats_server.py:
a run root in a temporary directory, ``exec_thread.limit`` 2 — Plan.threads —, the
HTTP cache off, ``map /`` to the origin) started once and kept for the whole run:
ATS alone, ATS + header_rewrite.so, ATS + tslua.so, ATS + hostscript (each engine).
Before timing, a request through each one must show the three headers (the origin
echoes the two request headers it received on ``/echo``; ATS alone must show none),
and the origin alone is measured under the same wrk (it must not be the bound).

wrk (2 threads, 32 keep-alive connections, ``--latency``, a ``User-Agent``) loads
``/bench`` through each contestant in turn, round by round; after a warm-up of each
(Plan.warmup seconds) the RSS of each traffic_server is read (VmRSS). Per round and
contestant: req/s, p99, and the traffic_server's CPU per request — utime + stime of
/proc/<pid>/stat across the wrk run, over the requests wrk counted — and the
origin's (nginx's worker) the same way. Figures are medians of the rounds; "added
CPU per request" is a contestant's median minus ATS alone's. Idle instances stay up
while another is measured (an idle traffic_server costs a few ms of CPU per second,
counted as idle_cpu in the JSON).

``--decompose`` adds contestants that split hostscript's cost (for the first
engine): a C plugin adding the same three hooks and doing nothing (ats/noop_hooks.c,
built with cc; with and without TXN_CLOSE) — Traffic Server's own cost of the hook
calls —, and the plugin with empty handlers (ats/empty.lua) and with the reads only
(ats/reads.lua). These are not checked for the headers (they do not do the work).
"""
from __future__ import annotations

import argparse
import dataclasses
import http.client
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent      # the source tree
HERE = Path(__file__).resolve().parent / "ats"
SCRIPT = HERE / "hostscript.lua"
RULES = HERE / "header_rewrite.config"
TS_LUA = HERE / "ts_lua.lua"
ATS_SERVER = ROOT / "tests" / "ats_server.py"       # AtsServer, shared with the tests
MODULES = Path("/usr/lib/trafficserver/modules")    # header_rewrite.so, tslua.so (Debian)

BODY = (b"hostscript ats benchmark origin, a body of one hundred bytes. " * 2)[:100]
BENCH_PATH = "/bench"
ECHO_PATH = "/echo"             # the origin echoes X-Bench-Client / X-Bench-Send back
USER_AGENT = "hs-ats-bench/1"
WRK_THREADS = 2
WRK_CONNECTIONS = 32
TICK = os.sysconf("SC_CLK_TCK")

ALONE = "ATS alone"
HEADER_REWRITE = "ATS + header_rewrite"
TS_LUA_NAME = "ATS + ts_lua"
ORIGIN_ALONE = "origin alone"


def hostscript_name(engine: str) -> str:
    return f"ATS + hostscript {engine}"


class Unavailable(Exception):
    """The rows cannot run here (a tool or the plugin is missing); says which."""


# ---------------------------------------------------------------- where things are

def plugin_path(engine: str) -> Path:
    """hostscript_ats_<engine>.so: $HS_ATS_PLUGIN_DIR, else build/ats/ (make ats)."""
    where = os.environ.get("HS_ATS_PLUGIN_DIR") or str(ROOT / "build" / "ats")
    return Path(where) / f"hostscript_ats_{engine}.so"


def missing(engines: Sequence[str]) -> str:
    """What this machine lacks for the rows ("" when nothing)."""
    lacks = []
    if not shutil.which("traffic_server") and not os.path.exists("/usr/bin/traffic_server"):
        lacks.append("traffic_server (sh tools/install-deps.sh)")
    if not shutil.which("wrk"):
        lacks.append("wrk (sh tools/install-deps.sh bench)")
    if not nginx_path():
        lacks.append("nginx, the origin (sh tools/install-deps.sh bench: nginx-light)")
    for so in ("header_rewrite.so", "tslua.so"):
        if not (MODULES / so).exists():
            lacks.append(f"{MODULES / so} (Debian's trafficserver)")
    for engine in engines:
        if not plugin_path(engine).exists():
            lacks.append(f"{plugin_path(engine)} (make ats)")
    if not ATS_SERVER.exists():
        lacks.append(f"{ATS_SERVER} (the source tree's tests/)")
    return "; ".join(lacks)


def nginx_path() -> Optional[str]:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)


def _ats_server_module() -> Any:
    """tests/ats_server.py, imported from its file (tests/ is not a package)."""
    name = "hostscript_tests_ats_server"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ATS_SERVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- /proc

def cpu_seconds(pid: int) -> float:
    """utime + stime of process PID (every thread), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def children(pid: int) -> List[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


# ---------------------------------------------------------------- the origin: nginx

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    default_type text/plain;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = {echo} {{
            add_header X-Echo-Client $http_x_bench_client;
            add_header X-Echo-Send $http_x_bench_send;
            return 200 "{body}";
        }}
        location / {{
            return 200 "{body}";
        }}
    }}
}}
"""


class Origin:
    """nginx on a free loopback port, one worker, answering BODY to everything."""

    def __init__(self) -> None:
        nginx = nginx_path()
        if nginx is None:
            raise Unavailable("nginx is not installed (sh tools/install-deps.sh bench: nginx-light)")
        self.root = tempfile.mkdtemp(prefix="hs-ats-origin-")
        self.port = _ats_server_module().free_port()
        conf = os.path.join(self.root, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(root=self.root, port=self.port, echo=ECHO_PATH,
                                      body=BODY.decode("ascii")))
        self.proc = subprocess.Popen([nginx, "-p", self.root, "-c", conf],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.root, "stderr.txt"), "wb"),
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                status, _, body = get(("127.0.0.1", self.port), BENCH_PATH)
                if status == 200 and body == BODY:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = Path(self.root, "stderr.txt").read_text(errors="replace")
                self.close()
                raise RuntimeError(f"nginx did not start: {err[-2000:]}")
            time.sleep(0.05)

    def worker_pids(self) -> List[int]:
        return children(self.proc.pid)

    def cpu_seconds(self) -> float:
        """The master's and its workers' utime + stime."""
        total = 0.0
        for pid in [self.proc.pid] + self.worker_pids():
            try:
                total += cpu_seconds(pid)
            except OSError:
                pass
        return total

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------- checks

def get(address: Tuple[str, int], path: str) -> Tuple[int, Dict[str, str], bytes]:
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request("GET", path, headers={"User-Agent": USER_AGENT})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def check_contestant(name: str, port: int, does_work: Optional[bool]) -> Dict[str, str]:
    """One request through the contestant on /echo: the body, and the three headers
    (two the origin echoes, one on the response) present — or, for ATS alone, absent
    (does_work None: only the body, for --decompose's variants)."""
    status, headers, body = get(("127.0.0.1", port), ECHO_PATH)
    if status != 200 or body != BODY:
        raise RuntimeError(f"{name}: {ECHO_PATH} answered {status}, {body[:200]!r}")
    want = {"x-echo-client": f"{USER_AGENT}@127.0.0.1:{port}", "x-echo-send": "1", "x-bench-out": "1"}
    got = {k: headers.get(k) for k in want}
    if does_work is None:
        return {k: v for k, v in got.items() if v}
    if does_work and got != want:
        raise RuntimeError(f"{name} does not do the work: want {want}, got {got} (all: {headers})")
    if not does_work and any(got.values()):
        raise RuntimeError(f"{name} should not touch the headers, got {got}")
    return {k: v for k, v in got.items() if v}


# ---------------------------------------------------------------- wrk

WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK-RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, '
    .. '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@dataclass
class Sample:
    """One wrk run through one contestant."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    seconds: float
    cpu_us: float          # the traffic_server's (or the origin's, for the origin alone) CPU per request
    origin_cpu_us: float   # nginx's CPU per request during the run


def wrk(port: int, seconds: float, connections: int, script: str) -> Dict[str, Any]:
    exe = shutil.which("wrk")
    if exe is None:
        raise Unavailable("wrk is not installed (sh tools/install-deps.sh bench)")
    argv = [exe, f"-t{WRK_THREADS}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
            "-H", f"User-Agent: {USER_AGENT}", "-s", script, f"http://127.0.0.1:{port}{BENCH_PATH}"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    m = re.search(r"^WRK-RESULT (\{.*\})$", proc.stdout, re.M)
    if proc.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({' '.join(argv)}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    r = json.loads(m.group(1))
    errors = {k: r[k] for k in ("connect", "read", "write", "status", "timeout") if r[k]}
    if errors or not r["requests"]:
        raise RuntimeError(f"wrk on port {port}: {r['requests']} requests, errors {errors}")
    return r


# ---------------------------------------------------------------- the measurement

@dataclass(frozen=True)
class Plan:
    seconds: float = 10.0     # one wrk run
    rounds: int = 5
    warmup: float = 3.0       # seconds of wrk per contestant before the rounds (0: none)
    connections: int = WRK_CONNECTIONS
    threads: int = 2          # proxy.config.exec_thread.limit
    engines: Tuple[str, ...] = ()  # hostscript's contestants (set by the runner)

    @classmethod
    def quick(cls) -> "Plan":
        return cls(seconds=1, rounds=1, warmup=0, connections=4)

    def for_engines(self, engines: Sequence[str]) -> "Plan":
        return dataclasses.replace(self, engines=tuple(engines))

    def describe(self) -> str:
        return (f"wrk -t{WRK_THREADS} -c{self.connections} -d{self.seconds:g}s keep-alive, "
                f"{self.rounds} interleaved round(s) after {self.warmup:g} s of warm-up each; "
                f"exec_thread.limit {self.threads}, HTTP cache off; nginx origin, 1 worker, "
                f"{len(BODY)}-byte body; {os.cpu_count()} cores shared by wrk, ATS and nginx")


@dataclass
class Measurement:
    plan: Plan
    rounds: Dict[str, List[Sample]] = field(default_factory=dict)
    rss_kib: Dict[str, int] = field(default_factory=dict)        # after the warm-up
    rss_end_kib: Dict[str, int] = field(default_factory=dict)    # after the rounds
    idle_cpu: Dict[str, float] = field(default_factory=dict)     # CPU s/s while idle
    checked: Dict[str, Dict[str, str]] = field(default_factory=dict)
    versions: Dict[str, str] = field(default_factory=dict)
    loadavg: Tuple[float, ...] = ()

    def med(self, name: str, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.rounds[name])

    def rps(self, name: str) -> float:
        return self.med(name, "rps")

    def cpu_us(self, name: str) -> float:
        return self.med(name, "cpu_us")

    def added_cpu_us(self, name: str) -> float:
        return self.cpu_us(name) - self.cpu_us(ALONE)

    def p99(self, name: str) -> float:
        return self.med(name, "p99_ms")

    def names(self) -> List[str]:
        return list(self.rounds)

    def summary(self) -> Dict[str, Dict[str, Any]]:
        """Per contestant, the medians and what they are against ATS alone."""
        out: Dict[str, Dict[str, Any]] = {}
        for n in self.names():
            d: Dict[str, Any] = {"rps": self.rps(n), "p50_ms": self.med(n, "p50_ms"), "p99_ms": self.p99(n),
                                 "cpu_us": self.cpu_us(n), "origin_cpu_us": self.med(n, "origin_cpu_us")}
            if n != ORIGIN_ALONE:
                d.update(rps_ratio=self.rps(n) / self.rps(ALONE), added_cpu_us=self.added_cpu_us(n),
                         rss_kib=self.rss_kib.get(n), added_rss_kib=self.rss_kib[n] - self.rss_kib[ALONE],
                         rss_end_kib=self.rss_end_kib.get(n))
            out[n] = d
        return out

    def to_json(self) -> Dict[str, Any]:
        return {"plan": dataclasses.asdict(self.plan), "setup": self.plan.describe(),
                "summary": self.summary(), "idle_cpu": self.idle_cpu, "checked": self.checked,
                "versions": self.versions, "loadavg": list(self.loadavg),
                "rounds": {n: [dataclasses.asdict(s) for s in ss] for n, ss in self.rounds.items()}}


def contestants(engines: Sequence[str]) -> Dict[str, List[str]]:
    """Contestant name -> its plugin.config lines."""
    c = {ALONE: [],
         HEADER_REWRITE: [f"{MODULES / 'header_rewrite.so'} {RULES}"],
         TS_LUA_NAME: [f"{MODULES / 'tslua.so'} {TS_LUA}"]}
    for engine in engines:
        c[hostscript_name(engine)] = [f"{plugin_path(engine)} {SCRIPT}"]
    return c


NOOP_HOOKS = HERE / "noop_hooks.c"


def decompose_variants(engine: str, build_dir: str) -> Dict[str, List[str]]:
    """--decompose's contestants: Traffic Server's floor for the hooks (a C plugin
    doing nothing, built into BUILD_DIR), hostscript with empty handlers, with reads only."""
    so = os.path.join(build_dir, "noop_hooks.so")
    cc = shutil.which(os.environ.get("CC", "cc")) or "cc"
    proc = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", so, str(NOOP_HOOKS)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise Unavailable(f"cannot build {NOOP_HOOKS} (trafficserver-dev?): {proc.stderr[-1000:]}")
    plugin = plugin_path(engine)
    return {"C no-op plugin, the 3 hooks": [so],
            "C no-op plugin, the 3 hooks + TXN_CLOSE": [f"{so} close"],
            f"hostscript {engine}, 3 empty handlers": [f"{plugin} {HERE / 'empty.lua'}"],
            f"hostscript {engine}, the reads only": [f"{plugin} {HERE / 'reads.lua'}"]}


def _versions(engines: Sequence[str]) -> Dict[str, str]:
    def first_line(argv: List[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    v = {"traffic_server": first_line(["traffic_server", "--version"]),
         "wrk": first_line(["wrk", "--version"]), "nginx": first_line([nginx_path() or "nginx", "-v"])}
    for engine in engines:
        p = plugin_path(engine)
        v[hostscript_name(engine)] = f"{p} ({time.strftime('%Y-%m-%d %H:%M', time.gmtime(p.stat().st_mtime))} UTC)"
    return v


def measure(plan: Plan, progress=lambda s: None, decompose: bool = False) -> Measurement:
    """Start the origin and every contestant, check them, run the rounds (DECOMPOSE:
    with decompose_variants too)."""
    lacks = missing(plan.engines)
    if lacks:
        raise Unavailable("missing: " + lacks)
    ats_server = _ats_server_module()
    m = Measurement(plan, versions=_versions(plan.engines))
    servers: Dict[str, Any] = {}
    origin: Optional[Origin] = None
    with tempfile.TemporaryDirectory(prefix="hs-ats-bench-") as tmp:
        done = os.path.join(tmp, "done.lua")
        Path(done).write_text(WRK_DONE)
        try:
            origin = Origin()
            every = contestants(plan.engines)
            variants = decompose_variants(plan.engines[0], tmp) if decompose and plan.engines else {}
            every.update(variants)
            for name, plugins in every.items():
                progress(f"starting {name}")
                servers[name] = ats_server.AtsServer(origin.url, plugins, threads=plan.threads).start()
            for name, s in servers.items():
                m.checked[name] = check_contestant(name, s.port,
                                                   does_work=None if name in variants else name != ALONE)
            ports = {ORIGIN_ALONE: origin.port, **{n: s.port for n, s in servers.items()}}
            pids = {n: s.pid for n, s in servers.items()}

            def run(name: str, seconds: float) -> Sample:
                pid = pids.get(name)
                c0 = cpu_seconds(pid) if pid else 0.0
                o0 = origin.cpu_seconds()
                r = wrk(ports[name], seconds, plan.connections, done)
                o1 = origin.cpu_seconds()
                c1 = cpu_seconds(pid) if pid else o1
                if not pid:
                    c0 = o0
                n = r["requests"]
                return Sample(n / (r["duration_us"] / 1e6), r["p50_us"] / 1e3, r["p99_us"] / 1e3, n,
                              r["duration_us"] / 1e6, (c1 - c0) / n * 1e6, (o1 - o0) / n * 1e6)

            if plan.warmup:
                for name in ports:
                    progress(f"warm-up: {name}")
                    run(name, plan.warmup)
            t0 = {n: cpu_seconds(p) for n, p in pids.items()}
            time.sleep(1.0)
            m.idle_cpu = {n: cpu_seconds(p) - t0[n] for n, p in pids.items()}
            m.rss_kib = {n: rss_kib(p) for n, p in pids.items()}
            m.rounds = {name: [] for name in ports}
            names = list(ports)
            for i in range(plan.rounds):
                # every round in turns; the order rotates so no contestant always follows another
                order = names[i % len(names):] + names[:i % len(names)]
                for name in order:
                    progress(f"round {i + 1}/{plan.rounds}: {name}")
                    m.rounds[name].append(run(name, plan.seconds))
            m.rss_end_kib = {n: rss_kib(p) for n, p in pids.items()}
            for name, s in servers.items():
                if not s.alive():
                    raise RuntimeError(f"{name}: traffic_server exited: {s.diags()[-2000:]}")
            m.loadavg = os.getloadavg()
        finally:
            for s in servers.values():
                s.stop(wait=False)
            for s in servers.values():
                s.join()
                s.cleanup()
            if origin is not None:
                origin.close()
    return m


_measured: Dict[Plan, Measurement] = {}


def measured(plan: Plan, progress=lambda s: None) -> Measurement:
    """measure(), once per plan: the rows A1-A4 read one measurement."""
    if plan not in _measured:
        _measured[plan] = measure(plan, progress)
    return _measured[plan]


# ---------------------------------------------------------------- the table

def markdown(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """Every contestant: req/s (and against ATS alone), ATS CPU per request (and
    added), p99, RSS after warm-up (and added); the origin alone last."""
    out = ["| contestant | req/s | vs ATS alone | ATS CPU / request | added | p99 | RSS | added RSS |",
           "|---|---|---|---|---|---|---|---|"]
    for name, d in summary.items():
        if name == ORIGIN_ALONE:
            continue
        out.append(f"| {name} | {d['rps']:,.0f} | {d['rps_ratio']:.2f} | {d['cpu_us']:.1f} µs | "
                   f"{d['added_cpu_us']:+.1f} µs | {d['p99_ms']:.2f} ms | {d['rss_kib'] / 1024:.1f} MiB | "
                   f"{d['added_rss_kib'] / 1024:+.1f} MiB |")
    o = summary.get(ORIGIN_ALONE)
    if o:
        out.append(f"| {ORIGIN_ALONE} (nginx, direct) | {o['rps']:,.0f} | "
                   f"{o['rps'] / summary[ALONE]['rps']:.2f} | nginx {o['cpu_us']:.1f} µs | | "
                   f"{o['p99_ms']:.2f} ms | | |")
    origin_share = ", ".join(f"{n} {d['origin_cpu_us']:.1f}" for n, d in summary.items() if n != ORIGIN_ALONE)
    out.append("")
    out.append(f"nginx CPU per request while serving each contestant (µs): {origin_share}")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one 1 s round, 4 connections: a smoke run")
    p.add_argument("--engine", action="append", choices=["luajit", "lua54"])
    p.add_argument("--rounds", type=int)
    p.add_argument("--seconds", type=float)
    p.add_argument("--warmup", type=float)
    p.add_argument("--threads", type=int, help="proxy.config.exec_thread.limit (default 2)")
    p.add_argument("--decompose", action="store_true",
                   help="also: a C plugin with the same hooks doing nothing, hostscript with empty "
                        "handlers and with the reads only (the first engine)")
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    plan = Plan.quick() if a.quick else Plan()
    plan = dataclasses.replace(plan, **{k: v for k, v in (("rounds", a.rounds), ("seconds", a.seconds),
                                                           ("warmup", a.warmup), ("threads", a.threads))
                                        if v is not None})
    plan = plan.for_engines(a.engine or ["lua54", "luajit"])
    started = time.monotonic()
    m = measure(plan, progress=lambda s: print(f"[{time.monotonic() - started:6.1f} s] {s}",
                                               file=sys.stderr, flush=True), decompose=a.decompose)
    print(plan.describe())
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in m.loadavg)}; "
          f"{time.monotonic() - started:.0f} s")
    print()
    print(markdown(m.summary()))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(m.to_json(), indent=2) + "\n")
        print(f"\nJSON: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
