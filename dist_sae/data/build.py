"""Building shard sets from the sources users have. Every builder streams: memory stays bounded.

`build(source, out, preprocessing=[...], WriterOptions(...))` is the one engine: it fits the
dataset-wide preprocessing in passes over the source (float64 partial sums in unit order,
dist_sae.data.transforms), then streams the source once more through the fitted transform into
shards in `<out>.partial/`, renamed into place only when complete. The fitted transform is saved in
the folder (transform.safetensors + a manifest entry) so encoding applies the same transform.

A source that can be cut (npy, idx, images, image-folder patches, synthetic, datasets) is built range
by range (dist_sae.data.ranges): shard k holds range k of the input, cut by the input alone, so a
`runner` may write the ranges anywhere in any order (dist_sae.cluster.build runs them as Ray tasks)
and the dataset, fingerprint included, is the one the single-process build writes. The statistics
passes go over the same ranges in the same blocks, so the fitted transform is the same too.

The named builders (`build_from_npy`, `build_patches`, `build_digits`, ...) pick a source from
dist_sae.data.sources and call `build`; `transform_dataset` does the same from an existing dataset.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_sae.data.reader import BlockReader, prefetch
from dist_sae.data.dataset import Dataset, publishing
from dist_sae.data.workunit import WorkUnit
from dist_sae.data.writer import DatasetWriter
from dist_sae.errors import DataError
from dist_sae.data.patches import patch_source
from dist_sae.data.ranges import RangeJob, RangeRunner, checked, run_here, source_label
from dist_sae.data.sources import DigitsSource, IdxSource, NpySource, Range, Source, SyntheticSource
from dist_sae.data.images import ImageFolderSource
from dist_sae.data.parquet import ParquetSource
from dist_sae.data.wds import WebDatasetSource
from dist_sae.data.transforms import StepSpec, Transform, describe_steps, fit_transform, load_transform, local_sums_fn
from dist_sae import progress

log = logging.getLogger(__name__)

# `dist-sae data build --from KIND`: the source of each kind (a class, or a function choosing one).
SOURCES = {"npy": NpySource, "idx": IdxSource, "images": ImageFolderSource, "webdataset": WebDatasetSource, "parquet": ParquetSource,
           "patches": patch_source, "digits": DigitsSource, "synthetic": SyntheticSource}
SKIPPED_LISTED = 20  # skipped inputs dataset.json names (with their count)

DEFAULT_SHARD_BYTES = 256 * 2**20  # the largest default shard
# Without a shard size, a source of known size is cut into about TARGET_SHARDS shards (but none under
# MIN_SHARD_ROWS rows, nor over DEFAULT_SHARD_BYTES): enough ranges to keep every core of a cluster
# busy, sized by the input alone so the shards never depend on the number of workers.
TARGET_SHARDS = 256
MIN_SHARD_ROWS = 1024
BLOCK_BYTES = 32 * 2**20  # rows per streamed block are chosen to hold about this many float64 bytes


@dataclass(frozen=True)
class WriterOptions:
    """How a new dataset is written: the output flags of `dist-sae data build` and `data transform`."""

    shard_rows: int | None = None
    """Rows per shard; image folders count files (a shard holds the images of that many files)."""
    shards: int | None = None
    """Number of shards instead (for a source whose size is known up front)."""
    shard_bytes: int | str | None = None
    """Bytes per shard instead, e.g. "256MB"; the default is about TARGET_SHARDS shards of at most 256 MB."""
    block_rows: int | None = None
    """Rows streamed at a time (default: about 32 MB of float64); also the blocks of the statistics passes."""
    dtype: str | None = None
    """Stored dtype (default: the source's natural float dtype; a transformed dataset's own)."""
    chunk_rows: int = 1024
    """HDF5 chunk height in rows."""
    compression: str | None = None
    """HDF5 compression filter: "gzip", "lzf" or None."""
    overwrite: bool = False
    """Replace an existing output folder once the new one is complete."""
    quiet: bool = True
    """No progress bars (they are also off when stderr is not a terminal)."""


class DatasetSource(Source):
    """An existing dataset as a source (for `dist-sae data transform`), cut by rows or, with
    keep_shards, one range per shard of the input (a staged build keeps the shards it staged)."""

    name = "dataset"

    def __init__(self, dataset: Dataset, keep_shards: bool = False) -> None:
        super().__init__()
        self.dataset, self.keep_shards = dataset, keep_shards
        self.rows, self.dim, self.sample_shape, self.dtype = dataset.rows, dataset.dim, dataset.sample_shape, dataset.dtype
        self.path = dataset.path

    def blocks(self, block_rows: int) -> Iterator[np.ndarray]:
        yield from self.range_blocks(Range(0, 0, self.rows), block_rows)

    def ranges(self, per_shard: int) -> list[Range]:
        if not self.keep_shards:
            return super().ranges(per_shard)
        bounds = np.cumsum([0] + [s.rows for s in self.dataset.shards])
        return [Range(k, int(bounds[k]), int(bounds[k + 1])) for k in range(len(self.dataset.shards))]

    def range_blocks(self, r: Range, block_rows: int) -> Iterator[np.ndarray]:
        units, offset = [], 0
        for shard, info in enumerate(self.dataset.shards):
            lo, hi = max(r.start - offset, 0), min(r.stop - offset, info.rows)
            units += [WorkUnit.of(len(units), shard, a, min(a + block_rows, hi)) for a in range(lo, hi, block_rows)]
            offset += info.rows
        with BlockReader(self.dataset) as reader:
            for _, block in prefetch(reader, units, depth=1):
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
    """Rows per shard from at most one of: rows, a shard count (needs the row count), bytes per shard."""
    if sum(v is not None for v in (shard_rows, shards, shard_bytes)) > 1:
        raise DataError("give only one of --shard-rows, --shards, --shard-size")
    if shard_rows is not None:
        return int(shard_rows)
    if shards is not None:
        if rows is None:
            raise DataError("--shards needs a source whose row count is known up front; use --shard-rows or --shard-size")
        return max(1, -(-rows // int(shards)))
    row_bytes = dim * np.dtype(dtype).itemsize
    most = max(1, int(parse_size(shard_bytes) or DEFAULT_SHARD_BYTES) // row_bytes)
    if shard_bytes is not None or rows is None:
        return most
    return min(most, max(MIN_SHARD_ROWS, -(-rows // TARGET_SHARDS)))


def check_out(out: str | Path, overwrite: bool) -> None:
    """The one-line error for an output folder that exists without overwrite (before any work)."""
    if Path(out).exists() and not overwrite:
        raise DataError(f"{out} already exists; choose another --out or pass --overwrite")


def default_block_rows(dim: int) -> int:
    return max(1, min(65536, BLOCK_BYTES // (8 * dim)))


def _counted(stream, total, desc, quiet):
    bar = progress.bar(total, desc, quiet=quiet, leave=False)
    try:
        for b in stream:
            bar.update(len(b))
            yield b
    finally:
        bar.close()


def _out_dim(specs: list[StepSpec], dim: int) -> int:
    """Features per row after the steps (known before fitting: only PCA with K components changes it)."""
    return min([dim] + [s.components for s in specs if s.kind == "pca" and s.components])


def plan_ranges(source: Source, options: WriterOptions, dim: int, dtype: str) -> list[Range] | None:
    """The shards of a build of `source` (rows of `dim` values stored as `dtype`), None if it cannot be cut."""
    rows = shard_rows_for(dim, dtype, source.planned_rows, options.shard_rows, options.shards, options.shard_bytes)
    return source.ranges(source.items_per_shard(rows)) if source.items is not None else None


@publishing
def build(
    source: Source,
    out: str | Path,
    preprocessing: list[StepSpec] | None = None,
    options: WriterOptions = WriterOptions(),
    *,
    base: Transform | None = None,
    stats: Callable[[Dataset, int], Callable] | None = None,
    runner: RangeRunner | None = None,
    extra_preprocessing: list[dict[str, Any]] | None = None,
) -> Dataset:
    """Stream a source into a new dataset folder, fitting and applying preprocessing on the way.

    Args:
        source: where rows come from (dist_sae.data.sources); read once per pass.
        out: dataset folder to create; nothing appears there unless the build completes.
        preprocessing: dataset-wide steps to fit and apply, in order (notes, standardize, pca/zca).
        options: shard size, dtype, chunks, compression, overwrite, quiet (WriterOptions).
        base: a transform already applied to the source's rows (kept first in the saved transform).
        stats: a factory (Dataset, block_rows) -> SumsFn running the statistics passes elsewhere (Ray);
            the raw rows are then staged (float64) in `<out>.staging/` and the passes run over its shards
            (for a source that can be cut; digits and the bundled photographs' patches fit here).
        runner: writes the ranges of a source that can be cut (default: here, one after another;
            dist_sae.cluster.build.ray_runner: as Ray tasks). Sources that cannot be cut (digits,
            patches of the bundled photographs) are written here in any case.
        extra_preprocessing: more manifest `preprocessing` entries describing what the source did.

    Returns:
        The opened dataset.

    Raises:
        DataError: naming the input or output that is wrong. `out` is then untouched and no
            `<out>.partial` or `<out>.staging` is left behind.
    """
    out = Path(out)
    specs = list(preprocessing or [])
    check_out(out, options.overwrite)
    if stats is not None and specs and source.items is not None:  # a source that cannot be cut is small: all here
        return _build_staged(source, out, specs, stats, options, base, runner)
    block_rows = options.block_rows or default_block_rows(source.dim)
    ranges = plan_ranges(source, options, _out_dim(specs, source.dim), options.dtype or source.dtype)

    def passes():
        if ranges is None:
            return checked(source.blocks(block_rows), source_label(source))
        # the units of a staged build's passes: each range in blocks of block_rows (bit-identical sums)
        return checked(itertools.chain.from_iterable(source.range_blocks(r, block_rows) for r in ranges), source_label(source))

    def counted(stream, kind):
        return _counted(stream, source.planned_rows, f"stats ({kind})", options.quiet)

    transform = fit_transform(specs, local_sums_fn(passes, counted), in_dim=source.dim) if specs else Transform([], source.dim)
    return _write(source, out, transform, base, options, block_rows, ranges, runner or run_here, extra_preprocessing)


def _write(source, out, transform, base, options, block_rows, ranges, runner, extra_preprocessing) -> Dataset:
    dim_out = transform.out_dim(source.dim)
    dtype = options.dtype or source.dtype
    sample_shape = list(source.sample_shape) if dim_out == source.dim else [dim_out]
    saved = Transform((base.steps if base else []) + transform.steps, base.in_dim if base else source.dim)
    rows_per_shard = shard_rows_for(dim_out, dtype, source.planned_rows, options.shard_rows, options.shards, options.shard_bytes)
    info = {"preprocessing": list(source.preprocessing) + list(extra_preprocessing or []) + describe_steps(transform)}
    bar = progress.bar(source.planned_rows, f"writing {out.name}", quiet=options.quiet, leave=False)
    kw = {"dtype": dtype, "chunk_rows": options.chunk_rows, "compression": options.compression}
    try:
        with DatasetWriter(out, dim_out, shard_rows=rows_per_shard, sample_shape=sample_shape, overwrite=options.overwrite, info=info, **kw) as writer:
            if saved:
                writer.info["transform"] = saved.save(writer.tmp)
            if ranges is None:
                for block in checked(source.blocks(block_rows), source_label(source)):
                    writer.write(transform.apply(block, dtype=np.float64) if transform else block)
                    bar.update(len(block))
            else:
                job = RangeJob(source, writer.tmp, dim_out, block_rows=block_rows, transform=transform or None, **kw)
                skipped = dict(source.skipped)  # write_range keeps each range's own in source.skipped
                for result in runner(job, ranges, bar.update):
                    skipped.update(result.skipped)
                    if result.shard is not None:  # the shards, in range order, as the writer's own
                        writer.shards.append(result.shard)
                        writer.rows += result.shard.rows
                for stray in writer.tmp.glob(".range-*"):  # scratch of attempts that died
                    shutil.rmtree(stray, ignore_errors=True)
                source.skipped = skipped
            writer.info["source"] = source.describe()
            if source.skipped:
                writer.info["skipped"] = {"count": len(source.skipped), "files": dict(sorted(source.skipped.items())[:SKIPPED_LISTED])}
    finally:
        bar.close()
        source.close()
    return writer.dataset


def _build_staged(source, out, specs, stats, options, base, runner) -> Dataset:
    """Write raw rows to `<out>.staging` (shards as the output's), run the statistics passes with
    `stats` over its shards, and transform it shard by shard into out (no data through this process
    when `runner` is a cluster's)."""
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    dtype = options.dtype or source.dtype
    rows = shard_rows_for(_out_dim(specs, source.dim), dtype, source.planned_rows, options.shard_rows, options.shards, options.shard_bytes)
    raw_options = dataclasses.replace(options, shard_rows=rows, shards=None, shard_bytes=None, dtype="float64", overwrite=False)
    try:
        raw = build(source, staging, [], raw_options, runner=runner)
        ds = transform_dataset(raw.path, out, specs, dataclasses.replace(options, dtype=dtype), stats=stats, runner=runner, base=base, _staged_from=source)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(staging.with_name(staging.name + ".partial"), ignore_errors=True)
    return ds


@publishing
def transform_dataset(
    in_dir: str | Path,
    out: str | Path,
    preprocessing: list[StepSpec],
    options: WriterOptions = WriterOptions(),
    *,
    stats: Callable[[Dataset, int], Callable] | None = None,
    runner: RangeRunner | None = None,
    base: Transform | None = None,
    _staged_from: Source | None = None,
) -> Dataset:
    """Fit `preprocessing` on an existing dataset (passes over its shards) and write the result to `out`.

    The saved transform of `out` is the input's own saved transform followed by the new steps, so it
    still maps raw rows. stats: a factory (Dataset, block_rows) -> SumsFn (e.g. dist_sae.cluster.stats.ray_sums_fn)
    to run the passes on a Ray cluster; by default they run here, unit by unit. runner: as in `build`.
    The output options are those of `build`; dtype defaults to the input's.
    """
    ds = Dataset.open(in_dir)
    if not preprocessing:
        raise DataError("no preprocessing requested; give --normalize notes, --standardize, --pca or --zca")
    source = DatasetSource(ds, keep_shards=_staged_from is not None)
    block_rows = options.block_rows or default_block_rows(ds.dim)
    check_out(out, options.overwrite)
    if base is None and _staged_from is None:
        base = load_transform(ds.path)
    if stats is not None:
        sums = stats(ds, block_rows)
    else:
        sums = local_sums_fn(lambda: source.blocks(block_rows), lambda s, kind: _counted(s, ds.rows, f"stats ({kind})", options.quiet))
    transform = fit_transform(preprocessing, sums, in_dim=ds.dim)
    if _staged_from is not None:  # a staged build: describe the original source, not the staging folder
        source.describe = _staged_from.describe
        source.preprocessing = list(_staged_from.preprocessing)
        source.skipped = dict(_staged_from.skipped)
    else:
        source.preprocessing = list(ds.preprocessing)
    options = dataclasses.replace(options, dtype=options.dtype or ds.dtype)
    return _write(source, Path(out), transform, base, options, block_rows, plan_ranges(source, options, transform.out_dim(ds.dim), options.dtype), runner or run_here, None)


# ---- the named builders ---------------------------------------------------------------------------


def build_from_npy(path: str | Path, out: str | Path, options: WriterOptions = WriterOptions(), sample_shape: list[int] | None = None, preprocessing: list[StepSpec] | None = None, **kw) -> Dataset:
    """Write a dataset from a .npy/.npz array without loading it whole (memory-mapped, block by block).

    Rows are the first axis; any further axes are flattened and become the sample shape. Without
    a shard size the data go to one shard (or `options.shards` equal ones). kw: those of `build`.
    """
    source = NpySource(path, sample_shape)
    if options.shard_rows is None and options.shard_bytes is None:
        options = dataclasses.replace(options, shard_rows=-(-source.rows // (options.shards or 1)), shards=None)
    return build(source, out, preprocessing, options, **kw)


def build_idx(path: str | Path, out: str | Path, options: WriterOptions = WriterOptions(), scale: bool = True, preprocessing: list[StepSpec] | None = None, **kw) -> Dataset:
    """MNIST / Fashion-MNIST IDX images (gzipped or not), streamed; uint8 scaled to [0, 1] unless scale=False."""
    return build(IdxSource(path, scale=scale), out, preprocessing, options, **kw)


def build_images(folder: str | Path, out: str | Path, options: WriterOptions = WriterOptions(), mode: str = "gray", size: tuple[int, int] | None = None, fit: str = "resize", preprocessing: list[StepSpec] | None = None, **kw) -> Dataset:
    """A folder tree of PNG/JPEG/TIFF via Pillow; undecodable files are skipped and listed in the manifest."""
    return build(ImageFolderSource(folder, mode, size, fit), out, preprocessing, options, **kw)


def build_patches(
    out: str | Path,
    options: WriterOptions = WriterOptions(),
    images: str | Path | list[np.ndarray] | None = None,
    patch: int = 8,
    count: int = 10000,
    seed: int = 0,
    whiten: bool = True,
    normalize: str | None = "notes",
    preprocessing: list[StepSpec] | None = None,
    **kw,
) -> Dataset:
    """The notes' exercise data: `count` seeded p×p patches of whitened natural images.

    Args:
        images: a folder of images (patches seeded per image, see dist_sae.data.patches), a list of
            2-D arrays, or None for scikit-image's photographs.
        whiten: Olshausen–Field whitening of each whole image, then unit variance (IMAGES.mat).
        normalize: "notes" (remove each patch's mean, clip at ±3σ of the patch set, map to
            [0.1, 0.9]) or None for the raw patches.
        preprocessing: further steps after the normalisation (e.g. [StepSpec("zca", 0.1)]).
        kw: those of `build` (stats, runner).

    Returns:
        The dataset: rows of p·p values, sample shape [p, p].
    """
    if normalize not in (None, "none", "notes"):
        raise DataError(f"normalize must be 'notes' or None, got {normalize!r}")
    specs = ([StepSpec("notes")] if normalize == "notes" else []) + list(preprocessing or [])
    return build(patch_source(images, patch, count, seed, whiten), out, specs, options, **kw)


def build_digits(out: str | Path, options: WriterOptions = WriterOptions(), size: int = 8, preprocessing: list[StepSpec] | None = None, **kw) -> Dataset:
    """scikit-learn's 1797 bundled 8×8 digits in [0, 1]; size=28 upsamples them to 28×28 (784 features)."""
    return build(DigitsSource(size), out, preprocessing, options, **kw)


def build_synthetic(out: str | Path, rows: int, options: WriterOptions = WriterOptions(), dim: int = 64, seed: int = 0, atoms: int = 32, active: int = 3, preprocessing: list[StepSpec] | None = None, **kw) -> Dataset:
    """`rows` seeded rows with planted sparse structure, streamed (any size: 1e7 rows is fine)."""
    return build(SyntheticSource(rows, dim, seed, atoms, active), out, preprocessing, options, **kw)
