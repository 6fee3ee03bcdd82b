"""The notes' exercise: `dist-sae train` on local Ray (and --local) vs the NumPy/SciPy peer, fresh processes.

    exercise_vs_numpy_peer   wall time of `dist-sae train` (local Ray) on the notes' exercise / a plain
                             NumPy + SciPy L-BFGS-B implementation of the same objective (dist_sae.bench.peer)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from dist_sae.apps.demo import NOTES_SETTINGS
from dist_sae.bench.child import run_json, run_module
from dist_sae.bench.peer import numpy_cost, run_peer
from dist_sae.bench.synthetic import read_all
from dist_sae.bench.timing import log, med
from dist_sae.config import load_config
from dist_sae.data.build import build_patches
from dist_sae.data.dataset import Dataset
from dist_sae.sae.model import load_model
from dist_sae.session import initial_theta
from dist_sae.train.inputs import bind_dataset

NOTES_OVERRIDES = [f"{k}={json.dumps(v)}" for k, v in NOTES_SETTINGS.items() if k != "optim.steps"]


def train_cli(data: Path, out: Path, steps: int, local: bool, extra: list[str] | None = None) -> dict:
    """`dist-sae train` on the exercise in a fresh process: wall time, its own training seconds, final θ's J."""
    args = ["train", "--data", data, "--out", out, "--overwrite", "--quiet", *NOTES_OVERRIDES, f"optim.steps={steps}",
            "run.report=false", "run.checkpoint_every=0", *(extra or [])] + (["--local"] if local else [])
    proc, wall = run_module("dist_sae", *args)
    match = re.search(r"trained (\d+) steps in ([0-9.]+)s", proc.stdout)
    summary_json = json.loads((out / "run.json").read_text())
    return {"wall_s": wall, "train_s": float(match.group(2)) if match else float("nan"), "steps": summary_json["steps"],
            "last_metrics_J": summary_json["final"].get("J")}


def final_theta(run: Path) -> np.ndarray:
    model, _ = load_model(run)
    return model.theta.detach().numpy().copy()


def _runs(reps: int, onepass: bool, float32: bool, run_one) -> dict[str, list[dict]]:
    """run_one(name) for every kind of run, `reps` rounds, each round in rotating order."""
    order = ["ray", "peer", "local", "peer_1thread", "startup"] + (["ray_onepass"] if onepass else [])
    order += ["ray_float32"] if float32 else []
    runs: dict[str, list[dict]] = {name: [] for name in order}
    for r in range(reps):
        for name in order[r % len(order):] + order[: r % len(order)]:
            runs[name].append(run_one(name))
            log(f"exercise {name}: {runs[name][-1]['startup_s' if name == 'startup' else 'wall_s']:.2f}s")
    return runs


def bench_exercise(tmp: Path, steps: int, reps: int, float32: bool = False, onepass: bool = True) -> dict:
    """The notes' exercise through the CLI on local Ray (and --local), and the NumPy peer, interleaved."""
    data = tmp / "patches"
    if not data.exists():
        build_patches(data)
    x = read_all(data).numpy()
    cfg = bind_dataset(load_config(None, NOTES_OVERRIDES + [f"data.path={data}"]), Dataset.open(data))
    theta0 = initial_theta(cfg, None)
    cost_args = (cfg.model.hidden[0], cfg.loss.weight_decay, cfg.sparsity.beta, cfg.sparsity.rho)

    def run_one(name: str) -> dict:
        if name in ("peer", "peer_1thread"):  # BLAS threads: NumPy's default, or 1
            return run_peer(data, theta0, steps, tmp, cost_args, 1 if name == "peer_1thread" else None)
        if name == "startup":
            return run_json("dist_sae.bench.ray_startup", data)
        out = tmp / f"run_{name}"
        extra = {"ray_float32": ["compute.dtype=float32"], "ray_onepass": ["sparsity.passes=1"]}.get(name, [])
        result = train_cli(data, out, steps, local=(name == "local"), extra=extra)
        # J at the final θ, computed by the peer's own cost function: the same objective for both.
        result["J"] = float(numpy_cost(final_theta(out), x, x.shape[1], *cost_args)[0])
        return result

    runs = _runs(reps, onepass, float32, run_one)

    def m(name: str, key: str) -> float:
        return med([r[key] for r in runs[name]])

    out = {
        "rows": int(x.shape[0]), "iterations": steps, "runs": runs,
        "ray_wall_s": m("ray", "wall_s"), "ray_train_s": m("ray", "train_s"), "local_wall_s": m("local", "wall_s"),
        # The peer at its best: NumPy's default BLAS threads, or 1 thread when that is faster (a busy machine).
        "peer_wall_s": min(m("peer", "wall_s"), m("peer_1thread", "wall_s")),
        "peer_default_threads_wall_s": m("peer", "wall_s"), "peer_1thread_wall_s": m("peer_1thread", "wall_s"),
        "peer_optimize_s": min(m("peer", "optimize_s"), m("peer_1thread", "optimize_s")),
        "ray_startup_s": m("startup", "startup_s"), "ray_import_s": m("startup", "import_s"),
        "J_ray": m("ray", "J"), "J_local": m("local", "J"), "J_peer": m("peer", "J"), "J_peer_1thread": m("peer_1thread", "J"),
        "peer_evaluations": m("peer", "evaluations"),
    }
    out["J_rel_diff_ray_vs_peer"] = (out["J_ray"] - out["J_peer"]) / out["J_peer"]
    out["train_only_vs_peer"] = out["ray_train_s"] / out["peer_wall_s"]
    out["local_vs_peer"] = out["local_wall_s"] / out["peer_wall_s"]
    if onepass:
        out.update({"ray_onepass_wall_s": m("ray_onepass", "wall_s"), "ray_onepass_train_s": m("ray_onepass", "train_s"),
                    "J_ray_onepass": m("ray_onepass", "J")})
    if float32:
        out["ray_float32_wall_s"] = m("ray_float32", "wall_s")
        out["J_ray_float32"] = m("ray_float32", "J")
    return out
