"""A WSGI application behind hostscript's middleware, served by waitress.

    .venv/bin/python examples/wsgi_demo.py [PORT]
    curl -si http://127.0.0.1:8080/hello                 # x-elapsed-ms added by send_response
    curl -si -H 'x-deny: 1' http://127.0.0.1:8080/hello  # 403 from read_request; the app is not called

The handlers are examples/stamp.lua (docs/wsgi.md).
"""
from __future__ import annotations

import logging
import os
import sys

from hostscript.wsgi import Middleware

HERE = os.path.dirname(os.path.abspath(__file__))


def hello(environ, start_response):
    body = f"hello from {environ['PATH_INFO']}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def main() -> None:
    import waitress

    logging.basicConfig(level=logging.INFO)
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    with Middleware(hello, [os.path.join(HERE, "stamp.lua")]) as app:
        waitress.serve(app, host="127.0.0.1", port=port, threads=8)


if __name__ == "__main__":
    main()
