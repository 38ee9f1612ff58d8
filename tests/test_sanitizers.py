"""The C core under ThreadSanitizer, AddressSanitizer (with LeakSanitizer) and
UndefinedBehaviorSanitizer, built against each engine: tests/c/reload_stress.c fires
from 4 threads while scripts reload and threads come and go; tests/c/exit_race.c
frees hosts while the threads that fired on them are ending; tests/c/pool_churn.c
hands states from ending threads to new ones through the host's pool, and frees
hosts while pooling threads end; tests/c/txn_checks.c "busy" refuses a second fire
on a transaction in use; tests/c/limits_stress.c hits the time and memory limits,
errors and deep recursion from 4 threads. `make test-sanitize` runs this file (and
the TSan "busy" case of test_txn_entry_points.py)."""
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


# ---- `make test-sanitize`: every C thread and limit test under ASan+UBSan, and the
# limits under TSan too (the ones above cover reload/exit/pool under TSan and ASan) ----

UBSAN = "address,undefined"
# UB the core is known to have, reported and not fixed yet: suppressed by file so the
# variant checks everything else; `-fsanitize-recover` only for these checks, and
# halt_on_error=1, so any other report of theirs still stops the program. (None now:
# program.c's memcpy from NULL on the first load is fixed.)
KNOWN_UB: dict = {}

VARIANTS = {
    UBSAN: ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
            *(f"-fsanitize-recover={check}" for check in KNOWN_UB)],
    "thread": ["-fsanitize=thread"],
}

# program, argument, what its stdout starts with
PROGRAMS = {
    "reload_stress": ("60", "ok fires="),
    "exit_race": ("100", "ok"),
    "pool_churn": ("40", "ok"),
    "txn_checks": ("busy", "ok"),
    "limits_stress": ("2", "ok fires="),
}

MATRIX = [(p, UBSAN) for p in PROGRAMS] + [("limits_stress", "thread")]


def run_sanitized(engine: str, program: str, variant: str, tmp_path: pathlib.Path) -> None:
    exe = build_c_program(engine, f"{program}.c", tmp_path / f"{program}_{engine}",
                          "-g", "-O1", "-fno-omit-frame-pointer", *VARIANTS[variant])
    supp = tmp_path / "ubsan.supp"
    supp.write_text("".join(f"{check}:{where}\n" for check, where in KNOWN_UB.items()))
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66",
               ASAN_OPTIONS="detect_leaks=1 exitcode=66",
               UBSAN_OPTIONS=f"halt_on_error=1 print_stacktrace=1 suppressions={supp}")
    arg, ok = PROGRAMS[program]
    proc = subprocess.run([str(exe), arg], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
    assert proc.stdout.startswith(ok), proc.stdout + proc.stderr[-2000:]
    for report in ("WARNING: ThreadSanitizer", "ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
                   "runtime error:"):
        assert report not in proc.stderr, proc.stderr[-6000:]


@pytest.mark.parametrize("program,variant", MATRIX, ids=[f"{p}-{v}" for p, v in MATRIX])
def test_c_threads_and_limits_are_clean_under_sanitizers(engine, program, variant, tmp_path):
    run_sanitized(engine, program, variant, tmp_path)


def test_the_first_load_has_no_undefined_behaviour(tmp_path):
    exe = build_c_program("lua54", "exit_race.c", tmp_path / "exit_race_ub", "-g", "-O1",
                          "-fsanitize=undefined", "-fno-sanitize-recover=undefined")
    proc = subprocess.run([str(exe), "1"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, UBSAN_OPTIONS="halt_on_error=1 print_stacktrace=1"))
    assert proc.returncode == 0 and "runtime error:" not in proc.stderr, proc.stderr[-3000:]
