"""The benchmarks' data: synthetic rows written to a dataset, and a whole dataset read into memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dist_sae.data.dataset import Dataset
from dist_sae.data.reader import BlockReader
from dist_sae.data.writer import DatasetWriter


def write_synthetic(path: Path, rows: int, dim: int, seed: int = 0, shard_rows: int = 250_000) -> Dataset:
    """Rows in [0.1, 0.9] with some correlation between features, float32, written in blocks."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    with DatasetWriter(path, dim, shard_rows=shard_rows, dtype="float32", chunk_rows=1024) as writer:
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            z = rng.normal(size=(n, dim)) @ mix
            writer.write(0.5 + 0.4 * np.tanh(z))
    return writer.dataset


def read_all(path: Path) -> torch.Tensor:
    """Every row of the dataset at `path` in one float64 tensor (the in-memory side of a comparison)."""
    ds = Dataset.open(path)
    with BlockReader(ds) as reader:
        return torch.from_numpy(np.concatenate([reader.read(u) for u in ds.units(65536)]).astype(np.float64))
