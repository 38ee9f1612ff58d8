"""cffi build script: compiles the C core (native/) once per engine.

Produces ``hostscript._lua54`` and ``hostscript._luajit`` — the same sources built
against Lua 5.4 and LuaJIT 2.1 — each linking a position-independent static Lua
(built by tools/build-lua.sh from the Debian sources pkg-config points at) and
hiredis's static library (libhiredis-dev) with ``--exclude-libs=ALL``, so no
``lua_*`` or ``redis*`` symbol leaks out of either module.
"""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

from cffi import FFI

ROOT = pathlib.Path(__file__).resolve().parent.parent
NATIVE = ROOT / "native"
LUA_BUILD = ROOT / "build" / "lua"
ARCHIVES = {"lua54": "liblua.a", "luajit": "libluajit.a"}
MACROS = {"lua54": [], "luajit": [("HS_ENGINE_LUAJIT", "1")]}


def _rel(path: pathlib.Path) -> str:
    # setuptools wants source paths relative to setup.py
    return os.path.relpath(path, os.getcwd())


def _cdef() -> str:
    header = (NATIVE / "hostscript.h").read_text()
    header = re.sub(r"/\*.*?\*/", "", header, flags=re.S)
    lines = [
        ln for ln in header.splitlines()
        if not ln.lstrip().startswith("#") and "extern \"C\"" not in ln and ln.strip() != "}"
    ]
    text = "\n".join(lines)
    # cffi accepts only literal enum values: evaluate the shifts
    return re.sub(r"1 << (\d+)", lambda m: str(1 << int(m.group(1))), text)


def _ensure_lua(engine: str) -> pathlib.Path:
    archive = LUA_BUILD / engine / ARCHIVES[engine]
    if not archive.exists():
        script = ROOT / "tools" / "build-lua.sh"
        if subprocess.call(["sh", str(script)]) != 0 or not archive.exists():
            sys.exit(f"hostscript: cannot build the {engine} engine: {archive} is missing")
    return archive


def _hiredis() -> pathlib.Path:
    """hiredis's static library (position-independent in Debian's libhiredis-dev),
    where the compiler finds it (Debian's hiredis.pc names a libdir without it)."""
    cc = os.environ.get("CC", "cc").split()[0]
    try:
        found = subprocess.run([cc, "-print-file-name=libhiredis.a"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        found = ""
    archive = pathlib.Path(found)
    if not archive.is_absolute() or not archive.exists():
        sys.exit("hostscript: hiredis is missing (Debian: libhiredis-dev; `sudo make deps` installs it)")
    return archive


def _lualib_source() -> pathlib.Path:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import embed_lua
    finally:
        sys.path.pop(0)
    out = ROOT / "build" / "c" / "hs_lualib.c"
    embed_lua.write_if_changed(ROOT / "src" / "lua", out)
    return out


def make_ffi(engine: str) -> FFI:
    archive = _ensure_lua(engine)
    ffi = FFI()
    ffi.cdef(_cdef())
    sources = sorted(NATIVE.glob("*.c")) + [_lualib_source()]
    ffi.set_source(
        f"hostscript._{engine}",
        '#include "hostscript.h"',
        sources=[_rel(p) for p in sources],
        include_dirs=[_rel(NATIVE), _rel(LUA_BUILD / engine / "include")],
        define_macros=MACROS[engine],
        extra_compile_args=["-std=gnu11", "-O2", "-fvisibility=hidden", "-Wall"],
        extra_objects=[str(archive), str(_hiredis())],
        depends=[str(archive)] + [_rel(p) for p in NATIVE.glob("*.h")],  # relink when Lua is rebuilt
        extra_link_args=["-Wl,--exclude-libs,ALL"],
        libraries=["m", "dl", "pthread"],
    )
    return ffi


ffi_lua54 = make_ffi("lua54")
ffi_luajit = make_ffi("luajit")

if __name__ == "__main__":
    for f in (ffi_lua54, ffi_luajit):
        f.compile(verbose=True)
