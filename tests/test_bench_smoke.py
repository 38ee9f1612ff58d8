"""`hostscript bench --quick` runs the whole comparison against peers end to end: every
row produces a number for every engine, and so does every baseline of the row. The
figures themselves are not checked here (machines are shared and noisy); `make bench`
is where they are read."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import defaultdict

import hostscript

EXPECTED_ROWS = {"noop-fire", "realistic-fire", "c-fire", "scaling-noop", "scaling-realistic",
                 "scaling-cpu", "rehydration", "heap-per-state", "rss-churn"}


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_bench_quick_gives_every_row_a_number_on_every_engine(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "hostscript", "bench", "--quick", "--silent",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    engines = hostscript.engines()
    assert set(report["machine"]["engines"]) == set(engines)
    seen = defaultdict(set)
    for row in report["rows"]:
        where = f"{row['key']}[{row['engine']}]"
        seen[row["key"]].add(row["engine"])
        assert _is_number(row["value"]), f"{where}: no value ({row['note']})"
        assert row["baselines"], f"{where}: no baseline"
        for name, value in row["baselines"].items():
            assert _is_number(value), f"{where}: baseline {name} has no value ({row['note']})"
        assert row["checks"], f"{where}: no target"
        for check in row["checks"]:
            assert _is_number(check["measured"]), f"{where}: {check['label']} not measured"
            assert isinstance(check["met"], bool)
    assert set(seen) == EXPECTED_ROWS
    for key, got in seen.items():
        assert got == set(engines), f"{key}: rows for {sorted(got)}, engines {engines}"
    assert [p["key"] for p in report["pending"]] == ["reference-proxy"]
    for row in report["rows"]:  # the table names every row
        assert row["title"] in proc.stdout
