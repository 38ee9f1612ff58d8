"""A real redis-server for the tests, and a tiny RESP client to look at it from the
outside (no redis-py): what the tests read and write behind the host's back.

    srv = RedisServer().start()
    srv.cmd("SET", "k", "v")        # -> b"OK"
    srv.url(prefix="t:", timeout=0.2)
    srv.kill(); srv.start()         # the same port again
    srv.pause(); srv.resume()       # SIGSTOP / SIGCONT
    srv.stop()
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any, Union
from urllib.parse import quote

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

Reply = Union[None, int, bytes, list[Any], "RedisReplyError"]


class RedisReplyError(Exception):
    """An error reply (-ERR ...) of the server; str() is its message."""


def encode_command(*args: Any) -> bytes:
    """ARGS as a RESP array of bulk strings (str as UTF-8, numbers in decimal)."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, (int, float)) and not isinstance(a, bool):
            a = str(a).encode()
        elif not isinstance(a, (bytes, bytearray)):
            raise TypeError(f"a Redis argument must be str, bytes or a number, not {type(a).__name__}")
        parts.append(b"$%d\r\n%s\r\n" % (len(a), bytes(a)))
    return b"".join(parts)


class _Reader:
    """Parses RESP2 replies off a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        self.buf += chunk

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def reply(self) -> Reply:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RedisReplyError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise ValueError(f"not a RESP2 reply: {line[:80]!r}")


class RedisServer:
    """A redis-server on a free loopback port, in a temp dir of its own, no
    persistence. ``password``, once set (after CONFIG SET requirepass), is sent by
    the raw client with AUTH."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="hs-redis-")
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.password: str | None = None
        self._log = None

    # ---- lifetime ----

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server (again on the same port after kill/stop) and wait for PING."""
        assert self.proc is None, "already running"
        tries = 1 if self.port else 5  # a free port may be taken before we bind it
        self.password = None  # a new server: no requirepass
        for _ in range(tries):
            port = self.port or _free_port()
            self._spawn(port)
            if self._wait_ready(timeout):
                return self
            self._reap()
            if tries > 1:
                self.port = None
        raise RuntimeError(f"redis-server did not start on port {port}: {self.log()[-2000:]}")

    def _spawn(self, port: int) -> None:
        if self._log:
            self._log.close()
        self._log = open(os.path.join(self.dir, "redis.log"), "ab")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--daemonize", "no",
             "--protected-mode", "no"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.port = port

    def _wait_ready(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                return False
            try:
                if self.cmd("PING", timeout=0.5) == b"PONG":
                    return True
            except (OSError, ConnectionError, RedisReplyError):
                pass
            time.sleep(0.01)
        return False

    def _reap(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGCONT)  # a paused one too
                self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL the server and wait for it: its port refuses connections until start()."""
        assert self.proc is not None, "not running"
        self._reap()

    def stop(self) -> None:
        """Stop it for good and remove its directory. Idempotent."""
        self._reap()
        if self._log:
            self._log.close()
            self._log = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but nothing answers."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log"), "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    # ---- addressing ----

    def url(self, prefix: str | None = None, db: int = 0, password: str | None = None,
            user: str | None = None, **opts: Any) -> str:
        """redis://[[user]:password@]127.0.0.1:PORT/DB[?prefix=P&OPT=V...]; options
        in the order given (timeout=0.2, connect_timeout=0.2, max_reply=...)."""
        auth = ""
        if password is not None:
            auth = f"{quote(user or '', safe='')}:{quote(password, safe='')}@"
        query = []
        if prefix is not None:
            query.append(f"prefix={prefix}")
        query += [f"{k}={v}" for k, v in opts.items()]
        return f"redis://{auth}127.0.0.1:{self.port}/{db}" + ("?" + "&".join(query) if query else "")

    # ---- the raw client ----

    def cmd(self, *args: Any, db: int = 0, timeout: float = 5.0) -> Reply:
        """Send one command on a new connection; its reply (bytes, int, None, list).
        An error reply is raised as RedisReplyError."""
        replies = self.pipeline([args], db=db, timeout=timeout)
        if isinstance(replies[0], RedisReplyError):
            raise replies[0]
        return replies[0]

    def pipeline(self, commands: list[Any], db: int = 0, timeout: float = 5.0) -> list[Reply]:
        """Send COMMANDS (each a tuple of arguments) at once on a new connection;
        their replies, error replies as RedisReplyError objects (not raised)."""
        pre = []
        if self.password is not None:
            pre.append(("AUTH", self.password))
        if db:
            pre.append(("SELECT", db))
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(b"".join(encode_command(*c) for c in pre + list(commands)))
            reader = _Reader(s)
            for _ in pre:
                r = reader.reply()
                if isinstance(r, RedisReplyError):
                    raise r
            return [reader.reply() for _ in commands]

    def scan_keys(self, pattern: bytes = b"*", db: int = 0) -> list[bytes]:
        """Every key matching the glob PATTERN (SCAN), sorted."""
        out, cursor = [], b"0"
        while True:
            cursor, batch = self.cmd("SCAN", cursor, "MATCH", pattern, "COUNT", 1000, db=db)
            out += batch
            if cursor == b"0":
                return sorted(set(out))

    def used_memory(self) -> int:
        info = self.cmd("INFO", "memory").decode()
        for line in info.splitlines():
            if line.startswith("used_memory:"):
                return int(line.split(":")[1])
        raise AssertionError("no used_memory in INFO")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
