"""Memory from outside: peak RSS of the largest process, and of the whole process tree, of one
`dist-sae evaluate` (local Ray, data.cache_mb=0: streaming) at 1x, 16x and 64x the rows.

A sampler in this process reads /proc/<pid>/status (VmRSS) of the command and all its
descendants (the driver, the raylet, the GCS, the workers) every --interval seconds: not
ru_maxrss (it carries over fork+exec, and covers one process) nor one process's VmHWM. Streaming
should not grow with the data: targets largest <= 1.10x at 16x and <= 1.15x at 64x, tree <= 1.10x.

    python -m dist_sae.bench.rss_tree --rows 50000 --factors 1,16,64 --out bench_out/rss_tree.json

The suite's rss ratios come from `measure` too (dist_sae.bench.rss).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dist_sae.bench.safety import emit
from dist_sae.bench.synthetic import write_synthetic


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:")), 0.0)
    except OSError:
        return 0.0


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ").strip()[:80]
    except OSError:
        return "?"


def tree_rss(root: int) -> dict[int, float]:
    """VmRSS (MB) of `root` and every descendant, by PID (Ray's processes are the driver's descendants)."""
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        out[pid] = _rss_mb(pid)
        todo += _children(pid)
    return out


def run_sampled(cmd: list[str], interval: float, workers: str | None = None) -> dict:
    """Run `cmd` (its own process tree) and sample it from here every `interval` seconds.

    Returns the peaks (MB) over time of its largest process's RSS (and that process's name), of
    its tree's total, of the command's own process (the driver), and, given `workers` (a regex on
    the process title, e.g. r"ray::range_task"), of the largest process that ever matched it; its
    seconds and stdout. A Ray worker's title changes (ray::IDLE, the task's or actor's, then
    ray::IDLE again), so once matched a process stays counted.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    largest, tree, driver, worker, which = 0.0, 0.0, 0.0, 0.0, ""
    matched: set[int] = set()
    while proc.poll() is None:
        sample = tree_rss(proc.pid)
        pid = max(sample, key=sample.get)
        if sample[pid] > largest:
            largest, which = sample[pid], _name(pid)
        tree = max(tree, sum(sample.values()))
        driver = max(driver, sample.get(proc.pid, 0.0))
        if workers is not None:
            matched |= {p for p in sample if p != proc.pid and p not in matched and re.match(workers, _name(p))}
            worker = max([worker, *(sample[p] for p in matched if p in sample)])
        time.sleep(interval)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {err[-2000:]}")
    return {"largest_peak_mb": largest, "largest_process": which, "tree_peak_mb": tree, "driver_peak_mb": driver,
            "worker_peak_mb": worker, "seconds": time.perf_counter() - t0, "stdout": out}


def measure(rows: int, factors: tuple[int, ...] = (1, 16, 64), dim: int = 64, workers: int = 2, interval: float = 0.05,
            reps: int = 1, block_rows: int = 16384) -> dict:
    """Peak RSS from outside (largest process, whole tree) of `dist-sae evaluate` at rows x each factor.

    Each factor's dataset is written once; with reps > 1 the runs go round by round in alternating
    order (load from other processes falls on every factor alike) and the peaks are medians.
    Give the base a few blocks (rows >= 4 * block_rows): below one block, 1x runs smaller blocks
    than 16x, and the ratio shows the block size (a fixed cost), not growth with the data.
    Returns {"benchmark", "results": {"16x": {...}}, "ratios": {"16x_vs_1x": {"largest", "tree"}}, "loadavg"}.
    """
    factors = tuple(factors)
    runs: dict[int, list[dict]] = {f: [] for f in factors}
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dist_sae_rss_") as tmp:
        from dist_sae.config import load_config
        from dist_sae.sae.model import SparseAutoencoder, save_model

        cfg = load_config(None, {"model.visible": dim, "model.hidden": [25]})
        model = SparseAutoencoder.from_config(cfg)
        model.reset_parameters(0)
        save_model(model, Path(tmp) / "model", cfg)
        for factor in factors:
            write_synthetic(Path(tmp) / f"{factor}x", rows * factor, dim, seed=factor, shard_rows=200_000)
        for r in range(reps):
            for factor in factors if r % 2 == 0 else factors[::-1]:
                cmd = [sys.executable, "-m", "dist_sae", "evaluate", "--model", str(Path(tmp) / "model"),
                       "--data", str(Path(tmp) / f"{factor}x"), "--json", "data.cache_mb=0", f"data.block_rows={block_rows}", f"workers.num={workers}", "compute.threads=1"]
                run = run_sampled(cmd, interval)
                runs[factor].append({**{k: v for k, v in run.items() if k != "stdout"}, "J": json.loads(run["stdout"])["J"]})
    results = {}
    for factor, got in runs.items():
        largest = [g["largest_peak_mb"] for g in got]
        results[f"{factor}x"] = {
            "rows": rows * factor, "largest_peak_mb": float(np.median(largest)), "tree_peak_mb": float(np.median([g["tree_peak_mb"] for g in got])),
            "largest_process": got[int(np.argsort(largest)[len(largest) // 2])]["largest_process"],
            "seconds": float(np.median([g["seconds"] for g in got])), "J": got[0]["J"], "runs": got,
        }
    base = results[f"{factors[0]}x"]
    return {
        "benchmark": "peak RSS from outside (largest process, whole tree) of `dist-sae evaluate` on a local Ray, streaming",
        "settings": {"dim": dim, "workers": workers, "interval_s": interval, "reps": reps, "data.cache_mb": 0, "data.block_rows": block_rows},
        "results": results,
        "ratios": {f"{k}_vs_{factors[0]}x": {"largest": r["largest_peak_mb"] / base["largest_peak_mb"],
                                            "tree": r["tree_peak_mb"] / base["tree_peak_mb"]} for k, r in results.items()},
        "loadavg": {"start": load_start, "end": os.getloadavg()},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000, help="rows at 1x")
    parser.add_argument("--factors", default="1,16,64")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between /proc samples")
    parser.add_argument("--reps", type=int, default=1, help="runs per factor (medians), in alternating order")
    parser.add_argument("--block-rows", type=int, default=16384, help="data.block_rows of the evaluations")
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args(argv)
    factors = tuple(int(f) for f in args.factors.split(","))
    return emit(measure(args.rows, factors, args.dim, args.workers, args.interval, args.reps, args.block_rows), args.out)


if __name__ == "__main__":
    main()
