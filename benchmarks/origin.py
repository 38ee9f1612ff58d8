"""The origin of the proxy rows (proxy_wrk.py): a fast HTTP/1.1 server that must not
be what bounds the measurement.

One process, one asyncio event loop, httptools (llhttp) parsing, keep-alive, and
responses built once: a fixed body of BODY_SIZE bytes, only the ``Date`` header is
refreshed (once a second). The path decides caching:

    /hit/...    Cache-Control: max-age=3600, Key: abc;match=bennet
    /miss/...   Cache-Control: no-store
    anything    Cache-Control: no-store (as /miss/)

Run it on its own (``python benchmarks/origin.py --listen 127.0.0.1:0``): it prints
``listening on HOST:PORT`` on stdout once it accepts connections, serves until
SIGTERM or SIGINT, then prints how many requests it answered.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
import time
from email.utils import formatdate
from typing import Dict, Optional

import httptools

BODY_SIZE = 1024
BODY = (b"hostscript proxy benchmark origin. " * 40)[:BODY_SIZE]

_KINDS = {
    "hit": [("Cache-Control", "max-age=3600"), ("Key", "abc;match=bennet")],
    "miss": [("Cache-Control", "no-store")],
}


def _response(kind: str, date: str, keep_alive: bool, head: bool) -> bytes:
    lines = ["HTTP/1.1 200 OK", "Content-Type: text/plain", f"Content-Length: {BODY_SIZE}",
             f"Date: {date}", "Server: bench-origin"]
    lines += [f"{n}: {v}" for n, v in _KINDS[kind]]
    if not keep_alive:
        lines.append("Connection: close")
    out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return out if head else out + BODY


class Responses:
    """Every response the origin sends, rebuilt when the second changes (Date)."""

    def __init__(self) -> None:
        self.second = -1
        self.table: Dict[tuple, bytes] = {}
        self.count = 0

    def get(self, kind: str, keep_alive: bool, head: bool) -> bytes:
        now = int(time.time())
        if now != self.second:
            date = formatdate(now, usegmt=True)
            self.table = {(k, ka, hd): _response(k, date, ka, hd)
                          for k in _KINDS for ka in (True, False) for hd in (True, False)}
            self.second = now
        self.count += 1
        return self.table[(kind, keep_alive, head)]


class OriginProtocol(asyncio.Protocol):
    """One connection: llhttp parses, each complete request is answered at once
    (pipelined requests in order)."""

    def __init__(self, responses: Responses) -> None:
        self.responses = responses
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Optional[asyncio.Transport] = None
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        kind = "hit" if self.url.startswith(b"/hit/") else "miss"
        self.url = b""
        p = self.parser
        keep_alive = p.should_keep_alive()
        assert self.transport is not None
        self.transport.write(self.responses.get(kind, keep_alive, p.get_method() == b"HEAD"))
        if not keep_alive:
            self.transport.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    responses = Responses()
    server = await loop.create_server(lambda: OriginProtocol(responses), host, port,
                                      backlog=1024, reuse_address=True)
    addr = server.sockets[0].getsockname()
    print(f"listening on {addr[0]}:{addr[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    print(f"served {responses.count} requests", flush=True)


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="origin.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    args = ap.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    asyncio.run(serve(host or "127.0.0.1", int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
