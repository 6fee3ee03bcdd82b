"""SIGTERM budget: how long the checkpoint of the last completed step takes, write and verified load.

A stopped run (SIGTERM from `ray job stop`, Kubernetes, a spot reclaim) must write its checkpoint
within the grace period before SIGKILL (Ray: RAY_JOB_STOP_WAIT_TIME_S, default 3 s). The checkpoint
holds θ and the optimizer state: for L-BFGS that is 2 × optim.history_size vectors of P floats, so
its size (and time) grows with the history. The state is a real train.lbfgs.LBFGS state of the
model's size (history filled with random vectors of the real shapes).

    python -m dist_sae.bench.safety --sizes 784,1024,784 --history 10,100 --out bench_out/safety.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dist_sae.sae.model import SparseAutoencoder
from dist_sae.train.checkpoint import load_checkpoint, save_checkpoint, snapshot_state
from dist_sae.train.lbfgs import LBFGS


def lbfgs_state(params: int, history: int, seed: int = 0) -> dict:
    """A Trainer.state_dict()-shaped state whose optimizer is a full-history L-BFGS."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(params, dtype=torch.float64, generator=gen)
    opt = LBFGS(theta.clone(), history_size=history)
    vec = lambda: torch.randn(params, dtype=torch.float64, generator=gen)  # noqa: E731
    state = opt.state_dict()
    state["state"] = {0: {"func_evals": history, "n_iter": history, "d": vec(), "t": 1.0, "old_dirs": [vec() for _ in range(history)],
                          "old_stps": [vec() for _ in range(history)], "ro": [1.0] * history,
                          "H_diag": 1.0, "prev_flat_grad": vec(), "prev_loss": 1.0}}
    meta = {"step": 1, "epoch": 0, "position": 0, "evaluations": history, "converged": False, "rho_step": 0, "dead_step": -1}
    return {"theta": theta, "optimizer": state, "meta": meta, "rho_means": None, "ema_means": None, "dead_units": None}


def measure(sizes: list[int], history: int, root: Path, reps: int) -> dict:
    model = SparseAutoencoder(sizes[0], sizes[1:len(sizes) // 2 + 1])
    state = lbfgs_state(model.num_params, history)
    out = {"params": model.num_params, "history": history, "snapshot_s": [], "write_s": [], "load_s": []}
    for _ in range(reps):
        t = time.perf_counter()
        snap = snapshot_state(state)  # what the stepper does before every step (the roll-back copy)
        out["snapshot_s"].append(time.perf_counter() - t)
        del snap
        t = time.perf_counter()
        path = save_checkpoint(root, state, {"config": {}}, keep=1)
        out["write_s"].append(time.perf_counter() - t)
        t = time.perf_counter()
        load_checkpoint(path)
        out["load_s"].append(time.perf_counter() - t)
    out["checkpoint_mb"] = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    for key in ("snapshot_s", "write_s", "load_s"):
        out[key] = sorted(out[key])[len(out[key]) // 2]  # median
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="784,1024,784", help="layer sizes, input to output")
    parser.add_argument("--history", default="10,100", help="L-BFGS history sizes to measure (optim.history_size; default 100)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", help="where to write the checkpoints (default: a temporary folder; the disk matters)")
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="dist_sae_ckpt_", dir=args.dir))
    try:
        result = {"sizes": sizes, "runs": [measure(sizes, int(h), root, args.reps) for h in args.history.split(",")]}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return emit(result, args.out)


def emit(report: dict, out: str | None) -> dict:
    """Print the report as JSON, and write it to `out` too when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
