"""Building shard sets from the sources users have. Every builder streams: memory stays bounded.

`build(source, out, preprocessing=[...])` is the one engine: it fits the dataset-wide preprocessing
in passes over the source (float64 partial sums in unit order, dist_sae.data.transforms), then streams the
source once more through the fitted transform into a DatasetWriter, which writes shards into
`<out>.partial/` and renames the folder into place only when complete. The fitted transform is saved
in the folder (transform.safetensors + a manifest entry) so encoding applies the same transform.

The named builders (`build_from_npy`, `build_patches`, `build_digits`, ...) pick a source from
dist_sae.data.sources and call `build`; `transform_dataset` does the same from an existing dataset.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dist_sae.data.reader import BlockReader, prefetch
from dist_sae.data.dataset import Dataset, publishing
from dist_sae.data.writer import DatasetWriter
from dist_sae.errors import DataError
from dist_sae.data.patches import PatchSource
from dist_sae.data.sources import DigitsSource, IdxSource, NpySource, Source, SyntheticSource
from dist_sae.data.images import ImageFolderSource
from dist_sae.data.transforms import StepSpec, Transform, describe_steps, fit_transform, load_transform, local_sums_fn
from dist_sae import progress

log = logging.getLogger(__name__)

# `dist-sae data build --from KIND`: the source class of each kind.
SOURCES = {"npy": NpySource, "idx": IdxSource, "images": ImageFolderSource, "patches": PatchSource, "digits": DigitsSource, "synthetic": SyntheticSource}

DEFAULT_SHARD_BYTES = 256 * 2**20  # shard size when neither rows nor shard count is given
BLOCK_BYTES = 32 * 2**20  # rows per streamed block are chosen to hold about this many float64 bytes


class DatasetSource(Source):
    """An existing dataset as a source, read unit by unit (for `dist-sae data transform`)."""

    name = "dataset"

    def __init__(self, dataset: Dataset) -> None:
        super().__init__()
        self.dataset = dataset
        self.rows, self.dim, self.sample_shape, self.dtype = dataset.rows, dataset.dim, dataset.sample_shape, dataset.dtype

    def blocks(self, block_rows: int) -> Iterator[np.ndarray]:
        with BlockReader(self.dataset) as reader:
            for _, block in prefetch(reader, self.dataset.units(block_rows, align=False), depth=1):
                yield block

    def describe(self) -> dict[str, Any]:
        return {"kind": "dataset", "path": str(self.dataset.path), "fingerprint": self.dataset.fingerprint}


def parse_size(text: str | int | None) -> int | None:
    """'256MB', '1.5GiB', '4096' -> bytes (decimal and binary units both accepted)."""
    if text is None or isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "KIB": 2**10, "M": 10**6, "MB": 10**6, "MIB": 2**20, "G": 10**9, "GB": 10**9, "GIB": 2**30}
    s = text.strip().upper()
    num = s.rstrip("KMGIB")
    try:
        return int(float(num) * units[s[len(num) :]])
    except (ValueError, KeyError):
        raise DataError(f"cannot read size {text!r}; write e.g. 256MB or 1GiB") from None


def shard_rows_for(dim: int, dtype: str, rows: int | None, shard_rows: int | None, shards: int | None, shard_bytes: int | str | None) -> int:
    """Rows per shard from exactly one of: rows, a shard count (needs the row count), bytes per shard."""
    if sum(v is not None for v in (shard_rows, shards, shard_bytes)) > 1:
        raise DataError("give only one of --shard-rows, --shards, --shard-size")
    if shard_rows is not None:
        return int(shard_rows)
    if shards is not None:
        if rows is None:
            raise DataError("--shards needs a source whose row count is known up front; use --shard-rows or --shard-size")
        return max(1, -(-rows // int(shards)))
    row_bytes = dim * np.dtype(dtype).itemsize
    return max(1, int(parse_size(shard_bytes) or DEFAULT_SHARD_BYTES) // row_bytes)


def _counted(stream, total, desc, quiet):
    bar = progress.bar(total, desc, quiet=quiet, leave=False)
    try:
        for b in stream:
            bar.update(len(b))
            yield b
    finally:
        bar.close()


@publishing
def build(
    source: Source,
    out: str | Path,
    preprocessing: list[StepSpec] | None = None,
    *,
    shard_rows: int | None = None,
    shards: int | None = None,
    shard_bytes: int | str | None = None,
    block_rows: int | None = None,
    dtype: str | None = None,
    chunk_rows: int = 1024,
    compression: str | None = None,
    overwrite: bool = False,
    quiet: bool = True,
    base: Transform | None = None,
    stats: Callable[[Dataset, int], Callable] | None = None,
    extra_preprocessing: list[dict[str, Any]] | None = None,
) -> Dataset:
    """Stream a source into a new dataset folder, fitting and applying preprocessing on the way.

    Args:
        source: where rows come from (dist_sae.data.sources); its blocks() is called once per pass.
        out: dataset folder to create; nothing appears there unless the build completes.
        preprocessing: dataset-wide steps to fit and apply, in order (notes, standardize, pca/zca).
        shard_rows / shards / shard_bytes: shard size as rows, a count, or bytes (default 256 MB).
        block_rows: rows per streamed block (default: about 32 MB of float64).
        dtype: stored dtype (default: the source's natural float dtype).
        chunk_rows, compression: HDF5 chunk height and filter ("gzip", "lzf", None).
        overwrite: replace an existing `out` once the new one is complete.
        quiet: no progress bars (they are also off when stderr is not a terminal).
        base: a transform already applied to the source's rows (kept first in the saved transform).
        stats: a factory (Dataset, block_rows) -> SumsFn running the statistics passes elsewhere (Ray);
            the raw rows are then staged (float64) in `<out>.staging/` and the passes run over its shards.
        extra_preprocessing: more manifest `preprocessing` entries describing what the source did.

    Returns:
        The opened dataset.

    Raises:
        DataError: naming the input or output that is wrong. `out` is then untouched and no
            `<out>.partial` or `<out>.staging` is left behind.
    """
    out = Path(out)
    specs = list(preprocessing or [])
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; choose another --out or pass --overwrite")
    if stats is not None and specs:
        return _build_staged(source, out, specs, stats, shard_rows=shard_rows, shards=shards, shard_bytes=shard_bytes, block_rows=block_rows, dtype=dtype, chunk_rows=chunk_rows, compression=compression, overwrite=overwrite, quiet=quiet, base=base)
    block_rows = block_rows or max(1, min(65536, BLOCK_BYTES // (8 * source.dim)))

    def passes():
        return checked_blocks(source, block_rows)

    def progress(stream, kind):
        return _counted(stream, source.rows, f"stats ({kind})", quiet)

    transform = fit_transform(specs, local_sums_fn(passes, progress), in_dim=source.dim) if specs else Transform([], source.dim)
    return _write(source, out, transform, base, shard_rows, shards, shard_bytes, block_rows, dtype, chunk_rows, compression, overwrite, quiet, extra_preprocessing)


def _write(source, out, transform, base, shard_rows, shards, shard_bytes, block_rows, dtype, chunk_rows, compression, overwrite, quiet, extra_preprocessing) -> Dataset:
    dim_out = transform.out_dim(source.dim)
    dtype = dtype or source.dtype
    sample_shape = list(source.sample_shape) if dim_out == source.dim else [dim_out]
    saved = Transform((base.steps if base else []) + transform.steps, base.in_dim if base else source.dim)
    steps_doc = describe_steps(transform)
    info = {"source": source.describe(), "preprocessing": list(source.preprocessing) + list(extra_preprocessing or []) + steps_doc}
    rows_per_shard = shard_rows_for(dim_out, dtype, source.rows, shard_rows, shards, shard_bytes)
    try:
        with DatasetWriter(out, dim_out, shard_rows=rows_per_shard, dtype=dtype, sample_shape=sample_shape, chunk_rows=chunk_rows, compression=compression, overwrite=overwrite, info=info) as writer:
            if saved:
                writer.info["transform"] = saved.save(writer.tmp)
            for block in _counted(checked_blocks(source, block_rows), source.rows, f"writing {out.name}", quiet):
                writer.write(transform.apply(block, dtype=np.float64) if transform else block)
            if source.skipped:
                writer.info["skipped"] = {"count": len(source.skipped), "files": dict(sorted(source.skipped.items())[:100])}
    finally:
        source.close()
    return writer.dataset


def checked_blocks(source: Source, block_rows: int) -> Iterator[np.ndarray]:
    """The source's blocks, with an error naming the input and rows at the first non-finite value."""
    label = getattr(source, "path", None) or getattr(source, "folder", None) or f"the {source.name} source"
    done = 0
    for block in source.blocks(block_rows):
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise DataError(f"{label}: non-finite values (NaN/Inf) in input rows {done + bad[0]}..{done + bad[-1]} ({bad.size} rows in this block); clean the input first")
        done += len(block)
        yield block


def _build_staged(source, out, specs, stats, *, base, block_rows, dtype, **kw) -> Dataset:
    """Write raw rows to `<out>.staging`, run the statistics passes with `stats` over its shards, transform into out."""
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        raw = build(source, staging, [], block_rows=block_rows, dtype="float64", **{k: v for k, v in kw.items() if k not in ("overwrite",)}, base=None)
        ds = transform_dataset(raw.path, out, specs, stats=stats, block_rows=block_rows, dtype=dtype or source.dtype, base=base, _source_info=source.describe(), _source_pre=source.preprocessing, **kw)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(staging.with_name(staging.name + ".partial"), ignore_errors=True)
    return ds


@publishing
def transform_dataset(
    in_dir: str | Path,
    out: str | Path,
    preprocessing: list[StepSpec],
    *,
    stats: Callable[[Dataset, int], Callable] | None = None,
    block_rows: int | None = None,
    base: Transform | None = None,
    shard_rows: int | None = None,
    shards: int | None = None,
    shard_bytes: int | str | None = None,
    dtype: str | None = None,
    chunk_rows: int = 1024,
    compression: str | None = None,
    overwrite: bool = False,
    quiet: bool = True,
    _source_info: dict | None = None,
    _source_pre: list | None = None,
) -> Dataset:
    """Fit `preprocessing` on an existing dataset (passes over its shards) and write the result to `out`.

    The saved transform of `out` is the input's own saved transform followed by the new steps, so it
    still maps raw rows. stats: a factory (Dataset, block_rows) -> SumsFn (e.g. dist_sae.cluster.stats.ray_sums_fn)
    to run the passes on a Ray cluster; by default they run here, unit by unit. The output options
    are those of `build`; dtype defaults to the input's.
    """
    ds = Dataset.open(in_dir)
    if not preprocessing:
        raise DataError("no preprocessing requested; give --normalize notes, --standardize, --pca or --zca")
    source = DatasetSource(ds)
    block_rows = block_rows or max(1, min(65536, BLOCK_BYTES // (8 * ds.dim)))
    if Path(out).exists() and not overwrite:
        raise DataError(f"{out} already exists; choose another output folder or pass --overwrite")
    if base is None:
        base = load_transform(ds.path)
    if stats is not None:
        sums = stats(ds, block_rows)
    else:
        sums = local_sums_fn(lambda: source.blocks(block_rows), lambda s, kind: _counted(s, ds.rows, f"stats ({kind})", quiet))
    transform = fit_transform(preprocessing, sums, in_dim=ds.dim)
    if _source_info is not None:  # a staged build: describe the original source, not the staging folder
        source.describe = lambda: _source_info
        source.preprocessing = list(_source_pre or [])
    else:
        source.preprocessing = list(ds.preprocessing)
    return _write(source, Path(out), transform, base, shard_rows, shards, shard_bytes, block_rows, dtype, chunk_rows, compression, overwrite, quiet, None)


# ---- the named builders ---------------------------------------------------------------------------


def build_from_npy(
    path: str | Path,
    out: str | Path,
    shards: int | None = None,
    shard_rows: int | None = None,
    block_rows: int | None = None,
    dtype: str | None = None,
    sample_shape: list[int] | None = None,
    preprocessing: list[StepSpec] | None = None,
    **writer_kwargs,
) -> Dataset:
    """Write a dataset from a .npy/.npz array without loading it whole (memory-mapped, block by block).

    Rows are the first axis; any further axes are flattened and become the sample shape. Without
    a shard size the data go to one shard (or `shards` equal ones).
    """
    source = NpySource(path, sample_shape)
    if shard_rows is None and writer_kwargs.get("shard_bytes") is None:
        shard_rows = -(-source.rows // (shards or 1))
        shards = None
    return build(source, out, preprocessing, shards=shards, shard_rows=shard_rows, block_rows=block_rows, dtype=dtype, **writer_kwargs)


def build_idx(path: str | Path, out: str | Path, scale: bool = True, preprocessing: list[StepSpec] | None = None, **kw) -> Dataset:
    """MNIST / Fashion-MNIST IDX images (gzipped or not), streamed; uint8 scaled to [0, 1] unless scale=False."""
    return build(IdxSource(path, scale=scale), out, preprocessing, **kw)


def build_images(folder: str | Path, out: str | Path, mode: str = "gray", size: tuple[int, int] | None = None, fit: str = "resize", preprocessing: list[StepSpec] | None = None, **kw) -> Dataset:
    """A folder tree of PNG/JPEG/TIFF via Pillow; undecodable files are skipped and listed in the manifest."""
    return build(ImageFolderSource(folder, mode, size, fit), out, preprocessing, **kw)


def build_patches(
    out: str | Path,
    images: str | Path | list[np.ndarray] | None = None,
    patch: int = 8,
    count: int = 10000,
    seed: int = 0,
    whiten: bool = True,
    normalize: str | None = "notes",
    overwrite: bool = False,
    preprocessing: list[StepSpec] | None = None,
    **writer_kwargs,
) -> Dataset:
    """The notes' exercise data: `count` seeded p×p patches of whitened natural images.

    Args:
        images: a folder of images, a list of 2-D arrays, or None for scikit-image's photographs.
        whiten: Olshausen–Field whitening of each whole image, then unit variance (IMAGES.mat).
        normalize: "notes" (remove each patch's mean, clip at ±3σ of the patch set, map to
            [0.1, 0.9]) or None for the raw patches.
        preprocessing: further steps after the normalisation (e.g. [StepSpec("zca", 0.1)]).

    Returns:
        The dataset: rows of p·p values, sample shape [p, p].
    """
    if normalize not in (None, "none", "notes"):
        raise DataError(f"normalize must be 'notes' or None, got {normalize!r}")
    specs = ([StepSpec("notes")] if normalize == "notes" else []) + list(preprocessing or [])
    return build(PatchSource(images, patch, count, seed, whiten), out, specs, overwrite=overwrite, **writer_kwargs)


def build_digits(out: str | Path, size: int = 8, preprocessing: list[StepSpec] | None = None, **kw) -> Dataset:
    """scikit-learn's 1797 bundled 8×8 digits in [0, 1]; size=28 upsamples them to 28×28 (784 features)."""
    return build(DigitsSource(size), out, preprocessing, **kw)


def build_synthetic(out: str | Path, rows: int, dim: int = 64, seed: int = 0, atoms: int = 32, active: int = 3, preprocessing: list[StepSpec] | None = None, **kw) -> Dataset:
    """`rows` seeded rows with planted sparse structure, streamed (any size: 1e7 rows is fine)."""
    return build(SyntheticSource(rows, dim, seed, atoms, active), out, preprocessing, **kw)
