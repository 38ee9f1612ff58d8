"""The C core under ThreadSanitizer and AddressSanitizer (with LeakSanitizer), built
against each engine: tests/c/reload_stress.c fires from 4 threads while scripts
reload and threads come and go; tests/c/exit_race.c frees hosts while the threads
that fired on them are ending; tests/c/pool_churn.c hands states from ending threads
to new ones through the host's pool, and frees hosts while pooling threads end."""
from __future__ import annotations

import os
import pathlib
import subprocess

import pytest
from helpers import build_c_program

def build(engine: str, sanitizer: str, out: pathlib.Path, program: str = "reload_stress") -> pathlib.Path:
    return build_c_program(engine, f"{program}.c", out / f"{program}_{engine}_{sanitizer}", "-g", "-O1",
                           f"-fsanitize={sanitizer}", "-fno-omit-frame-pointer")


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


@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_pool_churn_and_freeing_while_threads_pool_is_clean_under_sanitizer(engine, sanitizer,
                                                                             tmp_path):
    exe = build(engine, sanitizer, tmp_path, "pool_churn")
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66",
               ASAN_OPTIONS="detect_leaks=1 exitcode=66")
    proc = subprocess.run([str(exe), "40"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.strip() == "ok"
