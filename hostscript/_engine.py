"""The compiled engine modules (hostscript._luajit, hostscript._lua54): the cffi
library of each, and the address of its hs_fire for the C fast path."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Dict, List

from .errors import UsageError

_NAMES = ("luajit", "lua54")


@dataclass(frozen=True)
class Engine:
    name: str
    ffi: Any
    lib: Any
    fire_address: int  # hs_fire of this engine, called by hostscript._bridge


_loaded: Dict[str, Engine] = {}


def load(name: str) -> Engine:
    """The engine called *name*; UsageError when unknown or not built."""
    if name not in _NAMES:
        raise UsageError(f"unknown engine {name!r}; choose one of {', '.join(_NAMES)}")
    if name not in _loaded:
        try:
            mod = importlib.import_module(f"hostscript._{name}")
        except ImportError as exc:
            raise UsageError(f"engine {name!r} is not built in this installation: {exc}") from None
        ffi, lib = mod.ffi, mod.lib
        fire = int(ffi.cast("uintptr_t", ffi.addressof(lib, "hs_fire")))
        _loaded[name] = Engine(name, ffi, lib, fire)
    return _loaded[name]


def available() -> List[str]:
    """Engines built into this installation, the default first."""
    out = []
    for name in _NAMES:
        try:
            load(name)
        except UsageError:
            continue
        out.append(name)
    return out


def default() -> str:
    engines = available()
    if not engines:
        raise UsageError("no Lua engine is built: reinstall hostscript (see README)")
    return engines[0]
