"""The report: rows and their checks (the model), and the ways to show it — a text
table per engine, Markdown for the README, JSON and a PNG bar chart."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

OPS = {"<=": "≤", ">=": "≥"}


@dataclass
class Check:
    """A figure and its target: MEASURED OP TARGET. op "" is information (no target);
    NA says why the figure could not be measured in this build."""

    label: str
    measured: Optional[float]
    op: str = ""
    target: Optional[float] = None
    na: str = ""

    @property
    def met(self) -> Optional[bool]:
        if self.measured is None or not self.op or self.target is None:
            return None
        return self.measured <= self.target if self.op == "<=" else self.measured >= self.target

    def to_json(self) -> Dict[str, Any]:
        return {**asdict(self), "met": self.met}


@dataclass
class Row:
    """One comparison on one engine: hostscript's figure, the baselines', the checks,
    and every contestant's rounds (ROUNDS, in UNIT) for the JSON."""

    engine: str
    key: str
    title: str
    unit: str  # "ns" per call, "rps" requests per second, "x" a ratio, "KiB"
    value: Optional[float]
    baselines: Dict[str, Optional[float]] = field(default_factory=dict)
    checks: List[Check] = field(default_factory=list)
    note: str = ""
    rounds: Dict[str, List[float]] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)  # e.g. the proxy rows' latencies

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        d["checks"] = [c.to_json() for c in self.checks]
        return d


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


# ---------------------------------------------------------------- text and Markdown

def format_value(value: Optional[float], unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "ns":
        for scale, suffix in ((1e6, "ms"), (1e3, "us")):
            if value >= scale:
                return f"{value / scale:.3g} {suffix}"
        return f"{value:.3g} ns"
    if unit == "rps":
        return f"{value:,.0f} req/s"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:,.0f} KiB" if abs(value) >= 100 else f"{value:.1f} KiB"


def format_measured(c: Mapping[str, Any]) -> str:
    return f"n/a ({c['na']})" if c["measured"] is None else f"{c['measured']:.3g}"


def format_target(c: Mapping[str, Any]) -> str:
    return f"{OPS[c['op']]} {c['target']:g}" if c["op"] else "(info)"


def verdict(c: Mapping[str, Any]) -> str:
    return {True: "met", False: "MISSED", None: ""}[c["met"]]


def baselines_text(r: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {format_value(v, r['unit'])}" for k, v in r["baselines"].items())


def engines_of(report: Mapping[str, Any]) -> List[str]:
    return list(dict.fromkeys(r["engine"] for r in report["rows"]))


def table(report: Mapping[str, Any]) -> str:
    """One text table per engine: a line per check, the row's note below it."""
    m = report["machine"]
    out = [f"machine: {m['cpu']}, {m['cores']} cores, {m['platform']}, {m['python']}",
           f"statistic: {report['statistic']} of interleaved rounds"]
    if report["quick"]:
        out.append("quick mode: smoke-test counts, the figures are not meaningful")
    for engine in engines_of(report):
        cells: List[Tuple[str, ...]] = [("row", "hostscript", "baselines", "figure", "target", "")]
        notes: Dict[int, str] = {}
        for r in (r for r in report["rows"] if r["engine"] == engine):
            for i, c in enumerate(r["checks"]):
                head = (r["title"], format_value(r["value"], r["unit"]), baselines_text(r)) if i == 0 \
                    else ("", "", "")
                cells.append(head + (f"{c['label']} = {format_measured(c)}", format_target(c), verdict(c)))
            if r["note"]:
                notes[len(cells) - 1] = r["note"]
        widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
        out += ["", f"== {engine} ({m['engines'].get(engine, '?')}) =="]
        for n, line in enumerate(cells):
            out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
            if n in notes:
                out.append(" " * (widths[0] + 2) + f"({notes[n]})")
    return "\n".join(out)


def markdown(report: Mapping[str, Any]) -> str:
    """Two Markdown tables for the README: the checks with one column per engine
    (ratio and verdict), then what was measured (hostscript and the baselines)."""
    engines = engines_of(report)
    by_key: Dict[str, Dict[str, Mapping[str, Any]]] = {}
    for r in report["rows"]:
        by_key.setdefault(r["key"], {})[r["engine"]] = r
    out = ["| row | figure | target | " + " | ".join(engines) + " |",
           "|---|---|---|" + "---|" * len(engines)]
    for rows in by_key.values():
        first = next(iter(rows.values()))
        for i, check in enumerate(first["checks"]):
            cells = []
            for engine in engines:
                c = rows[engine]["checks"][i] if engine in rows else None
                cells.append("" if c is None else _md_cell(c))
            title = first["title"] if i == 0 else ""
            out.append(f"| {title} | {check['label']} | {format_target(check)} | " + " | ".join(cells) + " |")
    out += ["", "| row | engine | hostscript | baselines |", "|---|---|---|---|"]
    for rows in by_key.values():
        for n, (engine, r) in enumerate(rows.items()):
            out.append(f"| {r['title'] if n == 0 else ''} | {engine} | "
                       f"{format_value(r['value'], r['unit'])} | {baselines_text(r)} |")
    out += latency_markdown(report)
    return "\n".join(out)


def latency_markdown(report: Mapping[str, Any]) -> List[str]:
    """The rows that measured contestants under load (extra["contestants"]: the
    proxy rows): requests per second, p50 and p99 of each, per engine."""
    lines: List[str] = []
    for r in report["rows"]:
        for name, c in r.get("extra", {}).get("contestants", {}).items():
            lines.append(f"| {r['title']} | {r['engine']} | {name} | {c['rps']:,.0f} | "
                         f"{c['p50_ms']:.2f} ms | {c['p99_ms']:.2f} ms |")
    if not lines:
        return []
    return ["", "| row | engine | contestant | req/s | p50 | p99 |", "|---|---|---|---|---|---|"] + lines


def _md_cell(c: Mapping[str, Any]) -> str:
    v = verdict(c)
    return format_measured(c) + ("" if not v else " met" if v == "met" else " **missed**")


# ---------------------------------------------------------------- JSON

def write_json(report: Mapping[str, Any], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------- plot

def require_matplotlib() -> Any:
    """matplotlib.pyplot with a non-interactive backend; ImportError names the extra."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'hostscript[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(report: Mapping[str, Any], path: str) -> None:
    """A PNG: per check with a target, one bar per engine against the target line.
    Left: ratios on a log scale; right: memory as a fraction of its limit. Hatched
    bars missed their target."""
    plt = require_matplotlib()
    from matplotlib.patches import Patch

    engines = engines_of(report)
    colors = dict(zip(engines, ["#3a6ea5", "#e0a030", "#5a9e5a", "#9a5ab0"]))
    ratio_checks: Dict[str, Dict[str, Any]] = {}
    memory_checks: Dict[str, Dict[str, Any]] = {}
    for r in report["rows"]:
        for c in r["checks"]:
            if not c["op"]:
                continue
            label = f"{r['title'].split(' ')[0]} {c['label']}"
            (memory_checks if r["unit"] == "KiB" else ratio_checks).setdefault(label, {})[r["engine"]] = c
    fig, (ax_ratio, ax_mem) = plt.subplots(
        1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [max(1, len(ratio_checks)),
                                                               max(1, len(memory_checks)) + 1]})
    ax_ratio.set_yscale("log")
    lowest = _bars(ax_ratio, ratio_checks, engines, colors, scale=lambda c: 1.0)
    ax_ratio.set_ylim(bottom=lowest / 2)
    ax_ratio.set_ylabel("ratio (log scale)")
    _bars(ax_mem, memory_checks, engines, colors, scale=lambda c: 1.0 / c["target"])
    ax_mem.set_ylabel("fraction of the limit")
    handles = [Patch(facecolor=colors[e], edgecolor="black", label=e) for e in engines]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="target missed"))
    ax_ratio.legend(handles=handles, fontsize=8, loc="upper right")
    m = report["machine"]
    fig.suptitle(f"hostscript vs baselines: {m['cpu']}, {m['cores']} cores, {m['date'][:10]} "
                 f"({'quick smoke run, not meaningful' if report['quick'] else 'full run'}); "
                 "dashed: target", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax: Any, checks: Mapping[str, Mapping[str, Any]], engines: Sequence[str],
          colors: Mapping[str, str], scale: Callable[[Mapping[str, Any]], float]) -> float:
    """Grouped bars (one per engine) for each check, its target as a dashed line;
    returns the lowest bar or target drawn."""
    width = 0.8 / max(1, len(engines))
    lowest = math.inf
    for x, by_engine in enumerate(checks.values()):
        any_check = next(iter(by_engine.values()))
        target = any_check["target"] * scale(any_check)
        ax.hlines(target, x - 0.45, x + 0.45, colors="black", linestyles="dashed")
        lowest = min(lowest, target)
        for i, engine in enumerate(engines):
            c = by_engine.get(engine)
            bx = x - 0.4 + width * (i + 0.5)
            if not c or c["measured"] is None:
                ax.annotate("n/a", (bx, target), fontsize=7, ha="center", va="bottom")
                continue
            value = c["measured"] * scale(c)
            shown = max(value, 1e-3) if ax.get_yscale() == "log" else value
            lowest = min(lowest, shown)
            ax.bar(bx, shown, width, color=colors[engine], edgecolor="black",
                   hatch="//" if c["met"] is False else None)
            ax.annotate(f"{c['measured']:.3g}", (bx, shown), fontsize=7, ha="center", va="bottom")
    ax.set_xticks(range(len(checks)))
    labels = []
    for label, by_engine in checks.items():
        c = next(iter(by_engine.values()))
        labels.append(f"{label} ({format_target(c)})")
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    return lowest if lowest < math.inf else 1.0
