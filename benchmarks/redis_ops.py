"""Shared dictionaries in Redis against the in-process one and against
redis-benchmark (issue 9's performance section).

    python benchmarks/redis_ops.py [--quick] [--engine luajit|lua54] [--threads 1,2,8]
                                   [--rounds 5] [--seconds 0.3] [--markdown] [--json out.json]

Starts a redis-server of its own (a free loopback port, a temp dir, no
persistence). Per request as a server pays it: one fire of a Lua handler whose one
call is the dictionary operation (c/redis_bench.lua), from N threads at once, each
in a closed loop (the next request when the last one is answered), for a fixed time.
The contestants, for N = 1, 2 and 8:

- **C** — c/redis_bench.c, a C program firing from N pthreads (no Python, no GIL):
  the in-process dictionary ``hs.shared.mem``, the Redis one ``hs.shared.red``
  (``incr("n", 1, 0)`` is one INCRBY, ``get`` one GET), a raw
  ``hs.redis("red"):call("INCR", k)``, and the C API without a fire
  (``hs_shared_incr`` / ``hs_shared_get``);
- **Python** — N Python threads calling ``host.fire`` on the same handlers (the
  host releases the GIL before a handler waits on Redis);
- **redis-benchmark** — ``-c N -P 1`` against the same server: ``INCR k``, ``GET``
  of the same key the dictionaries read (the same bytes come back). redis-benchmark
  drives its N
  connections from one event-loop thread: its per-request latency at concurrency N
  is the floor for one connection per thread.
- **pipelining** — a handler making 16 ``r:call("INCR", k)`` against one making
  ``r:pipeline`` of the same 16 (C and Python), and ``redis-benchmark -P 16``.

Every contestant is measured once per round, in turns (A, B, C, A, B, C, ...);
figures are medians over the rounds, and every ratio is the median of the ratios
taken within each round. Per-request latency at concurrency N is N / throughput
(Little's law for a closed loop). The target of the issue: the Redis backend's
per-request latency within 1.3x of redis-benchmark's at the same concurrency.

Where the time goes is measured too, per operation: the client's CPU (the C
driver's, the Python process's or redis-benchmark's user + system time over the
timed span) and the server's (redis-server's used_cpu_user + used_cpu_sys, from
INFO, around each run). ``hostscript bench`` shows the targets as rows D1 (incr)
and D2 (get), measured by ``measured()`` with fewer contestants (Plan.for_rows).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: the source tree's hostscript and benchmarks
    sys.path.insert(0, str(ROOT))
    from benchmarks import native  # noqa: E402
else:
    from . import native

SCRIPT = ROOT / "benchmarks" / "c" / "redis_bench.lua"
# the hooks of c/redis_bench.lua (c/redis_bench.c declares the same, in this order)
HOOKS = ("incr_mem", "get_mem", "incr_redis", "get_redis", "incr_call", "single16", "pipeline16")
PREFIX = "bench:"
VALUE = b"v" * 64  # "v" in both dictionaries
TARGET = 1.3        # Redis backend / redis-benchmark, per-request latency at the same concurrency


class Unavailable(Exception):
    """The benchmark cannot run here (no redis-server, redis-benchmark, compiler...)."""


# ---------------------------------------------------------------- the server


class RedisProcess:
    """A redis-server of our own on a free loopback port, no persistence."""

    def __init__(self) -> None:
        self.exe = shutil.which("redis-server")
        if not self.exe or not shutil.which("redis-benchmark") or not shutil.which("redis-cli"):
            raise Unavailable("redis-server, redis-benchmark and redis-cli are needed "
                              "(tools/install-deps.sh installs them)")
        self.dir = tempfile.mkdtemp(prefix="hs-redis-bench-")
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self._sock: Optional[socket.socket] = None  # server_cpu()'s connection

    def start(self) -> "RedisProcess":
        for _ in range(5):  # a free port may be taken before redis binds it
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            log = open(os.path.join(self.dir, "redis.log"), "ab")
            self.proc = subprocess.Popen(
                [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", self.dir, "--daemonize", "no", "--protected-mode", "no"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()
            end = time.monotonic() + 10
            while time.monotonic() < end and self.proc.poll() is None:
                try:
                    if self.cli("PING") == "PONG":
                        return self
                except (subprocess.SubprocessError, OSError):
                    pass
                time.sleep(0.02)
            self.stop(remove=False)
        raise Unavailable(f"redis-server did not start: {self.log()[-1000:]}")

    def stop(self, remove: bool = True) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        try:
            return Path(self.dir, "redis.log").read_text(errors="replace")
        except OSError:
            return ""

    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0?prefix={PREFIX}"

    def server_cpu(self) -> float:
        """redis-server's CPU seconds so far (user + system, from INFO cpu), over a
        connection kept open for it."""
        if self._sock is None:
            self._sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock = self._sock

        def more(buf: bytes) -> bytes:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("redis-server closed the connection")
            return buf + chunk

        sock.sendall(b"*2\r\n$4\r\nINFO\r\n$3\r\ncpu\r\n")
        buf = b""
        while b"\r\n" not in buf:
            buf = more(buf)
        head, _, body = buf.partition(b"\r\n")
        size = int(head[1:])  # $<size>: a bulk string
        while len(body) < size + 2:
            body = more(body)
        info = dict(line.split(":", 1) for line in body[:size].decode().splitlines() if ":" in line)
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def cli(self, *args: str) -> str:
        """One command through redis-cli; its reply as redis-cli prints it."""
        proc = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *args],
                              capture_output=True, text=True, timeout=10)
        if proc.returncode != 0:
            raise subprocess.SubprocessError(proc.stderr.strip())
        return proc.stdout.strip()

    def __enter__(self) -> "RedisProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---------------------------------------------------------------- the contestants

class Sample(NamedTuple):
    """One run of a contestant: operations, the timed span, the client's CPU in it."""

    ops: int
    seconds: float
    client_cpu: float

    @property
    def rate(self) -> float:
        return self.ops / self.seconds


Measure = Callable[[], Sample]  # one round of one contestant


@dataclass(frozen=True)
class Plan:
    """How much work: thread counts, interleaved rounds, seconds per run."""

    threads: Tuple[int, ...] = (1, 2, 8)
    rounds: int = 5
    seconds: float = 0.3   # one contestant's timed span per round
    warmup: int = 200      # operations per thread before timing
    pipeline_threads: Tuple[int, ...] = (1, 8)
    extras: bool = True    # the contestants only this report shows (not hostscript bench's rows)

    @classmethod
    def quick(cls) -> "Plan":
        """The smoke test's: every contestant once, 1 thread, 20 ms."""
        return cls(threads=(1,), rounds=1, seconds=0.02, warmup=10, pipeline_threads=(1,))

    def for_rows(self) -> "Plan":
        """What hostscript bench's D1/D2 rows need: the targets' contestants, the
        in-process dictionary, Python threads and the C pipeline, 3 rounds when full."""
        return dataclasses.replace(self, extras=False, pipeline_threads=self.threads[:1],
                                   rounds=min(self.rounds, 3))


class CDriver:
    """c/redis_bench.c for one engine: one run per measurement."""

    def __init__(self, engine: str, url: str, plan: Plan) -> None:
        try:
            self.exe = native.build_program(engine, native.REDIS_BENCH_C)
        except native.Unavailable as e:
            raise Unavailable(str(e)) from None
        self.engine, self.url, self.plan = engine, url, plan

    def run(self, op: str, threads: int, seconds: float, warmup: Optional[int] = None) -> Sample:
        proc = subprocess.run([str(self.exe), str(SCRIPT), self.url, op, str(threads), str(seconds),
                               str(self.plan.warmup if warmup is None else warmup)],
                              capture_output=True, text=True, timeout=120)
        fields = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
        if proc.returncode != 0 or "error" in fields:
            raise RuntimeError(f"redis_bench {op} x{threads}: {fields.get('error') or proc.stderr[-2000:]}")
        if fields.get("engine") != self.engine:
            raise RuntimeError(f"redis_bench built for {self.engine} reports {fields.get('engine')!r}")
        return Sample(int(fields["ops"]), float(fields["seconds"]), float(fields["cpu_seconds"]))

    def measure(self, op: str, threads: int) -> Measure:
        return lambda: self.run(op, threads, self.plan.seconds)


class PythonThreads:
    """hostscript.Host on the same handlers, fired from N Python threads."""

    def __init__(self, engine: str, url: str, plan: Plan) -> None:
        import hostscript

        self.hostscript = hostscript
        self.host = hostscript.Host(HOOKS, engine=engine, on_error="raise",
                                    shared={"mem": 1 << 20, "red": url})
        self.host.load(SCRIPT.read_text(), name="redis_bench.lua")
        for name in ("mem", "red"):
            self.host.shared[name].set("v", VALUE.decode())
        self.plan = plan

    def run(self, hook: str, threads: int, seconds: float) -> Sample:
        fire, Transaction = self.host.fire, self.hostscript.Transaction
        stop = [False]
        counts = [0] * threads
        errors: List[BaseException] = []
        start = threading.Barrier(threads + 1)

        def work(i: int) -> None:
            txn = Transaction()
            try:
                for _ in range(self.plan.warmup):
                    fire(hook, txn)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
            start.wait()
            n = 0
            try:
                while not stop[0]:
                    fire(hook, txn)
                    n += 1
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
            counts[i] = n

        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        start.wait()
        t0, cpu0 = time.perf_counter(), time.process_time()
        time.sleep(seconds)
        stop[0] = True
        t1 = time.perf_counter()
        for w in workers:
            w.join()
        cpu = time.process_time() - cpu0
        if errors:
            raise RuntimeError(f"python {hook} x{threads}: {errors[0]!r}")
        return Sample(sum(counts), t1 - t0, cpu)

    def measure(self, hook: str, threads: int) -> Measure:
        return lambda: self.run(hook, threads, self.plan.seconds)

    def close(self) -> None:
        self.host.close()


class RedisBenchmark:
    """redis-benchmark against the same server: -c N clients, -P pipelining, a
    request count sized so one run takes about the plan's seconds."""

    def __init__(self, server: RedisProcess, plan: Plan) -> None:
        self.server, self.plan = server, plan
        self.rate: Dict[Tuple[Any, ...], float] = {}

    def run(self, command: Sequence[str], clients: int, requests: int, pipeline: int = 1) -> Sample:
        """One run: REQUESTS, the span redis-benchmark reports (REQUESTS / its
        requests per second), its CPU (user + system, from start to exit)."""
        before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        proc = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(self.server.port),
                               "-c", str(clients), "-n", str(requests), "-P", str(pipeline), "-q", "--csv",
                               *command], capture_output=True, text=True, timeout=300)
        rows = [line for line in proc.stdout.splitlines() if line.startswith('"') and "rps" not in line]
        if proc.returncode != 0 or not rows:
            raise RuntimeError(f"redis-benchmark {' '.join(command)}: {proc.stdout[-500:]} {proc.stderr[-500:]}")
        wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        rps = float(rows[-1].split('","')[1].strip('"'))
        # its clock counts milliseconds: a run of a few has no rate of its own (inf)
        seconds = requests / rps if 0 < rps < float("inf") else wall
        return Sample(requests, seconds, cpu)

    def measure(self, command: Sequence[str], clients: int, pipeline: int = 1) -> Measure:
        """Requests of COMMAND; with PIPELINE > 1 an operation is PIPELINE requests."""
        key = (tuple(command), clients, pipeline)

        def once() -> Sample:
            if key not in self.rate:  # size the runs: a short one first
                self.rate[key] = self.run(command, clients, 1000 * pipeline, pipeline).rate
            requests = max(100 * clients, int(self.rate[key] * self.plan.seconds))
            requests -= requests % pipeline
            got = self.run(command, clients, requests, pipeline)
            self.rate[key] = got.rate
            return got._replace(ops=got.ops // pipeline)

        return once


# ---------------------------------------------------------------- one engine


# group -> contestant -> (what is timed, unit per operation)
def contestants(c: CDriver, py: PythonThreads, rb: RedisBenchmark, n: int,
                plan: Plan) -> Dict[str, Dict[str, Measure]]:
    """The measurements of every contestant at N threads, by group."""
    groups = {
        "incr": {
            "C memory": c.measure("incr_mem", n),
            "C redis": c.measure("incr_redis", n),
            "C hs.redis INCR": c.measure("incr_call", n),
            "C API redis (no fire)": c.measure("c_incr_redis", n),
            "Python memory": py.measure("incr_mem", n),
            "Python redis": py.measure("incr_redis", n),
            "redis-benchmark INCR": rb.measure(["INCR", f"{PREFIX}rb"], n),
        },
        "get": {
            "C memory": c.measure("get_mem", n),
            "C redis": c.measure("get_redis", n),
            "C API redis (no fire)": c.measure("c_get_redis", n),
            "Python memory": py.measure("get_mem", n),
            "Python redis": py.measure("get_redis", n),
            "redis-benchmark GET": rb.measure(["GET", f"{PREFIX}v"], n),
        },
    }
    if n in plan.pipeline_threads:
        groups["16 INCRs"] = {
            "C 16 calls": c.measure("single16", n),
            "C pipeline of 16": c.measure("pipeline16", n),
            "Python 16 calls": py.measure("single16", n),
            "Python pipeline of 16": py.measure("pipeline16", n),
            # 16 INCRs in flight per client: an operation is 16 of them
            "redis-benchmark -P 16": rb.measure(["INCR", f"{PREFIX}rbp"], n, 16),
        }
    if not plan.extras:
        for members in groups.values():
            for name in EXTRAS:
                members.pop(name, None)
    return groups


EXTRAS = ("C hs.redis INCR", "C API redis (no fire)", "Python memory", "Python 16 calls",
          "Python pipeline of 16", "redis-benchmark -P 16")


# the ratios reported: label -> (group, numerator, denominator, target); each a
# ratio of per-request latencies (= the inverse ratio of operations per second)
RATIOS: List[Tuple[str, str, str, str, Optional[float]]] = [
    ("incr: C redis / redis-benchmark INCR", "incr", "C redis", "redis-benchmark INCR", TARGET),
    ("incr: C hs.redis INCR / redis-benchmark INCR", "incr", "C hs.redis INCR", "redis-benchmark INCR", None),
    ("incr: C API / redis-benchmark INCR", "incr", "C API redis (no fire)", "redis-benchmark INCR", None),
    ("incr: Python redis / redis-benchmark INCR", "incr", "Python redis", "redis-benchmark INCR", None),
    ("incr: C redis / C memory", "incr", "C redis", "C memory", None),
    ("get: C redis / redis-benchmark GET", "get", "C redis", "redis-benchmark GET", TARGET),
    ("get: C API / redis-benchmark GET", "get", "C API redis (no fire)", "redis-benchmark GET", None),
    ("get: Python redis / redis-benchmark GET", "get", "Python redis", "redis-benchmark GET", None),
    ("get: C redis / C memory", "get", "C redis", "C memory", None),
    ("16 INCRs: C 16 calls / C pipeline", "16 INCRs", "C 16 calls", "C pipeline of 16", None),
    ("16 INCRs: Python 16 calls / Python pipeline", "16 INCRs", "Python 16 calls", "Python pipeline of 16", None),
    ("16 INCRs: C pipeline / redis-benchmark -P 16", "16 INCRs", "C pipeline of 16", "redis-benchmark -P 16", None),
]


def run_engine(engine: str, plan: Plan, server: RedisProcess,
               progress: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """Every contestant at every concurrency, interleaved round by round. Returns
    {"engine", "figures": {n: {group: {contestant: [round, ...]}}}, "ratios":
    {label: {n: ratio}}}, a round being {"rate": ops/s, "client_us", "server_us"
    (CPU per operation)}."""
    c = CDriver(engine, server.url(), plan)
    py = PythonThreads(engine, server.url(), plan)
    rb = RedisBenchmark(server, plan)
    try:
        groups = {n: contestants(c, py, rb, n, plan) for n in plan.threads}
        figures: Dict[int, Dict[str, Dict[str, List[Dict[str, float]]]]] = {
            n: {g: {name: [] for name in members} for g, members in gs.items()} for n, gs in groups.items()}
        for r in range(plan.rounds):
            progress(f"{engine}: round {r + 1} of {plan.rounds}")
            for n, gs in groups.items():
                for g, members in gs.items():
                    for name, measure in members.items():
                        server_before = server.server_cpu()
                        got = measure()
                        server_cpu = server.server_cpu() - server_before
                        figures[n][g][name].append({"rate": got.rate, "client_us": got.client_cpu / got.ops * 1e6,
                                                    "server_us": server_cpu / got.ops * 1e6})
    finally:
        py.close()
    ratios: Dict[str, Dict[int, float]] = {}
    for label, g, num, den, _ in RATIOS:
        ratios[label] = {}
        for n in plan.threads:
            if num in figures[n].get(g, {}) and den in figures[n][g]:
                # latency ratio = inverse throughput ratio, per round, then the median
                ratios[label][n] = statistics.median(
                    b["rate"] / a["rate"] for a, b in zip(figures[n][g][num], figures[n][g][den]))
    return {"engine": engine, "figures": figures, "ratios": ratios}


def run(engines: Sequence[str], plan: Plan, progress: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """Every engine against one redis-server of our own: the whole report."""
    started = time.monotonic()
    with RedisProcess() as server:
        version = server.cli("INFO", "server")
        results = [run_engine(e, plan, server, progress) for e in engines]
    m = re.search(r"redis_version:(\S+)", version)
    return {"machine": {"cores": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
                        "redis": m.group(1) if m else "?"},
            "plan": {"threads": list(plan.threads), "rounds": plan.rounds, "seconds": plan.seconds,
                     "warmup": plan.warmup},
            "seconds": round(time.monotonic() - started, 1), "engines": results}


_measured: Dict[Tuple[str, Plan], Dict[str, Any]] = {}


def measured(engine: str, plan: Plan) -> Dict[str, Any]:
    """run_engine() once per engine and plan, on a redis-server of its own: the rows
    of ``hostscript bench`` (benchmarks/rows.py) read one measurement. Raises
    Unavailable when something it needs is missing."""
    key = (engine, plan)
    if key not in _measured:
        with RedisProcess() as server:
            _measured[key] = run_engine(engine, plan, server)
    return _measured[key]


def latency_ns(result: Dict[str, Any], n: int, group: str, contestant: str) -> float:
    """Median per-request latency (N / throughput) of CONTESTANT at N threads, in ns."""
    return n / median_of(result["figures"][n][group][contestant], "rate") * 1e9


# ---------------------------------------------------------------- the report


def median_of(rounds: List[Dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def _fmt_rate(ops: float) -> str:
    return f"{ops / 1e6:.2f}M/s" if ops >= 1e6 else f"{ops / 1e3:.1f}k/s"


def _fmt_us(us: float) -> str:
    return f"{us:.2f}" if us < 10 else f"{us:.1f}" if us < 100 else f"{us:.0f}"


def tables(result: Dict[str, Any]) -> List[List[List[str]]]:
    """The tables of one engine: per-request latency and throughput at each
    concurrency; CPU per operation, client + server; the ratios."""
    figures = {int(n): gs for n, gs in result["figures"].items()}
    threads = sorted(figures)
    names = [f"{n} thread{'s' if n > 1 else ''}" for n in threads]
    order: Dict[str, List[str]] = {}
    for n in threads:
        for g, members in figures[n].items():
            order.setdefault(g, [])
            order[g] += [m for m in members if m not in order[g]]
    latency = [["operation", "contestant"] + names]
    cpu = [["operation", "contestant"] + [f"CPU µs, {n}: client + server" for n in names]]
    for g, members in order.items():
        for name in members:
            lat, use = [g, name], [g, name]
            for n in threads:
                rounds = figures[n].get(g, {}).get(name)
                if not rounds:
                    lat.append("")
                    use.append("")
                    continue
                rate = median_of(rounds, "rate")
                per = f" ({_fmt_rate(rate * 16)} INCRs)" if g == "16 INCRs" else ""
                lat.append(f"{_fmt_us(n / rate * 1e6)} µs, {_fmt_rate(rate)}{per}")
                use.append(f"{_fmt_us(median_of(rounds, 'client_us'))} + {_fmt_us(median_of(rounds, 'server_us'))}")
            latency.append(lat)
            cpu.append(use)
    ratios = [["ratio of per-request latencies"] + names + ["target"]]
    for label, _, _, _, target in RATIOS:
        by_n = {int(n): v for n, v in result["ratios"].get(label, {}).items()}
        row = [label] + [f"{by_n[n]:.2f}" if n in by_n else "" for n in threads]
        row.append(f"≤ {target:g}" if target else "(info)")
        ratios.append(row)
    return [latency, cpu, ratios]


def header(report: Dict[str, Any]) -> str:
    m, p = report["machine"], report["plan"]
    return (f"{m['cores']} cores, load average {m['loadavg']} at the end, Redis {m['redis']}; "
            f"{p['rounds']} interleaved rounds of {p['seconds']} s per contestant, medians. Latency = "
            "N threads / throughput; a 16 INCRs operation is one fire of 16 (its INCRs per second in "
            "brackets); CPU per operation.")


def text(report: Dict[str, Any]) -> str:
    out = [header(report)]
    for result in report["engines"]:
        out += ["", f"== {result['engine']} =="]
        for table in tables(result):
            widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
            out.append("")
            out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    out.append(f"\n{report['seconds']:.0f} s")
    return "\n".join(out)


def markdown(report: Dict[str, Any]) -> str:
    out = [header(report)]
    for result in report["engines"]:
        out += ["", f"**{result['engine']}**"]
        for table in tables(result):
            out += ["", "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
            out += ["| " + " | ".join(r) + " |" for r in table[1:]]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import hostscript

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", action="append", choices=hostscript.engines(),
                   help="an engine (repeatable; default: every one built)")
    p.add_argument("--quick", action="store_true", help="tiny counts: proves it runs, the figures mean nothing")
    p.add_argument("--threads", help="comma-separated thread counts (default 1,2,8)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--seconds", type=float, help="one contestant's timed span per round")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    plan = Plan.quick() if args.quick else Plan()
    if args.threads:
        threads = tuple(int(x) for x in args.threads.split(","))
        plan = dataclasses.replace(plan, threads=threads, pipeline_threads=tuple(
            n for n in plan.pipeline_threads if n in threads) or threads[:1])
    if args.rounds:
        plan = dataclasses.replace(plan, rounds=args.rounds)
    if args.seconds:
        plan = dataclasses.replace(plan, seconds=args.seconds)
    try:
        report = run(args.engine or hostscript.engines(), plan,
                     lambda s: print(f"  {s} ...", file=sys.stderr, flush=True))
    except Unavailable as e:
        print(f"redis_ops: {e}", file=sys.stderr)
        return 2
    print(text(report))
    if args.markdown:
        print(markdown(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
