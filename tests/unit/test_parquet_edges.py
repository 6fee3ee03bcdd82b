"""`--from parquet` at its edges: failed reads against damaged pages, memory per batch, Hugging
Face files without the image bytes, shards of unequal row groups, mixed pixel types.

Inputs are written by pyarrow (pq.write_table, ParquetWriter) and Hugging Face `datasets`; the
reference rows are Pillow's decode of the same bytes (tests/producers.py) or pyarrow's own read.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dist_sae.commands.main import main
from dist_sae.data import build as prep
from dist_sae.data.parquet import ParquetSource, column_layout
from dist_sae.errors import DataError, StorageError
from producers import encoded_images, expected_rows, write_hf_parquet
from util import read_all

SIZE = (12, 10)


def chunk_span(path, group: int) -> tuple[int, int]:
    """(first byte, bytes) of column 0's chunk in row group `group`, from the footer."""
    cc = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = cc.dictionary_page_offset or cc.data_page_offset
    return start, cc.total_compressed_size


class FailingFile(io.RawIOBase):
    """A local file whose reads starting in bytes [lo, hi) raise `error`: a network (or disk) that
    fails in the middle of the row groups (the footer, read from before lo, still reads)."""

    def __init__(self, path, lo: int, hi: int, error: BaseException) -> None:
        super().__init__()
        self._fh, self.lo, self.hi, self.error = open(path, "rb"), lo, hi, error

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def read(self, size: int = -1) -> bytes:
        if self.lo <= self._fh.tell() < self.hi:
            raise self.error
        return self._fh.read(size)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._fh.close()
        super().close()


def binary_file(path, images, row_group_size, **options):
    pq.write_table(pa.table({"image": pa.array(images, type=pa.binary())}), path, row_group_size=row_group_size, **options)
    return path


@pytest.mark.parametrize("error", [StorageError("s3://b/x.parquet: GET failed after 10 retries"), OSError(5, "Input/output error")])
def test_a_failed_read_stops_the_build_instead_of_dropping_the_row_group(tmp_path, error):
    images = encoded_images(32, seed=1, size=SIZE)
    path = binary_file(tmp_path / "x.parquet", images, 8)
    lo, n = chunk_span(path, 2)
    src = ParquetSource(str(path), opener=lambda loc, size: FailingFile(loc, lo, lo + n, error))
    assert src.items == 4  # the footer and group 0 (the shape) read fine
    with pytest.raises(DataError) as caught:
        prep.build(src, tmp_path / "ds", None)
    if isinstance(error, StorageError):
        assert caught.value is error  # the store's own error, as it is
    else:
        assert "x.parquet cannot be read (OSError" in str(caught.value) and "build stops" in str(caught.value)
    assert not (tmp_path / "ds").exists()
    # The same file read plainly: every row, nothing skipped.
    ok = prep.build(ParquetSource(str(path)), tmp_path / "ok", None)
    np.testing.assert_array_equal(read_all(ok.path), expected_rows(images))


def test_a_failed_read_while_reopening_the_file_stops_the_build_too(tmp_path):
    """A worker opens the file again to read its row group: a read that fails there, in the footer,
    is a failed read as at the start, not a damaged group to list."""
    path = binary_file(tmp_path / "x.parquet", encoded_images(16, seed=4, size=SIZE), 8)
    failing = []
    src = ParquetSource(str(path), opener=lambda loc, size: FailingFile(loc, 0, 2**40, OSError(5, "Input/output error")) if failing else open(loc, "rb"))
    src.close()
    failing.append(True)
    with pytest.raises(DataError, match=r"x.parquet cannot be read \(OSError.*build stops"):
        next(src.item_records(1))


def test_a_damaged_row_group_is_still_skipped_and_listed(tmp_path, capsys):
    """A page header overwritten (group 1) and, past the first batch, a page whose bytes fail its
    checksum (group 3 of 200 rows in pages of 16): the rest of each group listed, the build goes on."""
    pytest.importorskip("pyarrow", minversion="15")  # page checksums
    images = encoded_images(8 * 3 + 200, seed=2, size=SIZE)
    path = tmp_path / "x.parquet"
    with pq.ParquetWriter(path, pa.schema([("image", pa.binary())]), use_dictionary=False, compression="none",
                          write_page_checksum=True, data_page_size=1, write_batch_size=16) as writer:
        for a, b in ((0, 8), (8, 16), (16, 24), (24, 224)):
            writer.write_table(pa.table({"image": pa.array(images[a:b], type=pa.binary())}))
    data = bytearray(path.read_bytes())
    start, _ = chunk_span(path, 1)
    data[start:start + 6] = b"\xff" * 6  # group 1: its first page header
    start, n = chunk_span(path, 3)
    at = start + int(n * 0.7)  # group 3: inside a page past its first 64 rows
    data[at:at + 16] = bytes(b ^ 0x5A for b in data[at:at + 16])
    path.write_bytes(bytes(data))
    rc = main(["data", "build", "--from", "parquet", str(path), "--out", str(tmp_path / "ds"), "-q"])
    capsys.readouterr()
    skipped = json.loads((tmp_path / "ds" / "dataset.json").read_text())["skipped"]["files"]
    assert rc == 0 and len(skipped) == 2 and skipped["x.parquet:rows 8-15"].startswith("DataError: row group 1 cannot be read"), skipped
    (late,) = [k for k in skipped if k != "x.parquet:rows 8-15"]
    first = int(late.split("rows ")[1].split("-")[0])
    assert late == f"x.parquet:rows {first}-223" and 24 < first < 224 and (first - 24) % 64 == 0, late
    assert "from its row" in skipped[late]
    kept = images[:8] + images[16:first]
    np.testing.assert_array_equal(read_all(tmp_path / "ds"), expected_rows(kept))


def test_a_row_group_is_read_a_batch_at_a_time(tmp_path):
    """Arrow memory while the records of one 2,000-row group (40 MB) stream by: a batch of 64 rows,
    a page of about 1 MB and the read buffer (about 5 MB), not the group (read whole: 40 MB or more)."""
    rng = np.random.default_rng(3)
    blobs = encoded_images(1, seed=3, size=SIZE) + [rng.bytes(20_000) for _ in range(1999)]  # record 0: the shape
    path = binary_file(tmp_path / "big.parquet", blobs, 2000, write_batch_size=16, compression="none")
    src = ParquetSource(str(path))
    assert src.items == 1
    base, peak, count = pa.total_allocated_bytes(), 0, 0
    for _, payload in src.item_records(0):
        peak = max(peak, pa.total_allocated_bytes() - base)
        count += 1
    src.close()
    assert count == 2000 and peak < 40_000_000 / 4, peak


def test_hugging_face_images_saved_as_paths_are_named_as_such(tmp_path, capsys):
    """`datasets` writes {bytes: null, path} for images loaded from files and saved by to_parquet."""
    from datasets import Dataset, Image as HFImage

    images = encoded_images(6, seed=4, size=SIZE, fmt="PNG")
    files = []
    for i, data in enumerate(images[:3]):
        files.append(tmp_path / "files" / f"im{i}.png")
        files[-1].parent.mkdir(exist_ok=True)
        files[-1].write_bytes(data)
    Dataset.from_dict({"image": [str(f) for f in files]}).cast_column("image", HFImage()).to_parquet(str(tmp_path / "hf" / "a-paths.parquet"))
    assert pq.read_table(tmp_path / "hf" / "a-paths.parquet").column("image").to_pylist()[0] == {"bytes": None, "path": str(files[0])}
    write_hf_parquet(tmp_path / "hf" / "b-bytes.parquet", images[3:])
    rc = main(["data", "build", "--from", "parquet", str(tmp_path / "hf"), "--out", str(tmp_path / "ds"), "-q"])
    capsys.readouterr()
    skipped = json.loads((tmp_path / "ds" / "dataset.json").read_text())["skipped"]["files"]
    assert rc == 0 and sorted(skipped) == [f"a-paths.parquet:{i}" for i in range(3)]
    assert all(f"bytes is null, path '{files[i]}'" in skipped[f"a-paths.parquet:{i}"] and "not embedded" in skipped[f"a-paths.parquet:{i}"]
               for i in range(3)), skipped
    np.testing.assert_array_equal(read_all(tmp_path / "ds"), expected_rows(images[3:]))
    with pytest.raises(DataError, match=r"a-paths.parquet:0: DataError: no image .* bytes is null, path .*im0.png.*not embedded"):
        ParquetSource(str(tmp_path / "hf" / "a-paths.parquet"))


def pixel_file(path, groups: list[int], dim: int = 4, seed: int = 5, value_type=pa.uint8()) -> np.ndarray:
    """Raw pixel rows in row groups of the given sizes (ParquetWriter: one group per write)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, (sum(groups), dim)).astype(value_type.to_pandas_dtype())
    with pq.ParquetWriter(path, pa.schema([("x", pa.list_(value_type))])) as writer:
        for a, b in zip(np.cumsum([0] + groups[:-1]), np.cumsum(groups)):
            writer.write_table(pa.table({"x": pa.array(list(rows[a:b]), type=pa.list_(value_type))}), row_group_size=b - a)
    assert [pq.ParquetFile(path).metadata.row_group(g).num_rows for g in range(len(groups))] == groups
    return rows


def test_unequal_row_groups_are_packed_by_rows(tmp_path):
    path = tmp_path / "x.parquet"
    pixel_file(path, [5] * 8 + [60])
    reference = np.stack([np.asarray(r, dtype=np.float32) for r in pq.read_table(path).column("x").to_pylist()]) / np.float32(255.0)
    for options, want in ((prep.WriterOptions(shard_rows=10), [10, 10, 10, 10, 60]), (prep.WriterOptions(shards=2), [40, 60]),
                          (prep.WriterOptions(shard_rows=1000), [100])):
        ds = prep.build(ParquetSource(str(path), column="x"), tmp_path / "ds", None, dataclasses.replace(options, overwrite=True))
        assert [s.rows for s in ds.shards] == want, options
        np.testing.assert_allclose(read_all(ds.path), reference, rtol=1e-6)
    # The reviewer's case, planned only: nine groups of 100 and one of 100,000.
    big = tmp_path / "big.parquet"
    pixel_file(big, [100] * 9 + [100_000], dim=1)
    src = ParquetSource(str(big), column="x")
    for options, want in ((prep.WriterOptions(shard_rows=10_000), [900, 100_000]), (prep.WriterOptions(shards=2), [900, 100_000]),
                          (prep.WriterOptions(shard_rows=250), [200, 300, 200, 200, 100_000])):
        ranges = prep.plan_ranges(src, options, src.dim, "float32")
        assert [sum(g[2] for g in src.groups[r.start:r.stop]) for r in ranges] == want, options
        assert [r.shard for r in ranges] == list(range(len(want))) and ranges[-1].stop == src.items


def test_raw_pixel_files_must_share_the_value_type(tmp_path):
    """uint8 rows are scaled to [0, 1] and float rows are not: a file whose type differs from the
    first usable file's is skipped and listed, whichever comes first."""
    (tmp_path / "a").mkdir()
    ints = pixel_file(tmp_path / "a" / "a.parquet", [6], value_type=pa.uint8())
    floats = pixel_file(tmp_path / "a" / "b.parquet", [4], seed=6, value_type=pa.float32())
    src = ParquetSource(str(tmp_path / "a"), column="x")
    assert list(src.skipped) == ["b.parquet"] and "not a list of uint8" in src.skipped["b.parquet"]
    ds = prep.build(src, tmp_path / "ds", None)
    np.testing.assert_allclose(read_all(ds.path), ints / np.float32(255.0), rtol=1e-6)
    (tmp_path / "b").mkdir()
    pixel_file(tmp_path / "b" / "a.parquet", [4], seed=6, value_type=pa.float32())
    pixel_file(tmp_path / "b" / "b.parquet", [6], value_type=pa.uint8())
    src = ParquetSource(str(tmp_path / "b"), column="x")
    assert list(src.skipped) == ["b.parquet"] and "not a list of float" in src.skipped["b.parquet"]
    ds = prep.build(src, tmp_path / "ds2", None)
    np.testing.assert_array_equal(read_all(ds.path), floats)  # not divided by 255


def test_layouts_and_the_binary_view_guard(tmp_path, monkeypatch):
    assert column_layout(pa.binary()) == column_layout(pa.large_binary()) == "bytes"
    if hasattr(pa, "binary_view"):
        assert column_layout(pa.binary_view()) == "bytes"
    monkeypatch.delattr(pa.types, "is_binary_view", raising=False)  # pyarrow < 16 has no such test
    assert column_layout(pa.binary()) == "bytes" and column_layout(pa.string()) is None
    assert column_layout(pa.list_(pa.uint8())) == "array" and column_layout(pa.struct([("bytes", pa.binary()), ("path", pa.string())])) == "struct"
    # What a consumer that decodes images itself (the patch source) checks: raw pixel rows are no images.
    pixel_file(tmp_path / "raw.parquet", [3])
    assert ParquetSource(str(tmp_path / "raw.parquet"), column="x").raw_pixels
    binary_file(tmp_path / "jpeg.parquet", encoded_images(3, seed=7, size=SIZE), 3)
    assert not ParquetSource(str(tmp_path / "jpeg.parquet")).raw_pixels


def test_patches_refuse_a_column_of_raw_pixel_rows(tmp_path, capsys):
    """--from patches decodes images itself: a Parquet column of pixel rows is one error line, exit 2, nothing written."""
    pixel_file(tmp_path / "raw.parquet", [3])
    out = tmp_path / "patches"
    assert main(["data", "build", "--from", "patches", "--images", str(tmp_path / "raw.parquet"), "--column", "x",
                 "--patch", "4", "--count", "20", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "raw pixel rows, not encoded images" in err and err.count("error:") == 1
    assert not out.exists() and not (tmp_path / "patches.partial").exists()


def test_footers_are_read_at_once_and_judged_in_file_order(tmp_path):
    """On object storage a footer costs a round trip, so they are read FOOTER_READS at a time; the
    parts, their groups and the skip list still follow the sorted file list (and test_the_first_failed_footer_read_in_file_order_stops_the_rest)."""
    import threading
    import time

    from dist_sae.data.inputs import open_input

    sizes = [3, 5, 2, 4, 6, 1]
    for i, rows in enumerate(sizes):
        binary_file(tmp_path / f"p{i}.parquet", encoded_images(rows, seed=i, size=SIZE), 2)
    (tmp_path / "p2.parquet").write_bytes(b"PAR1 not a footer")
    active, peak, lock = [0], [0], threading.Lock()

    def slow(loc, size):  # a round trip of latency per open, counting the opens in flight
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return open_input(loc, size)

    src = ParquetSource(str(tmp_path), opener=slow)
    assert peak[0] > 1
    assert list(src.skipped) == ["p2.parquet"]
    assert src.names == ["p0.parquet", "p1.parquet", "p3.parquet", "p4.parquet", "p5.parquet"]
    assert [g[2] for g in src.groups] == [2, 1, 2, 2, 1, 2, 2, 2, 2, 2, 1]
    assert [src.names[g[0]] for g in src.groups][:3] == ["p0.parquet"] * 2 + ["p1.parquet"]


def test_the_first_failed_footer_read_in_file_order_stops_the_rest(tmp_path):
    """Of two failed reads the one of the earlier file is reported, though the later one failed
    first; the footers not yet begun are never read. An opener that fails with an OSError of its
    own stops the build too (a failed open says nothing about the file's bytes)."""
    import time

    from dist_sae.data.inputs import open_input

    for i in range(48):
        binary_file(tmp_path / f"p{i:02d}.parquet", encoded_images(1, seed=i, size=SIZE), 1)
    opened = []

    def flaky(loc, size):
        opened.append(loc)
        if loc.endswith("p03.parquet"):
            raise StorageError(f"{loc}: GET failed after 10 retries (the later file, failing first)")
        if loc.endswith("p01.parquet"):
            time.sleep(0.1)
            raise StorageError(f"{loc}: GET failed after 10 retries")
        time.sleep(0 if loc.endswith("p00.parquet") else 0.5)
        return open_input(loc, size)

    with pytest.raises(StorageError, match="p01.parquet"):
        ParquetSource(str(tmp_path), opener=flaky)
    assert len(opened) < 32  # 16 at once: the queue was cancelled at p01's turn

    def refusing(loc, size):
        raise PermissionError(13, "Permission denied")

    with pytest.raises(DataError, match="p00.parquet cannot be opened .PermissionError"):
        ParquetSource(str(tmp_path), opener=refusing)


def test_a_file_with_the_column_twice_is_skipped_and_listed(tmp_path):
    images = encoded_images(4, seed=3, size=SIZE)
    binary_file(tmp_path / "a.parquet", images, 2)
    twice = pa.Table.from_arrays([pa.array(images, pa.binary())] * 2, names=["image", "image"])
    pq.write_table(twice, tmp_path / "b.parquet")
    src = ParquetSource(str(tmp_path))
    assert list(src.skipped) == ["b.parquet"] and "appears 2 times" in src.skipped["b.parquet"]
    assert src.planned_rows == 4
