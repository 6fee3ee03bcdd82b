"""Images stored as records inside container files (WebDataset tars, Parquet row groups): the shared source.

A record source reads a sorted list of container files ("parts", local paths or object-store
URLs, read in place) and cuts them into `items`, the smallest pieces a worker reads alone: whole
tars (dist_sae.data.wds), row groups (dist_sae.data.parquet). Records come in (sorted part list,
order inside the part) order; shard k holds the records of items [k·F, (k+1)·F), so a build's
shards depend on the input alone. A record that cannot be decoded, or that has no image, is
skipped and listed by name (`part:key`); the build goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from dist_sae.data.images import check_image_options, decode_image, image_steps, stacked_rows
from dist_sae.data.sources import Range, Source
from dist_sae.errors import DataError

log = logging.getLogger(__name__)

# A record's data: encoded image bytes, a row of raw pixel values, or why the record has no image.
Payload = bytes | np.ndarray | Exception


def part_names(locations: list[str]) -> list[str]:
    """How messages and skip lists name the parts: each one's path below the folder all of them
    share ('2020/part-0.parquet', '2021/part-0.parquet'), so no two get one name; the file name
    when they sit in one folder."""
    split = [str(loc).rstrip("/").split("/") for loc in locations]
    if not split:
        return []
    shared = 0
    folders = [parts[:-1] for parts in split]
    while all(len(f) > shared and f[shared] == folders[0][shared] for f in folders):
        shared += 1
    return ["/".join(parts[shared:]) for parts in split]


class RecordSource(Source):
    """Base of the container sources: subclasses set `parts` (locations, as strings: sources pickle to
    every Ray task) and implement `items`, `item_records(k)` and `item_counts()`."""

    kind = "records"  # what messages call the input ("WebDataset", "Parquet")

    def __init__(self, src: str, mode: str = "gray", size: tuple[int, int] | None = None, fit: str = "resize",
                 draft: bool = False, scale: bool = True) -> None:
        super().__init__()
        check_image_options(mode, fit)
        self.path, self.mode, self.size, self.fit, self.draft, self.scale = str(src), mode, size, fit, draft, scale
        self.parts: list[str] = []  # set by the subclass, with set_parts
        self.sizes: list[int] = []
        self.names: list[str] = []  # each part's name in skip lists (part_names)

    def set_parts(self, found: list[tuple[str, int]]) -> None:
        """The parts, as expand_inputs found them: (location, bytes), sorted."""
        self.parts, self.sizes = [loc for loc, _ in found], [size for _, size in found]
        self.names = part_names(self.parts)

    # ---- what subclasses provide ---------------------------------------------------------------

    def item_records(self, k: int) -> Iterator[tuple[str, Payload]]:
        """The records of item k in order, as (name, payload)."""
        raise NotImplementedError

    def item_counts(self) -> list[int]:
        """Records per item (for the per-image patch rule, which needs the count up front)."""
        raise NotImplementedError

    # ---- shared ----------------------------------------------------------------------------------

    def decode(self, payload: bytes | np.ndarray) -> np.ndarray:
        if isinstance(payload, np.ndarray):  # raw pixel rows (a Parquet list column) are rows already
            return payload
        return decode_image(payload, self.mode, self.size, self.fit, self.draft, self.scale)

    def setup_shape(self) -> None:
        """Decode the first good record to learn the row shape (every later record must match it)."""
        for k in range(self.items):
            for name, payload in self.item_records(k):
                try:
                    if isinstance(payload, Exception):
                        raise payload
                    shape = self.decode(payload).shape
                except Exception as exc:
                    self.skip(name, exc)
                    continue
                self.shape = shape
                self.sample_shape = list(shape)
                self.dim = int(np.prod(shape))
                self.preprocessing += image_steps(self.mode, self.size, self.fit, self.draft, self.scale)
                return
        first = next(iter(self.skipped.items()), None)
        why = f" (the first problem: {first[0]}: {first[1]})" if first else ""
        raise DataError(f"{self.path}: none of the records of its {len(self.parts)} {self.kind} file(s) holds an image that can be decoded{why}")

    def skip(self, name: str, exc: BaseException) -> None:
        if name not in self.skipped:
            self.skipped[name] = f"{type(exc).__name__}: {exc}"
            log.warning("skipping %s: %s", name, exc)

    def blocks(self, block_rows: int) -> Iterator[np.ndarray]:
        yield from self.range_blocks(Range(0, 0, self.items), block_rows)

    def range_blocks(self, r: Range, block_rows: int) -> Iterator[np.ndarray]:
        records = (rec for k in range(r.start, r.stop) for rec in self.item_records(k))
        yield from stacked_rows(records, self.decode, self.skip, self.shape, block_rows, where=lambda name: f"{self.path}: {name}")

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name, "path": self.path, "files": len(self.parts), "bytes": int(sum(self.sizes)), "mode": self.mode,
                "decode": "draft" if self.draft else "exact", "skipped": len(self.skipped)}
