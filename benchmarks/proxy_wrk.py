"""P1-P3: ``hostscript serve`` under wrk — the reference proxy as a real process,
loaded by a real HTTP benchmarking tool over loopback.

Three processes besides this one: the origin (origin.py: asyncio + httptools, a
fixed 1 KiB body), and two proxies started as ``python -m hostscript serve`` on the
engine of the row:

- **no scripts** — ``serve`` requires ``--script``, so this one loads a handler class
  with no handlers (``return {}``): no hook is handled, so none is fired;
- **scripts** — ``examples/key_header.lua`` (``--shared meta=1m``) then
  ``examples/headers.lua``: the Key header on a shared dictionary in read_request
  and read_response, and header work in read_request, send_request, send_response.

wrk (2 threads, 64 keep-alive connections, ``--latency``) loads one URL per run,
every request with the header ``abc: bennet``: ``/miss/...`` (the origin answers
``no-store``: every request goes upstream) or ``/hit/...`` (``max-age=3600`` and
``Key: abc;match=bennet``: after the first requests every answer comes from the
proxy's cache; with the scripts, under the secondary key key_header.lua computes).
The origin alone is measured too, on ``/miss/``, so a reader sees it is not the bound.

The five contestants take turns, round by round (origin, no scripts, scripts on
misses, then no scripts, scripts on hits, ...); each one's figures are the medians of
its rounds. Before timing, every proxy's answers are checked (status, body, X-Cache,
the scripts' headers present or absent) and every wrk run must end without a socket
error or a non-2xx answer, else the row fails. wrk's own Lua ``done`` hook reports
the requests, the duration and the latency percentiles (microseconds) as JSON.

In quick mode (the smoke test) each contestant gets a single 1 s run with 4
connections, all five at once: it proves the plumbing works, its figures mean nothing.
"""
from __future__ import annotations

import http.client
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
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent        # the source tree
ORIGIN = Path(__file__).resolve().parent / "origin.py"
SCRIPTS = (ROOT / "examples" / "key_header.lua", ROOT / "examples" / "headers.lua")
SHARED = "meta=1m"
WRK_THREADS = 2
WRK_CONNECTIONS = 64
REQUEST_HEADER = ("abc", "bennet")  # the field Key: abc;match=bennet names
MISS_PATH = "/miss/bench"
HIT_PATH = "/hit/bench"
START_TIMEOUT = 30.0

# contestant name -> (target, path)
CONTESTANTS: Dict[str, Tuple[str, str]] = {
    "origin alone, miss": ("origin", MISS_PATH),
    "no scripts, miss": ("no scripts", MISS_PATH),
    "scripts, miss": ("scripts", MISS_PATH),
    "no scripts, hit": ("no scripts", HIT_PATH),
    "scripts, hit": ("scripts", HIT_PATH),
}

# wrk's done hook: one JSON line with what the row needs (latencies in microseconds)
WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK-RESULT {"requests": %d, "duration_us": %d, "bytes": %d, "p50_us": %d, "p90_us": %d, '
    .. '"p99_us": %d, "max_us": %d, "connect": %d, "read": %d, "write": %d, "status": %d, '
    .. '"timeout": %d}\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.max, e.connect, e.read, e.write,
    e.status, e.timeout))
end
"""


class Unavailable(Exception):
    """The rows cannot run here (no wrk)."""


def wrk_path() -> Optional[str]:
    return shutil.which("wrk")


def proxy_threads() -> int:
    """The worker threads each proxy runs: serve's default (2 x cores, at least 4)."""
    return max(4, 2 * (os.cpu_count() or 1))


# ---------------------------------------------------------------- processes

class Process:
    """A child process whose output goes to a temporary file; started() waits for the
    line that says it listens and returns that address."""

    def __init__(self, name: str, argv: Sequence[str], ready: str) -> None:
        self.name = name
        self.log = tempfile.NamedTemporaryFile(prefix=f"hs-bench-{name.replace(' ', '-')}-",
                                               suffix=".log", delete=False)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        self.proc = subprocess.Popen(list(argv), stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=str(ROOT), env=env)
        self.address = self._wait_for(re.compile(ready))

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def _wait_for(self, pattern: "re.Pattern[str]") -> Tuple[str, int]:
        end = time.monotonic() + START_TIMEOUT
        while time.monotonic() < end:
            m = pattern.search(self.output())
            if m:
                return m.group(1), int(m.group(2))
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        out = self.output()
        self.close()
        raise RuntimeError(f"{self.name} did not start: {out[-2000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


def start_origin() -> Process:
    return Process("origin", [sys.executable, str(ORIGIN), "--listen", "127.0.0.1:0"],
                   r"listening on ([\d.]+):(\d+)")


def start_proxy(engine: str, upstream: Tuple[str, int], scripts: Sequence[Path],
                shared: Sequence[str] = (), threads: Optional[int] = None) -> Process:
    argv = [sys.executable, "-m", "hostscript", "serve", "--listen", "127.0.0.1:0",
            "--upstream", "http://%s:%d" % upstream, "--engine", engine,
            "--threads", str(threads or proxy_threads()), "--log-level", "info"]
    for s in scripts:
        argv += ["--script", str(s)]
    for spec in shared:
        argv += ["--shared", spec]
    return Process(f"proxy {engine} {'scripts' if shared or len(scripts) > 1 else 'no scripts'}",
                   argv, r"listening on http://([\d.]+):(\d+)")


# ---------------------------------------------------------------- checks

def get(address: Tuple[str, int], path: str) -> Tuple[int, Dict[str, str], bytes]:
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request("GET", path, headers={REQUEST_HEADER[0]: REQUEST_HEADER[1]})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def check_proxy(name: str, address: Tuple[str, int], scripts: bool) -> None:
    """The proxy answers what the rows assume: misses from the origin, hits from the
    cache (after at most a few requests), the scripts' headers present or absent."""
    from .origin import BODY_SIZE

    status, headers, body = get(address, MISS_PATH)
    if status != 200 or len(body) != BODY_SIZE or headers.get("x-cache") != "MISS":
        raise RuntimeError(f"{name}: {MISS_PATH} answered {status}, {len(body)} bytes, "
                           f"X-Cache {headers.get('x-cache')!r}")
    has = headers.get("x-content-type-options") == "nosniff" and "server" not in headers
    if has != scripts:
        raise RuntimeError(f"{name}: the scripts' headers are {'missing' if scripts else 'there'}: "
                           f"{headers}")
    for _ in range(5):
        status, headers, body = get(address, HIT_PATH)
        if status != 200 or len(body) != BODY_SIZE:
            raise RuntimeError(f"{name}: {HIT_PATH} answered {status}, {len(body)} bytes")
        if headers.get("x-cache") == "HIT":
            return
    raise RuntimeError(f"{name}: {HIT_PATH} is still not a cache hit after 5 requests")


# ---------------------------------------------------------------- wrk

@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    seconds: float


class WrkRun:
    """One wrk process loading URL for SECONDS (started at once; result() waits)."""

    def __init__(self, script: str, address: Tuple[str, int], path: str, seconds: int,
                 connections: int = WRK_CONNECTIONS) -> None:
        wrk = wrk_path()
        if wrk is None:
            raise Unavailable("wrk is not installed")
        self.url = "http://%s:%d%s" % (*address, path)
        self.argv = [wrk, f"-t{WRK_THREADS}", f"-c{connections}", f"-d{seconds}s", "--latency",
                     "-H", "%s: %s" % REQUEST_HEADER, "-s", script, self.url]
        self.seconds = seconds
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True)

    def result(self) -> WrkResult:
        out, _ = self.proc.communicate(timeout=self.seconds + 60)
        m = re.search(r"^WRK-RESULT (\{.*\})$", out, re.M)
        if self.proc.returncode != 0 or not m:
            raise RuntimeError(f"wrk failed ({' '.join(self.argv)}): {out[-2000:]}")
        r = json.loads(m.group(1))
        errors = {k: r[k] for k in ("connect", "read", "write", "status", "timeout") if r[k]}
        if errors or not r["requests"]:
            raise RuntimeError(f"wrk on {self.url}: {r['requests']} requests, errors {errors} "
                               "(status: non-2xx/3xx answers)")
        seconds = r["duration_us"] / 1e6
        return WrkResult(r["requests"] / seconds, r["p50_us"] / 1e3, r["p99_us"] / 1e3,
                         r["requests"], seconds)


# ---------------------------------------------------------------- the measurement

@dataclass(frozen=True)
class Plan:
    seconds: int      # one wrk run
    rounds: int
    warmup: int       # seconds of wrk per contestant before the rounds (0: none)
    concurrent: bool  # quick: a round's runs all at once (a smoke test, not figures)
    connections: int = WRK_CONNECTIONS  # per wrk run

    def describe(self) -> str:
        if self.concurrent:
            return f"quick: {self.rounds} round of {self.seconds} s, all contestants at once"
        return (f"{self.rounds} interleaved rounds of {self.seconds} s per contestant "
                f"after {self.warmup} s of warm-up")


@dataclass
class Measurement:
    engine: str
    plan: Plan
    threads: int
    rounds: Dict[str, List[WrkResult]] = field(default_factory=dict)

    def rps(self, name: str) -> float:
        return statistics.median(r.rps for r in self.rounds[name])

    def p50(self, name: str) -> float:
        return statistics.median(r.p50_ms for r in self.rounds[name])

    def p99(self, name: str) -> float:
        return statistics.median(r.p99_ms for r in self.rounds[name])

    def rps_rounds(self, name: str) -> List[float]:
        return [r.rps for r in self.rounds[name]]

    def summary(self, names: Sequence[str]) -> Dict[str, Dict[str, float]]:
        return {n: {"rps": self.rps(n), "p50_ms": self.p50(n), "p99_ms": self.p99(n)} for n in names}

    def setup(self) -> str:
        return (f"wrk {WRK_THREADS} threads, {self.plan.connections} connections, keep-alive; "
                f"{self.plan.describe()}; proxy --threads {self.threads}; "
                f"{os.cpu_count()} cores shared by wrk, the proxy and the origin")


def measure(engine: str, plan: Plan) -> Measurement:
    """Start the origin and both proxies on ENGINE, check them, run the rounds."""
    if wrk_path() is None:
        raise Unavailable("wrk is not installed (sh tools/install-deps.sh bench, as root)")
    m = Measurement(engine, plan, proxy_threads())
    procs: List[Process] = []
    with tempfile.TemporaryDirectory(prefix="hs-bench-proxy-") as tmp:
        done = Path(tmp) / "done.lua"
        done.write_text(WRK_DONE)
        empty = Path(tmp) / "no_handlers.lua"
        empty.write_text("return {}\n")
        try:
            origin = start_origin()
            procs.append(origin)
            plain = start_proxy(engine, origin.address, [empty])
            procs.append(plain)
            scripted = start_proxy(engine, origin.address, SCRIPTS, [SHARED])
            procs.append(scripted)
            targets = {"origin": origin.address, "no scripts": plain.address,
                       "scripts": scripted.address}
            check_proxy(plain.name, plain.address, scripts=False)
            check_proxy(scripted.name, scripted.address, scripts=True)
            runs = {name: (str(done), targets[t], path) for name, (t, path) in CONTESTANTS.items()}
            if plan.warmup:
                for name, args in runs.items():
                    WrkRun(*args, plan.warmup, plan.connections).result()
            m.rounds = {name: [] for name in runs}
            for _ in range(plan.rounds):
                if plan.concurrent:
                    started = {name: WrkRun(*args, plan.seconds, plan.connections)
                               for name, args in runs.items()}
                    for name, run in started.items():
                        m.rounds[name].append(run.result())
                else:
                    for name, args in runs.items():
                        m.rounds[name].append(WrkRun(*args, plan.seconds, plan.connections).result())
            for p in (plain, scripted):  # a proxy that died mid-run is a failed row
                if p.proc.poll() is not None:
                    raise RuntimeError(f"{p.name} exited: {p.output()[-2000:]}")
        finally:
            for p in reversed(procs):
                p.close()
    return m


_measured: Dict[Tuple[str, Plan], Measurement] = {}


def measured(engine: str, plan: Plan) -> Measurement:
    """measure(), once per engine and plan: the three rows read one measurement."""
    key = (engine, plan)
    if key not in _measured:
        _measured[key] = measure(engine, plan)
    return _measured[key]
