"""R3: a real threaded server. ``http.server.ThreadingHTTPServer`` on 127.0.0.1 (an
ephemeral port, in this process), one thread per connection, with and without hooks.

The handler is the same for every server: it passes the request line and headers to
a contestant's ``serve`` (build the request, fire read_request, send_response, log,
read the response headers back — exactly R1's per-request work) and answers 200 with
the headers serve returned; the server without hostscript passes them to
``contestants.no_hooks``. The client, in this process too, opens CONNECTIONS
connections from a few threads, one request each (``Connection: close``), over raw
sockets (cheaper than http.client, so the client's share of the GIL stays small),
and checks every answer is a 200.
"""
from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Type

from .contestants import Serve
from .workloads import METHOD, REQUEST_HEADERS, URI

CLIENT_THREADS = 4
BODY = b"ok\n"
REQUEST = (f"{METHOD} {URI} HTTP/1.1\r\n"
           + "".join(f"{name}: {'close' if name == 'Connection' else value}\r\n"
                     for name, value in REQUEST_HEADERS)
           + "\r\n").encode("latin-1")


class BenchServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the client's threads connect at once; 5 (the default) drops SYNs


def handler_class(serve: Serve) -> Type[BaseHTTPRequestHandler]:
    """A request handler answering every GET through SERVE."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            response_headers = serve(self.command, self.path, self.headers.items())
            self.send_response(200)
            for name, value in response_headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)

        def log_message(self, format: str, *args: object) -> None:
            pass  # no access log on stderr, for every server alike

    return Handler


class RunningServer:
    """A BenchServer answering through SERVE on its own thread until close()."""

    def __init__(self, serve: Serve) -> None:
        self.server = BenchServer(("127.0.0.1", 0), handler_class(serve))
        self.address = self.server.server_address[:2]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="bench-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fetch(address: tuple) -> bytes:
    """One connection, one request, the whole answer (the server closes)."""
    with socket.create_connection(address) as sock:
        sock.sendall(REQUEST)
        chunks: List[bytes] = []
        while True:
            data = sock.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def requests_per_second(address: tuple, connections: int) -> float:
    """Open CONNECTIONS connections from CLIENT_THREADS threads; requests per second
    over the lot. Raises when an answer is not a 200."""
    tickets = iter(range(connections))
    lock = threading.Lock()
    failures: List[str] = []

    def client() -> None:
        while True:
            with lock:
                if next(tickets, None) is None:
                    return
            try:
                answer = fetch(address)
            except OSError as exc:
                failures.append(repr(exc))
                return
            if not answer.startswith(b"HTTP/1.0 200"):
                failures.append(answer[:200].decode("latin-1"))
                return

    threads = [threading.Thread(target=client, name=f"bench-client-{i}") for i in range(CLIENT_THREADS)]
    t0 = time.perf_counter_ns()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter_ns() - t0
    if failures:
        raise RuntimeError(f"HTTP benchmark: {len(failures)} failed connections, first: {failures[0]}")
    return connections / (took / 1e9)


def response_headers(address: tuple) -> dict:
    """The headers of one answer, lower-cased names (to check that the hooks ran)."""
    head = fetch(address).split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in head)}

