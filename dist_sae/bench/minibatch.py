"""Minibatch training at scale (issue #21): dist_sae's ρ̂ modes against a Ray Train + Ray Data peer.

One epoch of Adam over a synthetic dataset with planted sparse structure (64-25-64 by default), at
each global batch size, with W Ray workers: examples/s of the training loop and the exact full-data
J (and mean activation) of the final model, for

    batch, ema, exact   `dist-sae train` with sparsity.rho_hat=batch / ema / exact (default policy)
    batch-onepass       batch with sparsity.passes=1: the same gradient in one round trip per step
    peer-float32/64     dist_sae.cluster.peer_train: TorchTrainer (DDP, gloo) + Ray Data Parquet,
                        ρ̂ over the global batch, the same objective, optimizer and initial θ

Runs are interleaved (each round runs every system once, in rotating order) and reported as medians.

    python -m dist_sae.bench.minibatch [--quick] [--rows 1000000] [--batches 512,4096] [--reps 3] [--out minibatch.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_sae.api import train
from dist_sae.cluster import runtime
from dist_sae.cluster.peer_train import to_parquet, train_peer
from dist_sae.config import Config, load_config
from dist_sae.data.build import build_synthetic
from dist_sae.data.dataset import Dataset
from dist_sae.sae.model import SparseAutoencoder
from dist_sae.session import initial_theta
from dist_sae.train.inputs import bind_dataset
from dist_sae.train.problem import local_problem
from dist_sae.train.units import minibatches

SYSTEMS = ["batch", "batch-onepass", "ema", "exact", "peer-float32", "peer-float64"]
MODES = {"batch": ["sparsity.rho_hat=batch", "sparsity.passes=2"], "batch-onepass": ["sparsity.rho_hat=batch", "sparsity.passes=1"],
         "ema": ["sparsity.rho_hat=ema"], "exact": ["sparsity.rho_hat=exact"]}


def log(msg: str) -> None:
    print(f"[bench-minibatch {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def base_config(data: Path, batch: int, workers: int, extra: list[str]) -> Config:
    ds = Dataset.open(data)
    cfg = load_config(None, [
        f"data.path={data}", "model.hidden=[25]", "optim.method=adam", "optim.lr=0.001", f"optim.batch_size={batch}",
        f"optim.batch_parts={workers}", "workers.engine=ray", f"workers.num={workers}", "compute.threads=1",
        "run.quiet=true", "run.report=false", *extra,
    ])
    cfg = bind_dataset(cfg, ds)
    return cfg.with_overrides([f"optim.steps={len(minibatches(ds, batch, workers))}"])  # one epoch


def final_objective(cfg: Config, theta: np.ndarray) -> dict[str, float]:
    """The exact full-data J and mean activation at θ (single process, one thread, float64)."""
    local = cfg.with_overrides(["workers.engine=local", "compute.dtype=float64", "compute.threads=1"])
    problem = local_problem(local, Dataset.open(cfg.data.path))
    try:
        ev = problem.evaluate(theta)
    finally:
        problem.evaluator.close()
    return {"J": ev.loss, "mean_activation": float(ev.layer_means[0].mean())}


def run_dist_sae(cfg: Config, mode: str, out: Path) -> dict[str, Any]:
    cfg = cfg.with_overrides([*MODES[mode], f"run.out={out}"])
    result = train(cfg, overwrite=True)
    rows = Dataset.open(cfg.data.path).rows
    final = result.final
    record = {"seconds": result.seconds, "examples_per_s": rows / result.seconds, "steps": result.steps,
              **final_objective(cfg, result.theta)}
    if mode == "exact":
        record.update({k: final.get(k) for k in ("refreshes", "refresh_interval", "rho_hat_error", "rho_hat_error_max")})
        record["refresh_share"] = (final.get("refresh_s") or 0.0) / result.seconds
    return record


def run_peer(cfg: Config, dtype: str, parquet: Path) -> dict[str, Any]:
    layout = SparseAutoencoder.from_config(cfg)
    theta0 = torch.from_numpy(initial_theta(cfg, None))
    params = {name: layout.param(name, theta0).numpy().copy() for name in ("W1", "b1", "W2", "b2")}
    sp = cfg.sparsity
    got = train_peer(parquet, params, batch_size=cfg.optim.batch_size, lr=cfg.optim.learning_rate, beta=float(sp.beta),
                     rho=float(sp.rho), weight_decay=float(cfg.loss.weight_decay), clamp_eps=sp.clamp_eps, dtype=dtype,
                     workers=cfg.workers.num, seed=cfg.run.seed)
    theta = torch.zeros_like(theta0)
    for name, value in got["params"].items():
        layout.param(name, theta).copy_(torch.from_numpy(value))
    after_first = got["seconds"] - got["first_batch_s"]
    return {"seconds": got["seconds"], "examples_per_s": got["rows"] / got["seconds"], "steps": got["steps"],
            "first_batch_s": got["first_batch_s"], "fit_s": got["fit_s"],
            "examples_per_s_after_first_batch": got["rows"] / after_first if after_first > 0 else None,
            **final_objective(cfg, theta.numpy())}


def summarise(runs: list[dict[str, Any]], rho: float) -> dict[str, Any]:
    """Medians per (batch, system), and the issue's ratios and targets."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for r in runs:
        table.setdefault(str(r["batch"]), {}).setdefault(r["system"], {"runs": []})["runs"].append(r)
    ratios: dict[str, Any] = {}
    for batch, systems in table.items():
        for name, entry in systems.items():
            for key in ("examples_per_s", "J", "mean_activation", "refresh_share", "rho_hat_error", "first_batch_s",
                        "examples_per_s_after_first_batch"):
                values = [r[key] for r in entry["runs"] if r.get(key) is not None]
                if values:
                    entry[f"median_{key}"] = float(np.median(values))
        speed = {name: e["median_examples_per_s"] for name, e in systems.items()}
        best_j = min(e["median_J"] for e in systems.values())
        b = {}
        if "batch" in speed and "peer-float64" in speed:
            b["batch_vs_peer_float64"] = speed["batch"] / speed["peer-float64"]
        if "exact" in speed and "batch" in speed:
            b["exact_vs_batch"] = speed["exact"] / speed["batch"]
        if "exact" in systems:
            b["exact_J_vs_best"] = systems["exact"]["median_J"] / best_j - 1.0
            b["exact_mean_activation_vs_rho"] = systems["exact"]["median_mean_activation"] / rho - 1.0
        ratios[batch] = b
    return {"table": table, "ratios": ratios}


def markdown(summary: dict[str, Any]) -> str:
    lines = ["| batch | system | examples/s | final J | mean activation | notes |", "|---|---|---|---|---|---|"]
    for batch, systems in summary["table"].items():
        for name, e in systems.items():
            notes = []
            if "median_refresh_share" in e:
                notes.append(f"refresh passes {100 * e['median_refresh_share']:.0f}% of training, "
                             f"ρ̂ error at last refresh {e.get('median_rho_hat_error', float('nan')):.3f}·ρ")
            if "median_examples_per_s_after_first_batch" in e:
                notes.append(f"{e['median_examples_per_s_after_first_batch']:,.0f}/s after its first batch "
                             f"({e['median_first_batch_s']:.1f} s)")
            lines.append(f"| {batch} | {name} | {e['median_examples_per_s']:,.0f} | {e['median_J']:.5f} | "
                         f"{e['median_mean_activation']:.5f} | {'; '.join(notes)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="100,000 rows, one round: a check that everything runs")
    p.add_argument("--rows", type=int, help="dataset rows (default 1,000,000; 100,000 with --quick)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batches", default="512,4096", help="global batch sizes, comma-separated")
    p.add_argument("--reps", type=int, help="rounds (default 3; 1 with --quick)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--data", help="folder for the datasets (kept between runs; default: a temporary folder)")
    p.add_argument("--set", action="append", default=[], help="extra config override for the dist_sae runs (key=value)")
    p.add_argument("--out", help="JSON report path (default: stdout only)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    reps = args.reps or (1 if args.quick else 3)
    batches = [int(b) for b in args.batches.split(",")]
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dist-sae-bench-minibatch-") as tmp:
        root = Path(args.data or tmp)
        data = root / f"synthetic-{rows}x{args.dim}"
        if not (data / "dataset.json").is_file():
            log(f"building {rows:,} x {args.dim} synthetic rows in {data}")
            build_synthetic(data, rows, dim=args.dim, seed=0)
        # One Ray for every run: dist_sae's sessions join it (and leave it up), the peer needs CPUs
        # beyond its W train workers for Ray Data's read tasks.
        runtime.start_local(num_cpus=args.workers + 2, dashboard=True)  # Ray Train V2 checks its actors through the state API
        try:
            parquet = to_parquet(data, root / f"parquet-{rows}x{args.dim}") if any(s.startswith("peer") for s in systems) else None
            runs = []
            for rep in range(reps):
                for batch in batches:
                    cfg = base_config(data, batch, args.workers, args.set)
                    order = systems[rep % len(systems):] + systems[: rep % len(systems)]
                    for name in order:
                        if name.startswith("peer"):
                            record = run_peer(cfg, name.split("-")[1], parquet)
                        else:
                            record = run_dist_sae(cfg, name, Path(tmp) / f"run-{name}-{batch}-{rep}")
                        record.update({"system": name, "batch": batch, "rep": rep})
                        log(f"round {rep + 1}/{reps} batch {batch} {name}: {record['examples_per_s']:,.0f} examples/s, "
                            f"J {record['J']:.5f}, mean activation {record['mean_activation']:.5f}")
                        runs.append(record)
        finally:
            runtime.stop_local()
        rho = float(cfg.sparsity.rho)
    summary = summarise(runs, rho)
    report = {"rows": rows, "dim": args.dim, "hidden": 25, "workers": args.workers, "batches": batches, "reps": reps,
              "overrides": args.set, "seconds": time.perf_counter() - t_start, "runs": runs, **summary}
    print(markdown(summary))
    print(json.dumps(summary["ratios"], indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=float) + "\n")
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
