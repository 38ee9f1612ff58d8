"""The WSGI application of the W rows (benchmarks/wsgi_servers.py): ``plain``, and
``wrapped`` — the same application behind hostscript's middleware with a three-hook
script (benchmarks/wsgi/three_hooks.lua)."""
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
