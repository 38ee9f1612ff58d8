"""The C core under ThreadSanitizer and AddressSanitizer (with LeakSanitizer), built
against each engine: tests/c/reload_stress.c fires from 4 threads while scripts
reload and threads come and go; tests/c/exit_race.c frees hosts while the threads
that fired on them are ending."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARCHIVES = {"lua54": "liblua.a", "luajit": "libluajit.a"}


def build(engine: str, sanitizer: str, out: pathlib.Path, program: str = "reload_stress") -> pathlib.Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    assert cc, "a C compiler is needed"
    lualib = out / "hs_lualib.c"
    subprocess.run([sys.executable, str(ROOT / "tools" / "embed_lua.py"), str(ROOT / "src" / "lua"),
                    str(lualib)], check=True)
    exe = out / f"{program}_{engine}_{sanitizer}"
    cmd = [cc, "-std=gnu11", "-g", "-O1", f"-fsanitize={sanitizer}", "-fno-omit-frame-pointer",
           "-I", str(ROOT / "native"), "-I", str(ROOT / "build" / "lua" / engine / "include")]
    if engine == "luajit":
        cmd.append("-DHS_ENGINE_LUAJIT")
    cmd += sorted(str(p) for p in (ROOT / "native").glob("*.c"))
    cmd += [str(lualib), str(ROOT / "tests" / "c" / f"{program}.c"),
            str(ROOT / "build" / "lua" / engine / ARCHIVES[engine]), "-lm", "-ldl", "-pthread",
            "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True)
    return exe


@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_core_is_clean_under_sanitizer_while_reloading(engine, sanitizer, tmp_path):
    exe = build(engine, sanitizer, tmp_path)
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66",
               ASAN_OPTIONS="detect_leaks=1 exitcode=66")
    proc = subprocess.run([str(exe), "60"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.startswith("ok fires="), proc.stdout
    assert "WARNING: ThreadSanitizer" not in proc.stderr
    assert "ERROR: AddressSanitizer" not in proc.stderr


@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_freeing_a_host_while_its_threads_end_is_clean_under_sanitizer(engine, sanitizer, tmp_path):
    exe = build(engine, sanitizer, tmp_path, "exit_race")
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66",
               ASAN_OPTIONS="detect_leaks=1 exitcode=66")
    proc = subprocess.run([str(exe), "100"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.strip() == "ok"
