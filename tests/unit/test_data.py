"""Dataset folders: atomic writes, work units, bounded block reads, read-ahead."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dist_sae.data.dataset import MANIFEST, Dataset
from dist_sae.data.reader import BlockReader, prefetch
from dist_sae.data.writer import DatasetWriter, write_array
from dist_sae.errors import DataError
from dist_sae.data.build import WriterOptions, build_from_npy

from util import global_rows, random_rows


def test_write_then_read_every_unit_in_order(tmp_path):
    x = random_rows(1000, 5, seed=1).astype(np.float32)
    ds = write_array(tmp_path / "d", x, shard_rows=300, chunk_rows=64)
    assert [s.rows for s in ds.shards] == [300, 300, 300, 100]
    meta = json.loads((tmp_path / "d" / MANIFEST).read_text())
    assert meta["rows"] == 1000 and meta["dim"] == 5 and meta["fingerprint"].startswith("sha256:")
    units = ds.units(200)  # aligned down to 192 = 3 chunks of 64
    assert all(u.rows <= 192 for u in units)
    assert [u.id for u in units] == list(range(len(units)))
    with BlockReader(ds) as reader:
        got = np.concatenate([block for _, block in prefetch(reader, units, depth=2)])
    np.testing.assert_array_equal(got, x)


def test_units_cover_every_row_exactly_once(tmp_path):
    ds = write_array(tmp_path / "d", random_rows(777, 3), shard_rows=250, chunk_rows=10)
    for block in (1, 7, 64, 5000):
        covered = np.zeros(777, dtype=int)
        for u in ds.units(block):
            covered[global_rows(u, [s.rows for s in ds.shards])] += 1
        assert (covered == 1).all()


def test_fingerprint_depends_on_content_only(tmp_path):
    x = random_rows(100, 4)
    a = write_array(tmp_path / "a", x, shard_rows=50)
    b = write_array(tmp_path / "b", x, shard_rows=50)
    y = x.copy()
    y[73, 2] += 1e-3
    c = write_array(tmp_path / "c", y, shard_rows=50)
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_failed_build_leaves_nothing_and_keeps_existing(tmp_path):
    first = write_array(tmp_path / "d", random_rows(10, 3), shard_rows=5)
    with pytest.raises(RuntimeError):
        with DatasetWriter(tmp_path / "d", 3, shard_rows=5, overwrite=True) as w:
            w.write(random_rows(7, 3))
            raise RuntimeError("interrupted")
    assert not (tmp_path / "d.partial").exists()
    assert Dataset.open(tmp_path / "d").fingerprint == first.fingerprint
    with pytest.raises(DataError, match="already exists"):
        DatasetWriter(tmp_path / "d", 3)


def test_non_finite_rows_named_with_shard_and_rows(tmp_path):
    x = random_rows(40, 3)
    x[25, 1] = np.nan
    ds = write_array(tmp_path / "d", x, shard_rows=20)
    with BlockReader(ds) as reader, pytest.raises(DataError, match=r"shard-00001.h5: non-finite .* rows 5\.\.5"):
        for _ in prefetch(reader, ds.units(8)):
            pass


def test_open_names_missing_folder_manifest_and_shard(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Dataset.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no dataset.json"):
        Dataset.open(tmp_path / "empty")
    write_array(tmp_path / "d", random_rows(10, 3), shard_rows=4)
    (tmp_path / "d" / "shard-00001.h5").unlink()
    with pytest.raises(DataError, match="shard-00001.h5 listed in dataset.json is missing"):
        Dataset.open(tmp_path / "d")


def test_build_from_npy_memory_maps_and_keeps_shape(tmp_path):
    x = np.random.default_rng(0).random((90, 4, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    ds = build_from_npy(tmp_path / "x.npy", tmp_path / "d", options=WriterOptions(shards=4, block_rows=16))
    assert ds.sample_shape == [4, 4] and ds.dim == 16 and len(ds.shards) == 4
    with BlockReader(ds) as reader:
        got = np.concatenate([reader.read(u) for u in ds.units(1000)])
    np.testing.assert_array_equal(got, x.reshape(90, 16))


def test_prefetch_raises_load_errors_in_order_and_keeps_order(tmp_path):
    from dist_sae.data.workunit import WorkUnit

    units = [WorkUnit.of(i, 0, i, i + 1) for i in range(6)]

    def load(unit):
        if unit.id == 4:
            raise DataError("unit 4 is bad")
        return unit.id

    seen = []
    with pytest.raises(DataError, match="unit 4 is bad"):
        for unit, value in prefetch(load, units, depth=2):
            seen.append(value)
    assert seen == [0, 1, 2, 3]
