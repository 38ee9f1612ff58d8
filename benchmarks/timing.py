"""Measuring: interleaved rounds and their medians.

Every comparison runs its contestants in turns — A, B, C, A, B, C, ... — so a noisy
neighbour on a shared machine hits them alike, and reports each contestant's median
round (the JSON keeps every round). The cyclic garbage collector stays on,
as in a server (a request object in a reference cycle is freed only by it), and runs
a full collection before every round so no round inherits another's garbage.
"""
from __future__ import annotations

import functools
import gc
import itertools
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Sequence


@dataclass
class Samples:
    """One contestant's rounds, in the unit its measurement returns."""

    rounds: List[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)


@dataclass(frozen=True)
class Call:
    """A function and its arguments: the one thing a timed loop repeats."""

    fn: Callable[..., Any]
    args: Sequence[Any] = ()


def interleave(measures: Mapping[str, Callable[[], float]], rounds: int) -> Dict[str, Samples]:
    """Call every measure once per round, in turns, ROUNDS times; their results by name."""
    out = {name: Samples() for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            gc.collect()
            out[name].rounds.append(measure())
    return out


def per_call_ns(fn: Callable[..., Any], args: Sequence[Any], n: int) -> float:
    """Nanoseconds per fn(*args), over N calls in a row."""
    t0 = time.perf_counter_ns()
    for _ in itertools.repeat(None, n):
        fn(*args)
    return (time.perf_counter_ns() - t0) / n


def calls_per_round(fn: Callable[..., Any], args: Sequence[Any], round_ns: float) -> int:
    """How many calls of fn(*args) take about ROUND_NS (at least 20); warms fn up."""
    n = 20
    while True:
        took = per_call_ns(fn, args, n) * n
        if took >= round_ns / 8 or n >= 1 << 24:
            return max(20, int(n * round_ns / max(took, 1.0)))
        n *= 4


def interleaved_calls(calls: Mapping[str, Call], rounds: int, round_ns: float) -> Dict[str, Samples]:
    """ns per call of each Call, rounds interleaved; each contestant's count per round
    sized so one round takes about ROUND_NS (equal time, not equal counts, so a slow
    contestant does not stretch the run)."""
    measures = {}
    for name, call in calls.items():
        n = calls_per_round(call.fn, call.args, round_ns)
        measures[name] = functools.partial(per_call_ns, call.fn, call.args, n)
    return interleave(measures, rounds)
