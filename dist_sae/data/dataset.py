"""Datasets on disk: a folder with `dataset.json` and HDF5 shards holding one 2-D `x`.

Reading is by work units (data/workunit.py), blocks of rows; memory is bounded by the block size, never by
the shard or dataset size. Writing streams rows into shards inside a temporary folder that is
renamed into place only when complete, so an interrupted build leaves nothing that looks whole.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dist_sae.data import storage
from dist_sae.data.workunit import WorkUnit, cut_units
from dist_sae.errors import DataError

log = logging.getLogger(__name__)

MANIFEST = "dataset.json"
FORMAT = "dist_sae.dataset/1"
DATASET_KEY = "x"
# The sparse layout of top-k codes (`dist-sae encode --top-k K`): each row's K kept values and their
# columns, (rows, K) each, the row width in the file's `dim` attribute (writer.ShardWriter).
TOPK_VALUES, TOPK_INDICES = "topk_values", "topk_indices"
SAMPLE_ROWS = 64  # rows at each end of a shard that Dataset.open checks for NaN/Inf


class TopKRows:
    """A top-k shard read as dense rows: the slice reads of an h5py Dataset (`x[a:b]`,
    `read_direct`, shape, dtype, chunks), each row zero except at its K stored columns."""

    def __init__(self, f: h5py.File) -> None:
        self.values, self.indices = f[TOPK_VALUES], f[TOPK_INDICES]  # (rows, K) each
        self.dim = int(f.attrs["dim"])
        self.shape = (self.values.shape[0], self.dim)
        self.dtype, self.chunks = self.values.dtype, self.values.chunks

    def read_direct(self, into: np.ndarray, sel: slice) -> None:
        into[...] = 0
        np.put_along_axis(into, self.indices[sel].astype(np.intp), self.values[sel], axis=1)

    def __getitem__(self, sel: slice) -> np.ndarray:
        out = np.empty((len(range(*sel.indices(self.shape[0]))), self.dim), self.dtype)  # (B, n)
        self.read_direct(out, sel)
        return out


def stored_rows(f: h5py.File) -> h5py.Dataset | TopKRows:
    """A shard's rows as a 2-D array to slice: `x`, or a top-k shard's dense view.

    Raises:
        KeyError: the file holds neither (the message lists what it holds).
    """
    if DATASET_KEY in f:
        return f[DATASET_KEY]
    if TOPK_VALUES in f and TOPK_INDICES in f:
        if "dim" not in f.attrs:
            raise KeyError(f"a top-k layout without its row width (no 'dim' attribute; holds {sorted(f.keys())})")
        return TopKRows(f)
    raise KeyError(f"no dataset {DATASET_KEY!r} (holds {sorted(f.keys())})")


@dataclass(frozen=True)
class ShardInfo:
    file: str
    rows: int
    sha256: str | None = None  # of the shard's row bytes, C order, as written
    size: int | None = None  # of the file, bytes
    file_sha256: str | None = None  # of the file's bytes: what a downloaded or cached copy is checked against


@dataclass
class Dataset:
    """An opened dataset folder: the manifest, checked against the shard files (cheap checks only).

    Opened from an object-store URL, `url` is that prefix and `path` its local mirror in the shard
    cache (dataset.json and the side files; shards arrive when a reader first needs them).
    """

    path: Path
    dim: int
    rows: int
    dtype: str
    sample_shape: list[int]
    shards: list[ShardInfo]
    fingerprint: str
    preprocessing: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    url: str | None = None
    cache: storage.ShardCache | None = field(default=None, repr=False)

    @property
    def location(self) -> str:
        """Where the dataset lives, as a user names it (and every node can reach it): the URL or the folder."""
        return self.url or str(self.path)

    @classmethod
    def open(cls, path: str | Path, verify_shards: bool = True, cache: storage.ShardCache | None = None) -> Dataset:
        """Read `dataset.json`; with verify_shards, check every shard exists with the right shape and dtype.

        `path` may be an object-store URL (s3://bucket/prefix): the manifest is read from there and
        the shards are fetched into `cache` (default: storage.ShardCache()) as they are read; the
        check is then against the bucket's listing (every shard present with the recorded size).

        Raises:
            DataError: naming the folder, URL, file or field that is wrong (StorageError for the store).
        """
        if storage.is_url(path):
            return cls._open_url(str(path).rstrip("/"), verify_shards, cache or storage.ShardCache())
        path = Path(path)
        manifest = path / MANIFEST
        if not path.is_dir():
            raise DataError(f"data folder {path} does not exist")
        if not manifest.is_file():
            raise DataError(f"{path} has no {MANIFEST}: it is not a dataset folder (build one with `dist-sae data build`)")
        ds = cls._from_manifest(path, manifest)
        if verify_shards:
            for i in range(len(ds.shards)):
                ds.check_shard(i)
        return ds

    @classmethod
    def _open_url(cls, url: str, verify_shards: bool, cache: storage.ShardCache) -> Dataset:
        objects = storage.listing(url)  # a missing bucket, denied access or no endpoint fails here
        if MANIFEST not in objects:
            if objects:
                raise DataError(f"{url} has no {MANIFEST}: it is not a complete dataset (a build still running or interrupted?); "
                                f"build one with `dist-sae data build --out {url}`")
            raise DataError(f"{url}: no objects under this prefix; check the URL, or build a dataset there with `dist-sae data build --out {url}`")
        mirror = cache.local_path(url)
        mirror.mkdir(parents=True, exist_ok=True)
        tmp = mirror / f"{MANIFEST}.{os.getpid()}.tmp"  # other processes of this node may be reading it
        tmp.write_bytes(storage.read_bytes(storage.join(url, MANIFEST)))
        os.replace(tmp, mirror / MANIFEST)
        ds = cls._from_manifest(mirror, mirror / MANIFEST)
        ds.url, ds.cache = url, cache
        shard_files = {s.file for s in ds.shards}
        for name, size in objects.items():  # side files (transform.safetensors, ...): small, fetched now
            if name != MANIFEST and name not in shard_files and "/" not in name and size <= storage.SIDE_FILE_MAX:
                cache.fetch(storage.join(url, name), size, None)
        if verify_shards:
            for info in ds.shards:
                if info.file not in objects:
                    raise DataError(f"shard {storage.join(url, info.file)} listed in {MANIFEST} is missing")
                if info.size is not None and objects[info.file] != info.size:
                    raise DataError(f"shard {storage.join(url, info.file)} has {objects[info.file]} bytes, {MANIFEST} says {info.size}; rebuild the dataset")
        return ds

    @classmethod
    def _from_manifest(cls, path: Path, manifest: Path) -> Dataset:
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
        return ds

    def shard_path(self, index: int) -> Path:
        """The shard's local file; from object storage, fetched into the cache (verified) first."""
        info = self.shards[index]
        if self.url is None:
            return self.path / info.file
        path = self.cache.fetch(*self._fetch_args(index))
        for ahead in range(index + 1, min(index + 1 + self.cache.read_ahead, len(self.shards))):
            self.cache.prefetch(*self._fetch_args(ahead))  # the next shard downloads while this one is read
        return path

    def _fetch_args(self, index: int) -> tuple:
        info = self.shards[index]
        return storage.join(self.url, info.file), info.size, info.file_sha256, lambda p: row_sha256(p) == info.sha256

    def check_shard(self, index: int) -> None:
        """Cheap check of one shard: it opens, has `x` of (rows, dim) and the manifest's dtype."""
        info, file = self.shards[index], self.shard_path(index)
        if not file.is_file():
            raise DataError(f"shard {file} listed in {MANIFEST} is missing")
        try:
            with h5py.File(file, "r") as f:
                try:
                    x = stored_rows(f)
                except KeyError as exc:
                    raise DataError(f"shard {file} has {exc.args[0]}") from None
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
                    x = stored_rows(f)
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
        """Rows per HDF5 chunk of the first shard (1 when not chunked); the manifest's `chunk_rows` when recorded."""
        if self.meta.get("chunk_rows"):
            return int(self.meta["chunk_rows"])
        with h5py.File(self.shard_path(0), "r") as f:
            chunks = stored_rows(f).chunks
        return chunks[0] if chunks else 1

    def units(self, block_rows: int, align: bool = True, min_units: int = 0, taper: bool = False, pack: bool = True) -> list[WorkUnit]:
        """The dataset's work units (workunit.cut_units): blocks of at most `block_rows` rows, small
        shards packed together (unless pack=False); with align, cut on whole HDF5 chunks."""
        return cut_units([info.rows for info in self.shards], block_rows, self.chunk_rows() if align else 1, min_units, taper, pack)


# ---- writing -------------------------------------------------------------------------------


def publishing(build_fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
    """Let a builder's `out` (its second argument) be an object-store URL.

    The dataset is built into a local temporary folder as usual, then its shards and side files
    are uploaded and dataset.json last, so a reader never sees a prefix as a dataset before it is
    complete. Replacing a dataset (overwrite=True) first removes the old dataset.json.
    """

    @functools.wraps(build_fn)
    def wrapper(source: Any, out: str | Path, *args: Any, **kwargs: Any) -> Dataset:
        if not storage.is_url(out):
            return build_fn(source, out, *args, **kwargs)
        url = str(out).rstrip("/")
        before = storage.listing(url)  # fails early on a missing bucket, denied access, no endpoint
        if MANIFEST in before and not kwargs.get("overwrite"):
            raise DataError(f"{url} already holds a dataset; choose another --out or pass --overwrite")
        with tempfile.TemporaryDirectory(prefix="dist_sae_build_") as tmp:
            built = build_fn(source, Path(tmp) / "dataset", *args, **kwargs)
            if MANIFEST in before:
                storage.delete(storage.join(url, MANIFEST))
            storage.upload_folder(built.path, url, last=MANIFEST)
            for name in set(before) - {p.name for p in built.path.iterdir()}:
                storage.delete(storage.join(url, name))  # the replaced dataset's leftovers
        log.info("uploaded %d shards to %s", len(built.shards), url)
        return Dataset.open(url)

    return wrapper


def fingerprint_of(shards: list[ShardInfo], dim: int, dtype: str) -> str:
    """Content fingerprint: SHA-256 over dim, dtype and each shard's row hash, in shard order."""
    h = hashlib.sha256(f"{dim}|{dtype}".encode())
    for s in shards:
        h.update(f"|{s.rows}:{s.sha256}".encode())
    return "sha256:" + h.hexdigest()


def row_sha256(file: Path, block_rows: int = 65536) -> str:
    """SHA-256 of a shard's row bytes (what dataset.json's per-shard `sha256` records)."""
    h = hashlib.sha256()
    with h5py.File(file, "r") as f:
        x = stored_rows(f)
        for start in range(0, x.shape[0], block_rows):
            h.update(x[start : start + block_rows].tobytes())
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or folder, so a rename that follows is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


