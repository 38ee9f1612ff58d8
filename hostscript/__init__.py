"""hostscript — Lua event handlers for threaded servers.

    host = hostscript.Host(hooks=["read_request", "send_response", "log"])
    host.load_file("stamp.lua")
    outcome = host.fire("read_request", hostscript.Transaction("GET", "/"))

Each thread that fires runs Lua in its own state; scripts are compiled once and
their bytecode shared through an immutable, versioned program.
"""
from ._engine import available as engines
from .errors import (ArgumentTypeError, BusyError, ClosedError, Error, HandlerError, ScriptError,
                     SharedDictError, SharedDictFullError, SharedDictKeyError, UsageError)
from .host import DEFAULT_HOOKS, Host, Outcome, Script, Status
from .shared import SharedDict
from .transaction import Headers, Request, Response, Transaction

__all__ = [
    "ArgumentTypeError", "BusyError", "ClosedError", "DEFAULT_HOOKS", "Error", "HandlerError",
    "Headers", "Host", "Outcome", "Request", "Response", "Script", "ScriptError", "SharedDict",
    "SharedDictError", "SharedDictFullError", "SharedDictKeyError", "Status", "Transaction",
    "UsageError", "engines",
]
__version__ = "0.6.0"
