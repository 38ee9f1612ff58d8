"""Instructions per request in Traffic Server's plugins, counted by callgrind: the same
contestants and work as ats.py (ats/hostscript.lua, header_rewrite.config,
ts_lua.lua), each in a private traffic_server run under valgrind, one keep-alive
connection sending sequential GETs through it to the nginx origin.

What is counted: the instructions run inside plugin continuations (Traffic Server's
``INKContInternal::handle_event``, which calls every global plugin's hook handler),
with ``TSHttpTxnReenable`` left out (it runs Traffic Server's next state) — the
plugins' own cost; ATS alone has none. Traffic Server's side of calling the hooks,
and what the larger messages cost it later, are not in it: the wall-clock rows of
ats.py have those. (Toggling on the event loop's functions does not work: callgrind
toggles one collection state for all threads, and the net threads wait inside them.)

The counters are zeroed after a warm-up (the first requests build each net thread's
Lua state), so the figures are the steady state. Deterministic to a few instructions
from run to run, unlike wall-clock figures on a shared machine; the price is speed
(a minute or two per contestant).

    python benchmarks/ats_instructions.py [--requests 2000] [--engine E] [--decompose] [--only TEXT]
"""
from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ats  # noqa: E402  (benchmarks/ats.py: contestants, origin, AtsServer)

TOGGLES = ["INKContInternal::handle_event*", "TSHttpTxnReenable"]
WARMUP = 200


def callgrind_total(path: str) -> int:
    """The total of callgrind's output file PATH (its "totals:" or "summary:" line)."""
    with open(path) as f:
        for line in f:
            m = re.match(r"^(?:totals|summary):\s+(\d+)", line)
            if m:
                return int(m.group(1))
    raise RuntimeError(f"no totals in {path}")


def count(plugin_lines: List[str], requests: int) -> float:
    """Instructions per request in plugin continuations with PLUGIN_LINES loaded."""
    work = tempfile.mkdtemp(prefix="hs-ats-cg-")
    out = os.path.join(work, "callgrind.out")
    prefix = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--collect-atstart=no",
              *(f"--toggle-collect={t}" for t in TOGGLES)]
    origin = ats.Origin()
    server = ats._ats_server_module().AtsServer(origin.url, plugin_lines, start_timeout=180, prefix=prefix)
    try:
        server.start()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)

        def send(n: int) -> None:
            for _ in range(n):
                conn.request("GET", ats.BENCH_PATH, headers={"User-Agent": ats.USER_AGENT})
                r = conn.getresponse()
                r.read()
                if r.status != 200:
                    raise RuntimeError(f"{plugin_lines}: status {r.status}")

        send(WARMUP)
        subprocess.run(["callgrind_control", "--zero", str(server.pid)], check=True,
                       capture_output=True, timeout=60)
        send(requests)
        conn.close()
        server.stop(timeout=60)  # callgrind writes its file as traffic_server ends
        return callgrind_total(out) / requests
    finally:
        server.cleanup()
        origin.close()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--engine", choices=["luajit", "lua54"], action="append")
    p.add_argument("--decompose", action="store_true",
                   help="also hostscript with empty handlers and with the reads only")
    p.add_argument("--only", metavar="TEXT", help="only the contestants whose name holds TEXT")
    args = p.parse_args(argv)
    engines = args.engine or ["luajit", "lua54"]
    why = ats.missing(engines) or ("" if shutil.which("callgrind_control") else "valgrind (apt-get install valgrind)")
    if why:
        print(f"n/a: {why}")
        return 1
    runs: Dict[str, List[str]] = ats.contestants(engines)
    if args.decompose:
        plugin = ats.plugin_path(engines[0])
        runs[f"hostscript {engines[0]}, 3 empty handlers"] = [f"{plugin} {ats.HERE / 'empty.lua'}"]
        runs[f"hostscript {engines[0]}, the reads only"] = [f"{plugin} {ats.HERE / 'reads.lua'}"]
    print(f"{args.requests} sequential keep-alive requests after {WARMUP} of warm-up, "
          f"instructions per request (callgrind)")
    print("| contestant | instructions per request in plugin continuations |")
    print("|---|---|")
    for name, lines in runs.items():
        if not lines or (args.only and args.only not in name):
            continue  # ATS alone has no plugin
        started = time.monotonic()
        n = count(lines, args.requests)
        print(f"| {name} | {n / 1000:.1f}k |  ({time.monotonic() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
