"""Compute: the engine streaming vs a plain in-memory PyTorch loop; two-pass / one-pass vs pass 2; threads.

    stream_vs_memory   examples/s of the engine streaming HDF5 (data.cache_mb=0) / PlainTorch over
                       the same rows held in one in-memory tensor (the ceiling here)
    twopass_vs_pass2   exact two-pass evaluation / pass 2 alone (ρ̂ given)
    onepass_vs_pass2   one-pass evaluation (sparsity.passes=1) / pass 2 alone
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dist_sae.bench.synthetic import read_all
from dist_sae.bench.timing import interleaved, med, summary
from dist_sae.config import load_config
from dist_sae.data.dataset import Dataset
from dist_sae.session import initial_theta
from dist_sae.train.inputs import bind_dataset
from dist_sae.train.problem import PassProblem, local_problem
from dist_sae.train.units import TORCH_DEFAULT_THREADS


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


def bench_config(path: Path, hidden: int, **overrides):
    """(the dataset at `path`, the default config for a `hidden`-unit model on it, bound to the data)."""
    ds = Dataset.open(path)
    cfg = load_config(None, {"model.hidden": [hidden], "data.path": str(path), "run.quiet": True, **overrides})
    return ds, bind_dataset(cfg, ds)


def bench_compute(path: Path, hidden: int, reps: int, block_rows: int = 16384) -> dict:
    """Exact evaluations of one model on one dataset, every variant interleaved in one loop."""
    # Two passes pinned: the two-pass path is what twopass_vs_pass2 measures (one-pass has its own ratio).
    ds, cfg = bench_config(path, hidden, **{"data.block_rows": block_rows, "sparsity.passes": 2})
    theta = initial_theta(cfg, None)
    stream = local_problem(cfg.with_overrides({"data.cache_mb": 0}), ds)  # HDF5 every pass
    cached = local_problem(cfg, ds)  # the default block cache: what repeated L-BFGS passes see
    autograd = local_problem(cfg, ds, backward="autograd")  # the same, pass 2 differentiated by autograd
    onepass = PassProblem(cached.evaluator, cfg.with_overrides({"sparsity.passes": 1}))
    stream_onepass = PassProblem(stream.evaluator, cfg.with_overrides({"sparsity.passes": 1}))  # reads the data once
    plain = PlainTorch(read_all(path), cfg, block_rows)
    state = cached.evaluate(theta).sparsity
    fns = {
        "stream_twopass": lambda: stream.evaluate(theta),
        "stream_onepass": lambda: stream_onepass.evaluate(theta),
        "memory_whole": lambda: plain.whole(theta),
        "memory_blocked": lambda: plain.blocked(theta),
        "cached_twopass": lambda: cached.evaluate(theta),
        "cached_pass2": lambda: cached.evaluate(theta, None, state),
        "cached_onepass": lambda: onepass.evaluate(theta),
        "cached_pass2_autograd": lambda: autograd.evaluate(theta, None, state),
    }
    times = interleaved(fns, reps)
    # The three give the same J and ∇J: check it, so that the ratios compare like with like.
    ev = cached.evaluate(theta)
    checks = {}
    for name, (loss, grad) in {"memory_whole": plain.whole(theta), "memory_blocked": plain.blocked(theta)}.items():
        checks[f"{name}_grad_rel_diff"] = _rel_diff(grad, ev.grad)
        checks[f"{name}_J_rel_diff"] = abs(loss - ev.loss) / abs(ev.loss)
    checks["onepass_grad_rel_diff"] = _rel_diff(onepass.evaluate(theta).grad, ev.grad)
    pass2 = cached.evaluate(theta, None, state).grad
    checks["pass2_autograd_grad_rel_diff"] = _rel_diff(autograd.evaluate(theta, None, state).grad, pass2)
    m = {k: med(v) for k, v in times.items()}
    memory_best = min(m["memory_whole"], m["memory_blocked"])
    for problem in (stream, cached, autograd):
        problem.evaluator.close()
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


def _rel_diff(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def bench_threads(path: Path, hidden: int, reps: int) -> dict:
    """The single-process engine at 1 thread vs torch's default, interleaved (compute.threads)."""
    ds, cfg = bench_config(path, hidden)
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
