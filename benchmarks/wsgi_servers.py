"""W rows: requests/s of real WSGI servers with hostscript's middleware and a
three-hook script (benchmarks/wsgi/) against the same server and application without
it — waitress (8 threads), gunicorn's gthread worker (1 worker, 8 threads) and cheroot
(8 threads), each a process of its own, loaded by wrk (1 thread, 16 keep-alive
connections) on the same machine. Rounds interleave the two contestants of a server;
the ratio is taken per round and its median reported. Target: >= 0.95.

    python benchmarks/wsgi_servers.py [--rounds 3] [--seconds 5] [--servers waitress,gunicorn,cheroot]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREADS = 8

SERVE = {
    "waitress": ["-c", "import sys, waitress, benchmarks.wsgi.app as a; "
                       "waitress.serve(getattr(a, sys.argv[1]), host='127.0.0.1', port=int(sys.argv[2]), "
                       f"threads={THREADS}, _quiet=True)"],
    "cheroot": ["-c", "import sys, benchmarks.wsgi.app as a; from cheroot import wsgi; "
                      "wsgi.Server(('127.0.0.1', int(sys.argv[2])), getattr(a, sys.argv[1]), "
                      f"numthreads={THREADS}).start()"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(server: str, app: str) -> "tuple[subprocess.Popen, int]":
    port = free_port()
    if server == "gunicorn":
        cmd = [sys.executable, "-m", "gunicorn", "-k", "gthread", "-w", "1", "--threads", str(THREADS),
               "-b", f"127.0.0.1:{port}", "--log-level", "warning", f"benchmarks.wsgi.app:{app}"]
    else:
        cmd = [sys.executable, *SERVE[server], app, str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": ROOT})
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{server} {app} exited: {proc.stderr.read().decode()[-500:]}")
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{server} {app} did not listen")


def wrk(port: int, seconds: float) -> float:
    out = subprocess.run(["wrk", "-t1", "-c16", f"-d{seconds}s", f"http://127.0.0.1:{port}/bench"],
                         capture_output=True, text=True, check=True).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{errors.group(1)} error responses:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def measure(server: str, rounds: int, seconds: float) -> Dict[str, object]:
    procs = {app: start(server, app) for app in ("plain", "wrapped")}
    try:
        for app, (_, port) in procs.items():  # warm up: imports, states, caches
            wrk(port, 1)
        rates: Dict[str, List[float]] = {"plain": [], "wrapped": []}
        for r in range(rounds):
            order = ("plain", "wrapped") if r % 2 == 0 else ("wrapped", "plain")
            for app in order:
                rates[app].append(wrk(procs[app][1], seconds))
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(10)
    ratios = [w / p for p, w in zip(rates["plain"], rates["wrapped"])]
    return {"server": server, "plain": statistics.median(rates["plain"]),
            "wrapped": statistics.median(rates["wrapped"]), "ratio": statistics.median(ratios)}


def main(argv: "List[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--servers", default="waitress,gunicorn,cheroot")
    args = ap.parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk is missing (sh tools/install-deps.sh bench)", file=sys.stderr)
        return 2
    print("| server | without (req/s) | with middleware + 3 hooks (req/s) | ratio | target |")
    print("|---|---|---|---|---|")
    for server in args.servers.split(","):
        m = measure(server, args.rounds, args.seconds)
        verdict = "met" if m["ratio"] >= 0.95 else "missed"
        print(f"| {server} | {m['plain']:,.0f} | {m['wrapped']:,.0f} | {m['ratio']:.2f} | "
              f"≥ 0.95 {verdict} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
