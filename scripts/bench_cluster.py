"""Throughput of exact J and ∇J evaluations: the single-process engine against Ray with 1 and 2 workers.

    python scripts/bench_cluster.py [--rows 1000000] [--dim 64] [--repeats 3] [--out bench.json]
    python scripts/bench_cluster.py --scaling [ARGS OF dist_sae.bench.reduce_scaling]

Two datasets: the demo size (10,000 rows × 64, model 64-25-64) and a large synthetic one (default
1e6 rows × 64) written to a temp dir. For each engine it times full evaluations (pass 1 + pass 2),
one-pass evaluations, and reports examples/s (rows per second of a whole J, ∇J evaluation), the
ratio Ray / single-process, and two-pass / one-pass. Each figure is the best of --repeats runs
after a warm-up (the machine may be shared; the best run is the least disturbed one).

--scaling runs the reduction scaling run instead (dist_sae/bench/reduce_scaling.py: W = 1..32
small workers on a multi-node ray.cluster_utils cluster, 784-1024-784; server bytes, server busy
time and pass time per pass for workers.reduce = server, grouped, tree; JSON out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dist_sae.session import initial_theta
from dist_sae.config import load_config
from dist_sae.data.dataset import Dataset
from dist_sae.train.passes import PassProblem, local_problem
from dist_sae.train.inputs import bind_dataset
from dist_sae.bench.synthetic import write_synthetic


def best_time(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up: worker processes import, θ upload, page cache
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def bench_problem(two: PassProblem, one: PassProblem, theta: np.ndarray, rows: int, repeats: int) -> dict:
    t_two, ev_two = best_time(lambda: two.evaluate(theta), repeats)
    t_one, ev_one = best_time(lambda: one.evaluate(theta), repeats)
    # Pass 2 alone: an evaluation at a fixed ρ̂ (what the one-pass mode is compared with).
    state = ev_two.sparsity
    t_pass2, _ = best_time(lambda: two.evaluate(theta, None, state), repeats)
    return {
        "two_pass_s": t_two,
        "one_pass_s": t_one,
        "pass2_only_s": t_pass2,
        "examples_per_s": rows / t_two,  # a whole exact J, ∇J evaluation (pass 1 + pass 2)
        "examples_per_s_one_pass": rows / t_one,
        "two_pass_over_one_pass": t_two / t_one,
        "one_pass_over_pass2_only": t_one / t_pass2,
        "grad_rel_diff_one_vs_two": float(np.linalg.norm(ev_one.grad - ev_two.grad) / np.linalg.norm(ev_two.grad)),
    }


def bench_dataset(name: str, path: Path, hidden: int, repeats: int, workers: list[int], block_rows: int) -> dict:
    from dist_sae.cluster.ray_session import ClusterSession

    ds = Dataset.open(path)
    base = load_config(None, {"model.hidden": [hidden], "compute.dtype": "float64", "data.block_rows": block_rows,
                              "data.path": str(path), "run.quiet": True})
    cfg = bind_dataset(base, ds)
    one_cfg = cfg.with_overrides({"sparsity.passes": 1})
    theta = initial_theta(cfg, None)
    out: dict = {"rows": ds.rows, "dim": ds.dim, "model": f"{ds.dim}-{hidden}-{ds.dim}", "units": len(ds.units(block_rows))}

    local_two, local_one = local_problem(cfg, ds), local_problem(one_cfg, ds)
    out["single_process"] = {"threads": torch.get_num_threads(), **bench_problem(local_two, local_one, theta, ds.rows, repeats)}
    local_two.evaluator.close()
    local_one.evaluator.close()
    reference = out["single_process"]["examples_per_s"]

    for n in workers:
        session = ClusterSession(cfg.with_overrides({"workers.num": n}), ds, dashboard=False)
        try:
            two = session.problem
            one = PassProblem(two.evaluator, one_cfg)
            result = bench_problem(two, one, theta, ds.rows, repeats)
            grad_local = local_problem(cfg, ds).evaluate(theta).grad
            grad_ray = two.evaluate(theta).grad
            result["grad_rel_diff_vs_single_process"] = float(np.linalg.norm(grad_ray - grad_local) / np.linalg.norm(grad_local))
            result["ray_over_single_process"] = result["examples_per_s"] / reference
            out[f"ray_{n}_workers"] = result
        finally:
            session.close()
        print(f"{name}: ray {n} worker(s) {result['examples_per_s']:,.0f} ex/s "
              f"({result['ray_over_single_process']:.2f}× single process)", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--scaling" in argv:
        from dist_sae.bench import reduce_scaling

        return reduce_scaling.main([a for a in argv if a != "--scaling"])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the large dataset (default 1e6)")
    parser.add_argument("--dim", type=int, default=64, help="features of the large dataset (64 or 256)")
    parser.add_argument("--hidden", type=int, default=25, help="hidden units")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the best is kept)")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts, comma-separated")
    parser.add_argument("--block-rows", type=int, default=16384, help="rows per work unit (data.block_rows)")
    parser.add_argument("--skip-large", action="store_true", help="only the demo-size dataset")
    parser.add_argument("--out", help="write the JSON here (default: stdout)")
    args = parser.parse_args(argv)

    from dist_sae.cluster import runtime

    workers = [int(w) for w in args.workers.split(",") if w]
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "repeats": args.repeats,
        "block_rows": args.block_rows,
        "compute_dtype": "float64",
    }
    runtime.start_local(num_cpus=max(workers + [os.cpu_count() or 1]), dashboard=False)
    try:
        with tempfile.TemporaryDirectory(prefix="dsae-bench-") as tmp:
            t0 = time.perf_counter()
            write_synthetic(Path(tmp) / "demo", 10_000, 64, seed=1)
            result["demo"] = bench_dataset("demo", Path(tmp) / "demo", args.hidden, args.repeats, workers, args.block_rows)
            if not args.skip_large:
                t0 = time.perf_counter()
                write_synthetic(Path(tmp) / "large", args.rows, args.dim, seed=2)
                result["large_write_s"] = time.perf_counter() - t0
                result["large"] = bench_dataset("large", Path(tmp) / "large", args.hidden, args.repeats, workers, args.block_rows)
    finally:
        runtime.stop_local()
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
