#!/usr/bin/env python
"""The performance suite (issue #8): dist_sae against its ceilings and its peer, side by side, in one run.

    python scripts/bench.py [--quick] [--out bench_out] [--reps 5]
    dist-sae bench [--quick] [--out DIR]

Writes OUT/bench.json (a `ratios` object, the targets, every measurement behind them) and OUT/bench.md
(the table). Every figure is the median of --reps timed repetitions after a warm-up; the things a
ratio compares run in the same process (or the same run), interleaved round by round in rotating
order, so load from other processes falls on both sides alike.

    stream_vs_memory        examples/s of the engine streaming HDF5 (data.cache_mb=0) / a plain PyTorch
                            loop over the same rows held in one in-memory tensor (the ceiling here)
    twopass_vs_pass2        exact two-pass evaluation / pass 2 alone (ρ̂ given)
    onepass_vs_pass2        one-pass evaluation (sparsity.passes=1) / pass 2 alone
    ray2_vs_local           examples/s of Ray with 2 workers / the single-process engine, >= 1e6 rows
    exercise_vs_numpy_peer  wall time of `dist-sae train` (local Ray) on the notes' exercise / a plain
                            NumPy + scipy L-BFGS-B implementation of the same objective
    rss_16x_vs_1x           peak RSS of one worker evaluating 16x the data / 1x (fresh subprocesses)

The compute ratios are given for the notes' 64-25-64 model and for 784-1024-784. --quick uses small
sizes and few repetitions (under 2 minutes); its numbers are for checking the suite, not for quoting.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the partial benchmarks beside this file
from bench_cluster import write_synthetic  # noqa: E402  (reused: synthetic rows in [0.1, 0.9])

import dist_sae.objective as objective  # noqa: E402
from dist_sae.api import initial_theta  # noqa: E402
from dist_sae.config import load_config  # noqa: E402
from dist_sae.data import BlockReader, Dataset  # noqa: E402
from dist_sae.demo import NOTES_SETTINGS  # noqa: E402
from dist_sae.engine import TORCH_DEFAULT_THREADS, PassProblem, bind_dataset, local_problem  # noqa: E402

TARGETS = {  # key: (comparison, bound)
    "stream_vs_memory": (">=", 0.85),
    "twopass_vs_pass2": ("<=", 1.25),
    "onepass_vs_pass2": ("<=", 1.05),
    "ray2_vs_local": (">=", 0.9),
    "exercise_vs_numpy_peer": ("<=", 0.5),
    "rss_16x_vs_1x": ("<=", 1.1),
}

SIZES = {
    # rows of the streamed/in-memory comparison per model, rows for Ray (>= 1e6 in the full run),
    # exercise iterations, RSS base rows (x16 for the large one), Ray scaling rows (784-1024)
    "full": {"rows_64": 200_000, "rows_784": 8192, "rows_ray": 1_000_000, "steps": 400, "rss_rows": 62_500,
             "scale_rows": 8192, "scale_workers": [1, 2, 4], "reps": 5, "exercise_reps": 3},
    "quick": {"rows_64": 20_000, "rows_784": 1024, "rows_ray": 100_000, "steps": 40, "rss_rows": 4096,
              "scale_rows": 2048, "scale_workers": [1, 2], "reps": 3, "exercise_reps": 1},
    "tiny": {"rows_64": 2048, "rows_784": 256, "rows_ray": 4096, "steps": 3, "rss_rows": 1024,
             "scale_rows": 2048, "scale_workers": [1, 2], "reps": 1, "exercise_reps": 1},
}
MODELS = {"64-25": (64, 25), "784-1024": (784, 1024)}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- timing --------------------------------------------------------------------------------


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


# ---- the plain PyTorch ceiling ---------------------------------------------------------------


class PlainTorch:
    """J and ∇J of the one-hidden-layer sigmoid KL objective, written as people write it in PyTorch.

    The rows sit in one in-memory float64 tensor. `whole`: one autograd graph over all rows (ρ̂ is
    a function of θ, so one backward gives the exact ∇J). `blocked`: the same two-pass surrogate
    the engine uses, a loop over blocks of the in-memory tensor with autograd.
    """

    def __init__(self, x: torch.Tensor, cfg, block_rows: int) -> None:
        self.x, self.block_rows = x, block_rows
        self.n, self.h = cfg.model.visible, cfg.model.hidden[0]
        self.lam, self.beta, self.rho = cfg.loss.weight_decay, cfg.sparsity.beta, cfg.sparsity.rho

    def _views(self, theta):
        n, h = self.n, self.h
        w1 = theta[: h * n].view(h, n)
        b1 = theta[h * n : h * n + h]
        w2 = theta[h * n + h : 2 * h * n + h].view(n, h)
        b2 = theta[2 * h * n + h :]
        return w1, b1, w2, b2

    def _penalty(self, theta, rho_hat):
        w1, _, w2, _ = self._views(theta)
        kl = self.rho * torch.log(self.rho / rho_hat) + (1 - self.rho) * torch.log((1 - self.rho) / (1 - rho_hat))
        return 0.5 * self.lam * ((w1 * w1).sum() + (w2 * w2).sum()) + self.beta * kl.sum()

    def whole(self, theta_np: np.ndarray) -> tuple[float, np.ndarray]:
        theta = torch.tensor(theta_np, requires_grad=True)
        w1, b1, w2, b2 = self._views(theta)
        a1 = torch.sigmoid(torch.addmm(b1, self.x, w1.t()))
        out = torch.sigmoid(torch.addmm(b2, a1, w2.t()))
        m = self.x.shape[0]
        loss = 0.5 * ((out - self.x) ** 2).sum() / m + self._penalty(theta, a1.mean(0))
        (grad,) = torch.autograd.grad(loss, theta)
        return float(loss.detach()), grad.numpy()

    def blocked(self, theta_np: np.ndarray) -> tuple[float, np.ndarray]:
        theta = torch.tensor(theta_np, requires_grad=True)
        w1, b1, w2, b2 = self._views(theta)
        m, blocks = self.x.shape[0], torch.split(self.x, self.block_rows)
        with torch.no_grad():
            rho_hat = sum(torch.sigmoid(torch.addmm(b1, xb, w1.t())).sum(0) for xb in blocks) / m
        g = self.beta * (-self.rho / rho_hat + (1 - self.rho) / (1 - rho_hat))
        grad, recon = torch.zeros_like(theta), 0.0
        for xb in blocks:
            a1 = torch.sigmoid(torch.addmm(b1, xb, w1.t()))
            out = torch.sigmoid(torch.addmm(b2, a1, w2.t()))
            rec = 0.5 * ((out - xb) ** 2).sum()
            (gb,) = torch.autograd.grad(rec + (a1 * g).sum(), theta)
            grad += gb
            recon += float(rec.detach())
        with torch.no_grad():
            penalty = float(self._penalty(theta, rho_hat))  # weight decay + KL; KL's gradient went in via g
        return recon / m + penalty, grad.numpy() / m + self.lam * _weights_only(theta_np, self.n, self.h)


def _weights_only(theta: np.ndarray, n: int, h: int) -> np.ndarray:
    out = theta.copy()
    out[h * n : h * n + h] = 0.0
    out[2 * h * n + h :] = 0.0
    return out


def read_all(path: Path) -> torch.Tensor:
    ds = Dataset.open(path)
    with BlockReader(ds) as reader:
        return torch.from_numpy(np.concatenate([reader.read(u) for u in ds.units(65536)]).astype(np.float64))


# ---- 1. compute: stream vs memory, two-pass / one-pass vs pass 2, autograd vs hand-written -----


def bench_compute(path: Path, hidden: int, reps: int, block_rows: int = 16384) -> dict:
    """Exact evaluations of one model on one dataset, every variant interleaved in one loop."""
    ds = Dataset.open(path)
    cfg = bind_dataset(load_config(None, {"model.hidden": [hidden], "data.path": str(path), "data.block_rows": block_rows,
                                          "run.quiet": True}), ds)
    theta = initial_theta(cfg, None)
    stream = local_problem(cfg.with_overrides({"data.cache_mb": 0}), ds)  # HDF5 every pass
    cached = local_problem(cfg, ds)  # the default block cache: what repeated L-BFGS passes see
    onepass = PassProblem(cached.evaluator, cfg.with_overrides({"sparsity.passes": 1}))
    stream_onepass = PassProblem(stream.evaluator, cfg.with_overrides({"sparsity.passes": 1}))  # reads the data once
    plain = PlainTorch(read_all(path), cfg, block_rows)
    state = cached.evaluate(theta).sparsity

    def autograd_pass2():
        objective.USE_HANDWRITTEN = False
        try:
            cached.evaluate(theta, None, state)
        finally:
            objective.USE_HANDWRITTEN = True

    fns = {
        "stream_twopass": lambda: stream.evaluate(theta),
        "stream_onepass": lambda: stream_onepass.evaluate(theta),
        "memory_whole": lambda: plain.whole(theta),
        "memory_blocked": lambda: plain.blocked(theta),
        "cached_twopass": lambda: cached.evaluate(theta),
        "cached_pass2": lambda: cached.evaluate(theta, None, state),
        "cached_onepass": lambda: onepass.evaluate(theta),
        "cached_pass2_autograd": autograd_pass2,
    }
    times = interleaved(fns, reps)
    # The three give the same J and ∇J: check it, so that the ratios compare like with like.
    ev = cached.evaluate(theta)
    checks = {}
    for name, (loss, grad) in {"memory_whole": plain.whole(theta), "memory_blocked": plain.blocked(theta)}.items():
        checks[f"{name}_grad_rel_diff"] = float(np.linalg.norm(grad - ev.grad) / np.linalg.norm(ev.grad))
        checks[f"{name}_J_rel_diff"] = abs(loss - ev.loss) / abs(ev.loss)
    ev1 = onepass.evaluate(theta)
    checks["onepass_grad_rel_diff"] = float(np.linalg.norm(ev1.grad - ev.grad) / np.linalg.norm(ev.grad))
    m = {k: med(v) for k, v in times.items()}
    memory_best = min(m["memory_whole"], m["memory_blocked"])
    stream.evaluator.close()
    cached.evaluator.close()
    return {
        "model": f"{ds.dim}-{hidden}-{ds.dim}", "rows": ds.rows, "params": int(theta.size), "units": len(cached.units),
        "threads": torch.get_num_threads(), "dtype": cfg.compute.dtype,
        "times": summary(times), "checks": checks,
        "examples_per_s": {"stream_twopass": ds.rows / m["stream_twopass"], "memory_best": ds.rows / memory_best},
        "ratios": {
            "stream_vs_memory": memory_best / m["stream_twopass"],  # examples/s ratio = inverse time ratio
            "twopass_vs_pass2": m["cached_twopass"] / m["cached_pass2"],
            "onepass_vs_pass2": m["cached_onepass"] / m["cached_pass2"],
            "onepass_vs_twopass": m["cached_onepass"] / m["cached_twopass"],
            "stream_onepass_vs_twopass": m["stream_onepass"] / m["stream_twopass"],
            "pass2_autograd_vs_handwritten": m["cached_pass2_autograd"] / m["cached_pass2"],
        },
    }


def bench_threads(path: Path, hidden: int, reps: int) -> dict:
    """The single-process engine at 1 thread vs torch's default, interleaved (compute.threads)."""
    ds = Dataset.open(path)
    cfg = bind_dataset(load_config(None, {"model.hidden": [hidden], "data.path": str(path), "run.quiet": True}), ds)
    theta = initial_theta(cfg, None)
    problem = local_problem(cfg, ds)
    default = TORCH_DEFAULT_THREADS  # torch's default here (the engine may have picked fewer for the load)

    def at(threads):
        def fn():
            torch.set_num_threads(threads)
            try:
                problem.evaluate(theta)
            finally:
                torch.set_num_threads(default)
        return fn

    times = interleaved({f"threads_{t}": at(t) for t in sorted({1, default})}, reps)
    problem.evaluator.close()
    out = {"model": f"{ds.dim}-{hidden}-{ds.dim}", "rows": ds.rows, "times": summary(times)}
    if default != 1:
        out["default_over_1"] = med(times[f"threads_{default}"]) / med(times["threads_1"])
    return out


# ---- 2. Ray: 2 workers vs the single-process engine; the scaling model's terms ------------------


def bench_ray(path: Path, hidden: int, reps: int, workers: list[int], block_rows: int = 16384, components: bool = False) -> dict:
    """Exact two-pass evaluations on Ray with each worker count and in this process, interleaved."""
    import ray

    from dist_sae.cluster.session import ClusterSession
    from dist_sae.objective import add_sums

    ds = Dataset.open(path)
    cfg = bind_dataset(load_config(None, {"model.hidden": [hidden], "data.path": str(path), "data.block_rows": block_rows,
                                          "run.quiet": True}), ds)
    theta = initial_theta(cfg, None)
    local = local_problem(cfg, ds)
    sessions = {n: ClusterSession(cfg.with_overrides({"workers.num": n}), ds, dashboard=False) for n in workers}
    try:
        fns = {"local": lambda: local.evaluate(theta)}
        for n, session in sessions.items():
            fns[f"ray_{n}"] = (lambda s: lambda: s.problem.evaluate(theta))(session)
        times = interleaved(fns, reps)
        ref = local.evaluate(theta).grad
        out: dict = {"model": f"{ds.dim}-{hidden}-{ds.dim}", "rows": ds.rows, "params": int(theta.size),
                     "units": len(local.units), "local_threads": torch.get_num_threads(), "times": summary(times),
                     "examples_per_s": {k: ds.rows / med(v) for k, v in times.items()}}
        for n, session in sessions.items():
            ev = session.problem.evaluate(theta)
            out[f"ray_{n}_grad_equal_local"] = bool(np.array_equal(ev.grad, ref))
            out[f"ray_{n}_vs_local"] = med(times["local"]) / med(times[f"ray_{n}"])
            out[f"ray_{n}_units_per_worker"] = session.problem.evaluator.last_counts
        if components:  # the terms of docs/scaling.md's cost model, measured here
            t_put = interleaved({"put": lambda: ray.put(theta + 0.0)}, max(reps, 5))["put"]
            part = {"grad": np.ones(theta.size), "act": np.ones(hidden), "rows": np.array(1.0)}
            t_add = interleaved({"add": lambda: add_sums({k: v.copy() for k, v in part.items()}, part)}, max(reps, 5))["add"]
            unit = local.units[0]
            runner = local.evaluator.runner
            runner.set_theta(theta, "bench")
            block = runner.load(unit)
            t_unit = interleaved({"p1": lambda: runner.compute("pass1", unit, block),
                                  "p2": lambda: runner.compute("pass2", unit, block)}, max(reps, 5))
            out["components"] = {"put_theta_s": med(t_put), "add_one_unit_sums_s": med(t_add),
                                 "pass1_unit_s": med(t_unit["p1"]), "pass2_unit_s": med(t_unit["p2"]),
                                 "unit_rows": unit.rows, "theta_mb": theta.nbytes / 2**20}
        return out
    finally:
        for session in sessions.values():
            session.close()
        local.evaluator.close()


# ---- 3. the notes' exercise: `dist-sae train` on local Ray vs a NumPy/SciPy peer ----------------


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def numpy_cost(theta: np.ndarray, x: np.ndarray, n: int, h: int, lam: float, beta: float, rho: float) -> tuple[float, np.ndarray]:
    """The notes' sparseAutoencoderCost in NumPy (rows are examples): J and ∇J, θ in dist_sae's layout."""
    m = x.shape[0]
    w1 = theta[: h * n].reshape(h, n)
    b1 = theta[h * n : h * n + h]
    w2 = theta[h * n + h : 2 * h * n + h].reshape(n, h)
    b2 = theta[2 * h * n + h :]
    a2 = sigmoid(x @ w1.T + b1)  # (m, h)
    a3 = sigmoid(a2 @ w2.T + b2)  # (m, n)
    rho_hat = a2.mean(0)
    diff = a3 - x
    kl = rho * np.log(rho / rho_hat) + (1 - rho) * np.log((1 - rho) / (1 - rho_hat))
    cost = 0.5 * np.sum(diff * diff) / m + 0.5 * lam * (np.sum(w1 * w1) + np.sum(w2 * w2)) + beta * kl.sum()
    d3 = diff * a3 * (1 - a3)
    sparse = beta * (-rho / rho_hat + (1 - rho) / (1 - rho_hat))
    d2 = (d3 @ w2 + sparse) * a2 * (1 - a2)
    grad = np.concatenate([
        (d2.T @ x / m + lam * w1).ravel(), d2.sum(0) / m,
        (d3.T @ a2 / m + lam * w2).ravel(), d3.sum(0) / m,
    ])
    return cost, grad


# The peer as people run it: its own process with NumPy, SciPy and h5py only (no torch in the process,
# whose OpenMP threads would compete with NumPy's BLAS threads). argv: dataset folder, θ0 .npy, iterations.
PEER_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import h5py, numpy as np
from scipy.optimize import minimize
def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))
def cost(theta, x, n, h, lam, beta, rho):
    m = x.shape[0]
    w1 = theta[: h * n].reshape(h, n); b1 = theta[h * n : h * n + h]
    w2 = theta[h * n + h : 2 * h * n + h].reshape(n, h); b2 = theta[2 * h * n + h :]
    a2 = sigmoid(x @ w1.T + b1)
    a3 = sigmoid(a2 @ w2.T + b2)
    rho_hat = a2.mean(0)
    diff = a3 - x
    kl = rho * np.log(rho / rho_hat) + (1 - rho) * np.log((1 - rho) / (1 - rho_hat))
    j = 0.5 * np.sum(diff * diff) / m + 0.5 * lam * (np.sum(w1 * w1) + np.sum(w2 * w2)) + beta * kl.sum()
    d3 = diff * a3 * (1 - a3)
    d2 = (d3 @ w2 + beta * (-rho / rho_hat + (1 - rho) / (1 - rho_hat))) * a2 * (1 - a2)
    grad = np.concatenate([(d2.T @ x / m + lam * w1).ravel(), d2.sum(0) / m, (d3.T @ a2 / m + lam * w2).ravel(), d3.sum(0) / m])
    return j, grad
folder, theta_file, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
meta = json.load(open(folder + "/dataset.json"))
x = np.concatenate([h5py.File(folder + "/" + s["file"], "r")["x"][:] for s in meta["shards"]]).astype(np.float64)
theta0 = np.load(theta_file)
t1 = time.perf_counter()
res = minimize(cost, theta0, args=(x, 64, 25, 1e-4, 3.0, 0.01), jac=True, method="L-BFGS-B",
               options={"maxiter": steps, "maxfun": 10 * steps})
t2 = time.perf_counter()
np.save(theta_file + ".final.npy", res.x)
print(json.dumps({"optimize_s": t2 - t1, "startup_s": t1 - t0, "J": float(res.fun), "iterations": int(res.nit),
                  "evaluations": int(res.nfev)}))
"""


def peer_process(data: Path, theta0: np.ndarray, steps: int, tmp: Path, threads: int | None) -> dict:
    """The NumPy/SciPy peer in a fresh process; wall_s is the process's whole life, as for `dist-sae train`."""
    theta_file = tmp / "peer_theta0.npy"
    np.save(theta_file, theta0)
    env = dict(os.environ)
    if threads:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEER_CHILD, str(data), str(theta_file), str(steps)], capture_output=True,
                          text=True, env=env, check=True)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


NOTES_OVERRIDES = [f"{k}={json.dumps(v)}" for k, v in NOTES_SETTINGS.items() if k != "optim.steps"]


def train_cli(data: Path, out: Path, steps: int, local: bool, extra: list[str] | None = None) -> dict:
    """`dist-sae train` on the exercise in a fresh process: wall time, its own training seconds, final θ's J."""
    cmd = [sys.executable, "-m", "dist_sae", "train", "--data", str(data), "--out", str(out), "--overwrite", "--quiet",
           *NOTES_OVERRIDES, f"optim.steps={steps}", "run.report=false", "run.checkpoint_every=0", *(extra or [])]
    if local:
        cmd.append("--local")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    match = re.search(r"trained (\d+) steps in ([0-9.]+)s", proc.stdout)
    summary_json = json.loads((out / "run.json").read_text())
    return {"wall_s": wall, "train_s": float(match.group(2)) if match else float("nan"), "steps": summary_json["steps"],
            "last_metrics_J": summary_json["final"].get("J")}


def final_theta(run: Path) -> np.ndarray:
    from dist_sae.model import load_model

    model, _ = load_model(run)
    return model.theta.detach().numpy().copy()


RAY_STARTUP = r"""
import json, sys, time
t0 = time.perf_counter()
from dist_sae.config import load_config
from dist_sae.data import Dataset
from dist_sae.engine import bind_dataset
from dist_sae.cluster.session import ClusterSession
t1 = time.perf_counter()
ds = Dataset.open(sys.argv[1])
cfg = bind_dataset(load_config(None, ["model.hidden=[25]", "run.quiet=true"]), ds)
session = ClusterSession(cfg, ds)
t2 = time.perf_counter()
session.close()
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "startup_s": t2 - t1, "shutdown_s": t3 - t2, "workers": len(session.worker_info)}))
"""


def bench_exercise(tmp: Path, steps: int, reps: int, float32: bool = False, onepass: bool = True) -> dict:
    """The notes' exercise through the CLI on local Ray (and --local), and the NumPy peer, interleaved."""
    from dist_sae.prep import build_patches

    data = tmp / "patches"
    if not data.exists():
        build_patches(data)
    x = read_all(data).numpy()
    cfg = bind_dataset(load_config(None, NOTES_OVERRIDES + [f"data.path={data}"]), Dataset.open(data))
    theta0 = initial_theta(cfg, None)
    runs: dict[str, list[dict]] = {"ray": [], "ray_onepass": [], "local": [], "peer": [], "peer_1thread": [], "startup": []}
    if float32:
        runs["ray_float32"] = []
    for r in range(reps):
        order = ["ray", "peer", "local", "peer_1thread", "startup"] + (["ray_onepass"] if onepass else [])
        order += ["ray_float32"] if float32 else []
        for name in order[r % len(order):] + order[: r % len(order)]:
            if name in ("peer", "peer_1thread"):  # BLAS threads: NumPy's default, or 1
                runs[name].append(peer_process(data, theta0, steps, tmp, 1 if name == "peer_1thread" else None))
            elif name == "startup":
                proc = subprocess.run([sys.executable, "-c", RAY_STARTUP, str(data)], capture_output=True, text=True, check=True)
                runs["startup"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            else:
                out = tmp / f"run_{name}"
                extra = {"ray_float32": ["compute.dtype=float32"], "ray_onepass": ["sparsity.passes=1"]}.get(name, [])
                result = train_cli(data, out, steps, local=(name == "local"), extra=extra)
                # J at the final θ, computed by the peer's own cost function: the same objective for both.
                result["J"] = float(numpy_cost(final_theta(out), x, 64, 25, 1e-4, 3.0, 0.01)[0])
                runs[name].append(result)
            log(f"exercise {name}: {runs[name][-1].get('wall_s', runs[name][-1].get('startup_s')):.2f}s")
    m = lambda name, key: med([r[key] for r in runs[name]])  # noqa: E731
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


# ---- 4. memory: peak RSS of one worker at 1x and 16x the data -----------------------------------

RSS_CHILD = r"""
import json, resource, sys, time
from dist_sae.api import evaluate_at_init
t0 = time.perf_counter()
ev = evaluate_at_init(sys.argv[1], ["model.hidden=[25]", "workers.engine=local", "compute.threads=1",
                                     "data.block_rows=16384", f"data.cache_mb={sys.argv[2]}"])
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child would report its
# parent's peak (the benchmark driver's) whenever that is the larger.
hwm_kb = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1])
print(json.dumps({"rows": ev.rows, "J": ev.loss, "seconds": time.perf_counter() - t0, "peak_rss_mb": hwm_kb / 1024,
                  "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def bench_rss(small: Path, large: Path, reps: int) -> dict:
    """Peak RSS of a fresh process evaluating J, ∇J once, at 1x and 16x rows, with and without the cache."""
    out: dict = {}
    for cache_mb in (0, 512):
        runs: dict[str, list[float]] = {"1x": [], "16x": []}
        for r in range(reps):
            for name, path in (("1x", small), ("16x", large))[:: 1 if r % 2 == 0 else -1]:
                proc = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path), str(cache_mb)], capture_output=True, text=True,
                                      check=True)
                runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"])
        out[f"cache_mb_{cache_mb}"] = {"peak_rss_mb": {k: med(v) for k, v in runs.items()},
                                       "ratio": med(runs["16x"]) / med(runs["1x"])}
    out["rows"] = {"1x": Dataset.open(small).rows, "16x": Dataset.open(large).rows}
    out["data_mb_as_float64"] = {k: v * 64 * 8 / 2**20 for k, v in out["rows"].items()}
    return out


# ---- the suite -----------------------------------------------------------------------------


def run_suite(out_dir: Path, size: str = "full", reps: int | None = None, skip: set[str] | None = None, float32: bool = False) -> dict:
    """Run every benchmark, write out_dir/bench.json and bench.md, return the report."""
    from dist_sae.cluster import runtime

    sz = dict(SIZES[size])
    reps = reps or sz["reps"]
    skip = skip or set()
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    report: dict = {
        "command": "python scripts/bench.py " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name == "bench.py" else "dist-sae bench",
        "size": size, "reps": reps,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.is_available(),
                    "loadavg_start": os.getloadavg()},
        "settings": {"compute_dtype": "float64", "block_rows": 16384, "cache_mb_default": 512,
                     "workers": "Ray: 1 CPU and 1 torch thread per worker; single process: torch's default threads"},
    }
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="dsae-bench-") as tmp_name:
        tmp = Path(tmp_name)
        data = {}
        log(f"writing data ({size})")
        data["64"] = write_synthetic(tmp / "d64", sz["rows_64"], 64, seed=1).path
        data["784"] = write_synthetic(tmp / "d784", sz["rows_784"], 784, seed=2).path
        if "compute" not in skip:
            report["compute"] = {}
            for name, (dim, hidden) in MODELS.items():
                log(f"compute {name}")
                report["compute"][name] = bench_compute(data["64" if dim == 64 else "784"], hidden, reps)
            log("threads")
            report["threads"] = bench_threads(data["64"], 25, reps)
            r = report["compute"]["64-25"]["ratios"]
            ratios.update({k: r[k] for k in ("stream_vs_memory", "twopass_vs_pass2", "onepass_vs_pass2")})
        ray_needed = not {"ray", "scaling"} <= skip
        if ray_needed:
            runtime.start_local(num_cpus=8, dashboard=False)
        try:
            if "ray" not in skip:
                log(f"ray: {sz['rows_ray']} rows")
                data["ray"] = write_synthetic(tmp / "dray", sz["rows_ray"], 64, seed=3).path
                report["ray"] = bench_ray(data["ray"], 25, reps, [2])
                ratios["ray2_vs_local"] = report["ray"]["ray_2_vs_local"]
            if "scaling" not in skip:
                log("scaling: 784-1024 at W = " + ",".join(map(str, sz["scale_workers"])))
                data["scale"] = write_synthetic(tmp / "dscale", sz["scale_rows"], 784, seed=4).path
                report["scaling"] = bench_ray(data["scale"], 1024, reps, sz["scale_workers"],
                                              block_rows=max(64, sz["scale_rows"] // 8), components=True)
        finally:
            if ray_needed:
                runtime.stop_local()
        if "exercise" not in skip:
            log(f"exercise: {sz['steps']} iterations x {sz['exercise_reps']}")
            report["exercise"] = bench_exercise(tmp, sz["steps"], sz["exercise_reps"], float32, onepass=size == "full")
            ratios["exercise_vs_numpy_peer"] = report["exercise"]["ray_wall_s"] / report["exercise"]["peer_wall_s"]
        if "rss" not in skip:
            log("rss")
            small = write_synthetic(tmp / "rss1", sz["rss_rows"], 64, seed=5).path
            if "ray" in data and Dataset.open(data["ray"]).rows == 16 * sz["rss_rows"]:
                large = data["ray"]  # the 1e6-row set of the Ray benchmark is exactly 16x
            else:
                large = write_synthetic(tmp / "rss16", 16 * sz["rss_rows"], 64, seed=6).path
            report["rss"] = bench_rss(small, large, 1 if size != "full" else 3)
            ratios["rss_16x_vs_1x"] = report["rss"]["cache_mb_0"]["ratio"]
    report["ratios"] = ratios
    if "compute" in report:
        report["ratios_784_1024"] = {k: report["compute"]["784-1024"]["ratios"][k]
                                     for k in ("stream_vs_memory", "twopass_vs_pass2", "onepass_vs_pass2")}
    report["targets"] = {k: {"target": f"{op} {bound}", "value": ratios.get(k),
                             "met": None if k not in ratios else (ratios[k] >= bound if op == ">=" else ratios[k] <= bound)}
                         for k, (op, bound) in TARGETS.items()}
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["seconds"] = time.perf_counter() - t_start
    report["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    (out_dir / "bench.md").write_text(markdown(report))
    return report


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def markdown(report: dict) -> str:
    """The table of ratios against targets, then the figures behind them."""
    lines = ["| ratio | value | target | met |", "|---|---|---|---|"]
    for key, t in report["targets"].items():
        value = "—" if t["value"] is None else f"{t['value']:.3f}"
        met = "—" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| `{key}` | {value} | {t['target']} | {met} |")
    for key, value in report.get("ratios_784_1024", {}).items():
        lines.append(f"| `{key}` (784-1024) | {value:.3f} | {report['targets'][key]['target']} | — |")
    lines.append("")
    c = report.get("compute", {})
    if c:
        lines += ["| model | rows | streamed ex/s | in-memory PyTorch ex/s | pass 2 autograd / hand-written |", "|---|---|---|---|---|"]
        for name, r in c.items():
            lines.append(f"| {r['model']} | {r['rows']:,} | {r['examples_per_s']['stream_twopass']:,.0f} | "
                         f"{r['examples_per_s']['memory_best']:,.0f} | {r['ratios']['pass2_autograd_vs_handwritten']:.2f} |")
        lines.append("")
    if "exercise" in report:
        e = report["exercise"]
        lines += [
            f"Exercise ({e['rows']:,} patches, 64-25-64, {e['iterations']} L-BFGS iterations), wall time of a fresh process each:",
            "",
            "| run | wall s | final J |",
            "|---|---|---|",
            f"| `dist-sae train` (local Ray, 2 workers) | {e['ray_wall_s']:.1f} (training {e['ray_train_s']:.1f}) | {e['J_ray']:.6g} |",
        ]
        if "ray_onepass_wall_s" in e:
            lines.append(f"| the same, `sparsity.passes=1` | {e['ray_onepass_wall_s']:.1f} (training {e['ray_onepass_train_s']:.1f}) | "
                         f"{e['J_ray_onepass']:.6g} |")
        if "ray_float32_wall_s" in e:
            lines.append(f"| the same, `compute.dtype=float32` | {e['ray_float32_wall_s']:.1f} | {e['J_ray_float32']:.6g} |")
        lines += [
            f"| `dist-sae train --local` | {e['local_wall_s']:.1f} | {e['J_local']:.6g} |",
            f"| NumPy + SciPy L-BFGS-B, 1 BLAS thread | {e['peer_1thread_wall_s']:.1f} (optimizer {e['peer_optimize_s']:.1f}) | {e['J_peer_1thread']:.6g} |",
            f"| NumPy + SciPy L-BFGS-B, default BLAS threads | {e['peer_default_threads_wall_s']:.1f} | {e['J_peer']:.6g} |",
            f"| Ray start-up alone (2 workers ready) | {e['ray_startup_s']:.1f} | |",
            "",
        ]
    if "rss" in report:
        r = report["rss"]
        lines.append(f"Peak RSS per worker, 1x → 16x rows ({r['rows']['1x']:,} → {r['rows']['16x']:,}): "
                     f"data.cache_mb=0 {r['cache_mb_0']['peak_rss_mb']['1x']:.0f} → {r['cache_mb_0']['peak_rss_mb']['16x']:.0f} MB; "
                     f"data.cache_mb=512 {r['cache_mb_512']['peak_rss_mb']['1x']:.0f} → {r['cache_mb_512']['peak_rss_mb']['16x']:.0f} MB.")
        lines.append("")
    m = report["machine"]
    lines.append(f"Machine: {m['cpus']} CPUs, {m['platform']}, torch {m['torch']}, GPU: {'yes' if m['gpu'] else 'none'}; "
                 f"load average {m['loadavg_start'][0]:.1f} at start. Medians of {report['reps']} interleaved repetitions.")
    return "\n".join(lines) + "\n"


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions (under 2 minutes)")
    parser.add_argument("--size", choices=sorted(SIZES), help="size preset (default: full, or quick with --quick)")
    parser.add_argument("--out", default="bench_out", help="folder for bench.json and bench.md (default bench_out)")
    parser.add_argument("--reps", type=int, help="timed repetitions per figure (default: 5 full, 3 quick)")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: compute,ray,scaling,exercise,rss")
    parser.add_argument("--float32", action="store_true", help="also train the exercise with compute.dtype=float32")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    size = args.size or ("quick" if args.quick else "full")
    report = run_suite(Path(args.out), size, args.reps, {s for s in args.skip.split(",") if s}, args.float32)
    print(json.dumps(report["ratios"], indent=2))
    print(f"wrote {Path(args.out) / 'bench.json'} and {Path(args.out) / 'bench.md'} in {report['seconds']:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
