"""A Ray Train + Ray Data peer of dist_sae's minibatch training, for the minibatch benchmark.

What a Ray user would write for the same model and objective: a `TorchTrainer` (DDP over gloo) whose
workers stream Parquet through Ray Data (`get_dataset_shard`, block order shuffled per epoch) and step
torch's Adam. ρ̂ is the batch one, over the *global* batch (dist_sae's sparsity.rho_hat=batch): each
step all-reduces the workers' activation sums, and the surrogate loss below makes DDP's averaged
gradient that of the global batch's objective

    J_B = (1/|B|) Σ_{x∈B} ½‖x̂ − x‖² + β Σ_j KL(ρ‖ρ̂_j) + (λ/2) Σ‖W‖²,   ρ̂ = (1/|B|) Σ_{x∈B} a(x).

Lives under cluster/ because it imports Ray (the only package that may); nothing in training uses it.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from dist_sae.data.dataset import Dataset
from dist_sae.data.reader import BlockReader
from dist_sae.data.workunit import WorkUnit

PARQUET_ROWS = 16384  # rows per Parquet file: Ray Data's blocks, shuffled in order each epoch


def to_parquet(dataset_path: str | Path, out: str | Path) -> Path:
    """The dataset's rows as Parquet files of PARQUET_ROWS rows (one tensor column `x`), once."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    out = Path(out)
    if (out / "_done").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    ds = Dataset.open(dataset_path, verify_shards=False)
    count = 0
    with BlockReader(ds) as reader:
        for shard, info in enumerate(ds.shards):
            for start in range(0, info.rows, PARQUET_ROWS):
                rows = reader.read(WorkUnit.of(count, shard, start, min(start + PARQUET_ROWS, info.rows)))
                table = pa.table({"x": ArrowTensorArray.from_numpy(np.ascontiguousarray(rows))})
                pq.write_table(table, out / f"part-{count:05d}.parquet")
                count += 1
    (out / "_done").write_text(f"{count}\n")
    return out


def _train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: DDP over the SAE's four tensors, Adam, the global batch's ρ̂."""
    import torch
    import torch.distributed as dist
    import ray.train
    import ray.train.torch

    torch.set_num_threads(1)
    dtype = getattr(torch, config["dtype"])
    world = ray.train.get_context().get_world_size()
    beta, rho, eps, decay = config["beta"], config["rho"], config["clamp_eps"], config["weight_decay"]

    class SAE(torch.nn.Module):
        def __init__(self, params: dict[str, np.ndarray]) -> None:
            super().__init__()
            for name, value in params.items():
                setattr(self, name, torch.nn.Parameter(torch.tensor(value, dtype=dtype)))

        def forward(self, x):
            h = torch.sigmoid(x @ self.W1.T + self.b1)  # (B, h)
            return h, torch.sigmoid(h @ self.W2.T + self.b2)  # (B, n)

    model = ray.train.torch.prepare_model(SAE(config["params"]))
    net = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    shard = ray.train.get_dataset_shard("train")
    rows = steps = 0
    first_s = None
    t0 = time.perf_counter()
    for _ in range(config["epochs"]):
        for batch in shard.iter_torch_batches(batch_size=config["batch_size"] // world, dtypes=dtype):
            x = batch["x"]
            if first_s is None:
                first_s = time.perf_counter() - t0
            h, out = model(x)
            stats = torch.cat([h.detach().sum(0), torch.tensor([float(x.shape[0])], dtype=dtype)]).to(torch.float64)
            dist.all_reduce(stats)  # (h + 1,): the global batch's activation sums and rows
            n = stats[-1]
            q = (stats[:-1] / n).clamp(eps, 1 - eps)
            g = (beta * (-rho / q + (1 - rho) / (1 - q))).to(dtype)  # β KL′(ρ̂), constant in the step
            # DDP averages over the workers: world × this worker's share of the batch sums.
            local = (0.5 * ((out - x) ** 2).sum() + (g * h.sum(0)).sum()) * (world / n.to(dtype))
            loss = local + 0.5 * decay * ((net.W1 ** 2).sum() + (net.W2 ** 2).sum())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            rows += int(n.item()) // world
            steps += 1
    seconds = time.perf_counter() - t0
    metrics = {"seconds": seconds, "first_batch_s": first_s, "steps": steps, "rows": rows * world}
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:  # the final parameters (the same on every worker)
            np.savez(Path(folder) / "params.npz", **{k: v.detach().to(torch.float64).numpy() for k, v in net.state_dict().items()})
            (Path(folder) / "metrics.json").write_text(json.dumps(metrics))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def train_peer(parquet: str | Path, params: dict[str, np.ndarray], *, batch_size: int, lr: float, beta: float, rho: float,
               weight_decay: float, clamp_eps: float = 1e-6, dtype: str = "float64", workers: int = 2, epochs: int = 1,
               seed: int = 0) -> dict[str, Any]:
    """One TorchTrainer run from `params` (W1, b1, W2, b2); {seconds, first_batch_s, steps, rows, params, fit_s}.

    `seconds` is the training loop on rank 0, from asking for the first batch to the last step.
    """
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    data = ray.data.read_parquet(str(parquet)).randomize_block_order(seed=seed)
    config = {"params": {k: np.asarray(v) for k, v in params.items()}, "batch_size": batch_size, "lr": lr, "beta": beta,
              "rho": rho, "clamp_eps": clamp_eps, "weight_decay": weight_decay, "dtype": dtype, "epochs": epochs}
    with tempfile.TemporaryDirectory(prefix="dist-sae-peer-") as storage:
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
            torch_config=TorchConfig(backend="gloo"),
            datasets={"train": data},
            run_config=ray.train.RunConfig(storage_path=storage, name="peer"),
        )
        t0 = time.perf_counter()
        result = trainer.fit()
        fit_s = time.perf_counter() - t0
        if result.error is not None or result.checkpoint is None:
            raise RuntimeError(f"the Ray Train peer failed: {result.error}")
        with result.checkpoint.as_directory() as folder:
            out = json.loads((Path(folder) / "metrics.json").read_text())
            with np.load(Path(folder) / "params.npz") as saved:
                out["params"] = {k: saved[k].copy() for k in saved.files}
    out["fit_s"] = fit_s
    return out
