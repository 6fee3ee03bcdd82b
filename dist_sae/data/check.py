"""`dist-sae data check` and `dist-sae data info`: find everything wrong with a dataset folder, describe it.

`check_dataset` reads every byte once, block by block, and collects ALL problems (not the first):
missing or extra shards, shards that are not readable HDF5 (truncated, overwritten), a missing `x`,
shape/dim/dtype mismatches against the manifest and between shards, empty shards, row-count
mismatches, NaN/Inf rows (as row ranges), per-shard SHA-256 of the row bytes and the manifest
fingerprint (recomputed as DatasetWriter computes them), and the saved transform file.
`Dataset.open` does the cheap part of this before every training run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dist_sae.data.storage import is_url, join
from dist_sae.data.dataset import DATASET_KEY, MANIFEST, Dataset, ShardInfo, fingerprint_of, stored_rows
from dist_sae.errors import DataError

log = logging.getLogger(__name__)

MAX_RANGES = 20  # non-finite row ranges listed per shard before "... and N more"


@dataclass(frozen=True)
class Problem:
    """One thing wrong: the file, the rows it concerns (None: the whole file), and what is wrong."""

    file: str
    message: str
    rows: tuple[int, int] | None = None  # [start, stop)

    def __str__(self) -> str:
        where = self.file + (f" rows {self.rows[0]}:{self.rows[1]}" if self.rows else "")
        return f"{where}: {self.message}"


def _ranges(indices: np.ndarray) -> list[tuple[int, int]]:
    """Sorted row indices -> [start, stop) runs of consecutive rows."""
    if indices.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1)
    starts = np.concatenate([[indices[0]], indices[breaks + 1]])
    stops = np.concatenate([indices[breaks], [indices[-1]]]) + 1
    return [(int(a), int(b)) for a, b in zip(starts, stops)]


def _read_manifest(path: Path) -> tuple[dict[str, Any] | None, list[Problem]]:
    manifest = path / MANIFEST
    if not path.is_dir():
        return None, [Problem(str(path), "the data folder does not exist")]
    if not manifest.is_file():
        return None, [Problem(str(manifest), "missing: this is not a dataset folder (build one with `dist-sae data build`)")]
    try:
        meta = json.loads(manifest.read_text())
        for key in ("dim", "rows", "dtype", "shards"):
            meta[key]
        [ShardInfo(**s) for s in meta["shards"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        return None, [Problem(str(manifest), f"not a valid manifest ({type(exc).__name__}: {exc}); rebuild the dataset")]
    return meta, []


def check_dataset(path: str | Path, block_rows: int = 65536, progress=None) -> list[Problem]:
    """Every problem found in the dataset folder at `path`; an empty list means it is sound.

    Args:
        block_rows: rows read at a time (memory is one block).
        progress: optional callable(rows_done) called after each block.

    An object-store URL is checked in its local mirror, after every shard is fetched (and checked
    against dataset.json's size and SHA-256); a bad URL raises DataError.
    """
    if is_url(path):
        ds = Dataset.open(path, verify_shards=False)
        fetched = []
        for i, info in enumerate(ds.shards):
            try:
                ds.shard_path(i)
            except DataError as exc:
                fetched.append(Problem(join(ds.url, info.file), str(exc), (0, info.rows)))
        if fetched:
            return fetched
        path = ds.path
    path = Path(path)
    meta, problems = _read_manifest(path)
    if meta is None:
        return problems
    dim, dtype = int(meta["dim"]), str(meta["dtype"])
    shards = [ShardInfo(**s) for s in meta["shards"]]
    manifest = str(path / MANIFEST)
    if sum(s.rows for s in shards) != int(meta["rows"]):
        problems.append(Problem(manifest, f"shard row counts sum to {sum(s.rows for s in shards)}, but rows={meta['rows']}"))
    listed = {s.file for s in shards}
    for extra in sorted(p.name for p in path.glob("*.h5") if p.name not in listed):
        problems.append(Problem(str(path / extra), f"extra shard: not listed in {MANIFEST} (remove it, or rebuild the dataset)"))
    if meta.get("fingerprint") != fingerprint_of(shards, dim, dtype):
        problems.append(Problem(manifest, "the fingerprint does not match the shard list in the manifest (the manifest was edited)"))

    seen: dict[str, Any] = {}  # first readable shard's dim and dtype, to compare shards with each other
    for info in shards:
        problems += _check_shard(path / info.file, info, dim, dtype, seen, block_rows, progress)

    entry = meta.get("transform")
    if entry:
        tfile = path / entry.get("file", "transform.safetensors")
        if not tfile.is_file():
            problems.append(Problem(str(tfile), f"missing, but {MANIFEST} lists a saved transform"))
        elif entry.get("sha256") and hashlib.sha256(tfile.read_bytes()).hexdigest() != entry["sha256"]:
            problems.append(Problem(str(tfile), "content differs from the sha256 in the manifest (corrupt or replaced)"))
    return problems


def _check_shard(file: Path, info: ShardInfo, dim: int, dtype: str, seen: dict, block_rows: int, progress) -> list[Problem]:
    name = str(file)
    if not file.is_file():
        return [Problem(name, f"missing shard (listed in {MANIFEST} with {info.rows} rows)", (0, info.rows))]
    problems: list[Problem] = []
    try:
        f = h5py.File(file, "r")
    except Exception as exc:  # truncated or overwritten superblock
        return [Problem(name, f"cannot be opened as HDF5 ({type(exc).__name__}: {exc}); the file is truncated or corrupt: rebuild it")]
    with f:
        try:
            try:
                x = stored_rows(f)
            except KeyError as exc:
                return [Problem(name, f"has {exc.args[0]}")]
            shape, stored = x.shape, str(x.dtype)
        except Exception as exc:
            return [Problem(name, f"HDF5 metadata cannot be read ({type(exc).__name__}: {exc}); the file is corrupt")]
        if len(shape) != 2:
            return [Problem(name, f"{DATASET_KEY} has shape {shape}; expected 2-D (rows, {dim})")]
        rows, width = shape
        if "dim" in seen and (width, stored) != (seen["dim"], seen["dtype"]):
            problems.append(Problem(name, f"differs from shard {seen['file']}: ({width} features, {stored}) vs ({seen['dim']} features, {seen['dtype']})"))
        seen.setdefault("dim", width)
        seen.setdefault("dtype", stored)
        seen.setdefault("file", file.name)
        if width != dim:
            problems.append(Problem(name, f"dimension mismatch: {width} features, {MANIFEST} says dim={dim}"))
        if stored != dtype:
            problems.append(Problem(name, f"dtype mismatch: {stored}, {MANIFEST} says {dtype}"))
        if rows == 0:
            problems.append(Problem(name, "empty shard: x has 0 rows"))
        if rows != info.rows:
            problems.append(Problem(name, f"has {rows} rows, {MANIFEST} says {info.rows}", (min(rows, info.rows), max(rows, info.rows))))
        sha = hashlib.sha256()
        bad_rows: list[np.ndarray] = []
        readable = True
        for start in range(0, rows, block_rows):
            stop = min(start + block_rows, rows)
            try:
                block = x[start:stop]
            except Exception as exc:
                problems.append(Problem(name, f"cannot be read ({type(exc).__name__}: {exc}); the file is corrupt or truncated", (start, stop)))
                readable = False
                continue
            sha.update(np.ascontiguousarray(block).tobytes())
            if block.dtype.kind in "fc":
                finite = np.isfinite(block).all(axis=1)
                if not finite.all():
                    bad_rows.append(start + np.flatnonzero(~finite))
            if progress:
                progress(stop - start)
        if bad_rows:
            runs = _ranges(np.concatenate(bad_rows))
            for run in runs[:MAX_RANGES]:
                problems.append(Problem(name, "non-finite values (NaN/Inf)", run))
            if len(runs) > MAX_RANGES:
                problems.append(Problem(name, f"... and {len(runs) - MAX_RANGES} more ranges of non-finite rows"))
        if readable and info.sha256 and sha.hexdigest() != info.sha256:
            problems.append(Problem(name, "content differs from the sha256 recorded at build time (bytes changed since; the fingerprint no longer matches)", (0, rows)))
    return problems


# ---- info -----------------------------------------------------------------------------------------


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def dataset_info(path: str | Path, max_rows: int | None = None, block_rows: int = 65536) -> dict[str, Any]:
    """Counts, size on disk, and per-feature mean/std (float64, over all rows or the first max_rows)."""
    from dist_sae.data.reader import BlockReader

    ds = Dataset.open(path)
    total = np.zeros(ds.dim)
    total_sq = np.zeros(ds.dim)
    lo, hi, seen = np.inf, -np.inf, 0
    with BlockReader(ds) as reader:
        for unit in ds.units(block_rows, align=False):
            if max_rows is not None and seen >= max_rows:
                break
            x = reader.read(unit).astype(np.float64)
            if max_rows is not None:
                x = x[: max_rows - seen]
            total += x.sum(axis=0)
            seen += len(x)
            lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    mean = total / seen
    with BlockReader(ds) as reader:  # second pass: centred sums, no cancellation
        done = 0
        for unit in ds.units(block_rows, align=False):
            if done >= seen:
                break
            x = reader.read(unit).astype(np.float64)[: seen - done]
            total_sq += ((x - mean) ** 2).sum(axis=0)
            done += len(x)
    std = np.sqrt(total_sq / seen)

    def summary(v: np.ndarray) -> dict[str, float]:
        return {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max()), "mean": float(v.mean())}

    return {
        "path": ds.location,
        "rows": ds.rows,
        "dim": ds.dim,
        "sample_shape": ds.sample_shape,
        "dtype": ds.dtype,
        "shards": len(ds.shards),
        "bytes_on_disk": sum(s.size or 0 for s in ds.shards) if ds.url else _du(ds.path),
        "fingerprint": ds.fingerprint,
        "source": ds.meta.get("source"),
        "preprocessing": ds.preprocessing,
        "rows_summarised": seen,
        "value_range": [lo, hi],
        "feature_mean": summary(mean),
        "feature_std": summary(std),
    }


def is_image_shape(shape: list[int]) -> bool:
    return len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3))


def image_shape(sample_shape: list[int], shape: tuple[int, int] | None = None) -> list[int]:
    """The (H, W[, C]) to draw a sample as: `shape` (H, W) if given, the stored one if it is an image,
    else H = W = √dim for square flat rows (64 → 8×8).

    Raises:
        DataError: no image shape fits, with what to pass.
    """
    dim = int(np.prod(sample_shape))
    if shape is not None:
        h, w = shape
        if h * w == dim:
            return [h, w]
        if dim % (h * w) == 0 and dim // (h * w) in (1, 3):
            return [h, w, dim // (h * w)]
        raise DataError(f"--shape {h} {w} does not fit rows of {dim} features (H×W or H×W×3 must be {dim})")
    if is_image_shape(sample_shape):
        return list(sample_shape)
    side = int(round(np.sqrt(dim)))
    if side * side == dim:
        return [side, side]
    raise DataError(f"sample shape {sample_shape} is not an image and {dim} is not a square: give --shape H W to view rows as H×W images")


def sample_grid(path: str | Path, png: str | Path, count: int = 64, scale: int = 4, seed: int = 0,
                shape: tuple[int, int] | None = None) -> Path:
    """Write a PNG grid of `count` samples (spread over the dataset, seeded), each scaled to [0, 1] on its own.

    Rows are drawn as image_shape(ds.sample_shape, shape): flat rows of a square dimension as squares.
    """
    from PIL import Image

    from dist_sae.data.reader import BlockReader
    from dist_sae.data.workunit import WorkUnit

    ds = Dataset.open(path)
    drawn = image_shape(ds.sample_shape, shape)
    count = min(count, ds.rows)
    picks = np.sort(np.random.default_rng(seed).choice(ds.rows, count, replace=False))
    offsets = np.cumsum([0] + [s.rows for s in ds.shards])
    h, w = drawn[:2]
    channels = drawn[2] if len(drawn) == 3 else 1
    cols = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / cols))
    grid = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1, channels))
    with BlockReader(ds) as reader:
        for k, row in enumerate(picks):
            shard = int(np.searchsorted(offsets, row, side="right") - 1)
            start = int(row - offsets[shard])
            x = reader.read(WorkUnit.of(k, shard, start, start + 1))[0].astype(np.float64).reshape(h, w, channels)
            span = x.max() - x.min()
            x = (x - x.min()) / span if span > 0 else np.zeros_like(x)
            r, c = divmod(k, cols)
            grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = x
    img = (grid * 255).round().astype(np.uint8)
    img = img[..., 0] if channels == 1 else img
    pil = Image.fromarray(img)
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    png = Path(png)
    pil.save(png)
    return png
