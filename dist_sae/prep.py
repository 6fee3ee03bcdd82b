"""Building shard sets from the sources users have. Every builder streams: memory stays bounded.

Sources register in SOURCES; each yields row blocks (B, dim) and describes the sample shape.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .data import Dataset, DatasetWriter
from .errors import DataError

log = logging.getLogger(__name__)


def open_npy(path: str | Path) -> np.ndarray:
    """Memory-map a .npy array (or the single/first array of a .npz, which is loaded lazily by member)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file {path} does not exist")
    try:
        if path.suffix == ".npz":
            archive = np.load(path, mmap_mode="r")
            if not archive.files:
                raise DataError(f"{path} holds no arrays")
            return archive[archive.files[0]]
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"{path} is not a NumPy array file: {exc}") from None


def build_from_npy(
    path: str | Path,
    out: str | Path,
    shards: int | None = None,
    shard_rows: int | None = None,
    block_rows: int = 65536,
    dtype: str | None = None,
    sample_shape: list[int] | None = None,
    **writer_kwargs,
) -> Dataset:
    """Write a dataset from a .npy/.npz array without loading it whole (memory-mapped, block by block).

    Rows are the first axis; any further axes are flattened and become the sample shape.
    """
    x = open_npy(path)
    if x.ndim < 2:
        raise DataError(f"{path}: expected an array of rows (rows, features...), got shape {x.shape}")
    rows = x.shape[0]
    flat = x.reshape(rows, -1)
    dim = flat.shape[1]
    if shard_rows is None:
        shard_rows = -(-rows // (shards or 1))
    with DatasetWriter(
        out,
        dim,
        shard_rows=shard_rows,
        dtype=dtype or (str(x.dtype) if x.dtype.kind == "f" else "float32"),
        sample_shape=sample_shape or list(x.shape[1:]),
        info={"source": {"kind": "npy", "path": str(path)}},
        **writer_kwargs,
    ) as writer:
        for start in range(0, rows, block_rows):
            writer.write(flat[start : start + block_rows])
    return writer.dataset
