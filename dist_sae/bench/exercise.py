"""The notes' exercise through the CLI vs the NumPy/SciPy peer: whole fresh processes, interleaved.

Every run trains the same patches (dist_sae.data.build.build_patches) from the same θ0, for the
same L-BFGS iterations; each round runs every kind once, in rotating order; figures are medians.

    peer_1thread   NumPy + SciPy L-BFGS-B (dist_sae.bench.peer), BLAS pinned to 1 thread: the reference
    peer           the same with NumPy's default BLAS threads
    ray            `dist-sae train` (default: a private local Ray, started and stopped by the command)
    attached       `dist-sae train --address ADDR`, joining a local Ray head already running (started
                   once for this part by dist_sae.cluster.head, token auth, stopped at the end)
    local          `dist-sae train --local`
    local32        `dist-sae train --local compute.dtype=float32`
    demo           `dist-sae demo --quiet` (data, training on Ray, report) in a temporary folder
    startup        Ray start-up alone (dist_sae.bench.ray_startup)
    ray_twopass    optional: `dist-sae train sparsity.passes=2` (the default takes one pass here); ray_float32: `compute.dtype=float32`

    exercise_ray_vs_peer, exercise_attached_vs_peer, exercise_local_vs_peer, exercise_local32_vs_peer
        median wall of that run / median wall of peer_1thread; J_rel_diff_<run>_vs_peer is its final J
        (the peer's own cost function at the final θ) against peer_1thread's
    demo_wall_s   median wall seconds of the demo
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from dist_sae.apps.demo import NOTES_SETTINGS
from dist_sae.bench.child import run_json, run_module
from dist_sae.bench.peer import numpy_cost, run_peer
from dist_sae.bench.synthetic import read_all
from dist_sae.bench.timing import log, med
from dist_sae.cluster.head import ray_cli, start_head
from dist_sae.config import load_config
from dist_sae.data.build import build_patches
from dist_sae.data.dataset import Dataset
from dist_sae.sae.model import load_model
from dist_sae.session import initial_theta
from dist_sae.train.inputs import bind_dataset

# The exercise's settings, less the iterations (a parameter); the pass mode is the engine's default.
NOTES_OVERRIDES = [f"{k}={json.dumps(v)}" for k, v in NOTES_SETTINGS.items() if k != "optim.steps"]
TRAIN_RUNS = {  # name -> (extra arguments of `dist-sae train`)
    "ray": [], "attached": [], "local": ["--local"], "local32": ["--local", "compute.dtype=float32"],
    "ray_twopass": ["sparsity.passes=2"], "ray_float32": ["compute.dtype=float32"],
}
VS_PEER = ("ray", "attached", "local", "local32")  # the ratios: exercise_<name>_vs_peer


def train_cli(data: Path, out: Path, steps: int, extra: list[str], env: dict[str, str] | None = None) -> dict:
    """`dist-sae train` on the exercise in a fresh process: wall time, its own training seconds, final J."""
    args = ["train", "--data", data, "--out", out, "--overwrite", "--quiet", *NOTES_OVERRIDES, f"optim.steps={steps}",
            "run.report=false", "run.checkpoint_every=0", *extra]
    proc, wall = run_module("dist_sae", *args, env=env)
    match = re.search(r"trained (\d+) steps in ([0-9.]+)s", proc.stdout)
    summary_json = json.loads((out / "run.json").read_text())
    return {"wall_s": wall, "train_s": float(match.group(2)) if match else float("nan"), "steps": summary_json["steps"],
            "last_metrics_J": summary_json["final"].get("J")}


def final_theta(run: Path) -> np.ndarray:
    model, _ = load_model(run)
    return model.theta.detach().numpy().copy()


def run_demo(tmp: Path, steps: int, patches: int | None = None) -> dict:
    """`dist-sae demo` in a fresh process, its output in a folder of its own: wall time, report included."""
    out = tmp / "demo"
    proc, wall = run_module("dist_sae", "demo", "--out", out, "--quiet", "--steps", steps, *(["--patches", patches] if patches else []))
    if not (out / "run" / "report" / "report.html").is_file():
        raise RuntimeError(f"dist-sae demo wrote no report:\n{proc.stdout[-2000:]}")
    match = re.search(r"in ([0-9.]+)s \(step loop", proc.stdout)
    return {"wall_s": wall, "steps_s": float(match.group(1)) if match else float("nan")}


def rotating(order: list[str], reps: int, run_one) -> dict[str, list[dict]]:
    """run_one(name) for every name, `reps` rounds, each round in rotating order."""
    runs: dict[str, list[dict]] = {name: [] for name in order}
    for r in range(reps):
        for name in order[r % len(order):] + order[: r % len(order)]:
            runs[name].append(run_one(name))
            log(f"exercise {name}: {runs[name][-1]['startup_s' if name == 'startup' else 'wall_s']:.2f}s")
    return runs


def bench_exercise(tmp: Path, steps: int, reps: int, float32: bool = False, twopass: bool = True, demo: bool = True,
                   attached: bool = True, demo_patches: int | None = None) -> dict:
    """Every run of the module docstring, interleaved; the figures, J of each and the issue's ratios.

    demo_patches: the demo's patch count (default: its own, the exercise's 10,000).
    """
    data = tmp / "patches"
    if not data.exists():
        build_patches(data)
    x = read_all(data).numpy()
    cfg = bind_dataset(load_config(None, NOTES_OVERRIDES + [f"data.path={data}"]), Dataset.open(data))
    theta0 = initial_theta(cfg, None)
    cost_args = (cfg.model.hidden[0], cfg.loss.weight_decay, cfg.sparsity.beta, cfg.sparsity.rho)
    notes = ["attached: skipped, no `ray` CLI to start a head with"] if attached and ray_cli() is None else []
    attached = attached and not notes
    order = ["peer_1thread", "ray", "local", "local32", "peer", "startup"] + ["attached"] * attached + ["demo"] * demo
    order += ["ray_twopass"] * twopass + ["ray_float32"] * float32
    # The head as the private local Ray is: every CPU of the machine, one worker per CPU.
    head = start_head(num_cpus=os.cpu_count() or 1, dashboard=False) if attached else None

    def run_one(name: str) -> dict:
        if name in ("peer", "peer_1thread"):  # BLAS threads: NumPy's default, or 1
            return run_peer(data, theta0, steps, tmp, cost_args, 1 if name == "peer_1thread" else None)
        if name == "startup":
            return run_json("dist_sae.bench.ray_startup", data)
        if name == "demo":
            return run_demo(tmp, steps, demo_patches)
        out = tmp / f"run_{name}"
        extra = TRAIN_RUNS[name] + (["--address", head.address] if name == "attached" else [])
        result = train_cli(data, out, steps, extra, env=head.env if name == "attached" else None)
        # J at the final θ, computed by the peer's own cost function: the same objective for both.
        result["J"] = float(numpy_cost(final_theta(out), x, x.shape[1], *cost_args)[0])
        return result

    try:
        if head is not None and steps > 5:  # the cluster user's head has run jobs before: its first is not timed
            train_cli(data, tmp / "run_attached_warmup", min(steps, 5), ["--address", head.address], env=head.env)
        runs = rotating(order, reps, run_one)
    finally:
        if head is not None:
            head.stop()
    return {**summarise(runs, int(x.shape[0]), steps), "notes": notes}


def summarise(runs: dict[str, list[dict]], rows: int, steps: int) -> dict:
    """Medians per run, J of each against the 1-thread peer's, and the ratios against its wall time."""
    def m(name: str, key: str) -> float:
        return med([r[key] for r in runs[name]])

    peer_wall, peer_j = m("peer_1thread", "wall_s"), m("peer_1thread", "J")
    out: dict = {"rows": rows, "iterations": steps, "runs": runs, "wall_s": {}, "J": {}, "J_rel_diff_vs_peer": {}, "ratios": {}}
    for name in runs:
        if name == "startup":
            out["ray_startup_s"], out["ray_import_s"] = m(name, "startup_s"), m(name, "import_s")
            continue
        out["wall_s"][name] = m(name, "wall_s")
        if "J" in runs[name][0]:
            out["J"][name] = m(name, "J")
            out["J_rel_diff_vs_peer"][name] = (out["J"][name] - peer_j) / peer_j
        if "train_s" in runs[name][0]:
            out.setdefault("train_s", {})[name] = m(name, "train_s")
    out["peer_optimize_s"] = m("peer_1thread", "optimize_s")
    out["peer_evaluations"] = m("peer_1thread", "evaluations")
    for name in VS_PEER:
        if name in runs:
            out["ratios"][f"exercise_{name}_vs_peer"] = out["wall_s"][name] / peer_wall
    out["ratios"]["exercise_J_vs_peer"] = max(abs(out["J_rel_diff_vs_peer"][n]) for n in VS_PEER if n in runs)
    if "demo" in runs:
        out["ratios"]["demo_wall_s"] = out["wall_s"]["demo"]
    return out
