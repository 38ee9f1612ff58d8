"""The C programs of the benchmarks, built at run time with tools/build_c.py (-O2,
against native/*.c, the embedded Lua library and the static Lua of
build/lua/<engine>/) into build/bench/, and reused while their inputs are unchanged:
``c/fire_bench.c``, the C floor — a no-op ``hs_fire`` against a bare ``lua_pcall``,
interleaved round by round inside the C program — and ``c/redis_bench.c``, the C
driver of redis_ops.py."""
from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parent.parent
FIRE_BENCH_C = ROOT / "benchmarks" / "c" / "fire_bench.c"
REDIS_BENCH_C = ROOT / "benchmarks" / "c" / "redis_bench.c"
ARCHIVES = {"lua54": "liblua.a", "luajit": "libluajit.a"}


class Unavailable(Exception):
    """The C benchmark cannot run here (no compiler, no Lua archive); the row says why."""


def _compiler() -> List[str]:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise Unavailable("no C compiler (cc) found")
    return shlex.split(cc)


def _inputs(engine: str, source: Path) -> List[Path]:
    """Every file the executable depends on, for the cache key."""
    native = ROOT / "native"
    archive = ROOT / "build" / "lua" / engine / ARCHIVES[engine]
    for need in (native / "hostscript.h", source, ROOT / "tools" / "build_c.py"):
        if not need.exists():
            raise Unavailable(f"needs the source tree ({need.relative_to(ROOT)} is missing)")
    if not archive.exists():
        raise Unavailable(f"{archive.relative_to(ROOT)} is missing: run `make` first")
    return (sorted(native.glob("*.[ch]")) + sorted((ROOT / "src" / "lua").rglob("*.lua"))
            + [source, ROOT / "tools" / "build_c.py", archive])


def build_program(engine: str, source: Path) -> Path:
    """The executable of the C program SOURCE for ENGINE, compiled when its inputs
    changed (build/bench/<name>_<engine>-<digest of the inputs>)."""
    cc = _compiler()
    digest = hashlib.sha256(" ".join(cc).encode())
    for p in _inputs(engine, source):
        digest.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes())
    out_dir = ROOT / "build" / "bench"
    exe = out_dir / f"{source.stem}_{engine}-{digest.hexdigest()[:16]}"
    if exe.exists():
        return exe
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        built = Path(tmp) / exe.name
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "build_c.py"), engine, str(built),
                               str(source), "-O2"],
                              capture_output=True, text=True, env=dict(os.environ, CC=" ".join(cc)))
        if proc.returncode != 0:
            raise RuntimeError(f"building {source.stem} for {engine} failed:\n{proc.stderr[-3000:]}")
        for old in out_dir.glob(f"{source.stem}_{engine}-*"):
            old.unlink()
        os.replace(built, exe)
    return exe


def build_fire_bench(engine: str) -> Path:
    """The fire_bench executable for ENGINE, compiled when its inputs changed."""
    return build_program(engine, FIRE_BENCH_C)


def run_fire_bench(engine: str, iterations: int, rounds: int) -> Tuple[float, float]:
    """(ns per bare lua_pcall, ns per hs_fire) of a no-op handler: the C program's
    median rounds."""
    exe = build_fire_bench(engine)
    proc = subprocess.run([str(exe), str(iterations), str(rounds)], capture_output=True, text=True,
                          timeout=600)
    fields = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    if proc.returncode != 0 or "error" in fields:
        raise RuntimeError(f"fire_bench {engine} failed: {fields.get('error') or proc.stderr[-2000:]}")
    if fields.get("engine") != engine:
        raise RuntimeError(f"fire_bench built for {engine} reports engine {fields.get('engine')!r}")
    return float(fields["pcall_ns"]), float(fields["fire_ns"])
