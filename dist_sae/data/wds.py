"""WebDataset tar shards as a source: `dist-sae data build --from webdataset SRC`.

SRC is a .tar, a folder (or prefix) of them, a glob, or a brace pattern
('DIR/train-{000000..000099}.tar'), local or on object storage. A tar is a stream of members
`key.ext`; consecutive members sharing a key are one record (webdataset's own rule: the key is
the name up to the first dot of its last component, the extension the rest). The record's image
is its first member with an image extension (IMAGE_EXTS), or the one `image_key` names.

The cut: whole tars. An item (what a worker reads alone) is one tar, and shard k holds the
records of tars [k·F, (k+1)·F) (F = `tars_per_shard`, 1 by default). A tar has no index: cutting
one by the byte offsets of its members needs a pass over every header first, which on object
storage reads the whole input once more (the headers sit between the members); published
WebDataset shards are already sized as units of parallel work (hundreds to thousands of tars of
1,000-10,000 records), so whole tars cost nothing to plan and keep the reads sequential.

Members are read as a stream (tarfile's "r|" mode over a local file or a ranged reader of the
object): memory holds one member, never the tar. The tar reader is the standard library's
tarfile, not the webdataset package (which iterates tarfile itself and adds its own decoding
layers): docs/scaling.md has the measured rates of both.
"""

from __future__ import annotations

import logging
import re
import tarfile
from collections.abc import Iterator
from typing import Any

from dist_sae.data.inputs import expand_inputs, open_input
from dist_sae.data.storage import is_url
from dist_sae.data.records import Payload, RecordSource, part_name
from dist_sae.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif")
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext: (key, extension)


def split_member(name: str) -> tuple[str, str] | None:
    """'dir/000123.seg.png' -> ('dir/000123', 'seg.png'); None for a name without an extension."""
    m = _KEY.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def _members(tf: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, str, str]]:
    for info in tf:
        tf.members = []  # tarfile keeps every header it has read: memory would grow with the tar
        parts = split_member(info.name) if info.isfile() else None
        if parts is not None:
            yield info, *parts


def tar_records(location: str, size: int | None = None, image_key: str | None = None) -> Iterator[tuple[str, Payload]]:
    """The records of one tar, in member order: (tar:key, image bytes or why there is none).

    A tar that ends inside a member (truncated) or holds a damaged header ends with one entry for
    the record it was in; an empty tar is one entry naming the tar.
    """
    name = part_name(location)
    wanted = (image_key,) if image_key else IMAGE_EXTS
    with open_input(location, size) as fh:
        try:
            tf = tarfile.open(fileobj=fh, mode="r|")
        except tarfile.ReadError as exc:
            yield name, DataError(f"an empty tar or not a tar ({exc})")
            return
        key, exts, image, seen = None, [], None, False
        try:
            for info, k, ext in _members(tf):
                if k != key:
                    if key is not None:
                        yield _record(name, key, image, exts)
                    key, exts, image = k, [], None
                seen = True
                exts.append(ext)
                if image is None and ext in wanted:
                    image = tf.extractfile(info).read()
        except (tarfile.TarError, EOFError) as exc:
            yield f"{name}:{key or '(first member)'}", DataError(f"truncated or damaged tar ({exc}); the records after this one are missing")
            return
        if key is not None:
            yield _record(name, key, image, exts)
        elif not seen:
            yield name, DataError("an empty tar (no members)")


def _record(tar: str, key: str, image: bytes | None, exts: list[str]) -> tuple[str, Payload]:
    if image is None:
        return f"{tar}:{key}", DataError(f"no image member (it has {', '.join(exts)})")
    return f"{tar}:{key}", image


def count_records(location: str, size: int | None = None) -> int:
    """Records in one tar, from its headers alone: a local tar is read by seeking from header to
    header; an object is streamed (seeking would cost one request per member)."""
    with open_input(location, size) as fh:
        try:
            tf = tarfile.open(fileobj=fh, mode="r|" if is_url(location) else "r:")
        except tarfile.ReadError:
            return 0
        count, last = 0, None
        try:
            for _, key, _ in _members(tf):
                count, last = count + (key != last), key
        except (tarfile.TarError, EOFError):
            pass
        return count


class WebDatasetSource(RecordSource):
    """WebDataset tars: one item per tar; records that cannot be decoded are skipped and listed."""

    name = "webdataset"
    kind = "WebDataset"

    def __init__(self, src: str, mode: str = "gray", size: tuple[int, int] | None = None, fit: str = "resize",
                 image_key: str | None = None, draft: bool = False, scale: bool = True, tars_per_shard: int = 1) -> None:
        super().__init__(src, mode, size, fit, draft, scale)
        if tars_per_shard < 1:
            raise DataError(f"tars per shard (--shard-rows) must be >= 1, got {tars_per_shard}")
        self.image_key = image_key.lower().lstrip(".") if image_key else None
        self.tars_per_shard = tars_per_shard
        found = expand_inputs(src, (".tar",), "tar")
        self.parts, self.sizes = [loc for loc, _ in found], [size for _, size in found]
        self.rows = None  # known only after reading (records without an image, bad images)
        self.setup_shape()

    @property
    def items(self) -> int:
        return len(self.parts)

    def items_per_shard(self, rows: int) -> int:
        """Whole tars per shard: the records per tar are unknown until read, so rows do not set it."""
        return self.tars_per_shard

    def item_records(self, k: int) -> Iterator[tuple[str, Payload]]:
        yield from tar_records(self.parts[k], self.sizes[k], self.image_key)

    def item_counts(self) -> list[int]:
        return [count_records(loc, size) for loc, size in zip(self.parts, self.sizes)]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "image_key": self.image_key, "tars_per_shard": self.tars_per_shard}
