"""The three ways a Python server can run its hooks, each serving one request the same
way: build the request from (method, uri, header pairs), fire read_request,
send_response and log, read the response headers back as a list of pairs.

Read the three ``serve`` methods side by side: that is the unit every request row
times. Each contestant also offers ``new_request`` (the request alone) and
``fire_function`` (one hook on a request made by ``new_request``, in the calling
thread) for the rows that time those parts.

- python: what a Python developer writes without hostscript — a dict of hook name
  to Python handlers over a plain request object (dicts of lower-cased header names).
- lupa: one LuaRuntime per thread running the same Lua handler class; the request
  is built by a Lua-side constructor called with flat arguments (the cheapest of the
  ways we measured, see README.md), the response headers read back from the Lua table
  the constructor returned.
- hostscript: a Host with the same Lua handler class, a fresh Transaction per
  request, ``host.fire`` per hook, ``txn.response.headers.items()``.
"""
from __future__ import annotations

import importlib
import itertools
import threading
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

from hostscript import Host, Transaction

from .workloads import HOOKS, METHOD, REQUEST_HEADERS, URI, Headers, PyHandler, Workload

Serve = Callable[[str, str, Headers], Headers]
Fire = Callable[[str, Any], Any]

LUPA_MODULES = {"lua54": "lupa.lua54", "luajit": "lupa.luajit21"}


class Contestant(Protocol):
    name: str

    def serve(self, method: str, uri: str, headers: Headers) -> Headers: ...

    def new_request(self, method: str, uri: str, headers: Headers) -> Any: ...

    def fire_function(self) -> Fire: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- python

class PyRequest:
    """The python contestant's request: what a Python server keeps when it has no
    hostscript — header names lower-cased once into a dict, plain dicts for the
    response headers and the handlers' per-request data."""

    __slots__ = ("method", "uri", "headers", "response_headers", "ctx")

    def __init__(self, method: str, uri: str, headers: Headers) -> None:
        self.method = method
        self.uri = uri
        self.headers = {name.lower(): value for name, value in headers}
        self.response_headers: Dict[str, Optional[str]] = {}
        self.ctx: Dict[str, Any] = {}


def header_dict(method: str, uri: str, headers: Headers) -> Dict[str, str]:
    """The least a Python server builds from a request's headers: a dict by lower-case
    name (what PyRequest holds; the build row's baseline)."""
    return {name.lower(): value for name, value in headers}


class PythonContestant:
    """A dict of hook name to the list of Python handlers of WORKLOAD."""

    name = "python"

    def __init__(self, workload: Workload, hooks: Sequence[str] = HOOKS) -> None:
        self.handlers: Dict[str, List[PyHandler]] = {
            hook: list(workload.python.get(hook, ())) for hook in hooks}

    def fire(self, hook: str, req: PyRequest) -> None:
        for handler in self.handlers[hook]:
            handler(req)

    def serve(self, method: str, uri: str, headers: Headers) -> Headers:
        req = PyRequest(method, uri, headers)
        fire = self.fire
        fire("read_request", req)
        fire("send_response", req)
        fire("log", req)
        return list(req.response_headers.items())  # type: ignore[arg-type]

    def new_request(self, method: str, uri: str, headers: Headers) -> PyRequest:
        return PyRequest(method, uri, headers)

    def fire_function(self) -> Fire:
        return self.fire

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- lupa

# Run once per runtime; returns the request constructor. Header names are
# lower-cased through a cache (a server sees the same few names over and over),
# which beat lower-casing in Python and lupa's table_from on both engines.
LUPA_TXN_LUA = """\
local lower = string.lower
local LOWER = setmetatable({}, {__index = function(names, name)
  local low = lower(name)
  names[name] = low
  return low
end})

return function(method, uri, ...)
  local flat, headers = {...}, {}
  for i = 1, #flat, 2 do
    headers[LOWER[flat[i]]] = flat[i + 1]
  end
  local resp_headers = {}
  return {req = {method = method, uri = uri, headers = headers},
          resp = {headers = resp_headers}, ctx = {}}, resp_headers
end
"""


def lupa_module(engine: str) -> Any:
    """lupa's module for the same Lua as ENGINE; ImportError when lupa lacks it."""
    return importlib.import_module(LUPA_MODULES[engine])


def lupa_unavailable(engine: str) -> Optional[str]:
    """Why the lupa contestant cannot run for ENGINE, or None when it can."""
    try:
        lupa_module(engine)
    except ImportError as exc:
        return f"lupa is not installed ({exc}); pip install 'hostscript[bench]'"
    return None


class LupaThread:
    """One thread's LuaRuntime: the handler class executed in it, the request
    constructor, and hook name -> [(Lua handler function, class)]."""

    __slots__ = ("runtime", "new_txn", "handlers")

    def __init__(self, module: Any, source: str, hooks: Sequence[str]) -> None:
        self.runtime = module.LuaRuntime()
        cls = self.runtime.execute(source)
        self.new_txn = self.runtime.execute(LUPA_TXN_LUA)
        self.handlers: Dict[str, List[Tuple[Any, Any]]] = {}
        for hook in hooks:
            handler = cls[f"on_{hook}"]
            self.handlers[hook] = [] if handler is None else [(handler, cls)]

    def fire(self, hook: str, txn: Any) -> None:
        for handler, cls in self.handlers[hook]:
            handler(cls, txn)


class LupaContestant:
    """One LuaRuntime per thread (threading.local), made on the thread's first request."""

    name = "lupa"

    def __init__(self, engine: str, workload: Workload, hooks: Sequence[str] = HOOKS) -> None:
        self.module = lupa_module(engine)
        self.source = workload.lua
        self.hooks = tuple(hooks)
        self._local = threading.local()

    def runtime(self) -> LupaThread:
        try:
            return self._local.lua  # type: ignore[no-any-return]
        except AttributeError:
            lua = self._local.lua = LupaThread(self.module, self.source, self.hooks)
            return lua

    def serve(self, method: str, uri: str, headers: Headers) -> Headers:
        lua = self.runtime()
        txn, resp_headers = lua.new_txn(method, uri, *itertools.chain.from_iterable(headers))
        fire = lua.fire
        fire("read_request", txn)
        fire("send_response", txn)
        fire("log", txn)
        return list(resp_headers.items())

    def new_request(self, method: str, uri: str, headers: Headers) -> Any:
        return self.runtime().new_txn(method, uri, *itertools.chain.from_iterable(headers))[0]

    def fire_function(self) -> Fire:
        return self.runtime().fire

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- hostscript

class HostscriptContestant:
    """A Host as a server makes it (no time or memory limit, sandbox on; a failing
    handler raises, as it does for the other two) with WORKLOAD's script loaded.
    HOST_OPTIONS go to Host() (e.g. state_pool)."""

    name = "hostscript"

    def __init__(self, engine: str, workload: Workload, hooks: Sequence[str] = HOOKS,
                 **host_options: Any) -> None:
        self.host = Host(hooks, engine=engine, on_error="raise", **host_options)
        try:
            self.host.load(workload.lua, name=f"{workload.name}.lua")
        except BaseException:
            self.host.close()
            raise

    def serve(self, method: str, uri: str, headers: Headers) -> Headers:
        txn = Transaction(method, uri, headers=headers)
        fire = self.host.fire
        fire("read_request", txn)
        fire("send_response", txn)
        fire("log", txn)
        return txn.response.headers.items()

    def new_request(self, method: str, uri: str, headers: Headers) -> Transaction:
        return Transaction(method, uri, headers=headers)

    def fire_function(self) -> Fire:
        return self.host.fire

    def close(self) -> None:
        self.host.close()


# ---------------------------------------------------------------- all three

def contestants(engine: str, workload: Workload, **host_options: Any) -> Dict[str, Contestant]:
    """{name: contestant} for hostscript, python (when WORKLOAD has a Python twin)
    and lupa (when installed), each checked to serve WORKLOAD's request correctly."""
    out: Dict[str, Contestant] = {"hostscript": HostscriptContestant(engine, workload, **host_options)}
    if workload.python:
        out["python"] = PythonContestant(workload)
    if not lupa_unavailable(engine):
        out["lupa"] = LupaContestant(engine, workload)
    try:
        for c in out.values():
            check_serve(c, workload)
    except BaseException:
        close_all(out)
        raise
    return out


def check_serve(contestant: Contestant, workload: Workload) -> None:
    """Serve one request and insist on WORKLOAD's response headers: a benchmark whose
    contestants do different work measures nothing."""
    got = dict(contestant.serve(METHOD, URI, REQUEST_HEADERS))
    if workload.expected and got != workload.expected:
        raise RuntimeError(f"{contestant.name} served {workload.name} wrong: "
                           f"response headers {got}, expected {workload.expected}")


def close_all(contestants_: Dict[str, Contestant]) -> None:
    for c in contestants_.values():
        c.close()


def no_hooks(method: str, uri: str, headers: Headers) -> Headers:
    """The server without hooks: no request object, no handlers, no response headers."""
    return []
