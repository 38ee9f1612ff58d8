"""Command line: ``hostscript demo`` (what ``make run`` shows), ``hostscript check`` and
``hostscript bench`` (the comparison against peers, ``make bench``)."""
from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

from . import Host, ScriptError, Transaction, engines

HOOKS = ("read_request", "send_request", "read_response", "send_response", "log")
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _request(i: int) -> Transaction:
    uri = f"/Shop/Item/{i}?utm_campaign=autumn&utm_source=mail&color=red" if i % 3 == 0 else f"/item/{i}"
    headers = [("Host", "demo.local"), ("Accept", "*/*")]
    if i % 7 == 0:
        headers.append(("X-Deny", "1"))
    return Transaction("GET", uri, headers)


def demo(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="  %(threadName)-12s %(levelname)-5s %(message)s")
    scripts = sorted(glob.glob(os.path.join(args.examples, "*.lua")))
    for engine in args.engine or engines():
        print(f"== engine {engine}: {len(scripts)} scripts, {args.threads} worker threads, "
              f"{args.requests} requests")
        with Host(HOOKS, engine=engine, time_limit=0.05, memory_limit=16 << 20) as host:
            for path in scripts:
                host.load_file(os.path.relpath(path))
            print(f"  loaded: {', '.join(host.scripts)}")
            results: List[str] = []
            lock = threading.Lock()

            def serve(i: int) -> None:
                txn = _request(i)
                out = host.fire("read_request", txn)
                if out.status is out.CONTINUE:
                    txn.response.status = 200
                    txn.response.body = b"ok\n"
                    host.fire("send_response", txn)
                host.fire("log", txn)
                line = (f"#{i:<3} {txn.request.uri:<22} -> {txn.response.status} "
                        f"{dict(txn.response.headers.items())} ({out.status.name})")
                with lock:
                    results.append(line)

            with ThreadPoolExecutor(args.threads, thread_name_prefix="worker") as pool:
                list(pool.map(serve, range(args.requests)))
            print("  what the handlers did (first 6):")
            for line in results[:6]:
                print("   ", line)
            st = host.stats()
            hooks = ", ".join(f"{k}={v['fires']}" for k, v in st.pop("hooks").items())
            print(f"  stats: {st}")
            print(f"  fires per hook: {hooks}")
    return 0


def check(args: argparse.Namespace) -> int:
    host = Host(args.hooks.split(","), engine=args.engine[0] if args.engine else None)
    status = 0
    for path in args.files:
        try:
            host.load_file(path)
            print(f"{path}: ok")
        except ScriptError as e:
            print(e if str(e).startswith(path) else f"{path}: {e}", file=sys.stderr)
            status = 1
    host.close()
    return status


def bench(args: argparse.Namespace) -> int:
    from . import bench as benchmarks

    if args.plot:
        try:
            benchmarks.require_matplotlib()
        except ImportError as e:
            print(f"hostscript bench: {e}", file=sys.stderr)
            return 2
    engines_ = args.engine or engines()
    progress = (lambda s: None) if args.silent else (
        lambda s: print(f"  measuring {s} ...", file=sys.stderr, flush=True))
    report = benchmarks.run(engines_, quick=args.quick, progress=progress)
    print(benchmarks.table(report))
    if args.markdown:
        print()
        print(benchmarks.markdown(report))
    if args.json:
        benchmarks.write_json(report, args.json)
        print(f"\nJSON: {args.json}")
    if args.plot:
        benchmarks.plot(report, args.plot)
        print(f"plot: {args.plot}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="hostscript", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="fire the example handlers from a pool of threads")
    d.add_argument("--engine", action="append", choices=["luajit", "lua54"])
    d.add_argument("--threads", type=int, default=4)
    d.add_argument("--requests", type=int, default=40)
    d.add_argument("--examples", default=EXAMPLES)
    d.set_defaults(func=demo)
    c = sub.add_parser("check", help="load scripts and report errors")
    c.add_argument("files", nargs="+")
    c.add_argument("--hooks", default=",".join(HOOKS))
    c.add_argument("--engine", action="append", choices=["luajit", "lua54"])
    c.set_defaults(func=check)
    b = sub.add_parser("bench", help="benchmark against pure Python, lupa and bare C; print the table")
    b.add_argument("--quick", action="store_true", help="tiny counts: a smoke run, not figures")
    b.add_argument("--json", metavar="PATH", help="write the report (machine info and rows) as JSON")
    b.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
    b.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    b.add_argument("--engine", action="append", choices=["luajit", "lua54"])
    b.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    b.set_defaults(func=bench)
    args = ap.parse_args(argv)
    return args.func(args)
