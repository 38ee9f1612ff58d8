"""Transaction: one request's method, URI, headers, response and ctx.

The types are implemented in C (``hostscript/_transaction.c``) over the core's
transaction, which is the only copy of the request: ``txn.request.headers`` and
``txn.response.headers`` read and write it directly, and the handlers of every
hook — on any thread, on either engine — see the same storage.
"""
from __future__ import annotations

from ._bridge import Headers, Request, Response, Transaction

__all__ = ["Headers", "Request", "Response", "Transaction"]
