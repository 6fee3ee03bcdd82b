"""Datasets on disk (SPEC §5): a folder with `dataset.json` and HDF5 shards holding one 2-D `x`.

Reading is by work units, (shard, row range) blocks; memory is bounded by the block size, never by
the shard or dataset size. Writing streams rows into shards inside a temporary folder that is
renamed into place only when complete, so an interrupted build leaves nothing that looks whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dist_sae.errors import DataError

log = logging.getLogger(__name__)

MANIFEST = "dataset.json"
# Passes cut a small dataset into up to this many units, so that several workers get work, but never
# into units under MIN_UNIT_ROWS rows: a Ray call costs ~1 ms, the compute of ~1-4k rows of a small
# model (10,000 rows × 64-25-64 on 2 Ray workers: 17 ms per evaluation in 2 units, 24 in 4, 31 in 8).
PASS_MIN_UNITS = 4
MIN_UNIT_ROWS = 4096
FORMAT = "dist_sae.dataset/1"
DATASET_KEY = "x"
SAMPLE_ROWS = 64  # rows at each end of a shard that Dataset.open checks for NaN/Inf


@dataclass(frozen=True)
class WorkUnit:
    """Rows [start, stop) of shard `shard`; `id` orders the reduction of partial sums."""

    id: int
    shard: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ShardInfo:
    file: str
    rows: int
    sha256: str | None = None  # of the shard's row bytes, C order, as written


@dataclass
class Dataset:
    """An opened dataset folder: the manifest, checked against the shard files (cheap checks only)."""

    path: Path
    dim: int
    rows: int
    dtype: str
    sample_shape: list[int]
    shards: list[ShardInfo]
    fingerprint: str
    preprocessing: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path, verify_shards: bool = True) -> Dataset:
        """Read `dataset.json`; with verify_shards, check every shard exists with the right shape and dtype.

        Raises:
            DataError: naming the folder, file or field that is wrong.
        """
        path = Path(path)
        manifest = path / MANIFEST
        if not path.is_dir():
            raise DataError(f"data folder {path} does not exist")
        if not manifest.is_file():
            raise DataError(f"{path} has no {MANIFEST}: it is not a dataset folder (build one with `dist-sae data build`)")
        try:
            meta = json.loads(manifest.read_text())
            shards = [ShardInfo(**s) for s in meta["shards"]]
            ds = cls(
                path=path,
                dim=int(meta["dim"]),
                rows=int(meta["rows"]),
                dtype=str(meta["dtype"]),
                sample_shape=list(meta.get("sample_shape") or [int(meta["dim"])]),
                shards=shards,
                fingerprint=str(meta.get("fingerprint", "")),
                preprocessing=list(meta.get("preprocessing", [])),
                meta=meta,
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{manifest} is not a valid manifest: {type(exc).__name__}: {exc}") from None
        if sum(s.rows for s in shards) != ds.rows:
            raise DataError(f"{manifest}: shard row counts sum to {sum(s.rows for s in shards)}, but rows={ds.rows}")
        if ds.rows == 0:
            raise DataError(f"{manifest}: the dataset has no rows")
        if verify_shards:
            for i in range(len(shards)):
                ds.check_shard(i)
        return ds

    def shard_path(self, index: int) -> Path:
        return self.path / self.shards[index].file

    def check_shard(self, index: int) -> None:
        """Cheap check of one shard: it opens, has `x` of (rows, dim) and the manifest's dtype."""
        info, file = self.shards[index], self.shard_path(index)
        if not file.is_file():
            raise DataError(f"shard {file} listed in {MANIFEST} is missing")
        try:
            with h5py.File(file, "r") as f:
                if DATASET_KEY not in f:
                    raise DataError(f"shard {file} has no dataset {DATASET_KEY!r} (has {list(f.keys())})")
                x = f[DATASET_KEY]
                shape, dtype = x.shape, x.dtype
        except DataError:
            raise
        except Exception as exc:  # h5py raises OSError/KeyError/RuntimeError for corrupt files
            raise DataError(f"shard {file} cannot be read as HDF5 ({type(exc).__name__}: {exc}); rebuild or remove it") from None
        if len(shape) != 2 or shape[1] != self.dim:
            raise DataError(f"shard {file}: {DATASET_KEY} has shape {shape}, expected (rows, {self.dim})")
        if shape[0] != info.rows:
            raise DataError(f"shard {file}: {DATASET_KEY} has {shape[0]} rows, {MANIFEST} says {info.rows}")
        if str(dtype) != self.dtype:
            raise DataError(f"shard {file}: dtype {dtype}, {MANIFEST} says {self.dtype}")

    def check_edges(self) -> None:
        """NaN/Inf in the first and last SAMPLE_ROWS rows of each shard (a chunk or two each: cheap).

        Run before training starts, so that a shard corrupt there is named before the run dir is
        made; `dist-sae data check` reads every row.

        Raises:
            DataError: naming the shard and the first bad row.
        """
        for index in range(len(self.shards)):
            file = self.shard_path(index)
            try:
                with h5py.File(file, "r") as f:
                    x = f[DATASET_KEY]
                    edge = min(SAMPLE_ROWS, x.shape[0])
                    sample = [(0, x[:edge]), (x.shape[0] - edge, x[x.shape[0] - edge :])]
            except Exception as exc:  # h5py: OSError/RuntimeError for a corrupt chunk
                raise DataError(f"shard {file} cannot be read ({type(exc).__name__}: {exc}); the file is corrupt or truncated") from None
            for first, rows in sample:
                if rows.dtype.kind == "f" and not np.isfinite(rows).all():
                    bad = first + np.flatnonzero(~np.isfinite(rows).all(axis=1))
                    raise DataError(f"shard {file}: non-finite values (NaN/Inf) in rows {bad[0]}..{bad[-1]} ({bad.size} rows "
                                    "checked before training); clean the data first (`dist-sae data check` lists every bad row)")

    def chunk_rows(self) -> int:
        """Rows per HDF5 chunk of the first shard (1 when not chunked)."""
        with h5py.File(self.shard_path(0), "r") as f:
            chunks = f[DATASET_KEY].chunks
        return chunks[0] if chunks else 1

    def units(self, block_rows: int, align: bool = True, min_units: int = 0) -> list[WorkUnit]:
        """Cut every shard into blocks of at most `block_rows` rows, numbered in shard-then-row order.

        With align, block_rows is rounded down to a whole number of HDF5 chunks (when it spans one or
        more), so no chunk is read and decompressed by two units. With min_units, a dataset too small
        to make that many blocks is cut into up to min_units equal blocks of at least MIN_UNIT_ROWS
        rows instead (not chunk-aligned), so that every worker of a pass gets work; the cut depends
        only on the data, never on the number of workers, so results stay bit-identical for any
        worker count.
        """
        wanted = min(min_units, self.rows // MIN_UNIT_ROWS)
        if wanted > 1 and sum(-(-info.rows // block_rows) for info in self.shards) < wanted:
            block_rows = -(-self.rows // wanted)
            align = False
        if align:
            chunk = self.chunk_rows()
            if block_rows >= chunk:
                block_rows -= block_rows % chunk
        units = []
        for shard, info in enumerate(self.shards):
            for start in range(0, info.rows, block_rows):
                units.append(WorkUnit(len(units), shard, start, min(start + block_rows, info.rows)))
        return units


# ---- writing -------------------------------------------------------------------------------


def fingerprint_of(shards: list[ShardInfo], dim: int, dtype: str) -> str:
    """Content fingerprint: SHA-256 over dim, dtype and each shard's row hash, in shard order."""
    h = hashlib.sha256(f"{dim}|{dtype}".encode())
    for s in shards:
        h.update(f"|{s.rows}:{s.sha256}".encode())
    return "sha256:" + h.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or folder, so a rename that follows is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


