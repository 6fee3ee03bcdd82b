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
nor the webdataset package (which iterates tarfile itself): measured 3.9x faster per member than
tarfile and 4.4x than the webdataset package (dist_sae.bench.sources; docs/scaling.md), and a
build spent a fifth of its time in tarfile.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from dist_sae.data.inputs import READ_BUFFER, RangedReader, expand_inputs, open_input
from dist_sae.data.records import Payload, RecordSource, part_names
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
SKIP_PIECE = 2**20  # bytes read at a time to pass a member of a stream without a length
SEEK_PAST = READ_BUFFER  # on an object, members this big that nobody reads are seeked past (a seek drops the reader's buffer)
_OCTAL = re.compile(rb"[0-7]+")
MAX_META = 2**20  # a pax or GNU long-name header larger than this is damage, not metadata


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if text and not _OCTAL.fullmatch(text):  # not a tar (an HTML error page, a gzip file named .tar); int() would take '-1' or '1_0'
        raise TarError(f"not a tar header (a number field holds {text[:12]!r})")
    return int(text, 8) if text else 0


def _pax(data: bytes) -> dict[str, str]:
    """A pax extended header's records ('%d key=value\n')."""
    out, pos = {}, 0
    try:
        while pos < len(data) and data[pos:pos + 1] != b"\0":
            length = int(data[pos:data.index(b" ", pos)])
            if length <= 0:
                raise ValueError(f"a record of length {length}")
            key, _, value = data[data.index(b" ", pos) + 1:pos + length - 1].partition(b"=")
            out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
            pos += length
        size = out.get("size")
        if size is not None and not re.fullmatch(r"[0-9]+", size):  # ASCII digits only: str.isdigit takes '²'
            raise ValueError(f"size {size!r}")
    except ValueError as exc:
        raise TarError(f"a damaged pax header ({exc})") from None
    return out


def _checksum_ok(header: bytes) -> bool:
    """The header's checksum: the sum of its bytes with the checksum field as spaces, as unsigned
    bytes (POSIX) or, as some old writers did, signed ones (tarfile accepts both)."""
    stored = _octal(header[148:156])
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])  # sum() over bytes runs in C
    if stored == unsigned:
        return True
    high = 512 - 8 - len((header[:148] + header[156:]).translate(None, bytes(range(128, 256))))  # bytes >= 128
    return stored == unsigned - 256 * high  # rare: computed only when the POSIX sum fails


def _length(fh) -> int | None:
    """The file's length, where it has one (a local file, an object): a member past it is cut."""
    size = getattr(fh, "size", None)
    if size is not None:
        return size
    try:
        return os.fstat(fh.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


def tar_members(fh, seek_past: int | None = None) -> Iterator[tuple[str, int, Callable[[], bytes]]]:
    """The regular files of a tar read as a stream: (name, size, read), where read() returns the
    member's bytes and must be called before the next member is asked for (or the member is skipped).

    Written here rather than taken from tarfile: on the benchmark's tars tarfile's stream mode reads
    33,800 members/s (header parsing into TarInfo objects) and the webdataset package, which wraps
    it, 30,300; this reader of the same formats (ustar, pax and GNU long names) 133,000
    (docs/sources_bench.json). tarfile had taken a fifth of a build's time.
    A member that is not read is seeked past where the file has a length, from `seek_past` bytes on
    (default: every member of a local file; on an object, SEEK_PAST: the next ranged GET starts
    after it, so a 2 GB video member beside an image costs nothing, while smaller members are read
    past in the reader's buffer, since a seek drops it and a seek per .cls member would be a GET per
    member). Without a length (a stream) it is read past in pieces of SKIP_PIECE bytes: memory
    holds at most the member that is read.
    Raises TarError for a truncated member, a header whose checksum is wrong, or what is not a tar.
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    length = _length(fh)
    if seek_past is None:
        seek_past = SEEK_PAST if isinstance(fh, RangedReader) else 0
    while True:
        header = fh.read(BLOCK)
        if len(header) < BLOCK or header.count(0) == BLOCK:
            if header and header.count(0) != len(header):
                raise TarError(f"a header is cut after {len(header)} bytes")
            return  # the end-of-archive blocks, or a tar without them that ends between members
        if not _checksum_ok(header):
            raise TarError("a damaged header (wrong checksum)")
        size = int(pax.get("size", _octal(header[124:136])))  # >= 0: digits only, or base-256 without its sign
        kind = header[156:157]
        padded = -(-size // BLOCK) * BLOCK
        if kind in (b"x", b"g", b"L"):  # metadata for the next member (g: global, ignored)
            if size > MAX_META:
                raise TarError(f"a {size}-byte metadata header")
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
            _skip(fh, padded, size, length if padded >= seek_past else None, name)


def _skip(fh, padded: int, size: int, length: int | None, name: str) -> None:
    """Move past a member's `padded` bytes without keeping them (by a seek when the file's `length`
    is given); TarError if the file ends inside its data (the padding after it may be missing)."""
    if length is not None:
        start = fh.tell()
        fh.seek(padded, 1)
        if start + size > length:
            raise TarError(f"truncated: {name} has {max(0, length - start)} of its {size} bytes")
        return
    left = padded
    while left > 0:
        got = len(fh.read(min(left, SKIP_PIECE)))
        if got == 0:
            if padded - left >= size:
                return  # the data is whole; a tar without its last padding
            raise TarError(f"truncated: {name} has {padded - left} of its {size} bytes")
        left -= got


def _members(fh) -> Iterator[tuple[str, str, Callable[[], bytes]]]:
    for name, _, read in tar_members(fh):
        parts = split_member(name)
        if parts is not None:
            yield *parts, read


def tar_records(location: str, size: int | None = None, image_key: str | None = None, name: str | None = None) -> Iterator[tuple[str, Payload]]:
    """The records of one tar, in member order: (tar:key, image bytes or why there is none).

    A tar that ends inside a member (truncated) or holds a damaged header ends with one entry for
    the record it was in; an empty tar is one entry naming the tar (`name`, by default its file name).
    """
    name = name or part_names([location])[0]
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
        self.set_parts(expand_inputs(src, (".tar",), "tar"))
        self.rows = None  # known only after reading (records without an image, bad images)
        self.setup_shape()

    @property
    def items(self) -> int:
        return len(self.parts)

    def items_per_shard(self, rows: int) -> int:
        """Whole tars per shard: the records per tar are unknown until read, so rows do not set it."""
        return self.tars_per_shard

    def item_records(self, k: int) -> Iterator[tuple[str, Payload]]:
        yield from tar_records(self.parts[k], self.sizes[k], self.image_key, self.names[k])

    def item_counts(self) -> list[int]:
        return [count_records(loc, size) for loc, size in zip(self.parts, self.sizes)]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "image_key": self.image_key, "tars_per_shard": self.tars_per_shard}
