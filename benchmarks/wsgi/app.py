"""The WSGI application of the W rows (benchmarks/wsgi_servers.py): ``plain``;
``wrapped`` — the same application behind hostscript's middleware with a three-hook
script (benchmarks/wsgi/three_hooks.lua); and ``python`` — behind a plain Python
middleware doing the same three things, as a competent user would write it."""
from __future__ import annotations

import os

from hostscript.wsgi import Middleware

BODY = b"x" * 1024
HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]


def plain(environ, start_response):
    start_response("200 OK", list(HEADERS))
    return [BODY]


wrapped = Middleware(plain, [os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                          "three_hooks.lua")])


class SameInPython:
    """The three hooks' work in Python: a request header from the user agent, a
    response header, the status noted once the response is closed."""

    def __init__(self, app):
        self.app = app
        self.logged = None

    def __call__(self, environ, start_response):
        ua = environ.get("HTTP_USER_AGENT")
        environ["HTTP_X_CLIENT"] = ua[:16] if ua else "none"
        status_seen = []

        def start(status, headers, exc_info=None):
            status_seen.append(status)
            return start_response(status, headers + [("x-served-by", "hostscript")], exc_info)

        body = self.app(environ, start)
        try:
            yield from body
        finally:
            if hasattr(body, "close"):
                body.close()
            self.logged = status_seen[0] if status_seen else None


python = SameInPython(plain)
