"""The exception hierarchy: every error the package raises derives from ``Error``.

Errors about how the package is called also derive from the built-in exception a
Python developer would expect (``ValueError``, ``TypeError``, ``RuntimeError``), so
``except hostscript.Error`` catches everything hostscript raises and
``except ValueError`` keeps working.
"""
from __future__ import annotations

from typing import Optional


class Error(Exception):
    """Base class of hostscript's errors."""


class UsageError(Error, ValueError):
    """A call got a value it cannot take: an undeclared hook, an invalid header name
    or value, method, URI or status, an unknown engine or script, a bad option."""


class ArgumentTypeError(Error, TypeError):
    """A call got an argument of the wrong type."""


class ClosedError(UsageError):
    """The host is closed."""


class BusyError(Error, RuntimeError):
    """The transaction is in use: a fire runs on it in another thread. One fire at a
    time per transaction; touch it again once that fire returned."""


class ScriptError(Error):
    """A script failed to load or reload: it does not compile, its chunk raised an
    error, it returned no handler class, or it handles an undeclared hook.
    The published program is unchanged."""

    def __init__(self, name: str, line: Optional[int], message: str, kind: str = "script",
                 traceback: str = "") -> None:
        super().__init__(message)
        self.name = name
        self.line = line
        self.message = message
        self.kind = kind  # "syntax", "script", "memory", "timeout", "usage", "io" (unreadable file)
        self.traceback = traceback

    def __str__(self) -> str:
        return self.message


class HandlerError(Error):
    """A handler failed during a fire (raised an error, hit the time or memory limit,
    or left non-plain data in ``txn.ctx``)."""

    def __init__(self, script: str, hook: str, message: str, traceback: str = "",
                 kind: str = "runtime") -> None:
        super().__init__(message)
        self.script = script
        self.hook = hook
        self.message = message
        self.traceback = traceback
        self.kind = kind  # "runtime", "timeout", "memory", "ctx", "usage"

    def __str__(self) -> str:
        where = f"{self.script} in {self.hook}" if self.script else self.hook
        return f"{where}: {self.message}"

    def __repr__(self) -> str:
        return (f"HandlerError(script={self.script!r}, hook={self.hook!r}, "
                f"kind={self.kind!r}, message={self.message!r})")


class SharedDictError(Error):
    """A shared dictionary refused an operation: ``incr`` on a value that is not a
    number, or past the 64-bit integer range."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"shared dictionary {name!r}: {message}")
        self.dict_name = name
        self.message = message

    def __str__(self) -> str:
        return str(self.args[0])


class SharedDictFullError(SharedDictError):
    """"no memory": the entry does not fit — a ``safe_*`` call would have had to
    evict live entries, or the entry is larger than the dictionary's capacity."""


class SharedDictKeyError(SharedDictError, KeyError):
    """"not found": the key is absent or expired (``d[key]``, ``del d[key]``,
    ``incr`` without ``init``)."""
