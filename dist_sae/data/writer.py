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
from dist_sae.data.dataset import DATASET_KEY, FORMAT, MANIFEST, TOPK_INDICES, TOPK_VALUES, Dataset, ShardInfo, fingerprint_of, fsync_path


class ShardWriter:
    """One HDF5 shard, written block by block; `close()` gives its ShardInfo.

    Dense rows go to `x` (rows, dim). With `top_k`, each row keeps only its K values of largest
    magnitude and their columns (`topk_values`, `topk_indices`: (rows, K), columns ascending in each row), which
    readers expand back to (rows, dim) with zeros elsewhere (dataset.stored_rows). The row hash is
    over the rows as a reader gets them back (C order, stored dtype), whichever layout holds them.

    Args:
        path: the file to create.
        dim: features per row n.
        dtype: stored dtype.
        chunk_rows: HDF5 chunk height (rows).
        compression: h5py compression filter ("gzip", "lzf") or None.
        top_k: keep each row's K largest values (the sparse layout); None: dense.
    """

    def __init__(self, path: str | Path, dim: int, dtype: str = "float32", chunk_rows: int = 1024,
                 compression: str | None = None, top_k: int | None = None) -> None:
        if top_k is not None and not 0 < top_k < dim:
            raise DataError(f"top_k must be between 1 and dim - 1 = {dim - 1}, got {top_k}")
        self.path, self.dim, self.dtype, self.top_k = Path(path), dim, np.dtype(dtype), top_k
        self._file = h5py.File(self.path, "w")
        width = top_k or dim
        kw = {"maxshape": (None, width), "chunks": (max(1, chunk_rows), width), "compression": compression}
        if top_k is None:
            self._columns = [self._file.create_dataset(DATASET_KEY, shape=(0, dim), dtype=self.dtype, **kw)]
        else:
            self._file.attrs["dim"] = dim
            self._columns = [self._file.create_dataset(TOPK_VALUES, shape=(0, top_k), dtype=self.dtype, **kw),
                             self._file.create_dataset(TOPK_INDICES, shape=(0, top_k), dtype=np.int32, **kw)]
        self._hash = hashlib.sha256()
        self.rows = 0

    def write(self, rows: np.ndarray) -> None:
        """Append rows (B, dim); they are cast to the stored dtype (the top K chosen before the cast).

        Raises:
            DataError: finite values that the cast to a narrower dtype makes infinite.
        """
        source = rows
        if self.top_k is None:
            with np.errstate(over="ignore"):  # an overflow is reported below, as a DataError
                rows = np.ascontiguousarray(rows, dtype=self.dtype)
            parts = [rows]
        else:
            # The K of largest magnitude, ties to the lowest column (a stable sort: the same choice on
            # any machine, so the shard does not depend on which worker wrote it); columns ascending.
            cols = np.sort(np.argsort(-np.abs(rows), axis=1, kind="stable")[:, : self.top_k], axis=1)  # (B, K)
            with np.errstate(over="ignore"):
                values = np.take_along_axis(rows, cols, axis=1).astype(self.dtype)  # (B, K)
            parts = [values, cols.astype(np.int32)]
            rows = np.zeros((len(rows), self.dim), self.dtype)  # what a reader gets back: hashed
            np.put_along_axis(rows, cols, values, axis=1)
        if self.dtype.itemsize < np.asarray(source).dtype.itemsize and not np.isfinite(parts[0]).all() and np.isfinite(source).all():
            raise DataError(f"{self.path.name}: values beyond the range of {self.dtype} (e.g. float16's ±65504); store a wider --dtype")
        for column, part in zip(self._columns, parts):
            column.resize(self.rows + len(part), axis=0)
            column[self.rows :] = part
        self._hash.update(rows)  # the C-contiguous array itself: no copy of its bytes
        self.rows += len(rows)

    def close(self) -> ShardInfo:
        """Close the file: its ShardInfo (rows, row hash, size, file hash)."""
        self._file.close()
        return ShardInfo(self.path.name, self.rows, self._hash.hexdigest(), self.path.stat().st_size, file_sha256(self.path))

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def manifest(dim: int, rows: int, dtype: str, sample_shape: list[int], chunk_rows: int, shards: list[ShardInfo],
             info: dict[str, Any]) -> dict[str, Any]:
    """The dataset.json of a dataset of these shards (`info`: source, preprocessing, layout, ...)."""
    info = dict(info)
    return {
        "format": FORMAT,
        "dim": dim,
        "rows": rows,
        "dtype": str(np.dtype(dtype)),
        "sample_shape": list(sample_shape),
        "chunk_rows": chunk_rows,
        "shards": [asdict(s) for s in shards],
        "fingerprint": fingerprint_of(shards, dim, str(np.dtype(dtype))),
        "preprocessing": info.pop("preprocessing", []),
        **info,
    }


def publish(tmp: Path, out: Path, meta: dict[str, Any]) -> Dataset:
    """Write the manifest into the finished folder `tmp`, fsync it all, and rename it to `out`
    (an existing `out` is replaced only now, when the new one is complete)."""
    (tmp / MANIFEST).write_text(json.dumps(meta, indent=2) + "\n")
    for file in tmp.iterdir():
        fsync_path(file)
    if out.exists():
        trash = out.with_name(out.name + ".old")
        shutil.rmtree(trash, ignore_errors=True)
        out.rename(trash)
        tmp.rename(out)
        shutil.rmtree(trash)
    else:
        tmp.rename(out)
    return Dataset.open(out)


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
        self._shard: ShardWriter | None = None
        self.rows = 0

    def write(self, rows: np.ndarray) -> None:
        """Append rows (B, dim); they are cast to the stored dtype."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise DataError(f"rows of shape {rows.shape} do not fit a dataset of dim {self.dim}")
        while len(rows):
            if self._shard is None:
                name = f"shard-{len(self.shards):05d}.h5"
                self._shard = ShardWriter(self.tmp / name, self.dim, self.dtype, self.chunk_rows, self.compression)
            take = min(len(rows), self.shard_rows - self._shard.rows)
            self._shard.write(rows[:take])
            rows = rows[take:]
            self.rows += take
            if self._shard.rows == self.shard_rows:
                self._close_shard()

    def _close_shard(self) -> None:
        if self._shard is not None:
            self.shards.append(self._shard.close())
            self._shard = None

    def close(self) -> Dataset:
        """Finish the last shard, write the manifest, fsync, and move the folder into place."""
        self._close_shard()
        if self.rows == 0:
            raise DataError(f"no rows were written to {self.out}")
        meta = manifest(self.dim, self.rows, str(self.dtype), self.sample_shape, self.chunk_rows, self.shards, self.info)
        return publish(self.tmp, self.out, meta)

    def abort(self) -> None:
        if self._shard is not None:
            self._shard.abort()
            self._shard = None
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
