"""The C core under ThreadSanitizer and under AddressSanitizer (with LeakSanitizer)
plus UndefinedBehaviorSanitizer, built against each engine: tests/c/reload_stress.c
fires from 4 threads while scripts reload and threads come and go; exit_race.c frees
hosts while the threads that fired on them are ending; pool_churn.c hands states
from ending threads to new ones through the host's pool, and frees hosts while
pooling threads end; txn_checks.c "busy" refuses a second fire on a transaction in
use; limits_stress.c hits the time and memory limits, errors and deep recursion from
4 threads; shared_stress.c hammers shared dictionaries from 8 threads, Lua and C;
redis_stress.c does the same to a Redis-backed one (hs.shared, hs.redis calls and
pipelines, connections dropped for a reply too large and a timeout), against a
redis-server of its own, then to one whose Redis is unreachable (every call fails
cleanly); redis_thread_end.c ends threads right after hs.redis calls and after a
get left without its retry (nothing may be left behind); register_stress.c fires
from 8 threads while 4 of them register and unregister classes (hs.register in a
fire) and the script is reloaded and unloaded.
`make test-sanitize` runs this file; `make test` skips it in CI."""
from __future__ import annotations

import os
import socket
import subprocess

import pytest
from helpers import build_c_program

VARIANTS = {
    # any UB report stops the program (the first load once did memcpy from NULL)
    "address,undefined": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"],
    "thread": ["-fsanitize=thread"],
}

# program, argument, what its stdout starts with
PROGRAMS = {
    "reload_stress": ("60", "ok fires="),
    "exit_race": ("100", "ok"),
    "pool_churn": ("40", "ok"),
    "txn_checks": ("busy", "ok"),
    # headers on demand: values pushed from the host's copy and the journal (ASan)
    "txn_lookup": ("lookup", "list=0 fetches=1 lookups=7"),
    "txn_peek": ("peek 20000", "ok peek="),
    "limits_stress": ("2", "ok fires="),
    "shared_stress": ("5000", "ok hits="),
    "redis_stress": ("600", "ok hits="),
    "redis_thread_end": ("2", "ok"),
    "register_stress": ("1500", "ok fires="),
    # the same program, every thread replacing one class in every fire: a published
    # class freed by another thread's replacement while its registering fire still
    # used it (hs_register_publish, fixed in 81f4241) showed within a second or two
    "register_replace": ("1500 replace", "ok fires="),
}
SOURCES = {"register_replace": "register_stress", "txn_lookup": "txn_checks", "txn_peek": "txn_checks"}  # programs built from another's source
# programs given a Redis, a redis-server of the test's own (URL: under a prefix of
# the test's own; DEAD_URL: a closed port): the arguments after the first
REDIS_PROGRAMS = {
    "redis_stress": lambda url, dead_url: [url, dead_url],
    "redis_thread_end": lambda url, dead_url: [url],
}

MATRIX = [(p, v) for p in PROGRAMS for v in VARIANTS]


def closed_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("program,variant", MATRIX, ids=[f"{p}-{v}" for p, v in MATRIX])
def test_c_threads_and_limits_are_clean_under_sanitizers(engine, program, variant, tmp_path, request):
    exe = build_c_program(engine, f"{SOURCES.get(program, program)}.c", tmp_path / f"{program}_{engine}",
                          "-g", "-O1", "-fno-omit-frame-pointer", *VARIANTS[variant])
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66",
               ASAN_OPTIONS="detect_leaks=1 exitcode=66",
               UBSAN_OPTIONS="halt_on_error=1 print_stacktrace=1")
    arg, ok = PROGRAMS[program]
    argv = [str(exe), *arg.split()]
    if program in REDIS_PROGRAMS:
        redis = request.getfixturevalue("own_redis")  # skips without redis-server
        argv += REDIS_PROGRAMS[program](redis.url(prefix=request.getfixturevalue("redis_prefix")),
                                        f"redis://127.0.0.1:{closed_port()}/0?prefix=dead:")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
    assert proc.stdout.startswith(ok), proc.stdout + proc.stderr[-2000:]
    for report in ("WARNING: ThreadSanitizer", "ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
                   "runtime error:"):
        assert report not in proc.stderr, proc.stderr[-6000:]
