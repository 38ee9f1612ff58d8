"""``hostscript demo`` — what ``make run`` shows: the reference proxy caching by the
``Key`` header.

It starts a small origin on loopback whose content varies with the request header
``abc`` and which answers with ``Key: abc;match=bennet`` (the response depends only
on whether ``abc`` lists ``bennet``) and ``Cache-Control: max-age=60``; starts the
proxy in front of it with ``examples/key_header.lua`` and ``examples/headers.lua``;
sends a scripted sequence of requests over one keep-alive connection; prints one
line per request with its cache status; prints the host's and the proxy's counters.
Exits 1 when a cache status differs from the expected one.
"""
from __future__ import annotations

import http.client
import http.server
import json
import logging
import os
import threading
from typing import Optional, Sequence, Tuple

from . import Host, engines
from .proxy import Proxy

HOOKS = ("read_request", "send_request", "read_response", "send_response", "log")
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
SCRIPTS = ("key_header.lua", "headers.lua")

# (value of the abc request header, the cache status expected)
SEQUENCE: Sequence[Tuple[Optional[str], str]] = (
    ("bennet", "MISS"),       # first request: the Key is learnt, the response stored
    ("bennet", "HIT"),
    ("foo, bennet", "HIT"),   # match=bennet: a list holding bennet is the same key
    ("theodore", "MISS"),     # another secondary key: its own cache entry
    ("theodore", "HIT"),
    ("Bennet", "HIT"),        # match is case-sensitive: "Bennet" reduces like theodore
    (None, "MISS"),           # no abc at all: "none"
    (None, "HIT"),
)


class _Origin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hits = 0

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        type(self).hits += 1
        abc = self.headers.get("abc")
        body = f"content for abc={abc!r} (origin request #{type(self).hits})\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=60")
        self.send_header("Key", "abc;match=bennet")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def run(engine_names: Optional[Sequence[str]] = None, examples: str = EXAMPLES) -> int:
    logging.basicConfig(level=logging.WARNING, format="  %(levelname)s %(name)s: %(message)s")
    failures = 0
    for engine in engine_names or engines():
        failures += _run_one(engine, examples)
    print("ok: every cache status as expected" if not failures else f"{failures} unexpected")
    return 1 if failures else 0


def _run_one(engine: str, examples: str) -> int:
    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
    origin.daemon_threads = True
    threading.Thread(target=origin.serve_forever, name="origin", daemon=True).start()
    upstream = f"http://127.0.0.1:{origin.server_address[1]}"
    failures = 0
    try:
        with Host(HOOKS, engine=engine, shared={"meta": 1 << 20}, time_limit=0.05,
                  memory_limit=32 << 20) as host:
            for name in SCRIPTS:
                host.load_file(os.path.relpath(os.path.join(examples, name)))
            with Proxy(host, upstream=upstream, listen=("127.0.0.1", 0), threads=4) as proxy:
                addr = proxy.address
                print(f"== engine {engine}: proxy on http://{addr[0]}:{addr[1]} -> origin {upstream}, "
                      f"scripts: {', '.join(host.scripts)}")
                conn = http.client.HTTPConnection(addr[0], addr[1], timeout=10)
                for abc, expected in SEQUENCE:
                    headers = {"abc": abc} if abc is not None else {}
                    conn.request("GET", "/article", headers=headers)
                    resp = conn.getresponse()
                    body = resp.read().decode().strip()
                    got = resp.getheader("X-Cache", "?")
                    mark = "" if got == expected else f"   <-- expected {expected}"
                    failures += got != expected
                    shown = f"abc: {abc}" if abc is not None else "(no abc)"
                    print(f"  GET /article  {shown:<18} -> {resp.status} X-Cache: {got:<4} "
                          f"Age: {resp.getheader('Age', '-'):<2} {body}{mark}")
                conn.close()
                stats = proxy.stats()
            hs = host.stats()
            hooks = ", ".join(f"{k}={v['fires']}" for k, v in hs.pop("hooks").items())
            print(f"  host: fires={hs['fires']} errors={hs['errors']} states={hs['states']} "
                  f"rehydrations={hs['rehydrations']} heap_bytes={hs['heap_bytes']}")
            print(f"  fires per hook: {hooks}")
            if "shared" in hs:
                print(f"  shared: {json.dumps(hs['shared'])}")
            print(f"  proxy: {json.dumps(stats, default=str)}")
            print(f"  origin saw {_Origin.hits} requests")
    finally:
        origin.shutdown()
        origin.server_close()
        _Origin.hits = 0
    return failures

