"""``hostscript demo`` — what ``make run`` shows: the reference proxy caching by the
``Key`` header.

It starts a small origin on loopback whose content varies with the request header
``abc`` and which answers with ``Key: abc;match=bennet`` (the response depends only
on whether ``abc`` lists ``bennet``) and ``Cache-Control: max-age=60``; starts the
proxy in front of it with ``examples/key_header.lua`` and ``examples/headers.lua``;
sends a scripted sequence of requests over one keep-alive connection; prints one
line per request with its cache status.

Then it loads ``examples/event_system.lua`` into the running proxy's host and shows
a class registered from a handler (``hs.register``, docs/register.md) on ``/events``
(not cached): a request before the trigger gets no ``x-on_*`` header; the trigger
(``x-event-system: on``) registers the class; then four requests at once, each on
a connection of its own and held by the origin until all four have arrived (so
each is served by another of the proxy's four threads), all get the three headers
(``x-on_send_request`` as the origin received it, echoed back by the origin).
Last come the host's and the proxy's counters. Exits 1 when a cache status or an
``x-on_*`` header differs from the expected one.
"""
from __future__ import annotations

import http.client
import http.server
import json
import logging
import os
import threading
from typing import Dict, List, Optional, Sequence, Tuple

from . import Host, engines
from .proxy import Proxy

HOOKS = ("read_request", "send_request", "read_response", "send_response", "log")
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
SCRIPTS = ("key_header.lua", "headers.lua")
EVENT_SCRIPT = "event_system.lua"
EVENT_HOOKS = ("send_request", "read_response", "send_response")  # x-on_<hook>
AT_ONCE = 4  # the requests held together after the trigger: the proxy's threads

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

    event_hits = 0
    held = threading.Barrier(AT_ONCE)  # /events?together: answered once AT_ONCE are in
    apart = 0  # /events?together requests that waited in vain for the others

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.startswith("/events"):
            return self._events()
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

    def _events(self) -> None:
        """Not cached; echoes the x-on_send_request the proxy sent as x-origin-got."""
        type(self).event_hits += 1
        if self.path.endswith("?together"):
            try:
                type(self).held.wait(timeout=5)
            except threading.BrokenBarrierError:  # not all arrived together
                type(self).apart += 1
        body = b"events\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Origin-Got", self.headers.get("x-on_send_request", "-"))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def run(engine_names: Optional[Sequence[str]] = None, examples: str = EXAMPLES) -> int:
    logging.basicConfig(level=logging.WARNING, format="  %(levelname)s %(name)s: %(message)s")
    failures = 0
    for engine in engine_names or engines():
        failures += _run_one(engine, examples)
    print("ok: every cache status and x-on_* header as expected" if not failures
          else f"{failures} unexpected")
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
                print(f"  origin saw {_Origin.hits} requests for /article")
                failures += _events(host, addr, examples)
                stats = proxy.stats()
            hs = host.stats()
            hooks = ", ".join(f"{k}={v['fires']}" for k, v in hs.pop("hooks").items())
            print(f"  host: fires={hs['fires']} errors={hs['errors']} states={hs['states']} "
                  f"rehydrations={hs['rehydrations']} heap_bytes={hs['heap_bytes']} "
                  f"registered={hs['registered']} registrations={hs['registrations']}")
            print(f"  fires per hook: {hooks}")
            if "shared" in hs:
                print(f"  shared: {json.dumps(hs['shared'])}")
            print(f"  proxy: {json.dumps(stats, default=str)}")
            print(f"  origin saw {_Origin.hits} requests for /article, {_Origin.event_hits} for /events")
    finally:
        origin.shutdown()
        origin.server_close()
        _Origin.hits = _Origin.event_hits = _Origin.apart = 0
        _Origin.held.reset()
    return failures


def _events(host: Host, addr: Tuple[str, int], examples: str) -> int:
    """The event_system.lua step: the x-on_* headers before the trigger, on the
    trigger, and on AT_ONCE requests served together after it; the failures."""
    host.load_file(os.path.relpath(os.path.join(examples, EVENT_SCRIPT)))
    print(f"-- {EVENT_SCRIPT} loaded too: `x-event-system: on` registers its class handling "
          f"{', '.join(EVENT_HOOKS)}")
    print("   (columns: x-on_send_request as the origin got it, x-on_read_response and "
          "x-on_send_response as the client got them)")
    failures = 0

    def show(label: str, path: str, headers: Dict[str, str], expect: bool,
             got: Optional[Tuple[int, Dict[str, str]]] = None) -> None:
        nonlocal failures
        status, seen = got or _get(addr, path, headers)
        ok = status == 200 and all((seen[h] != "-") == expect for h in EVENT_HOOKS)
        failures += not ok
        mark = "" if ok else f"   <-- expected {'all three' if expect else 'none'}"
        cols = "  ".join(f"{h}: {seen[h]:<10}" for h in EVENT_HOOKS)
        print(f"  GET /events  {label:<22} -> {status}  {cols}{mark}".rstrip())

    show("(no x-event-system)", "/events", {}, expect=False)
    # its read_request registers the class; the hooks this request fires next (the
    # proxy fires them: the Key and headers examples handle them) already run it
    show("x-event-system: on", "/events", {"x-event-system": "on"}, expect=True)
    print(f"  scripts now: {', '.join(host.scripts)}")
    print(f"  {AT_ONCE} requests at once, each on a connection of its own, held by the origin "
          f"until all {AT_ONCE} are in (so on {AT_ONCE} proxy threads, {AT_ONCE - 1} at least "
          f"not the trigger's):")
    results: List[Optional[Tuple[int, Dict[str, str]]]] = [None] * AT_ONCE

    def one(i: int) -> None:
        try:
            results[i] = _get(addr, "/events?together", {})
        except OSError as exc:
            print(f"  request {i} failed: {exc}")

    workers = [threading.Thread(target=one, args=(i,)) for i in range(AT_ONCE)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(15)
    for got in results:
        if got is None:
            failures += 1
            continue
        show("(no x-event-system)", "/events", {}, expect=True, got=got)
    if _Origin.apart:
        failures += 1
        print(f"  the origin did not get the {AT_ONCE} requests together   <-- expected at once")
    return failures


def _get(addr: Tuple[str, int], path: str, headers: Dict[str, str]) -> Tuple[int, Dict[str, str]]:
    """GET PATH on a new connection: the status and the x-on_* values by hook
    (x-on_send_request as the origin echoed it), "-" for an absent one."""
    conn = http.client.HTTPConnection(addr[0], addr[1], timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        resp.read()
        seen = {"send_request": resp.getheader("X-Origin-Got", "-"),
                "read_response": resp.getheader("x-on_read_response", "-"),
                "send_response": resp.getheader("x-on_send_response", "-")}
        return resp.status, seen
    finally:
        conn.close()

