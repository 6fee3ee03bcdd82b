"""Parquet files as a source: `dist-sae data build --from parquet SRC [--column NAME]`.

SRC is a .parquet file, a folder (or prefix) of them, a glob or a brace pattern, local or on object
storage (read in place through a seekable ranged reader: the footer, then the column's pages of
one row group at a time; pyarrow reads them). The column holds, per row, either the encoded image
(binary), the Hugging Face `datasets` struct {bytes, path} of its Image feature, or raw pixel
values (a list of numbers of one length: the row itself, uint8 scaled to [0, 1] unless scale=False).

The cut: row groups. Every footer is read up front (a small ranged read per file, 16 at once), so the row
count and each group's rows are known; an item is one row group, and shard k holds whole groups,
cut at the group boundary nearest each multiple of `--shard-rows` rows (from the footers alone, so
the same for any number of workers). A group is read in batches of BATCH_ROWS rows, its pages
streamed through a READ_BUFFER buffer: memory holds one batch of the one column, not the group.

What is skipped and listed: a file whose footer pyarrow cannot parse, that lacks the column, or
whose column has another type than the first usable file's; the rest of a row group from a page
pyarrow cannot decode (a damaged page, a failed checksum); a row without an image. What stops the
build: a read that fails (object storage after its retries, a local disk), since skipping it would
build a different dataset from the same input; and a column no file has.
"""

from __future__ import annotations

import functools
import logging
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from dist_sae.data.inputs import expand_inputs, open_input
from dist_sae.data.records import Payload, RecordSource, part_names
from dist_sae.data.sources import Range
from dist_sae.errors import DataError, DistSaeError

log = logging.getLogger(__name__)

BATCH_ROWS = 64  # rows per decoded batch: 64 encoded images of ~100 KB is ~6 MB held, whatever the group size
FOOTER_READS = 16  # footers read at once when the build starts (each a ranged GET or two on object storage)
READ_BUFFER = 2**20  # bytes per read of a column chunk: pages are streamed, the chunk is never held whole

Opener = Callable[[str, int | None], Any]  # (location, bytes) -> a seekable binary file object


def column_layout(column_type) -> str | None:
    """'bytes' (encoded images), 'struct' (Hugging Face Image: {bytes, path}), 'array' (raw pixels), or None."""
    import pyarrow as pa

    t = column_type
    is_binary_view = getattr(pa.types, "is_binary_view", lambda _: False)  # pyarrow >= 16 only
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or is_binary_view(t):
        return "bytes"
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        return "struct"
    if (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and (
            pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type)):
        return "array"
    return None


class _Watched:
    """A file object that remembers whether its own reads failed. pyarrow raises OSError both for a
    page it cannot decode and for a read that failed under it (a local file's OSError), so the type
    alone cannot tell a damaged file (skip it) from a failed read (stop the build)."""

    def __init__(self, fh) -> None:
        self.fh = fh
        self.error: BaseException | None = None

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except Exception as exc:
            self.error = exc
            raise

    def read(self, size: int = -1) -> bytes:
        return self._call(self.fh.read, size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._call(self.fh.seek, offset, whence)

    def tell(self) -> int:
        return self._call(self.fh.tell)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self.fh.closed

    def close(self) -> None:
        self.fh.close()


@functools.cache
def _read_options() -> dict[str, Any]:
    """pq.ParquetFile's options, looked up once: pre_buffer off and a small buffer, so pages are read
    as decoded, not the column chunk at once; pages written with checksums verified (pyarrow >= 15)."""
    import inspect

    import pyarrow.parquet as pq

    checks = "page_checksum_verification" in inspect.signature(pq.ParquetFile).parameters
    return {"pre_buffer": False, "buffer_size": READ_BUFFER, **({"page_checksum_verification": True} if checks else {})}


def _data_error(exc: BaseException) -> bool:
    """An error pyarrow raises for bytes it cannot decode (ArrowInvalid, a failed decompression or
    checksum, which pyarrow raises as OSError): the file's fault. Not running out of memory."""
    import pyarrow as pa

    return isinstance(exc, (pa.ArrowException, OSError)) and not isinstance(exc, MemoryError)


class ParquetSource(RecordSource):
    """Images (or pixel rows) in one column of Parquet files; one item per row group."""

    name = "parquet"
    kind = "Parquet"

    def __init__(self, src: str, column: str = "image", mode: str = "gray", size: tuple[int, int] | None = None, fit: str = "resize",
                 draft: bool = False, scale: bool = True, opener: Opener = open_input) -> None:
        """opener: how a file is opened (location, bytes) -> file object; open_input (local or in place on object storage)."""
        super().__init__(src, mode, size, fit, draft, scale)
        self.column, self.opener = column, opener
        self.groups: list[tuple[int, int, int, int]] = []  # (part, row group, rows, first row of the group in its file)
        self.layout: str | None = None
        self.value_type: str | None = None  # raw pixel rows: the numbers' type, one for all files (uint8 is scaled)
        self._open: tuple[int, Any, Any] | None = None  # (part, watched file, ParquetFile) of the last group read
        self._plan: tuple[int, int] | None = None  # (groups per shard returned, rows asked) by items_per_shard
        columns_seen: list[str] = []
        found = expand_inputs(src, (".parquet", ".pq"), "Parquet")
        for (loc, nbytes), name, footer in zip(found, part_names([loc for loc, _ in found]), self._footers(found)):
            if isinstance(footer, Exception):
                self.skip(name, DataError(f"not a readable Parquet file ({type(footer).__name__}: {footer})"))
                continue
            group_rows, schema = footer
            if column not in schema.names:
                columns_seen = columns_seen or list(schema.names)
                self.skip(name, DataError(f"no column {column!r} (its columns: {', '.join(schema.names)})"))
                continue
            if schema.names.count(column) > 1:  # pyarrow writes such files; which one is meant is unknowable
                self.skip(name, DataError(f"column {column!r} appears {schema.names.count(column)} times"))
                continue
            ctype = schema.field(column).type
            kind = column_layout(ctype)
            values = str(ctype.value_type) if kind == "array" else None
            if kind is None or (self.layout is not None and (kind, values) != (self.layout, self.value_type)):
                want = "binary, a {bytes, path} struct or a list of numbers" if self.layout is None else (
                    f"a list of {self.value_type} as in the first file (one value type for all, since uint8 is scaled and others are not)"
                    if self.layout == "array" else self.layout)
                self.skip(name, DataError(f"column {column!r} is {ctype}, not {want}"))
                continue
            self.layout, self.value_type = kind, values
            part, first = len(self.parts), 0
            self.parts.append(loc)
            self.sizes.append(nbytes)
            self.names.append(name)
            for g, rows in enumerate(group_rows):
                self.groups.append((part, g, rows, first))
                first += rows
        if not self.parts:
            if columns_seen:
                raise DataError(f"{src}: column {column!r} does not exist (the files' columns: {', '.join(columns_seen)}); choose one with --column")
            first = next(iter(self.skipped.items()), ("", ""))
            raise DataError(f"{src}: none of its {len(found)} Parquet file(s) can be used ({first[0]}: {first[1]})")
        if self.layout == "array" and size is not None:
            raise DataError(f"{src}: column {column!r} holds raw pixel values, which --size cannot resize; leave --size out")
        self.rows = None  # known after reading (rows without an image are skipped)
        self.setup_shape()

    @property
    def raw_pixels(self) -> bool:
        """True when the column holds raw pixel rows (no encoded images): a consumer that decodes
        images itself (the patch source) cannot use such a source."""
        return self.layout == "array"

    @property
    def uint8(self) -> bool:
        return self.value_type == "uint8"

    def _parquet_file(self, fh):
        import pyarrow.parquet as pq

        return pq.ParquetFile(fh, **_read_options())

    def _read_failed(self, location: str, watched: _Watched, exc: BaseException) -> DistSaeError:
        """The build-stopping error for a read that failed under pyarrow (the file's own error)."""
        err = watched.error
        if isinstance(err, DistSaeError):  # StorageError after the store's retries: as it is
            return err
        return DataError(f"{location} cannot be read ({type(err).__name__}: {err}); the build stops, since skipping what a failed read "
                         "lost would build another dataset from the same input")

    def _footers(self, found: list[tuple[str, int]]) -> Iterator[tuple[list[int], Any] | Exception]:
        """Each file's (rows of each row group, arrow schema), or the data error its footer raised
        (a file to skip), in the files' order. FOOTER_READS at a time: on object storage a footer is
        a ranged GET or two of latency, and thousands of files read one by one would keep a build
        waiting. A failed read raises as soon as its file's turn comes and cancels the reads not yet
        begun; a footer is dropped once judged (only its row counts are kept)."""
        def footer(item: tuple[str, int]) -> tuple[list[int], Any] | Exception:
            try:
                return self._footer(*item)
            except DistSaeError:
                raise
            except Exception as exc:
                if not _data_error(exc):
                    raise
                return exc

        pool = ThreadPoolExecutor(min(FOOTER_READS, len(found)), thread_name_prefix="dist-sae-footer")
        try:
            pending = deque(pool.submit(footer, item) for item in found)
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _opened(self, loc: str, nbytes: int | None) -> _Watched:
        """The file through the opener; a failed open stops the build like a failed read (it is no
        sign of a bad file)."""
        try:
            return _Watched(self.opener(loc, nbytes))
        except DistSaeError:
            raise
        except Exception as exc:
            raise DataError(f"{loc} cannot be opened ({type(exc).__name__}: {exc})") from exc

    def _parquet_at(self, loc: str, nbytes: int | None) -> tuple[_Watched, Any]:
        """The file opened and its footer parsed: (watched file, ParquetFile). A read that fails
        under pyarrow raises _read_failed (the build stops); a footer pyarrow cannot parse raises
        pyarrow's own error (a damaged file). For the footers at the start and for every reopening."""
        watched = self._opened(loc, nbytes)
        try:
            return watched, self._parquet_file(watched)
        except BaseException as exc:
            watched.close()
            if isinstance(exc, Exception) and not isinstance(exc, DistSaeError) and watched.error is not None:
                raise self._read_failed(loc, watched, exc) from exc
            raise

    def _footer(self, loc: str, nbytes: int) -> tuple[list[int], Any]:
        watched, pf = self._parquet_at(loc, nbytes)
        try:
            meta = pf.metadata
            return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)], pf.schema_arrow
        finally:
            watched.close()

    def __getstate__(self) -> dict[str, Any]:  # an open file stays with its process
        return {**self.__dict__, "_open": None}

    @property
    def items(self) -> int:
        return len(self.groups)

    @property
    def planned_rows(self) -> int:
        return sum(g[2] for g in self.groups)

    def items_per_shard(self, rows: int) -> int:
        """Row groups per shard at the mean group size (for a caller that cuts by items, as the patch
        source does); `ranges` given this count packs groups toward `rows` rows instead."""
        per = max(1, round(rows * len(self.groups) / max(1, self.planned_rows)))
        self._plan = (per, rows)
        return per

    def ranges(self, per_shard: int) -> list[Range]:
        """Consecutive whole row groups per shard: shard k ends at the group boundary nearest k x the
        target rows (ties: the earlier boundary), so unequal groups still give shards of about the
        target and `--shards N` about N; cut from the footers alone."""
        counts = np.array([g[2] for g in self.groups], dtype=np.int64)
        if self._plan is not None and self._plan[0] == per_shard:
            target = max(1, self._plan[1])
        else:  # asked for a group count directly: its rows at the mean group size
            target = max(1, round(per_shard * int(counts.sum()) / max(1, len(counts))))
        bounds = np.concatenate([[0], np.cumsum(counts)])  # (groups + 1,) rows before each group
        total, cuts = int(bounds[-1]), [0]
        for k in range(1, -(-total // target)):
            i = int(np.searchsorted(bounds, k * target))  # first boundary at or past the multiple
            j = i - 1 if i == len(bounds) or k * target - bounds[i - 1] <= bounds[i] - k * target else i
            if cuts[-1] < j < len(counts):
                cuts.append(j)
        cuts.append(len(counts))
        return [Range(s, a, b) for s, (a, b) in enumerate(zip(cuts, cuts[1:])) if b > a]

    def _file(self, part: int):
        if self._open is None or self._open[0] != part:
            self.close()
            self._open = (part, *self._parquet_at(self.parts[part], self.sizes[part]))
        return self._open[1], self._open[2]

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def item_records(self, k: int) -> Iterator[tuple[str, Payload]]:
        part, group, rows, first = self.groups[k]
        name, done = self.names[part], 0  # done: rows of the group given so far
        watched = None
        try:
            watched, pf = self._file(part)
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=[self.column], use_threads=False):
                for i, payload in enumerate(self._payloads(batch.column(0))):
                    yield f"{name}:{first + done + i}", payload
                done += batch.num_rows
        except DistSaeError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            if watched is not None and watched.error is not None:
                raise self._read_failed(self.parts[part], watched, exc) from exc
            if not _data_error(exc):
                raise
            # A page pyarrow cannot decode: the rest of the group is missing (the batches are fixed, so the same rows every run).
            where = f"row group {group}" + (f" from its row {done}" if done else "")
            yield f"{name}:rows {first + done}-{first + rows - 1}", DataError(f"{where} cannot be read ({type(exc).__name__}: {exc})")

    def _payloads(self, column) -> Iterator[Payload]:
        """The records of one batch's column (BATCH_ROWS rows): one conversion per batch, since a
        scalar's as_py() per row costs 10x."""
        if self.layout == "struct":
            fields = dict(zip([f.name for f in column.type], column.flatten()))  # children, with the struct's nulls applied
            data = fields["bytes"].to_pylist()
            paths = fields["path"].to_pylist() if "path" in fields else [None] * len(data)
            for value, path in zip(data, paths):
                if value is None and path:
                    # What `datasets` writes for images loaded from files and saved by to_parquet: the path alone.
                    yield DataError(f"no image in column {self.column!r}: bytes is null, path {path!r}; the image is not embedded in the "
                                    "Parquet file (write it with the bytes, as Hugging Face push_to_hub(embed_external_files=True) does)")
                else:
                    yield DataError(f"no image in column {self.column!r} (null)") if value is None else value
            return
        for value in column.to_pylist():
            if value is None:
                yield DataError(f"no image in column {self.column!r} (null)")
            elif self.layout == "array":
                try:
                    row = np.asarray(value, dtype=np.float32)  # (values,)
                except TypeError:  # a null among the values
                    yield DataError(f"a null value in the pixel row of column {self.column!r}")
                    continue
                yield row / np.float32(255.0) if self.uint8 and self.scale else row
            else:
                yield value

    def item_counts(self) -> list[int]:
        return [g[2] for g in self.groups]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "column": self.column, "layout": self.layout, "row_groups": len(self.groups)}
