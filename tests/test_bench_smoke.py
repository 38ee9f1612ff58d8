"""`hostscript bench --quick` runs the whole comparison against peers end to end: every
row produces a number for every engine, and so does every baseline of the row. The
figures themselves are not checked here (machines are shared and noisy); `make bench`
is where they are read. The only figure allowed to be missing is the one a build
cannot measure — the pooled first fire when Host() has no state pool — and then the
row must say why — and the rows whose tool is not installed (wrk for the proxy rows,
redis-server and redis-benchmark for the Redis rows), which must say so."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

import hostscript
from hostscript import cli

EXPECTED_ROWS = {"request-flow", "build-request", "noop-fire", "http-server", "first-fire", "c-fire",
                 "scaling-short", "scaling-cpu", "heap-per-state", "rss-churn",
                 "proxy-miss", "proxy-hit", "proxy-hit-miss", "redis-incr", "redis-get",
                 "register-steady", "register-first", "register-latency", "register-per-request"}
MAY_BE_NA = {("first-fire", "with state pool")}  # (row, baseline) a build without a pool lacks
PROXY_ROWS = {"proxy-miss", "proxy-hit", "proxy-hit-miss"}  # n/a, and saying so, without wrk
HAVE_WRK = shutil.which("wrk") is not None
REDIS_ROWS = {"redis-incr", "redis-get"}  # n/a, and saying so, without redis-server
HAVE_REDIS = all(shutil.which(t) for t in ("redis-server", "redis-benchmark", "redis-cli"))


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_bench_quick_gives_every_row_a_number_on_every_engine(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "hostscript", "bench", "--quick", "--silent",
                           "--markdown", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    engines = hostscript.engines()
    assert set(report["machine"]["engines"]) == set(engines)
    seen = defaultdict(set)
    for row in report["rows"]:
        where = f"{row['key']}[{row['engine']}]"
        seen[row["key"]].add(row["engine"])
        if row["key"] in PROXY_ROWS and not HAVE_WRK:
            assert row["value"] is None and "wrk is not installed" in row["note"], where
            assert all("wrk" in c["na"] for c in row["checks"]), where
            continue
        if row["key"] in REDIS_ROWS and not HAVE_REDIS:
            assert row["value"] is None and "redis-server" in row["note"], where
            assert all("redis-server" in c["na"] for c in row["checks"]), where
            continue
        assert _is_number(row["value"]), f"{where}: no value ({row['note']})"
        assert row["baselines"], f"{where}: no baseline"
        na = [c["na"] for c in row["checks"] if c["na"]]
        for name, value in row["baselines"].items():
            if (row["key"], name) in MAY_BE_NA and value is None:
                assert na, f"{where}: baseline {name} is missing and no check says why"
                continue
            assert _is_number(value), f"{where}: baseline {name} has no value ({row['note']})"
        assert any(c["op"] for c in row["checks"]), f"{where}: no target"
        for check in row["checks"]:
            if check["na"]:
                assert check["measured"] is None and row["key"] == "first-fire", f"{where}: {check}"
                continue
            assert _is_number(check["measured"]), f"{where}: {check['label']} not measured"
            assert isinstance(check["met"], bool) if check["op"] else check["met"] is None
    assert set(seen) == EXPECTED_ROWS
    for key, got in seen.items():
        assert got == set(engines), f"{key}: rows for {sorted(got)}, engines {engines}"
    for row in report["rows"]:  # the text table and the Markdown name every row
        assert row["title"] in proc.stdout.split("| row |")[0]
        assert f"| {row['title']} |" in proc.stdout
    if HAVE_WRK:  # the proxy rows' latencies: a Markdown line per contestant and engine
        for row in report["rows"]:
            for name, c in row["extra"].get("contestants", {}).items():
                assert all(_is_number(c[k]) for k in ("rps", "p50_ms", "p99_ms")), (row["key"], name)
                assert f"| {row['title']} | {row['engine']} | {name} |" in proc.stdout
        assert any(row["extra"].get("contestants") for row in report["rows"])


def test_bench_outside_a_source_tree_says_so(tmp_path, monkeypatch, capsys):
    """An installed wheel has no benchmarks/ next to the package: a clear message, not
    a traceback, and a non-zero exit."""
    monkeypatch.setattr(cli, "SOURCE_ROOT", str(tmp_path))
    assert cli.main(["bench", "--quick"]) != 0
    err = capsys.readouterr().err
    assert "benchmarks/" in err and "source checkout" in err


def test_proxy_rows_without_wrk_say_so(monkeypatch):
    """No wrk on the machine: the proxy rows are n/a and say how to get it, quickly."""
    assert cli._load_benchmarks(cli.SOURCE_ROOT) is not None
    from benchmarks import proxy_wrk, rows

    monkeypatch.setattr(proxy_wrk, "wrk_path", lambda: None)
    monkeypatch.setattr(proxy_wrk, "_measured", {})
    for make in (rows.proxy_miss_row, rows.proxy_hit_row, rows.proxy_hit_miss_row):
        row = make(hostscript.engines()[0], rows.Counts.quick())
        assert row.value is None and "wrk is not installed" in row.note
        assert "install-deps.sh bench" in row.note
        assert all(c.measured is None and c.met is None and "wrk" in c.na for c in row.checks)
        assert all(v is None for v in row.baselines.values()) and row.baselines


def test_redis_rows_without_redis_say_so(monkeypatch):
    """No redis-server (or redis-benchmark) on the machine: the Redis rows are n/a and
    say what to install, quickly."""
    assert cli._load_benchmarks(cli.SOURCE_ROOT) is not None
    from benchmarks import redis_ops, rows

    monkeypatch.setattr(redis_ops.shutil, "which", lambda name: None)
    monkeypatch.setattr(redis_ops, "_measured", {})
    for make in (rows.redis_incr_row, rows.redis_get_row):
        row = make(hostscript.engines()[0], rows.Counts.quick())
        assert row.value is None and "redis-server" in row.note and "install-deps.sh" in row.note
        assert all(c.measured is None and c.met is None and "redis-server" in c.na for c in row.checks)
        assert all(v is None for v in row.baselines.values()) and row.baselines


def test_progress_lines_say_how_far_a_run_is():
    from benchmarks.runner import progress_line

    assert progress_line(0, 4, 0, "luajit: a") == "[--------------------] 0/4  0:00  luajit: a"
    assert progress_line(3, 4, 65.7, "lua54: b") == "[###############-----] 3/4  1:05  lua54: b"


ATS_ROWS = {"ats-throughput", "ats-cpu", "ats-p99", "ats-rss"}


def _ats_missing() -> str:
    assert cli._load_benchmarks(cli.SOURCE_ROOT) is not None
    from benchmarks import ats

    return ats.missing(hostscript.engines())


def test_ats_rows_without_traffic_server_say_so(monkeypatch):
    """A machine without traffic_server, wrk, nginx or the plugin: the A rows are n/a
    and say what is missing, quickly."""
    assert cli._load_benchmarks(cli.SOURCE_ROOT) is not None
    from benchmarks import ats, rows

    monkeypatch.setattr(ats, "missing", lambda engines: "wrk (sh tools/install-deps.sh bench)")
    monkeypatch.setattr(ats, "_measured", {})
    counts = rows.Counts.quick().with_engines(hostscript.engines())
    for make in rows.ATS_ROWS:
        row = make(hostscript.engines()[0], counts)
        assert row.value is None and "wrk" in row.note and "install-deps.sh bench" in row.note
        assert all(c.measured is None and c.met is None and "wrk" in c.na for c in row.checks)
        assert row.baselines and all(v is None for v in row.baselines.values())


def test_bench_ats_quick_measures_every_contestant(tmp_path):
    """`hostscript bench --ats --quick`: every A row has a figure on every engine, each
    contestant was checked to do the three header edits, and the contestants' table
    is printed."""
    lacks = _ats_missing()
    if lacks:
        pytest.skip(f"hostscript bench --ats needs: {lacks}")
    out = tmp_path / "ats.json"
    proc = subprocess.run([sys.executable, "-m", "hostscript", "bench", "--ats", "--quick", "--silent",
                           "--markdown", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    engines = hostscript.engines()
    assert {(r["key"], r["engine"]) for r in report["rows"]} == {(k, e) for k in ATS_ROWS for e in engines}
    for row in report["rows"]:
        where = f"{row['key']}[{row['engine']}]"
        assert _is_number(row["value"]), f"{where}: no value ({row['note']})"
        assert row["baselines"] and all(_is_number(v) for v in row["baselines"].values()), where
        assert all(_is_number(c["measured"]) for c in row["checks"]), where
    measured = next(r["extra"]["ats"] for r in report["rows"] if r["key"] == "ats-throughput")
    for name, headers in measured["checked"].items():
        assert len(headers) == (0 if name == "ATS alone" else 3), (name, headers)
    assert "Traffic Server contestants" in proc.stdout
    for name in measured["summary"]:
        assert f"| {name}" in proc.stdout


def test_ats_instructions_counts_the_plugins_work(tmp_path):
    """benchmarks/ats_instructions.py under valgrind: hostscript's count is there and
    plausible (more than the three empty handlers' would be, less than a copy of
    everything), in a short run."""
    lacks = _ats_missing()
    if lacks or not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        pytest.skip(f"needs Traffic Server, wrk, nginx and valgrind: {lacks or 'valgrind'}")
    proc = subprocess.run([sys.executable, "benchmarks/ats_instructions.py", "--requests", "100",
                           "--engine", "luajit", "--only", "hostscript"],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    m = re.search(r"\| ATS \+ hostscript luajit \| ([\d.]+)k \|", proc.stdout)
    assert m, proc.stdout
    assert 5 < float(m.group(1)) < 60, proc.stdout
