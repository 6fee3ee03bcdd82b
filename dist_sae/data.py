"""Datasets on disk (SPEC §5): a folder with `dataset.json` and HDF5 shards holding one 2-D `x`.

Reading is by work units, (shard, row range) blocks; memory is bounded by the block size, never by
the shard or dataset size. Writing streams rows into shards inside a temporary folder that is
renamed into place only when complete, so an interrupted build leaves nothing that looks whole.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import DataError

log = logging.getLogger(__name__)

MANIFEST = "dataset.json"
# Passes cut a small dataset into up to this many units, so that several workers get work, but never
# into units under MIN_UNIT_ROWS rows: a Ray call costs ~1 ms, the compute of ~1-4k rows of a small
# model (10,000 rows × 64-25-64 on 2 Ray workers: 17 ms per evaluation in 2 units, 24 in 4, 31 in 8).
PASS_MIN_UNITS = 4
MIN_UNIT_ROWS = 4096
FORMAT = "dist_sae.dataset/1"
DATASET_KEY = "x"


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


class BlockReader:
    """Reads work units from the shards of a dataset, keeping a few files open.

    Only the rows of the unit are read (h5py reads the needed chunks), so memory is one block.
    Non-finite values are an error that names the shard and rows.
    """

    def __init__(self, dataset: Dataset, max_open: int = 8, check_finite: bool = True) -> None:
        self.dataset = dataset
        self.max_open = max_open
        self.check_finite = check_finite
        self._files: OrderedDict[int, h5py.File] = OrderedDict()
        self._lock = threading.Lock()  # h5py is not re-entrant across our prefetch thread and caller

    def _file(self, shard: int) -> h5py.File:
        f = self._files.get(shard)
        if f is None:
            try:
                f = h5py.File(self.dataset.shard_path(shard), "r")
            except Exception as exc:
                raise DataError(f"cannot open shard {self.dataset.shard_path(shard)}: {exc}") from None
            self._files[shard] = f
            while len(self._files) > self.max_open:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(shard)
        return f

    def read(self, unit: WorkUnit) -> np.ndarray:
        """Rows of the unit, (unit.rows, dim), in the stored dtype."""
        with self._lock:
            try:
                block = self._file(unit.shard)[DATASET_KEY][unit.start : unit.stop]
            except DataError:
                raise
            except Exception as exc:
                raise DataError(
                    f"shard {self.dataset.shard_path(unit.shard)}: rows {unit.start}:{unit.stop} cannot be read "
                    f"({type(exc).__name__}: {exc}); the file is corrupt or truncated"
                ) from None
        # A float64 sum is finite when every value is (it cannot overflow for float32 rows), and needs
        # no (B, n) temporary; only a non-finite sum (or a float64 overflow) takes the element check.
        if self.check_finite and not np.isfinite(block.sum(dtype=np.float64)) and not np.isfinite(block).all():
            bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
            raise DataError(
                f"shard {self.dataset.shard_path(unit.shard)}: non-finite values (NaN/Inf) in rows "
                f"{unit.start + int(bad[0])}..{unit.start + int(bad[-1])} ({bad.size} rows); clean the data first"
            )
        return block

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()

    def __enter__(self) -> BlockReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prefetch(
    source: BlockReader | Callable[[WorkUnit], Any],
    units: Iterable[WorkUnit],
    depth: int = 2,
    executor: ThreadPoolExecutor | None = None,
) -> Iterator[tuple[WorkUnit, Any]]:
    """Yield (unit, block) in order, loading up to `depth` units ahead on a background thread.

    source: a BlockReader, or any `load(unit)` (e.g. one that also converts and caches blocks).
    The compute of one block (torch releases the GIL) overlaps the load of the next. Memory is
    bounded by depth + 1 blocks. A load error is raised in the caller, in unit order. Pass a
    long-lived single-thread `executor` to avoid starting a thread per pass.
    """
    load = source.read if isinstance(source, BlockReader) else source
    units = list(units)
    if depth <= 0:
        for unit in units:
            yield unit, load(unit)
        return
    pool = executor or ThreadPoolExecutor(1, thread_name_prefix="dist-sae-prefetch")
    ahead: deque = deque()
    todo = iter(units)
    try:
        for unit in itertools.islice(todo, depth):
            ahead.append((unit, pool.submit(load, unit)))
        while ahead:
            unit, future = ahead.popleft()
            block = future.result()  # re-raises the load's error here, in order
            following = next(todo, None)
            if following is not None:
                ahead.append((following, pool.submit(load, following)))
            yield unit, block
    finally:
        for _, future in ahead:
            future.cancel()
        if executor is None:
            pool.shutdown(wait=True)


# ---- writing -------------------------------------------------------------------------------


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
        self.shards.append(ShardInfo(self._name, self._rows_in_shard, self._hash.hexdigest()))
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


def write_array(out: str | Path, x: np.ndarray, shard_rows: int, block_rows: int = 65536, **kwargs) -> Dataset:
    """Write a (possibly memory-mapped) 2-D array as a dataset, `block_rows` rows at a time."""
    if x.ndim != 2:
        raise DataError(f"expected a 2-D array (rows, features), got shape {x.shape}")
    with DatasetWriter(out, x.shape[1], shard_rows=shard_rows, **kwargs) as writer:
        for start in range(0, x.shape[0], block_rows):
            writer.write(x[start : start + block_rows])
    return writer.dataset
