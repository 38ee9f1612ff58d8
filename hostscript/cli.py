"""Command line: ``hostscript demo`` (what ``make run`` shows), ``hostscript check``,
``hostscript serve`` (the reference caching reverse proxy, docs/serve.md) and
``hostscript bench`` (the comparison against peers, ``make bench``)."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types
from typing import List, Optional

from . import Error, Host, _engine, engines

HOOKS = ("read_request", "send_request", "read_response", "send_response", "log")
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def demo(args: argparse.Namespace) -> int:
    from . import demo as _demo

    return _demo.run(args.engine, examples=args.examples)


CHECK_TIME_LIMIT = 5.0  # seconds a script's chunk (and its class's new) may run in a check
CHECK_MEMORY_LIMIT = 256 << 20


def check(args: argparse.Namespace) -> int:
    """Static check of scripts (docs/check.md): every problem as file:line: message
    on stderr, "file: ok" on stdout; exit 1 when there are problems, 2 on a usage error."""
    from . import check as _check

    hooks = [h for h in args.hooks.split(",") if h]
    engine_list = list(dict.fromkeys(args.engine or [_engine.default()]))
    shared = dict(args.shared)
    try:
        for eng in engine_list:  # the hooks or dictionaries given: the usage's fault
            Host(hooks, engine=eng, shared=shared).close()
        files = _check.expand(args.files)
    except (Error, _check.UsageProblem) as e:
        print(f"hostscript check: {e}", file=sys.stderr)
        return 2
    use_luac = _check.luac_available()
    if not use_luac:
        print(f"hostscript check: {_check.LUAC} not found (Debian package lua5.4): "
              "no global analysis", file=sys.stderr)

    def make_host(engine: str, sandbox: bool) -> Host:
        # bounded: a chunk that loops or hoards memory is reported, not waited for
        return Host(hooks, engine=engine, shared=shared, sandbox=sandbox,
                    time_limit=CHECK_TIME_LIMIT, memory_limit=CHECK_MEMORY_LIMIT)

    status = 0
    for path in files:
        problems, notes = _check.check_file(path, hooks, engine_list, make_host, use_luac)
        for note in notes:
            print(note, file=sys.stderr)
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            status = 1
        else:
            print(f"{path}: ok")
    return status


SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_benchmarks(root: str) -> Optional[types.ModuleType]:
    """The source tree's benchmarks/ package (ROOT/benchmarks), imported as
    ``benchmarks``; None when ROOT is not a hostscript source tree (an installed
    wheel: ROOT is site-packages, whose benchmarks/, if any, is somebody else's)."""
    init = os.path.join(root, "benchmarks", "__init__.py")
    markers = (init, os.path.join(root, "benchmarks", "runner.py"),
               os.path.join(root, "native", "hostscript.h"))
    if not all(os.path.isfile(p) for p in markers):
        return None
    loaded = sys.modules.get("benchmarks")
    if loaded is not None and os.path.abspath(getattr(loaded, "__file__", "")) == os.path.abspath(init):
        return loaded
    spec = importlib.util.spec_from_file_location("benchmarks", init,
                                                  submodule_search_locations=[os.path.dirname(init)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks"] = module
    spec.loader.exec_module(module)
    return module


def bench(args: argparse.Namespace) -> int:
    if _load_benchmarks(SOURCE_ROOT) is None:
        print(f"hostscript bench: no benchmarks/ next to this hostscript package ({SOURCE_ROOT}): "
              "the benchmarks are not installed with the package. Run `make bench` (or "
              "`python -m hostscript bench`) in a source checkout of hostscript.", file=sys.stderr)
        return 2
    from benchmarks import runner

    return runner.main(args.engine or engines(), quick=args.quick, json_path=args.json,
                       plot_path=args.plot, markdown=args.markdown, silent=args.silent, ats=args.ats)


def main(argv: Optional[List[str]] = None) -> int:
    from .proxy import serve as _serve

    ap = argparse.ArgumentParser(prog="hostscript", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the reference proxy: caching by the Key header, then a class registered from a hook (make run)")
    d.add_argument("--engine", action="append", choices=["luajit", "lua54"])
    d.add_argument("--examples", default=EXAMPLES)
    d.set_defaults(func=demo)
    c = sub.add_parser("check", help="check scripts statically: every problem as file:line: message")
    c.add_argument("files", nargs="+", metavar="FILE|DIR", help="a script, or a directory (every *.lua inside)")
    c.add_argument("--hooks", default=",".join(HOOKS))
    c.add_argument("--engine", action="append", choices=["luajit", "lua54"])
    c.add_argument("--shared", action="append", type=_serve.shared_spec, default=[],
                   metavar="NAME=SIZE|NAME=URL",
                   help="a shared dictionary the scripts use (NAME=16M, or NAME=redis://...; repeatable)")
    c.set_defaults(func=check)
    s = sub.add_parser("serve", help="run the caching HTTP/1.1 reverse proxy that fires the scripts' hooks")

    _serve.add_arguments(s)
    s.set_defaults(func=_serve.run)
    b = sub.add_parser("bench", help="benchmark against pure Python, lupa and bare C; print the table")
    b.add_argument("--quick", action="store_true", help="tiny counts: a smoke run, not figures")
    b.add_argument("--json", metavar="PATH", help="write the report (machine info and rows) as JSON")
    b.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
    b.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    b.add_argument("--engine", action="append", choices=["luajit", "lua54"])
    b.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    b.add_argument("--ats", action="store_true",
                   help="instead: hostscript inside Traffic Server against ATS alone, header_rewrite "
                        "and ts_lua under wrk (rows A1-A4; needs traffic_server, wrk, nginx, make ats)")
    b.set_defaults(func=bench)
    args = ap.parse_args(argv)
    return args.func(args)
