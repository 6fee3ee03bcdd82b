"""Parquet files as a source: `dist-sae data build --from parquet SRC [--column NAME]`.

SRC is a .parquet file, a folder (or prefix) of them, a glob or a brace pattern, local or on object
storage (read in place through a seekable ranged reader: the footer, then the column's pages of
one row group at a time; pyarrow reads them). The column holds, per row, either the encoded image
(binary), the Hugging Face `datasets` struct {bytes, path} of its Image feature, or raw pixel
values (a list of numbers of one length: the row itself, uint8 scaled to [0, 1] unless scale=False).

The cut: row groups. Every footer is read up front (one small ranged read per file), so the row
count and each group's rows are known; an item is one row group, the unit pyarrow reads and
decompresses alone, and shard k holds about `--shard-rows` rows of whole groups. Memory holds one
row group of the one column (the Hugging Face writer makes groups of 100 images).

A file whose footer cannot be read, or that lacks the column, is skipped and listed; so is a row
group that cannot be read, or a row without an image. A column no file has is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from dist_sae.data.inputs import expand_inputs, open_input
from dist_sae.data.records import Payload, RecordSource, part_name
from dist_sae.errors import DataError

log = logging.getLogger(__name__)


def column_layout(column_type) -> str | None:
    """'bytes' (encoded images), 'struct' (Hugging Face Image: {bytes, path}), 'array' (raw pixels), or None."""
    import pyarrow as pa

    t = column_type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return "bytes"
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        return "struct"
    if (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and (
            pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type)):
        return "array"
    return None


class ParquetSource(RecordSource):
    """Images (or pixel rows) in one column of Parquet files; one item per row group."""

    name = "parquet"
    kind = "Parquet"

    def __init__(self, src: str, column: str = "image", mode: str = "gray", size: tuple[int, int] | None = None, fit: str = "resize",
                 draft: bool = False, scale: bool = True) -> None:
        super().__init__(src, mode, size, fit, draft, scale)
        self.column = column
        self.groups: list[tuple[int, int, int, int]] = []  # (part, row group, rows, first row of the group in its file)
        self.layout: str | None = None
        self.uint8 = False
        self._open: tuple[int, Any, Any] | None = None  # (part, file, ParquetFile) of the last group read
        columns_seen: list[str] = []
        found = expand_inputs(src, (".parquet", ".pq"), "Parquet")
        for loc, nbytes in found:
            try:
                with open_input(loc, nbytes) as fh:
                    meta, schema = self._footer(fh)
            except DataError:
                raise
            except Exception as exc:  # pyarrow: ArrowInvalid "Parquet magic bytes not found", OSError, ...
                self.skip(part_name(loc), DataError(f"not a readable Parquet file ({type(exc).__name__}: {exc})"))
                continue
            if column not in schema.names:
                columns_seen = columns_seen or list(schema.names)
                self.skip(part_name(loc), DataError(f"no column {column!r} (its columns: {', '.join(schema.names)})"))
                continue
            kind = column_layout(schema.field(column).type)
            if kind is None or (self.layout is not None and kind != self.layout):
                want = self.layout or "binary, a {bytes, path} struct or a list of numbers"
                self.skip(part_name(loc), DataError(f"column {column!r} is {schema.field(column).type}, not {want}"))
                continue
            self.layout = kind
            self.uint8 = kind == "array" and str(schema.field(column).type.value_type) == "uint8"
            part, first = len(self.parts), 0
            self.parts.append(loc)
            self.sizes.append(nbytes)
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
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

    @staticmethod
    def _footer(fh):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(fh)
        return pf.metadata, pf.schema_arrow

    def __getstate__(self) -> dict[str, Any]:  # an open file stays with its process
        return {**self.__dict__, "_open": None}

    @property
    def items(self) -> int:
        return len(self.groups)

    @property
    def planned_rows(self) -> int:
        return sum(g[2] for g in self.groups)

    def items_per_shard(self, rows: int) -> int:
        """Whole row groups per shard, about `rows` rows (groups of the mean size)."""
        return max(1, round(rows * len(self.groups) / max(1, self.planned_rows)))

    def _file(self, part: int):
        import pyarrow.parquet as pq

        if self._open is None or self._open[0] != part:
            self.close()
            fh = open_input(self.parts[part], self.sizes[part])
            self._open = (part, fh, pq.ParquetFile(fh))
        return self._open[2]

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def item_records(self, k: int) -> Iterator[tuple[str, Payload]]:
        part, group, rows, first = self.groups[k]
        name = part_name(self.parts[part])
        try:
            column = self._file(part).read_row_group(group, columns=[self.column]).column(0).combine_chunks()
        except Exception as exc:  # a damaged page or group: every row of it is missing
            self.close()
            yield f"{name}:rows {first}-{first + rows - 1}", DataError(f"row group {group} cannot be read ({type(exc).__name__}: {exc})")
            return
        if self.layout == "struct":
            column = column.field("bytes")
        for i, value in enumerate(column.to_pylist()):  # one conversion per group: a scalar's as_py() per row costs 10x
            label = f"{name}:{first + i}"
            if value is None:
                yield label, DataError(f"no image in column {self.column!r} (null)")
            elif self.layout == "array":
                row = np.asarray(value, dtype=np.float32)
                yield label, row / np.float32(255.0) if self.uint8 and self.scale else row
            else:
                yield label, value

    def item_counts(self) -> list[int]:
        return [g[2] for g in self.groups]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "column": self.column, "layout": self.layout, "row_groups": len(self.groups)}
