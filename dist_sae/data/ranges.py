"""One range of a build, written alone: the plain function a parallel build runs in many processes.

`write_range(job, r)` streams the rows of Range r of the job's source through the fitted transform
into `<job.folder>/shard-<r.shard>.h5` and returns that shard's ShardInfo and the files it skipped.
It touches nothing else, so a range can be built anywhere, any number of times: it writes into its
own scratch folder (`.range-<shard>`, removed first, so a retried task starts clean) and moves the
finished shard into place with one rename. `run_here` runs the ranges one after another in this
process (the single-process build); dist_sae.cluster.build runs `range_steps` as Ray tasks
(streaming generators: each block's row count, then the result).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dist_sae.data.dataset import ShardInfo
from dist_sae.data.sources import Range, Source
from dist_sae.data.transforms import Transform
from dist_sae.data.writer import DatasetWriter
from dist_sae.errors import DataError

ONE_SHARD = 2**40  # a range's scratch writer never cuts: the range is one shard


@dataclass
class RangeJob:
    """What every range of one build shares (shipped once to each worker)."""

    source: Source
    folder: Path  # the output's partial folder, where the shards go
    dim: int  # stored features per row (after the transform)
    dtype: str  # stored dtype
    block_rows: int  # rows per streamed block (the statistics passes use the same blocks)
    chunk_rows: int = 1024
    compression: str | None = None
    transform: Transform | None = None


@dataclass
class RangeResult:
    """One written range: its shard (None when every file of the range was skipped) and skips."""

    shard: ShardInfo | None
    skipped: dict[str, str] = field(default_factory=dict)


def source_label(source: Source) -> str:
    return str(getattr(source, "path", None) or getattr(source, "folder", None) or f"the {source.name} source")


def checked(blocks: Iterable[np.ndarray], label: str, first_row: int = 0) -> Iterator[np.ndarray]:
    """The blocks, with an error naming the input and rows at the first non-finite value."""
    done = first_row
    for block in blocks:
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise DataError(f"{label}: non-finite values (NaN/Inf) in input rows {done + bad[0]}..{done + bad[-1]} ({bad.size} rows in this block); clean the input first")
        done += len(block)
        yield block


def range_steps(job: RangeJob, r: Range) -> Iterator[int | RangeResult]:
    """Build shard r.shard from range r of job.source: yields the rows of each block as it is
    written, then the RangeResult (so a runner can stream a task's progress to the driver)."""
    source = job.source
    source.skipped = {}  # this range's own skips, returned to the driver
    scratch = job.folder / f".range-{r.shard:05d}"
    final = job.folder / f"shard-{r.shard:05d}.h5"
    if not job.folder.is_dir():
        raise DataError(f"{job.folder} is gone: the build it belonged to has ended")
    writer = DatasetWriter(scratch, job.dim, shard_rows=ONE_SHARD, dtype=job.dtype, chunk_rows=job.chunk_rows, compression=job.compression, overwrite=True)
    try:
        label = source_label(source)
        for block in checked(source.range_blocks(r, job.block_rows), label, r.start if source.rows is not None else 0):
            writer.write(job.transform.apply(block, dtype=np.float64) if job.transform else block)
            yield len(block)
    except BaseException:
        writer.abort()
        raise
    if writer.rows == 0:
        writer.abort()
        yield RangeResult(None, dict(source.skipped))
        return
    written = writer.close()
    os.replace(written.shard_path(0), final)
    shutil.rmtree(scratch, ignore_errors=True)
    info = written.shards[0]
    yield RangeResult(dataclasses.replace(info, file=final.name), dict(source.skipped))  # same bytes, final name


def write_range(job: RangeJob, r: Range, progress: Callable[[int], object] | None = None) -> RangeResult:
    """range_steps run to the end here: progress(rows) after each block; the shard's RangeResult."""
    for step in range_steps(job, r):
        if isinstance(step, RangeResult):
            return step
        if progress is not None:
            progress(step)
    raise AssertionError("range_steps ended without a result")


# Runs the ranges of one build and yields their results in range order; progress(rows) as they go.
RangeRunner = Callable[[RangeJob, list[Range], Callable[[int], object]], Iterable[RangeResult]]


def run_here(job: RangeJob, ranges: list[Range], progress: Callable[[int], object]) -> Iterator[RangeResult]:
    """The single-process runner: the ranges one after another in this process."""
    for r in ranges:
        yield write_range(job, r, progress)
