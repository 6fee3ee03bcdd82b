"""Per-row outputs of a model (codes or reconstructions), written shard by shard where they are computed.

Output shard k holds input rows [k·S, (k+1)·S) (S = rows per output shard), cut by the input
alone, so the output is the same dataset, row for row and bit for bit, whoever computes which
shard and in what order. A shard is computed by one process from its work units (blocks of at
most data.block_rows rows, each within the shard) and stored whole in the output's partial
folder (data/partial.py): `write_code_shard` is what a Ray worker or the single process runs.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from dist_sae.data.dataset import ShardInfo
from dist_sae.data.partial import scratch_file, shard_name, store_shard
from dist_sae.data.reader import prefetch
from dist_sae.data.workunit import Span, WorkUnit
from dist_sae.data.writer import ShardWriter
from dist_sae.errors import DataError
from dist_sae.train.passes import PassRunner

KINDS = ("encode", "reconstruct")


@dataclass(frozen=True)
class CodeJob:
    """What every output shard of one encode shares (sent with each shard's call)."""

    kind: str  # encode | reconstruct
    layer: int | None  # encoder layer (1-based) whose codes to write; None for reconstruct
    dim: int  # output features per row
    dtype: str  # stored dtype
    folder: str  # the output's partial folder (local path or URL)
    top_k: int | None = None  # keep each row's K largest values (the sparse layout)
    chunk_rows: int = 1024
    compression: str | None = None


def plan_shards(shard_sizes: list[int], out_rows: int, block_rows: int) -> list[tuple[WorkUnit, ...]]:
    """The work units of each output shard: shard k is input rows [k·out_rows, (k+1)·out_rows),
    in units of at most block_rows rows (a unit may span input shards, never output shards);
    unit ids run in row order over the whole plan. Linear in the units and input shards."""
    offsets = list(itertools.accumulate(shard_sizes, initial=0))  # first row of each input shard

    def spans(a: int, b: int) -> tuple[Span, ...]:  # rows [a, b) of the input shards, concatenated
        out, k = [], bisect.bisect_right(offsets, a) - 1
        while a < b:
            while offsets[k + 1] <= a:  # past empty shards
                k += 1
            stop = min(b, offsets[k + 1])
            out.append(Span(k, a - offsets[k], stop - offsets[k]))
            a = stop
        return tuple(out)

    total, plan, uid = offsets[-1], [], 0
    for lo in range(0, total, out_rows):
        hi = min(lo + out_rows, total)
        units = []
        for a in range(lo, hi, block_rows):
            units.append(WorkUnit(uid, spans(a, min(a + block_rows, hi))))
            uid += 1
        plan.append(tuple(units))
    return plan


def write_code_shard(runner: PassRunner, job: CodeJob, k: int, units: list[WorkUnit] | tuple[WorkUnit, ...],
                     compute: Callable | None = None, reads: ThreadPoolExecutor | None = None) -> ShardInfo:
    """Compute output shard k from its units and store it in job.folder (then its record).

    Args:
        runner: reads the units (runner.load) and holds the model, θ already set.
        compute: block -> (rows, job.dim) outputs; default runner.transform(job.kind, block, job.layer).
        reads: a one-thread pool to read the next unit while this one computes (None: in turn).

    Returns:
        The stored shard's ShardInfo (file named shard-<k>.h5).
    """
    compute = compute or (lambda block: runner.transform(job.kind, block, job.layer))
    name = shard_name(k)
    scratch = scratch_file(job.folder, name)
    rows = sum(u.rows for u in units)
    writer = ShardWriter(scratch, job.dim, job.dtype, max(1, min(job.chunk_rows, rows)), job.compression, job.top_k)
    try:
        for unit, block in prefetch(runner.load, units, 1 if reads else 0, reads):
            try:
                out = np.asarray(compute(block))
            finally:
                runner.release(block)
            if out.shape != (unit.rows, job.dim):
                raise DataError(f"work unit {unit.id} gave outputs of shape {out.shape}, expected ({unit.rows}, {job.dim})")
            writer.write(out)
        info = dataclasses.replace(writer.close(), file=name)
    except BaseException:
        writer.abort()
        raise
    store_shard(job.folder, scratch, info)
    return info
