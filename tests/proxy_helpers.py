"""Fixtures and clients for the proxy tests: a real origin, a real Proxy on
loopback sockets, and a small raw HTTP/1.1 response reader independent of the
proxy's parser."""
from __future__ import annotations

import http.client
import json
import logging
import dataclasses
import socket
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from hostscript.proxy import Limits, Proxy
from origin import Origin

# short timeouts: the failure tests wait for them
FAST = Limits(head_timeout=1.0, idle_timeout=5.0, body_timeout=1.0, send_timeout=5.0,
              connect_timeout=1.0, upstream_timeout=0.6, drain_timeout=3.0)


def fast(**changes: Any) -> Limits:
    """FAST with CHANGES."""
    return dataclasses.replace(FAST, **changes)


def read_to_close(sock: socket.socket) -> bytes:
    """Everything SOCK receives until the peer closes (or resets) it."""
    data = b""
    try:
        while True:
            got = sock.recv(65536)
            if not got:
                break
            data += got
    except OSError:
        pass
    return data

LOG_SCRIPT = """
local L = {}
function L:on_log(txn)
  hs.log.info("LOG " .. tostring(txn.resp.status) .. " " .. txn.req.method .. " " .. txn.req.uri)
end
return L
"""


@pytest.fixture
def origin():
    o = Origin()
    yield o
    o.close()


@pytest.fixture
def start_proxy(make_host, origin):
    """start_proxy(*scripts, upstream=origin.url, limits=FAST, threads=4, **proxy_kw)
    -> Proxy (started; .host is its Host), shut down after the test."""
    proxies: List[Proxy] = []

    def start(*scripts: str, upstream: Optional[str] = None, limits: Limits = FAST,
              threads: int = 4, host_kw: Optional[Dict[str, Any]] = None, **kw: Any) -> Proxy:
        host = make_host(**(host_kw or {}))
        for i, src in enumerate(scripts):
            host.load(src, name=f"script{i}.lua")
        p = Proxy(host, upstream or origin.url, "127.0.0.1:0", threads=threads, limits=limits, **kw)
        proxies.append(p)
        return p.start()

    yield start
    for p in proxies:
        p.shutdown(timeout=2)


@pytest.fixture
def log_lines(caplog):
    """log_lines() -> the messages the LOG_SCRIPT's on_log wrote, in order."""
    caplog.set_level(logging.INFO, logger="hostscript")

    def get() -> List[str]:
        return [r.getMessage().split("] ", 1)[1] for r in list(caplog.records)
                if r.name == "hostscript" and "] LOG " in r.getMessage()]

    return get


class Reply:
    def __init__(self, status: int, headers: List[Tuple[str, str]], body: bytes, version: str) -> None:
        self.status, self.headers, self.body, self.version = status, headers, body, version

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return default

    def all(self, name: str) -> List[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Dict[str, Any]:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.headers}, {self.body[:200]!r})"


def request(proxy: Proxy, method: str = "GET", path: str = "/", headers: Optional[Dict[str, str]] = None,
            body: Optional[bytes] = None, conn: Optional[http.client.HTTPConnection] = None,
            timeout: float = 10) -> Reply:
    """One request with http.client (on *conn* when given: keep-alive)."""
    c = conn or http.client.HTTPConnection(*proxy.address, timeout=timeout)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    out = Reply(r.status, r.getheaders(), data, f"{r.version // 10}.{r.version % 10}")
    if conn is None:
        c.close()
    return out


class Raw:
    """A raw client socket and a reader of the responses on it (by Content-Length,
    chunked, or to the close), independent of the proxy's parser."""

    def __init__(self, proxy: Proxy, timeout: float = 10) -> None:
        self.sock = socket.create_connection(proxy.address, timeout=timeout)
        self.f = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, head_only: bool = False) -> Reply:
        line = self.f.readline()
        if not line:
            raise ConnectionError("closed before a response")
        version, status, *_ = line.decode("latin-1").split(" ", 2)
        headers: List[Tuple[str, str]] = []
        while True:
            line = self.f.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers.append((k.strip(), v.strip()))
        reply = Reply(int(status), headers, b"", version)
        te, cl = reply.get("Transfer-Encoding"), reply.get("Content-Length")
        if head_only or int(status) in (204, 304) or 100 <= int(status) < 200:
            return reply
        if te and "chunked" in te.lower():
            body = bytearray()
            while True:
                size = int(self.f.readline().split(b";")[0], 16)
                if size == 0:
                    self.f.readline()
                    break
                body += self.f.read(size)
                self.f.readline()
            reply.body = bytes(body)
        elif cl is not None:
            reply.body = self.f.read(int(cl))
        else:
            reply.body = self.f.read()
        return reply

    def closed(self, timeout: float = 3) -> bool:
        """The proxy closed the connection (EOF within *timeout*)."""
        self.sock.settimeout(timeout)
        try:
            return self.f.read(1) == b""
        except ConnectionResetError:  # closed with our bytes unread: the kernel resets
            return True
        except (socket.timeout, OSError):
            return False

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def hook_fires(proxy: Proxy) -> Dict[str, int]:
    return {k: v["fires"] for k, v in proxy.host.stats()["hooks"].items()}


Waiter = Callable[[], Any]
