"""The compiled engine modules (hostscript._luajit, hostscript._lua54) and, for each,
the bridge that calls its hot-path functions without releasing the GIL."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Dict, List

from . import _bridge

_NAMES = ("luajit", "lua54")
_BRIDGED = ("hs_fire", "hs_txn_new", "hs_txn_free", "hs_txn_load", "hs_txn_field", "hs_txn_status")


@dataclass(frozen=True)
class Engine:
    name: str
    ffi: Any
    lib: Any
    bridge: _bridge.Bridge


_loaded: Dict[str, Engine] = {}


def load(name: str) -> Engine:
    """The engine called *name*; ValueError when unknown or not built."""
    if name not in _NAMES:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(_NAMES)}")
    if name not in _loaded:
        try:
            mod = importlib.import_module(f"hostscript._{name}")
        except ImportError as exc:
            raise ValueError(f"engine {name!r} is not built in this installation: {exc}") from None
        ffi, lib = mod.ffi, mod.lib
        addrs = tuple(int(ffi.cast("uintptr_t", ffi.addressof(lib, f))) for f in _BRIDGED)
        _loaded[name] = Engine(name, ffi, lib, _bridge.Bridge(addrs))  # type: ignore[arg-type]
    return _loaded[name]


def available() -> List[str]:
    """Engines built into this installation, the default first."""
    out = []
    for name in _NAMES:
        try:
            load(name)
        except ValueError:
            continue
        out.append(name)
    return out


def default() -> str:
    engines = available()
    if not engines:
        raise ValueError("no Lua engine is built: reinstall hostscript (see README)")
    return engines[0]
