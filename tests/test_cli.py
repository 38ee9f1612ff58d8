"""The command line: `hostscript demo` (what `make run` shows) and `hostscript check`."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = sorted(str(p) for p in (ROOT / "examples").glob("*.lua"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hostscript", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


# *_redis.lua examples need their dictionary in Redis (hs.redis); a redis:// one
# connects lazily, so checking needs no server
IN_PROCESS = [e for e in EXAMPLES if not e.endswith("_redis.lua")]


@pytest.mark.parametrize("shared, examples", [("meta=64k", IN_PROCESS),
                                              ("meta=redis://127.0.0.1:9/0?prefix=check:", EXAMPLES)],
                         ids=["in-process", "redis"])
def test_check_accepts_the_examples(engine, shared, examples):
    p = run("check", "--engine", engine, "--shared", shared, *examples)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count(": ok") == len(examples)


def test_check_refuses_a_redis_example_without_redis(engine):
    redis_only = [e for e in EXAMPLES if e.endswith("_redis.lua")]
    assert redis_only
    p = run("check", "--engine", engine, "--shared", "meta=64k", *redis_only)
    assert p.returncode == 1
    assert "needs the shared dictionary 'meta' in Redis" in p.stderr


def test_check_reports_a_broken_script_with_its_line(engine, tmp_path):
    bad = tmp_path / "bad.lua"
    bad.write_text("local C = {}\nfunction C:on_read_request(txn)\n  if then end\nend\nreturn C\n")
    p = run("check", "--engine", engine, EXAMPLES[0], str(bad))
    assert p.returncode == 1
    assert f"{bad}:3:" in p.stderr
    assert ": ok" in p.stdout


@pytest.mark.parametrize("engine_arg", ["luajit", "lua54"])
def test_demo_runs_the_key_header_scenario_through_the_proxy(engine_arg):
    p = run("demo", "--engine", engine_arg)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [ln for ln in p.stdout.splitlines() if "GET /article" in ln]
    statuses = [ln.split("X-Cache: ")[1].split()[0] for ln in lines]
    assert statuses == ["MISS", "HIT", "HIT", "MISS", "HIT", "HIT", "MISS", "HIT"]
    assert "origin saw 3 requests for /article" in p.stdout
    assert "ok: every cache status and x-on_* header as expected" in p.stdout


@pytest.mark.parametrize("engine_arg", ["luajit", "lua54"])
def test_demo_registers_the_event_system_class_for_every_thread(engine_arg):
    p = run("demo", "--engine", engine_arg)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [ln for ln in p.stdout.splitlines() if "GET /events" in ln]
    assert len(lines) == 6, p.stdout
    hooks = ("send_request", "read_response", "send_response")
    # before the trigger: none of the three; the trigger and the 4 requests served
    # at once (4 proxy threads) after it: all three, x-on_send_request at the origin
    assert all(f"{h}: -" in lines[0] for h in hooks), lines[0]
    assert "x-event-system: on" in lines[1]
    for ln in lines[1:]:
        assert all(f"{h}: events-1.0" in ln for h in hooks) and "<--" not in ln, ln
    assert "examples/event_system.lua#events" in p.stdout.split("scripts now:")[1].splitlines()[0]
    assert "registered=1 registrations=1" in p.stdout
    assert "origin saw 3 requests for /article, 6 for /events" in p.stdout
    assert "did not get the 4 requests together" not in p.stdout


def test_check_takes_a_redis_dictionary_without_connecting(engine):
    # nothing listens on port 1: the check compiles, it does not talk to Redis
    p = run("check", "--engine", engine, "--shared", "meta=redis://127.0.0.1:1/0", *EXAMPLES)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count(": ok") == len(EXAMPLES)


def test_check_reports_a_bad_dictionary_url_without_a_traceback(engine):
    p = run("check", "--engine", engine, "--shared", "meta=redis://127.0.0.1:0/0", EXAMPLES[0])
    assert p.returncode == 2
    assert p.stderr.strip() == ("hostscript check: shared dictionary 'meta': 'redis://127.0.0.1:0/0': "
                                "the port must be a number from 1 to 65535")
    assert "Traceback" not in p.stderr
