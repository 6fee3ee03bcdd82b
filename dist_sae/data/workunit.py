"""Work units: the blocks of rows that passes read, compute and reduce, and how a dataset is cut into them.

A unit is one or more consecutive spans (shard, row range); its `id` orders the reduction of
partial sums. The cut depends only on the shards' sizes and the settings, never on the number or
kind of workers, so results stay bit-identical for any worker count (partial sums are reduced in unit-id order).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple

# Passes cut a small dataset into up to this many units, so that several workers get work, but never
# into units under MIN_UNIT_ROWS rows: a Ray call costs ~1 ms, the compute of ~1-4k rows of a small
# model (10,000 rows × 64-25-64 on 2 Ray workers: 17 ms per evaluation in 2 units, 24 in 4, 31 in 8).
PASS_MIN_UNITS = 4
MIN_UNIT_ROWS = 4096
# data.taper: units in the pass's third quarter of rows are cut in halves, the next eighth in quarters,
# the rest in eighths (never under MIN_UNIT_ROWS rows), so the units handed out last are small.
TAPER = (2, 4, 8)


class Span(NamedTuple):
    """Rows [start, stop) of shard `shard`."""

    shard: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class WorkUnit:
    """The rows of `spans`, in order, as one block; `id` orders the reduction of partial sums.

    A unit holds several spans only where shards are smaller than a unit (cut_units packs them),
    so that a dataset of many small shards is not computed and reduced in many small pieces.
    """

    id: int
    spans: tuple[Span, ...]

    @classmethod
    def of(cls, id: int, shard: int, start: int, stop: int) -> WorkUnit:
        """The unit of rows [start, stop) of one shard."""
        return cls(id, (Span(shard, start, stop),))

    @property
    def rows(self) -> int:
        return sum(span.rows for span in self.spans)

    def parts(self) -> Iterator[tuple[Span, int]]:
        """Each span with the offset of its first row within the unit."""
        at = 0
        for span in self.spans:
            yield span, at
            at += span.rows

    def flat(self) -> tuple[int, ...]:
        """(id, shard, start, stop, shard, start, stop, ...): Ray serializes a tuple of ints in half
        the time of the dataclass (cloudpickle), and each minibatch step sends one per worker."""
        return (self.id, *(n for span in self.spans for n in span))

    @classmethod
    def from_flat(cls, flat: tuple[int, ...] | list[int]) -> WorkUnit:
        return cls(flat[0], tuple(Span(*flat[i : i + 3]) for i in range(1, len(flat), 3)))

    def slice(self, lo: int, hi: int) -> tuple[Span, ...]:
        """The spans of the unit's rows [lo, hi) (offsets within the unit)."""
        out = []
        for span, at in self.parts():
            a, b = max(lo - at, 0), min(hi - at, span.rows)
            if a < b:
                out.append(Span(span.shard, span.start + a, span.start + b))
        return tuple(out)


def cut_units(shard_rows: list[int], block_rows: int, chunk: int = 1, min_units: int = 0, taper: bool = False,
              pack: bool = True) -> list[WorkUnit]:
    """Work units of shards of `shard_rows` rows, numbered in shard-then-row order.

    Each shard is cut into pieces of at most `block_rows` rows, rounded down to a whole number of
    `chunk`-row HDF5 chunks when it spans one or more (so no chunk is read and decompressed by two
    units); consecutive pieces are packed into one unit while it stays within block_rows rows (a
    dataset built as many small shards, such as 10,000 patches in shards of 1,024 rows, makes one
    or two units, not ten). With min_units, a dataset too small to make that many units is cut
    into up to min_units equal blocks of its rows (shards concatenated) of at least MIN_UNIT_ROWS
    rows instead, not chunk-aligned, so that every worker of a pass gets work. With taper, units
    are cut smaller toward the pass's end (taper_units). pack=False keeps every piece a unit of
    its own (what the data builders' streamed blocks are, whose statistics must match these).
    """
    if chunk > 1 and block_rows >= chunk:
        block_rows -= block_rows % chunk
    units: list[WorkUnit] = []
    for shard, size in enumerate(shard_rows):
        for start in range(0, size, block_rows):
            piece = Span(shard, start, min(start + block_rows, size))
            if pack and units and units[-1].rows + piece.rows <= block_rows:
                units[-1] = WorkUnit(units[-1].id, units[-1].spans + (piece,))
            else:
                units.append(WorkUnit(len(units), (piece,)))
    total = sum(shard_rows)
    wanted = min(min_units, total // MIN_UNIT_ROWS)
    if wanted > 1 and len(units) < wanted:
        whole = WorkUnit(0, tuple(Span(shard, 0, size) for shard, size in enumerate(shard_rows) if size))
        size = -(-total // wanted)
        units = [WorkUnit(i, whole.slice(lo, lo + size)) for i, lo in enumerate(range(0, total, size))]
        chunk = 1
    return taper_units(units, chunk=chunk) if taper else units


def taper_units(units: list[WorkUnit], min_rows: int = MIN_UNIT_ROWS, chunk: int = 1) -> list[WorkUnit]:
    """`units` cut smaller toward the pass's end, renumbered in order (data.taper).

    A unit starting in the first half of the pass's rows stays whole; one starting in the next
    quarter is cut in 2, the next eighth in 4, the rest in 8 (TAPER), never into pieces under
    `min_rows` rows (less up to one chunk, where a boundary moves down onto one); piece boundaries
    fall on multiples of `chunk` rows of their shard where a piece spans chunks. So a pass holds
    large units for fast workers at its front (taken lowest id first) and small ones at its back,
    which slow workers take (cluster.dispatch): the units left when the pass ends are small,
    whoever holds them.
    """
    if len(units) < PASS_MIN_UNITS:
        return units
    total = sum(u.rows for u in units)
    out: list[WorkUnit] = []
    offset = 0  # rows of the pass before this unit
    for unit in units:
        level = 0
        while level < len(TAPER) and offset >= total * (1 - 0.5 ** (level + 1)):
            level += 1
        offset += unit.rows
        parts = max(1, min(TAPER[level - 1] if level else 1, unit.rows // min_rows))
        size = unit.rows / parts
        step = chunk if size >= chunk else 1
        cuts = sorted({_aligned(unit, round(k * size), step) for k in range(parts)} | {unit.rows})
        out.extend(WorkUnit(len(out), unit.slice(lo, hi)) for lo, hi in pairwise(cuts))
    return out


def _aligned(unit: WorkUnit, offset: int, step: int) -> int:
    """`offset` (rows into the unit) moved down to the nearest multiple of `step` rows of its shard,
    not below the start of its span (spans of cut_units start on a chunk)."""
    for span, at in unit.parts():
        if offset < at + span.rows:
            row = span.start + offset - at
            return at + max(row // step * step, span.start) - span.start
    return offset
