"""Throughput of exact J and ∇J evaluations: the single-process engine against Ray with 1 and 2 workers.

    python scripts/bench_cluster.py [--rows 1000000] [--dim 64] [--repeats 3] [--out bench.json]
    python scripts/bench_cluster.py --scaling [ARGS OF dist_sae.bench.reduce_scaling]
    python scripts/bench_cluster.py --pools [--pool-rows 262144] [--pool-cpus 16] [--out pools.json]

Two datasets: the demo size (10,000 rows × 64, model 64-25-64) and a large synthetic one (default
1e6 rows × 64) written to a temp dir. For each engine it times full evaluations (pass 1 + pass 2),
one-pass evaluations, and reports examples/s (rows per second of a whole J, ∇J evaluation), the
ratio Ray / single-process, and two-pass / one-pass. Each figure is the best of --repeats runs
after a warm-up (the machine may be shared; the best run is the least disturbed one).

--scaling runs the reduction scaling run instead (dist_sae/bench/reduce_scaling.py: W = 1..32
small workers on a multi-node ray.cluster_utils cluster, 784-1024-784; server bytes, server busy
time and pass time per pass for workers.reduce = server, grouped, tree; JSON out).
--pools (on a machine with a GPU and 16 CPUs): examples/s of exact evaluations on 784-1024-784, in
float32 and float64, for 1 GPU worker, --pool-cpus one-core CPU workers, and the mixed pool (both),
with each pool's unit counts per kind and pass tail; without a GPU it says so and times only the CPUs.
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
from dist_sae.train.problem import PassProblem, local_problem
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


GPU_POOL = {"kind": "gpu", "num": 1, "gpus": 1, "cpus": 1}


def pools_of(name: str, cpus: int) -> list[dict]:
    """workers.pools of the --pools layouts: 1 GPU worker, `cpus` one-core CPU workers, or both."""
    cpu_pool = {"kind": "cpu", "num": cpus, "cpus": 1}
    return {"1_gpu": [GPU_POOL], "cpu": [cpu_pool], "mixed": [GPU_POOL, cpu_pool]}[name]


def bench_pools(path: Path, cpus: int, repeats: int, block_rows: int) -> dict:
    """examples/s of J, ∇J on 784-1024-784 per pool and compute dtype (float32 and float64)."""
    from dist_sae.cluster.ray_session import ClusterSession

    ds = Dataset.open(path)
    gpus = torch.cuda.is_available()
    out: dict = {"rows": ds.rows, "model": "784-1024-784", "block_rows": block_rows, "gpu": torch.cuda.get_device_name(0) if gpus else None}
    for dtype in ("float32", "float64"):
        for name in ("1_gpu", "cpu", "mixed"):
            if name != "cpu" and not gpus:
                out[f"{name}_{dtype}"] = "skipped: no GPU on this machine"
                continue
            cfg = bind_dataset(load_config(None, {
                "model.hidden": [1024], "compute.dtype": dtype, "data.block_rows": block_rows, "data.path": str(path),
                "run.quiet": True, "workers.pools": pools_of(name, cpus)}), ds)
            session = ClusterSession(cfg, ds, dashboard=False)
            try:
                theta = initial_theta(cfg, None)
                seconds, ev = best_time(lambda: session.problem.evaluate(theta), repeats)
                kinds = [session.launcher.kind(i) for i in range(session.num_workers)]
                counts = session.problem.evaluator.last_counts
                out[f"{name}_{dtype}"] = {
                    "examples_per_s": ds.rows / seconds, "evaluation_s": seconds, "tail_s": ev.stats.get("tail_s"),
                    "units_by_kind": {k: sum(c for w, c in counts.items() if kinds[w] == k) for k in sorted(set(kinds))},
                    **{k: v for k, v in ev.stats.items() if k.startswith("rows_per_s_")},
                }
            finally:
                session.close()
            print(f"pools: {name} {dtype} {ds.rows / seconds:,.0f} ex/s", file=sys.stderr)
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
    parser.add_argument("--pools", action="store_true", help="only the GPU / CPU / mixed pools on 784-1024-784")
    parser.add_argument("--pool-rows", type=int, default=262_144, help="rows of the 784-dim dataset of --pools")
    parser.add_argument("--pool-cpus", type=int, default=16, help="one-core CPU workers of --pools")
    args = parser.parse_args(argv)

    from dist_sae.cluster import runtime

    workers = [int(w) for w in args.workers.split(",") if w]
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "repeats": args.repeats,
        "block_rows": args.block_rows,
        "compute_dtype": "float64",
    }
    runtime.start_local(num_cpus=max(workers + [os.cpu_count() or 1, args.pool_cpus + 1]), dashboard=False)
    try:
        with tempfile.TemporaryDirectory(prefix="dsae-bench-") as tmp:
            if args.pools:
                write_synthetic(Path(tmp) / "pools", args.pool_rows, 784, seed=4)
                result["pools"] = bench_pools(Path(tmp) / "pools", args.pool_cpus, args.repeats, max(args.block_rows, 65536))
            else:
                write_synthetic(Path(tmp) / "demo", 10_000, 64, seed=1)
                result["demo"] = bench_dataset("demo", Path(tmp) / "demo", args.hidden, args.repeats, workers, args.block_rows)
            if not args.skip_large and not args.pools:
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
