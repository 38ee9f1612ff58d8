"""`make test` runs the fuzz target (tests/fuzz/fuzz_fire.py) briefly on each engine —
about 12 s each, from the committed seed corpus (tests/fuzz/corpus) with a fixed
libFuzzer seed — and checks its plain replay mode. `make fuzz` is the long run."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "tests" / "fuzz" / "fuzz_fire.py"
SEEDS = ROOT / "tests" / "fuzz" / "corpus"
SECONDS = 12

try:
    import atheris  # noqa: F401
    HAVE_ATHERIS = True
except ImportError:
    HAVE_ATHERIS = False


@pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris is not installed (pip install -e '.[fuzz]'); "
                                             "the fuzz target needs it")
def test_the_fuzz_target_finds_nothing_in_a_short_run(engine, tmp_path):
    corpus, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    corpus.mkdir()
    artifacts.mkdir()
    cmd = [sys.executable, str(FUZZ), f"-max_total_time={SECONDS}", "-timeout=10", "-seed=1",
           "-len_control=0", "-max_len=2048", "-rss_limit_mb=4096",
           f"-artifact_prefix={artifacts}/", str(corpus)]
    if SEEDS.is_dir():
        cmd.append(str(SEEDS))
    env = dict(os.environ, HS_FUZZ_ENGINE=engine)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS * 10, env=env)
    log = "\n".join(line for line in proc.stderr.splitlines()
                    if not line.startswith("INFO: Instrumenting"))
    assert proc.returncode == 0, f"the fuzzer stopped with {proc.returncode}:\n{log[-8000:]}"
    assert str(ROOT / "hostscript") in log, log[:2000]  # this checkout's hostscript
    runs = re.search(r"Done (\d+) runs", log)
    assert runs and int(runs.group(1)) >= 200, log[-3000:]
    assert not list(artifacts.iterdir())


def test_replay_runs_an_input_and_reports_a_violation(tmp_path):
    # plain replay needs no atheris; a 0-second fire bound makes every fire a violation
    case = tmp_path / "input"
    case.write_bytes(bytes(range(256)) * 2)
    ok = subprocess.run([sys.executable, str(FUZZ), str(case)], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith(f"ok {case}"), ok.stdout + ok.stderr[-3000:]
    env = dict(os.environ, HS_FUZZ_FIRE_BOUND="0")
    bad = subprocess.run([sys.executable, str(FUZZ), "--show", str(case)], capture_output=True,
                         text=True, timeout=120, env=env)
    assert bad.returncode == 1, bad.stdout + bad.stderr[-3000:]
    assert "hostscript fuzz invariant violated" in bad.stderr and " took " in bad.stderr
    assert "--- load 'fuzz" in bad.stdout and "function C:on_" in bad.stdout  # --show: the script
