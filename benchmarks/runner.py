"""Run the comparison and print it: what ``hostscript bench`` calls (hostscript/cli.py
parses the flags and hands them here). ``--ats`` runs the Traffic Server rows
(rows.ATS_ROWS, ats.py) instead of the others."""
from __future__ import annotations

import datetime
import importlib
import os
import platform
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import report
from .contestants import lupa_module, lupa_unavailable
from . import ats as ats_bench
from .rows import ATS_ROWS, ROWS, Counts

Progress = Callable[[str], None]


def run(engines: Sequence[str], quick: bool = False, progress: Progress = lambda s: None,
        ats: bool = False) -> Dict[str, Any]:
    """The whole comparison: {"machine", "quick", "statistic", "seconds", "rows"} (JSON-ready).
    ATS: the Traffic Server rows instead (one measurement, hostscript on every engine)."""
    counts = (Counts.quick() if quick else Counts.full()).with_engines(engines)
    started = time.monotonic()
    rows: List[Dict[str, Any]] = []
    steps = [(engine, row) for engine in engines for row in (ATS_ROWS if ats else ROWS)]
    for done, (engine, row) in enumerate(steps):
        progress(progress_line(done, len(steps), time.monotonic() - started,
                               f"{engine}: {row.__name__.removesuffix('_row').replace('_', ' ')}"))
        rows.append(row(engine, counts).to_json())
    return {"machine": machine_info(engines), "quick": quick, "statistic": "median",
            "seconds": round(time.monotonic() - started, 1), "rows": rows}


def progress_line(done: int, total: int, elapsed: float, what: str, width: int = 20) -> str:
    """``[#####---------------] 5/24  1:05  luajit: proxy miss``: where a long run is."""
    filled = width * done // total if total else width
    minutes, seconds = divmod(int(elapsed), 60)
    return f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total} {minutes:2d}:{seconds:02d}  {what}"


def stderr_progress() -> Progress:
    """Progress on stderr: one line redrawn in place on a terminal, a line each otherwise."""
    if sys.stderr.isatty():
        return lambda s: print("\r\033[K" + s, end="", file=sys.stderr, flush=True)
    return lambda s: print(s, file=sys.stderr, flush=True)


def machine_info(engines: Sequence[str]) -> Dict[str, Any]:
    """What the figures came from: the machine, Python, the engines, lupa."""
    info: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_implementation() + " " + platform.python_version(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "engines": {},
        "lupa": None,
    }
    for engine in engines:
        module = importlib.import_module(f"hostscript._{engine}")  # the cffi module of the core
        info["engines"][engine] = module.ffi.string(module.lib.hs_engine_version()).decode()
    try:
        import lupa

        info["lupa"] = {"version": lupa.__version__, "engines": {
            e: lupa_module(e).LuaRuntime().lua_implementation for e in engines if not lupa_unavailable(e)}}
    except ImportError:
        pass
    return info


def ats_table(result: Dict[str, Any]) -> str:
    """The ATS rows' contestants side by side (ats.markdown), from the first row that
    carries the measurement; "" when none does (n/a)."""
    for r in result["rows"]:
        measured = r.get("extra", {}).get("ats")
        if measured:
            return f"Traffic Server contestants ({measured['setup']}):\n\n" + \
                ats_bench.markdown(measured["summary"])
    return ""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(engines: Sequence[str], *, quick: bool = False, json_path: Optional[str] = None,
         plot_path: Optional[str] = None, markdown: bool = False, silent: bool = False,
         ats: bool = False) -> int:
    """Run, print the text table (and Markdown), write JSON and the plot; exit status."""
    if plot_path:
        try:
            report.require_matplotlib()
        except ImportError as e:
            print(f"hostscript bench: {e}", file=sys.stderr)
            return 2
    progress: Progress = (lambda s: None) if silent else stderr_progress()
    result = run(engines, quick=quick, progress=progress, ats=ats)
    if not silent and sys.stderr.isatty():
        print(file=sys.stderr)  # end the redrawn line
    print(report.table(result))
    print(f"\n{result['seconds']:.0f} s")
    contestants = ats_table(result) if ats else ""
    if contestants:
        print()
        print(contestants)
    if markdown:
        print()
        print(report.markdown(result))
    if json_path:
        report.write_json(result, json_path)
        print(f"\nJSON: {json_path}")
    if plot_path:
        report.plot(result, plot_path)
        print(f"plot: {plot_path}")
    return 0
