"""The proxy's limits and timeouts: one frozen dataclass, documented in docs/serve.md."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Size limits (bytes) and timeouts (seconds) of ``hostscript serve``.

    The defaults are what the command line uses; tests pass short timeouts."""

    max_request_line: int = 8 << 10      # request target longer -> 414
    max_header_bytes: int = 64 << 10     # request header block larger -> 431
    max_headers: int = 100               # more request header fields -> 431
    max_body: int = 16 << 20             # request body larger -> 413
    head_timeout: float = 10.0           # a request head not complete this long after its first byte -> 408
    idle_timeout: float = 30.0           # a keep-alive connection idle this long -> closed
    body_timeout: float = 30.0           # no request body byte for this long -> 408 (or closed)
    send_timeout: float = 30.0           # the client accepts no byte for this long -> closed
    min_rate: int = 1024                 # bytes/s a client must keep to, on average, sending a
                                         # request body or reading a response, beyond a grace of
                                         # body_timeout / send_timeout: a trickle that never lets
                                         # a single timeout pass cannot hold a worker for hours
    connect_timeout: float = 5.0         # connecting to the upstream -> 504
    upstream_timeout: float = 30.0       # no byte from the upstream for this long -> 504 (or closed)
    pool_size: int = 32                  # idle upstream connections kept
    pool_idle_timeout: float = 30.0      # a pooled connection idle longer is closed, not reused
    max_connections: int = 4096          # client connections open at once (accepting pauses beyond)
    drain_timeout: float = 10.0          # shutdown waits this long for requests in flight

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not value > 0:
                raise ValueError(f"Limits.{name} must be positive, not {value!r}")
