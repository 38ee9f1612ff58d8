"""``hostscript serve``: a threaded caching HTTP/1.1 reverse proxy that fires a
Host's hooks for every request (docs/serve.md).

    from hostscript.proxy import Proxy
    with Proxy(host, upstream="http://127.0.0.1:9000", listen="127.0.0.1:8080") as p:
        ...
"""
from .config import Limits
from .server import Proxy, default_threads

__all__ = ["Limits", "Proxy", "default_threads"]
