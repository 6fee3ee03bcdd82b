"""Fresh interpreters for what a benchmark measures per process (wall time, peak RSS, start-up).

The children are modules of this package run with `python -m` in this interpreter (sys.executable),
so they work from an installed wheel and from any working directory. Standard library only: the
NumPy peer's process imports this module and must not load torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def run_module(module: str, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m module args` in a fresh process (`env`: variables set on top of this one's).

    Returns the finished process and its wall seconds (its whole life); raises if it failed.
    """
    cmd = [sys.executable, "-m", module, *map(str, args)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc, wall


def run_json(module: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """run_module, then the JSON object the child printed as its last line, with wall_s added."""
    proc, wall = run_module(module, *args, env=env)
    return {"wall_s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def print_json(result: dict) -> None:
    """What a child prints last: its measurements on one line."""
    print(json.dumps(result), flush=True)
