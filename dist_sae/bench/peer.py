"""The NumPy + SciPy peer: the notes' sparseAutoencoderCost and L-BFGS-B, as people write it without dist_sae.

    python -m dist_sae.bench.peer DATASET THETA0.npy ITERATIONS [--hidden 25 --weight-decay 1e-4 --beta 3 --rho 0.01]

Loads every row of DATASET (its HDF5 shards, with h5py) into memory, minimises J from θ0 with
scipy's L-BFGS-B, saves the final θ to THETA0.npy.final.npy and prints one JSON line (optimizer
and start-up seconds, final J, iterations, evaluations, whether torch got imported). Its own
process with NumPy, SciPy and h5py only: no torch, whose OpenMP threads would compete with
NumPy's BLAS threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from dist_sae.bench.child import print_json, run_json

BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


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


def load_rows(folder: Path) -> np.ndarray:
    """Every row of a dist_sae dataset folder in float64, read with h5py from its manifest's shards."""
    import h5py

    meta = json.loads((folder / "dataset.json").read_text())
    parts = []
    for shard in meta["shards"]:
        with h5py.File(folder / shard["file"], "r") as f:
            parts.append(f["x"][:])
    return np.concatenate(parts).astype(np.float64)


def run_peer(data: Path, theta0: np.ndarray, steps: int, tmp: Path, cost_args: tuple, threads: int | None) -> dict:
    """The peer in a fresh process (`threads`: BLAS threads, None for NumPy's default).

    cost_args: (hidden, weight decay, beta, rho). wall_s is the process's whole life, as for `dist-sae train`.
    """
    theta_file = tmp / "peer_theta0.npy"
    np.save(theta_file, theta0)
    hidden, lam, beta, rho = cost_args
    env = {var: str(threads) for var in BLAS_THREAD_VARS} if threads else None
    return run_json("dist_sae.bench.peer", data, theta_file, steps, "--hidden", hidden, "--weight-decay", repr(lam),
                    "--beta", repr(beta), "--rho", repr(rho), env=env)


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    from scipy.optimize import minimize

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="dataset folder")
    parser.add_argument("theta0", help="θ0 as a .npy file")
    parser.add_argument("steps", type=int, help="L-BFGS-B iterations")
    parser.add_argument("--hidden", type=int, default=25)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=3.0)
    parser.add_argument("--rho", type=float, default=0.01)
    args = parser.parse_args(argv)
    x = load_rows(args.data)
    theta0 = np.load(args.theta0)
    t1 = time.perf_counter()
    res = minimize(numpy_cost, theta0, args=(x, x.shape[1], args.hidden, args.weight_decay, args.beta, args.rho), jac=True,
                   method="L-BFGS-B", options={"maxiter": args.steps, "maxfun": 10 * args.steps})
    t2 = time.perf_counter()
    np.save(args.theta0 + ".final.npy", res.x)
    print_json({"optimize_s": t2 - t1, "startup_s": t1 - t0, "J": float(res.fun), "iterations": int(res.nit),
                "evaluations": int(res.nfev), "torch_imported": "torch" in sys.modules})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
