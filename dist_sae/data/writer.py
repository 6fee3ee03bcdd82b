"""Writing datasets: rows streamed into shards in a temporary folder renamed into place when complete.

An interrupted build leaves nothing that looks whole.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dist_sae.errors import DataError
from dist_sae.data.storage import file_sha256, is_url
from dist_sae.data.dataset import DATASET_KEY, FORMAT, MANIFEST, Dataset, ShardInfo, fingerprint_of, fsync_path


class DatasetWriter:
    """Stream rows into a new dataset folder, atomically.

    Rows go to shards of `shard_rows` rows in `<out>.partial/`; `close()` writes the manifest with
    per-shard SHA-256 and a fingerprint, then renames the folder to `out`. An exception inside the
    `with` block removes the partial folder and leaves any existing `out` untouched.

    Args:
        out: the dataset folder to create.
        dim: features per row n.
        shard_rows: rows per shard.
        dtype: stored dtype.
        sample_shape: how a row reshapes into a sample, e.g. [8, 8] or [28, 28, 1]; default [dim].
        chunk_rows: HDF5 chunk height (rows); clipped to shard_rows.
        compression: h5py compression filter ("gzip", "lzf") or None.
        overwrite: replace an existing folder at `out` once the new one is complete.
        info: extra manifest fields (source, preprocessing, ...).
    """

    def __init__(
        self,
        out: str | Path,
        dim: int,
        shard_rows: int = 100_000,
        dtype: str = "float32",
        sample_shape: list[int] | None = None,
        chunk_rows: int = 1024,
        compression: str | None = None,
        overwrite: bool = False,
        info: dict[str, Any] | None = None,
    ) -> None:
        if is_url(out):  # builders upload through dataset.publishing; a bare writer writes a local folder
            raise DataError(f"{out}: this output must be a local folder (only `dist-sae data build`/`transform` write to object storage)")
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise DataError(f"{self.out} already exists; choose another --out or pass --overwrite")
        if shard_rows < 1 or dim < 1:
            raise DataError(f"shard_rows and dim must be >= 1 (got {shard_rows}, {dim})")
        if sample_shape is not None and int(np.prod(sample_shape)) != dim:
            raise DataError(f"sample_shape {sample_shape} has {int(np.prod(sample_shape))} values per row, dim is {dim}")
        self.dim, self.shard_rows, self.dtype = dim, shard_rows, np.dtype(dtype)
        self.sample_shape = list(sample_shape or [dim])
        self.chunk_rows = max(1, min(chunk_rows, shard_rows))
        self.compression = compression
        self.overwrite = overwrite
        self.info = dict(info or {})
        self.tmp = self.out.with_name(self.out.name + ".partial")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.shards: list[ShardInfo] = []
        self._file: h5py.File | None = None
        self._rows_in_shard = 0
        self._hash = None
        self.rows = 0

    def _open_shard(self) -> None:
        name = f"shard-{len(self.shards):05d}.h5"
        self._file = h5py.File(self.tmp / name, "w")
        self._file.create_dataset(
            DATASET_KEY,
            shape=(0, self.dim),
            maxshape=(None, self.dim),
            dtype=self.dtype,
            chunks=(self.chunk_rows, self.dim),
            compression=self.compression,
        )
        self._rows_in_shard = 0
        self._hash = hashlib.sha256()
        self._name = name

    def _close_shard(self) -> None:
        if self._file is None:
            return
        self._file.close()
        file = self.tmp / self._name  # size and file hash: what a downloaded or cached copy is checked against
        self.shards.append(ShardInfo(self._name, self._rows_in_shard, self._hash.hexdigest(), file.stat().st_size, file_sha256(file)))
        self._file = None

    def write(self, rows: np.ndarray) -> None:
        """Append rows (B, dim); they are cast to the stored dtype."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise DataError(f"rows of shape {rows.shape} do not fit a dataset of dim {self.dim}")
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        while len(rows):
            if self._file is None:
                self._open_shard()
            take = min(len(rows), self.shard_rows - self._rows_in_shard)
            part, rows = rows[:take], rows[take:]
            x = self._file[DATASET_KEY]
            x.resize(self._rows_in_shard + take, axis=0)
            x[self._rows_in_shard :] = part
            self._hash.update(part.tobytes())
            self._rows_in_shard += take
            self.rows += take
            if self._rows_in_shard == self.shard_rows:
                self._close_shard()

    def close(self) -> Dataset:
        """Finish the last shard, write the manifest, fsync, and move the folder into place."""
        self._close_shard()
        if self.rows == 0:
            raise DataError(f"no rows were written to {self.out}")
        meta = {
            "format": FORMAT,
            "dim": self.dim,
            "rows": self.rows,
            "dtype": str(self.dtype),
            "sample_shape": self.sample_shape,
            "chunk_rows": self.chunk_rows,
            "shards": [asdict(s) for s in self.shards],
            "fingerprint": fingerprint_of(self.shards, self.dim, str(self.dtype)),
            "preprocessing": self.info.pop("preprocessing", []),
            **self.info,
        }
        manifest = self.tmp / MANIFEST
        manifest.write_text(json.dumps(meta, indent=2) + "\n")
        for file in self.tmp.iterdir():
            fsync_path(file)
        if self.out.exists():
            trash = self.out.with_name(self.out.name + ".old")
            shutil.rmtree(trash, ignore_errors=True)
            self.out.rename(trash)
            self.tmp.rename(self.out)
            shutil.rmtree(trash)
        else:
            self.tmp.rename(self.out)
        return Dataset.open(self.out)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.dataset = self.close()
        else:
            self.abort()



def write_array(out: str | Path, x: np.ndarray, shard_rows: int, block_rows: int = 65536, **kwargs) -> Dataset:
    """Write a (possibly memory-mapped) 2-D array as a dataset, `block_rows` rows at a time."""
    if x.ndim != 2:
        raise DataError(f"expected a 2-D array (rows, features), got shape {x.shape}")
    with DatasetWriter(out, x.shape[1], shard_rows=shard_rows, **kwargs) as writer:
        for start in range(0, x.shape[0], block_rows):
            writer.write(x[start : start + block_rows])
    return writer.dataset
