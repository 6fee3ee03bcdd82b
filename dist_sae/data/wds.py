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

Members are read as a stream (over a local file or a ranged reader of the object): memory holds
one member, never the tar. The tar reader is tar_members below, not the standard library's tarfile
nor the webdataset package (which iterates tarfile itself): measured 3.7x faster than either per
member (dist_sae.bench.sources; docs/scaling.md), and a build spent a fifth of its time in tarfile.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

from dist_sae.data.inputs import expand_inputs, open_input
from dist_sae.data.records import Payload, RecordSource, part_name
from dist_sae.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif")
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext: (key, extension)


def split_member(name: str) -> tuple[str, str] | None:
    """'dir/000123.seg.png' -> ('dir/000123', 'seg.png'); None for a name without an extension."""
    m = _KEY.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


class TarError(Exception):
    """A tar that ends inside a member, or whose header is damaged."""


BLOCK = 512


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    return int(text, 8) if text else 0


def _pax(data: bytes) -> dict[str, str]:
    """A pax extended header's records ('%d key=value\n')."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        length = int(data[pos:data.index(b" ", pos)])
        key, _, value = data[data.index(b" ", pos) + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


def tar_members(fh) -> Iterator[tuple[str, int, Callable[[], bytes]]]:
    """The regular files of a tar read as a stream: (name, size, read), where read() returns the
    member's bytes and must be called before the next member is asked for (or the member is skipped).

    Written here rather than taken from tarfile: on the benchmark's tars tarfile's stream mode reads
    45,600 members/s (header parsing into TarInfo objects) and the webdataset package, which wraps
    it, 43,500; this reader of the same formats (ustar, pax and GNU long names) 168,000
    (docs/sources_bench.json). tarfile had taken a fifth of a build's time.
    Raises TarError for a truncated member or a header whose checksum is wrong.
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = fh.read(BLOCK)
        if len(header) < BLOCK or header.count(0) == BLOCK:
            if header and header.count(0) != len(header):
                raise TarError(f"a header is cut after {len(header)} bytes")
            return  # the end-of-archive blocks, or a tar without them that ends between members
        stored = _octal(header[148:156])
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            raise TarError("a damaged header (wrong checksum)")
        size = int(pax.get("size", _octal(header[124:136])))
        kind = header[156:157]
        padded = -(-size // BLOCK) * BLOCK
        if kind in (b"x", b"g", b"L"):  # metadata for the next member (g: global, ignored)
            data = fh.read(padded)
            if len(data) < padded:
                raise TarError("a header is cut")
            if kind == b"x":
                pax = _pax(data[:size])
            elif kind == b"L":
                long_name = data[:size].split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        name = pax.get("path") or long_name
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if header[257:262] == b"ustar" and header[345:346] != b"\0":
                name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        long_name, pax = None, {}
        done = False

        def read(size=size) -> bytes:
            nonlocal done
            done = True
            data = fh.read(padded)
            if len(data) < size:
                raise TarError(f"truncated: {name} has {len(data)} of its {size} bytes")
            return data[:size]

        if kind in (b"0", b"\0", b"7"):
            yield name, size, read
        if not done:
            read()  # skip the member's data (a stream: read, not seek, so an object keeps its buffer)


def _members(fh) -> Iterator[tuple[str, str, Callable[[], bytes]]]:
    for name, _, read in tar_members(fh):
        parts = split_member(name)
        if parts is not None:
            yield *parts, read


def tar_records(location: str, size: int | None = None, image_key: str | None = None) -> Iterator[tuple[str, Payload]]:
    """The records of one tar, in member order: (tar:key, image bytes or why there is none).

    A tar that ends inside a member (truncated) or holds a damaged header ends with one entry for
    the record it was in; an empty tar is one entry naming the tar.
    """
    name = part_name(location)
    wanted = (image_key,) if image_key else IMAGE_EXTS
    with open_input(location, size) as fh:
        key, exts, image, seen = None, [], None, False
        try:
            for k, ext, read in _members(fh):
                if k != key:
                    if key is not None:
                        yield _record(name, key, image, exts)
                    key, exts, image = k, [], None
                seen = True
                exts.append(ext)
                if image is None and ext in wanted:
                    image = read()
        except TarError as exc:
            if not seen:
                yield name, DataError(f"not a tar ({exc})")
                return
            yield f"{name}:{key}", DataError(f"truncated or damaged tar ({exc}); the records after this one are missing")
            return
        if key is not None:
            yield _record(name, key, image, exts)
        else:
            yield name, DataError("an empty tar (no members)")


def _record(tar: str, key: str, image: bytes | None, exts: list[str]) -> tuple[str, Payload]:
    if image is None:
        return f"{tar}:{key}", DataError(f"no image member (it has {', '.join(exts)})")
    return f"{tar}:{key}", image


def count_records(location: str, size: int | None = None) -> int:
    """Records in one tar, from its headers (the members' data is read past, not kept)."""
    count, last = 0, None
    with open_input(location, size) as fh:
        try:
            for key, _, _ in _members(fh):
                count, last = count + (key != last), key
        except TarError:
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
