"""The admin listener: ``GET /-/stats`` answers the host's and the proxy's counters
as JSON, ``GET /metrics`` the same in the Prometheus text format (with
prometheus-client installed), on its own address and thread (``http.server``: it
serves operators, not traffic)."""
from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Dict, Tuple

if TYPE_CHECKING:
    from .server import Proxy

log = logging.getLogger("hostscript.proxy")


def stats_document(proxy: "Proxy") -> Dict[str, Any]:
    try:
        host = proxy.host.stats()
    except Exception as exc:  # the host closed under us
        host = {"error": str(exc)}
    return {"host": host, "proxy": proxy.stats()}


def metrics_document(proxy: "Proxy") -> bytes:
    """The host's and the proxy's counters in the Prometheus text format (0.0.4)."""
    from .. import metrics
    return metrics.exposition(metrics.HostCollector(proxy.host, "default"),
                              metrics.ProxyCollector(proxy, "default"))


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._metrics()
            return
        if path != "/-/stats":
            self._answer(404, {"error": "not found; try GET /-/stats or GET /metrics"})
            return
        self._answer(200, stats_document(self.server.proxy))

    def _metrics(self) -> None:
        from .. import metrics
        try:
            body = metrics_document(self.server.proxy)
        except metrics.MetricsUnavailable as exc:
            self._answer(501, {"error": str(exc)})
            return
        self.send_response(200)
        self.send_header("Content-Type", metrics.CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _answer(self, status: int, doc: Dict[str, Any]) -> None:
        body = json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("admin: %s", format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: "Proxy"


class AdminServer:
    def __init__(self, address: Tuple[str, int], proxy: "Proxy") -> None:
        self._server = _Server(address, _Handler)
        self._server.proxy = proxy
        self.address: Tuple[str, int] = self._server.server_address[:2]  # type: ignore[assignment]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="proxy-admin", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(2)
