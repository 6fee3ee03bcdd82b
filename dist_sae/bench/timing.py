"""Timing: every compared function once per round, in rotating order, so outside load falls on all alike."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def interleaved(fns: dict, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each fn over `reps` rounds; every round calls each fn once, in rotating order."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def med(values: list[float]) -> float:
    return float(np.median(values))


def summary(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {k: {"median_s": med(v), "min_s": float(min(v)), "reps": len(v)} for k, v in times.items()}


def emit_report(report: dict, out: str | Path | None = None) -> None:
    """A benchmark's JSON report: printed (the command's output), and written to `out` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
