"""A small threaded HTTP/1.1 origin for the proxy tests (http.server, keep-alive).

Every response echoes the request the origin got, as JSON — method, path, headers,
body — unless asked otherwise by the query string:

    cc=VALUE       Cache-Control: VALUE
    vary=NAME      Vary: NAME (and the body carries that request header's value)
    chunked=1      a chunked response body
    nolength=1     no Content-Length: the body ends with the connection
    size=N         a body of N bytes instead of the echo
    delay=S        sleep S seconds before answering
    slowbody=S     send the head, sleep S seconds, then the body
    status=N       that status
    hdr=NAME:VAL   one more response header (repeatable)
    cookie=1       Set-Cookie
"""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Tuple
from urllib.parse import parse_qs, urlsplit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # the head and the body are two writes
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        body = self._read_body()
        parts = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        extra = parse_qs(parts.query).get("hdr", [])
        req = {"method": self.command, "path": self.path, "version": self.request_version,
               "headers": [[k, v] for k, v in self.headers.items()],
               "body": body.decode("latin-1")}
        with self.server.lock:
            self.server.requests.append(req)
            self.server.counts[self.path] = self.server.counts.get(self.path, 0) + 1
            req["n"] = self.server.counts[self.path]
        if "delay" in q:
            time.sleep(float(q["delay"]))
        if "vary" in q:
            req["varied"] = self.headers.get(q["vary"], "")
        payload = (b"x" * int(q["size"]) if "size" in q
                   else json.dumps(req).encode())
        status = int(q.get("status", 200))
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if "size" not in q else "text/plain")
        if "cc" in q:
            self.send_header("Cache-Control", q["cc"])
        if "vary" in q:
            self.send_header("Vary", q["vary"])
        if "cookie" in q:
            self.send_header("Set-Cookie", "a=b")
        for h in extra:
            name, _, value = h.partition(":")
            self.send_header(name, value)
        no_body = self.command == "HEAD" or status in (204, 304)
        if q.get("chunked"):
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if not no_body:
                for i in range(0, len(payload), 1000):
                    piece = payload[i:i + 1000]
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
            return
        if q.get("nolength"):
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if "slowbody" in q:
            self.wfile.flush()
            time.sleep(float(q["slowbody"]))
        if not no_body:
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the proxy hung up (timeouts under test): not the origin's failure
    lock: threading.Lock
    requests: List[Dict[str, Any]]
    counts: Dict[str, int]


class Origin:
    """The origin, started on a free loopback port: ``url``, ``requests`` (what it
    received, in order), ``count(path)``."""

    def __init__(self, port: int = 0) -> None:
        self.server = _Server(("127.0.0.1", port), _Handler)
        self.server.lock = threading.Lock()
        self.server.requests = []
        self.server.counts = {}
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def requests(self) -> List[Dict[str, Any]]:
        with self.server.lock:
            return list(self.server.requests)

    def last(self) -> Dict[str, Any]:
        return self.requests[-1]

    def count(self, path: str) -> int:
        with self.server.lock:
            return self.server.counts.get(path, 0)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    """A loopback port nothing listens on (for an upstream that refuses)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def header(req: Dict[str, Any], name: str) -> List[str]:
    """The values of request header *name* the origin received."""
    return [v for k, v in req["headers"] if k.lower() == name.lower()]


Pairs = List[Tuple[str, str]]
