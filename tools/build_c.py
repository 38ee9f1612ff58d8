"""Compile a C program against the hostscript core, without Python.

The program is linked with native/*.c, the embedded Lua library (generated next to
the output by tools/embed_lua.py), the position-independent static Lua of
build/lua/<engine>/ (tools/build-lua.sh) and hiredis (-lhiredis). Used by tests/test_c_embed.py,
tests/test_sanitizers.py, tests/test_txn_entry_points.py and benchmarks/native.py:

    python tools/build_c.py ENGINE OUTPUT SOURCE.c [CFLAG ...]
    python tools/build_c.py ENGINE OUTPUT.so SOURCE.c --plugin [CFLAG ...]   (make ats)

$CC picks the compiler (default cc). Exits non-zero with the compiler's messages
on stderr when the build fails.
"""
from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARCHIVES = {"lua54": "liblua.a", "luajit": "libluajit.a"}

sys.path.insert(0, str(ROOT / "tools"))
import embed_lua  # noqa: E402


def _static_hiredis(cc: list) -> str:
    found = subprocess.run([*cc, "-print-file-name=libhiredis.a"], capture_output=True,
                           text=True).stdout.strip()
    if not os.path.isabs(found):
        sys.exit("hiredis's static library is missing (Debian: libhiredis-dev)")
    return found


def build(engine: str, output: pathlib.Path, source: pathlib.Path, cflags: list) -> None:
    """A program; with --plugin in CFLAGS, a shared object for a host that loads
    plugins (Traffic Server): Lua and hiredis linked in statically, every symbol
    hidden but those the source marks visible."""
    cc = shlex.split(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "cc")
    plugin = "--plugin" in cflags
    cflags = [f for f in cflags if f != "--plugin"]
    if plugin:
        cflags = ["-shared", "-fPIC", "-fvisibility=hidden", "-O2", "-Wall", *cflags]
    archive = ROOT / "build" / "lua" / engine / ARCHIVES[engine]
    if not archive.exists():
        sys.exit(f"{archive} is missing: run `make` (tools/build-lua.sh) first")
    lualib = output.parent / f"{output.name}.hs_lualib.c"
    embed_lua.write_if_changed(ROOT / "src" / "lua", lualib)
    cmd = [*cc, "-std=gnu11", *cflags, "-I", str(ROOT / "native"),
           "-I", str(ROOT / "build" / "lua" / engine / "include")]
    if engine == "luajit":
        cmd.append("-DHS_ENGINE_LUAJIT")
    cmd += sorted(str(p) for p in (ROOT / "native").glob("*.c"))
    hiredis = [_static_hiredis(cc), "-Wl,--exclude-libs,ALL"] if plugin else ["-lhiredis"]
    # linked next to OUTPUT, then renamed over it: a process loading OUTPUT meanwhile
    # (a Traffic Server starting) sees the old file or the new one, never half of one
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    cmd += [str(lualib), str(source), str(archive), *hiredis, "-lm", "-ldl", "-pthread", "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        sys.exit(f"{' '.join(cmd)}\n{proc.stderr}")
    os.replace(tmp, output)


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] not in ARCHIVES:
        sys.exit(__doc__)
    build(sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]), sys.argv[4:])
