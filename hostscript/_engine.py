"""Finding the compiled engine modules (hostscript._luajit, hostscript._lua54)."""
from __future__ import annotations

import importlib
from typing import Any, Dict, List, Tuple

_NAMES = ("luajit", "lua54")
_loaded: Dict[str, Tuple[Any, Any]] = {}


def load(engine: str) -> Tuple[Any, Any]:
    """(ffi, lib) of an engine; ValueError when unknown or not built."""
    if engine not in _NAMES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(_NAMES)}")
    if engine not in _loaded:
        try:
            mod = importlib.import_module(f"hostscript._{engine}")
        except ImportError as exc:
            raise ValueError(f"engine {engine!r} is not built in this installation: {exc}") from None
        _loaded[engine] = (mod.ffi, mod.lib)
    return _loaded[engine]


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
