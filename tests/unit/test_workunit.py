"""How a dataset is cut into work units (data/workunit.py) and how a unit of several shards reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_sae.data.dataset import Dataset
from dist_sae.data.reader import BlockReader
from dist_sae.data.workunit import MIN_UNIT_ROWS, Span, WorkUnit, cut_units
from dist_sae.data.writer import write_array
from dist_sae.errors import DataError
from dist_sae.train.inputs import bind_dataset
from dist_sae.train.passes import PassRunner
from util import config, global_rows, random_rows


def spans(units):
    return [[tuple(s) for s in u.spans] for u in units]


def assert_cover(units, shard_rows):
    """Every row exactly once, in order, ids 0..n-1, each unit's spans consecutive."""
    assert [u.id for u in units] == list(range(len(units)))
    rows = np.concatenate([global_rows(u, shard_rows) for u in units])
    np.testing.assert_array_equal(rows, np.arange(sum(shard_rows)))


def test_small_shards_are_packed_up_to_block_rows():
    notes = [1024] * 9 + [784]  # the notes' 10,000 patches as `dist-sae data build` shards them
    assert spans(cut_units(notes, 16384, chunk=1024)) == [[(s, 0, n) for s, n in enumerate(notes)]]
    four = cut_units(notes, 4096, chunk=1024)
    assert [u.rows for u in four] == [4096, 4096, 1808] and [len(u.spans) for u in four] == [4, 4, 2]
    assert_cover(four, notes)
    # A shard's tail packs with the small shards after it, never with a whole block.
    assert spans(cut_units([20000, 3000, 3000, 20000], 16384)) == [
        [(0, 0, 16384)], [(0, 16384, 20000), (1, 0, 3000), (2, 0, 3000)], [(3, 0, 16384)], [(3, 16384, 20000)]]


def test_large_shards_are_cut_as_before():
    units = cut_units([40000, 40000], 16500, chunk=64)  # 16500 rounds down to 257 chunks: 16448 rows
    assert spans(units) == [[(0, 0, 16448)], [(0, 16448, 32896)], [(0, 32896, 40000)],
                            [(1, 0, 16448)], [(1, 16448, 32896)], [(1, 32896, 40000)]]


def test_min_units_cuts_equal_blocks_across_shards():
    notes = [1024] * 9 + [784]
    units = cut_units(notes, 16384, chunk=1024, min_units=4)  # 10,000 rows: 2 blocks of >= MIN_UNIT_ROWS
    assert [u.rows for u in units] == [5000, 5000]
    assert units[0].spans[-1] == Span(4, 0, 904) and units[1].spans[0] == Span(4, 904, 1024)
    assert_cover(units, notes)
    assert len(cut_units([1000] * 8, 16384, min_units=4)) == 1  # 8,000 rows: never a unit under MIN_UNIT_ROWS
    assert all(u.rows >= MIN_UNIT_ROWS for u in cut_units([7000, 7000, 2397], 16384, min_units=4))


def test_taper_cuts_packed_units_on_their_shards_chunks():
    shard_rows = [3000] * 40  # 120,000 rows in 8 units of 5 shards
    plain = cut_units(shard_rows, 16384, chunk=1000)
    assert [u.rows for u in plain] == [15000] * 8
    tapered = cut_units(shard_rows, 16384, chunk=1000, taper=True)
    assert_cover(tapered, shard_rows)
    sizes = [u.rows for u in tapered]
    assert sizes[:4] == [15000] * 4 and len(tapered) > len(plain) and min(sizes) >= MIN_UNIT_ROWS - 1000
    assert all(s.start % 1000 == 0 for u in tapered for s in u.spans)  # no chunk read by two units
    assert cut_units(shard_rows, 16384, chunk=1000, taper=True) == tapered  # the data alone decides


def test_unit_travels_as_flat_ints_and_slices():
    unit = WorkUnit(3, (Span(4, 904, 1024), Span(5, 0, 1024), Span(6, 0, 100)))
    assert unit.flat() == (3, 4, 904, 1024, 5, 0, 1024, 6, 0, 100)
    assert WorkUnit.from_flat(list(unit.flat())) == unit and unit.rows == 1244
    assert unit.slice(100, 1200) == (Span(4, 1004, 1024), Span(5, 0, 1024), Span(6, 0, 56))
    assert WorkUnit.of(0, 2, 5, 9) == WorkUnit(0, (Span(2, 5, 9),))


@pytest.fixture()
def shards(tmp_path):
    x = random_rows(100, 3, seed=4).astype(np.float32)
    return x, write_array(tmp_path / "d", x, shard_rows=30, chunk_rows=8)  # 30, 30, 30, 10


def test_a_unit_of_several_shards_reads_as_their_rows_in_order(shards):
    x, ds = shards
    unit = WorkUnit(0, (Span(0, 25, 30), Span(1, 0, 30), Span(3, 2, 7)))
    with BlockReader(ds) as reader:
        np.testing.assert_array_equal(reader.read(unit), np.concatenate([x[25:30], x[30:60], x[92:97]]))
        buffer = np.full((50, 3), -1.0, np.float32)
        got = reader.read(unit, out=buffer)
        assert got.base is buffer and got.shape == (40, 3)  # read into the caller's buffer
        np.testing.assert_array_equal(buffer[:40], np.concatenate([x[25:30], x[30:60], x[92:97]]))
        assert (buffer[40:] == -1).all()
        whole = ds.units(16384)
        assert len(whole) == 1 and np.array_equal(reader.read(whole[0]), x)


def test_non_finite_rows_of_a_packed_unit_name_their_shard(tmp_path):
    x = random_rows(100, 3)
    x[67, 2] = np.inf  # shard 2, row 7
    ds = write_array(tmp_path / "d", x, shard_rows=30)
    with BlockReader(ds) as reader, pytest.raises(DataError, match=r"shard-00002.h5: non-finite .* rows 7\.\.7 \(1 rows\)"):
        reader.read(ds.units(16384)[0])


def test_noise_of_a_packed_unit_is_that_of_its_shards_rows(tmp_path):
    path = tmp_path / "d"
    write_array(path, random_rows(100, 3, seed=2), shard_rows=30)
    ds = Dataset.open(path)
    cfg = bind_dataset(config(path, model__hidden=[2], noise__kind="gaussian", noise__sigma=0.5), ds)
    runner = PassRunner(cfg, ds)
    try:
        packed = WorkUnit(0, (Span(0, 20, 30), Span(1, 0, 30)))
        x = torch.from_numpy(runner.reader.read(packed))
        alone = torch.cat([runner.corrupt(x[:10], WorkUnit.of(5, 0, 20, 30)), runner.corrupt(x[10:], WorkUnit.of(6, 1, 0, 30))])
        assert torch.equal(runner.corrupt(x, packed), alone)
        assert not torch.equal(runner.corrupt(x, packed), runner.corrupt(x, WorkUnit(0, (Span(0, 0, 10), Span(1, 0, 30)))))
    finally:
        runner.close()
