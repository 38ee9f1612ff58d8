"""``hostscript serve``: the command line around ``Proxy`` — options, the host, the
start-up line, and the signals (SIGTERM/SIGINT drain and exit 0, SIGHUP reloads
every script)."""
from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
from typing import Dict, List, Optional

from .. import DEFAULT_HOOKS, Host, ScriptError, UsageError
from .config import Limits
from .server import Proxy, default_threads

log = logging.getLogger("hostscript.proxy")

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def size(text: str) -> int:
    """Bytes: ``1048576``, ``64k``, ``16M``, ``1GiB`` (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1048576, 64k, 16M)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def shared_spec(text: str) -> tuple:
    """``NAME=SIZE`` (in this process) or ``NAME=redis://...`` (in Redis)."""
    name, eq, spec = text.partition("=")
    if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise argparse.ArgumentTypeError(f"expected NAME=SIZE or NAME=redis://..., not {text!r}")
    if spec.startswith("redis://"):
        return name, spec
    return name, size(spec)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Limits()
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="address to listen on (port 0: any free port; default %(default)s)")
    p.add_argument("--upstream", required=True, metavar="URL", help="origin, http://HOST[:PORT]")
    p.add_argument("--script", action="append", required=True, metavar="FILE",
                   help="a handler script (repeat for several; they run in this order)")
    p.add_argument("--watch", action="store_true",
                   help="reload a script when its file changes (a failed reload keeps the "
                        "running version and logs the error)")
    p.add_argument("--engine", choices=["luajit", "lua54"])
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="worker threads (default: 2 x cores, at least 4: %(default)s)")
    p.add_argument("--time-limit", type=float, metavar="S", help="seconds of Lua per hook call")
    p.add_argument("--memory-limit", type=size, metavar="BYTES", help="Lua heap per worker state")
    p.add_argument("--shared", action="append", type=shared_spec, default=[],
                   metavar="NAME=SIZE|NAME=URL",
                   help="a shared dictionary for the scripts: in this process (NAME=16M) or in "
                        "Redis (NAME=redis://127.0.0.1:6379/0?prefix=hs:NAME:); repeatable")
    p.add_argument("--max-registrations", type=int, default=64, metavar="N",
                   help="handler classes scripts may register at run time (hs.register inside a "
                        "hook) at once (default %(default)s)")
    p.add_argument("--no-runtime-register", action="store_true",
                   help="refuse hs.register inside a hook (load-time registration still works)")
    p.add_argument("--cache-size", type=size, default=64 << 20, metavar="BYTES",
                   help="response cache size (0: no cache; default 64M)")
    p.add_argument("--max-body", type=size, default=d.max_body, metavar="BYTES",
                   help="largest request body (413 beyond; default 16M)")
    p.add_argument("--access-log", metavar="FILE|-", help="one line per request (- : stdout)")
    p.add_argument("--admin", metavar="HOST:PORT", help="serve GET /-/stats (JSON) there")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error", "critical"])
    t = p.add_argument_group("timeouts (seconds) and other limits")
    t.add_argument("--head-timeout", type=float, default=d.head_timeout,
                   help="a request head must be complete this long after its first byte (408)")
    t.add_argument("--idle-timeout", type=float, default=d.idle_timeout,
                   help="an idle keep-alive client connection is closed")
    t.add_argument("--body-timeout", type=float, default=d.body_timeout,
                   help="longest wait for a request body byte (408)")
    t.add_argument("--send-timeout", type=float, default=d.send_timeout,
                   help="longest wait for the client to accept response bytes")
    t.add_argument("--min-rate", type=int, default=d.min_rate, metavar="BYTES_PER_S",
                   help="slowest average rate a client may send a body or read a response at, "
                        "after the body/send timeout's grace (default %(default)s)")
    t.add_argument("--connect-timeout", type=float, default=d.connect_timeout,
                   help="connecting to the upstream (504)")
    t.add_argument("--upstream-timeout", type=float, default=d.upstream_timeout,
                   help="longest wait for an upstream byte (504 before the head)")
    t.add_argument("--drain-timeout", type=float, default=d.drain_timeout,
                   help="on SIGTERM, how long requests in flight may take to finish")
    t.add_argument("--max-request-line", type=size, default=d.max_request_line, metavar="BYTES",
                   help="longest request target (414; default 8k)")
    t.add_argument("--max-header-bytes", type=size, default=d.max_header_bytes, metavar="BYTES",
                   help="largest request header block (431; default 64k)")
    t.add_argument("--max-headers", type=int, default=d.max_headers,
                   help="most request header fields (431)")
    t.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="client connections open at once (accepting pauses beyond)")
    t.add_argument("--pool-size", type=int, default=d.pool_size,
                   help="idle upstream connections kept")


def make_host(args: argparse.Namespace) -> Host:
    kw: Dict[str, object] = dict(engine=args.engine, time_limit=args.time_limit,
                                 memory_limit=args.memory_limit,
                                 runtime_register=not args.no_runtime_register,
                                 max_registrations=args.max_registrations)
    if args.shared:
        kw["shared"] = dict(args.shared)
    return Host(DEFAULT_HOOKS, **kw)  # type: ignore[arg-type]


def reload_scripts(host: Host, scripts: List[str]) -> bool:
    """Reload every script from its file, in order. One that fails keeps the version
    that runs now (a failed load publishes nothing); the error is logged with its
    file and line. True when all reloaded."""
    ok = True
    for name in scripts:
        try:
            host.reload(name)
            log.info("reloaded %s", name)
        except ScriptError as exc:
            ok = False
            log.error("reload of %s failed, keeping the running version: %s", name, exc)
    return ok


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        limits = Limits(max_body=args.max_body, head_timeout=args.head_timeout,
                        idle_timeout=args.idle_timeout, body_timeout=args.body_timeout,
                        send_timeout=args.send_timeout, min_rate=args.min_rate,
                        connect_timeout=args.connect_timeout,
                        upstream_timeout=args.upstream_timeout, drain_timeout=args.drain_timeout,
                        max_connections=args.max_connections, pool_size=args.pool_size,
                        max_request_line=args.max_request_line,
                        max_header_bytes=args.max_header_bytes, max_headers=args.max_headers)
        host = make_host(args)
    except (ValueError, UsageError) as exc:
        print(f"hostscript serve: {exc}", file=sys.stderr)
        return 2
    try:
        for path in args.script:
            host.load_file(path)
    except ScriptError as exc:
        print(f"hostscript serve: {exc}", file=sys.stderr)
        host.close()
        return 1
    try:
        proxy = Proxy(host, args.upstream, args.listen, threads=args.threads, limits=limits,
                      cache_size=args.cache_size, access_log=args.access_log, admin=args.admin)
        proxy.start()
    except (ValueError, OSError) as exc:
        print(f"hostscript serve: {exc}", file=sys.stderr)
        host.close()
        return 2

    watcher = None
    if args.watch:
        logging.getLogger("watchfiles").setLevel(logging.WARNING)  # its "N changes detected"
        try:
            watcher = host.watch(args.script)
        except UsageError as exc:
            print(f"hostscript serve: {exc}", file=sys.stderr)
            proxy.shutdown()
            host.close()
            return 2

    wake = threading.Event()
    pending: List[int] = []

    def on_signal(signum: int, frame: object) -> None:
        pending.append(signum)
        wake.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    hostport = "%s:%d" % proxy.address
    log.info("hostscript serve: listening on http://%s -> %s; %s engine, scripts %s "
             "(hooks: %s); %d workers; cache %s; admin %s", hostport, proxy.origin.base,
             host.engine, ", ".join(host.scripts), ", ".join(sorted(host.handled_hooks)) or "none",
             proxy.threads, f"{args.cache_size} bytes" if proxy.cache is not None else "off",
             "http://%s:%d/-/stats" % proxy.admin_address if proxy.admin_address else "off")
    stop: Optional[int] = None
    while stop is None:
        wake.wait(1.0)
        wake.clear()
        while pending:
            sig = pending.pop(0)
            if sig == signal.SIGHUP:
                files = [n for n in host.scripts if "#" not in n]  # not the classes they register
                log.info("SIGHUP: reloading %d script(s)", len(files))
                reload_scripts(host, files)
            else:
                stop = sig
    log.info("%s: stopping; requests in flight have %g s to finish",
             signal.Signals(stop).name, limits.drain_timeout)
    if watcher is not None:
        watcher.stop()
    drained = proxy.shutdown()
    host.close(timeout=1.0)
    log.info("stopped%s", "" if drained else " (some requests were cut short)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="hostscript serve")
    add_arguments(ap)
    return run(ap.parse_args(argv))
