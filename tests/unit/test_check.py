"""`data check` catches every kind of damage, names the file and rows, and reports all of it; `data info`."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from dist_sae.data import build as prep
from dist_sae.data.check import check_dataset, dataset_info, sample_grid
from dist_sae.commands.main import main

SHARD_ROWS, DIM = 200, 16


@pytest.fixture
def dataset(tmp_path):
    """4 shards of 200 rows, chunked by 25 rows."""
    return prep.build_synthetic(tmp_path / "ds", rows=4 * SHARD_ROWS, dim=DIM, seed=0, options=prep.WriterOptions(shard_rows=SHARD_ROWS, chunk_rows=25))


def shard(ds, i):
    return ds.path / ds.shards[i].file


def messages(problems):
    return [str(p) for p in problems]


def rewrite_x(path, data):
    with h5py.File(path, "a") as f:
        del f["x"]
        f.create_dataset("x", data=data, maxshape=(None, data.shape[1] if data.ndim == 2 else None), chunks=True)


def test_clean_dataset_passes(dataset, capsys):
    assert check_dataset(dataset.path) == []
    assert main(["data", "check", str(dataset.path), "-q"]) == 0
    assert "OK" in capsys.readouterr().out


def test_truncated_shard(dataset):
    f = shard(dataset, 1)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    problems = check_dataset(dataset.path)
    assert any(f.name in m and ("truncated" in m or "cannot be" in m) for m in messages(problems)), messages(problems)


def test_missing_and_extra_shards(dataset):
    os.remove(shard(dataset, 2))
    (dataset.path / "shard-00099.h5").write_bytes(shard(dataset, 0).read_bytes())
    m = messages(check_dataset(dataset.path))
    assert any("shard-00002.h5" in s and "missing shard" in s and "rows 0:200" in s for s in m), m
    assert any("shard-00099.h5" in s and "extra shard" in s for s in m), m


def test_bytes_overwritten_in_the_middle(dataset):
    f = shard(dataset, 3)
    with h5py.File(f, "r") as h:
        offset = h["x"].id.get_chunk_info(3).byte_offset  # rows 75:100
    with open(f, "r+b") as fh:
        fh.seek(offset + 40)
        fh.write(b"\x7f" * 64)
    m = messages(check_dataset(dataset.path))
    assert any("shard-00003.h5" in s and "sha256" in s for s in m), m


def test_corrupt_compressed_chunk_names_rows(tmp_path):
    ds = prep.build_synthetic(tmp_path / "gz", rows=400, dim=DIM, options=prep.WriterOptions(shard_rows=200, chunk_rows=50, compression="gzip"))
    f = shard(ds, 1)
    with h5py.File(f, "r") as h:
        info = h["x"].id.get_chunk_info(2)  # rows 100:150
    with open(f, "r+b") as fh:
        fh.seek(info.byte_offset + 5)
        fh.write(os.urandom(info.size - 10))
    m = messages(check_dataset(ds.path, block_rows=50))
    assert any("shard-00001.h5 rows 100:150" in s and "cannot be read" in s for s in m), m


def test_nan_rows_are_named_by_range(dataset):
    f = shard(dataset, 1)
    with h5py.File(f, "a") as h:
        h["x"][10:13, 0] = np.nan
        h["x"][150, 5] = np.inf
    m = messages(check_dataset(dataset.path))
    assert any("shard-00001.h5 rows 10:13: non-finite" in s for s in m), m
    assert any("shard-00001.h5 rows 150:151: non-finite" in s for s in m), m
    assert any("shard-00001.h5" in s and "sha256" in s for s in m), m


def test_dtype_and_dim_mismatch(dataset):
    with h5py.File(shard(dataset, 0), "r") as h:
        x = h["x"][:]
    rewrite_x(shard(dataset, 1), x.astype(np.float64))
    rewrite_x(shard(dataset, 2), x[:, :10])
    m = messages(check_dataset(dataset.path))
    assert any("shard-00001.h5" in s and "dtype mismatch: float64" in s for s in m), m
    assert any("shard-00001.h5" in s and "differs from shard shard-00000.h5" in s for s in m), m
    assert any("shard-00002.h5" in s and "dimension mismatch: 10 features" in s for s in m), m


def test_empty_shard(dataset):
    rewrite_x(shard(dataset, 3), np.zeros((0, DIM), np.float32))
    m = messages(check_dataset(dataset.path))
    assert any("shard-00003.h5" in s and "empty shard" in s for s in m), m
    assert any("shard-00003.h5" in s and "has 0 rows" in s for s in m), m


def test_missing_x(dataset):
    with h5py.File(shard(dataset, 0), "a") as h:
        h["y"] = h["x"][:]
        del h["x"]
    m = messages(check_dataset(dataset.path))
    assert any("shard-00000.h5" in s and "has no dataset 'x'" in s for s in m), m


def test_all_problems_reported_at_once(dataset, capsys):
    os.remove(shard(dataset, 0))
    with h5py.File(shard(dataset, 1), "a") as h:
        h["x"][0, 0] = np.nan
    f = shard(dataset, 2)
    f.write_bytes(f.read_bytes()[:1000])
    meta = json.loads((dataset.path / "dataset.json").read_text())
    meta["fingerprint"] = "sha256:" + "0" * 64
    (dataset.path / "dataset.json").write_text(json.dumps(meta))
    problems = check_dataset(dataset.path)
    files = {os.path.basename(p.file) for p in problems}
    assert {"shard-00000.h5", "shard-00001.h5", "shard-00002.h5", "dataset.json"} <= files, messages(problems)
    assert main(["data", "check", str(dataset.path), "-q"]) == 1
    out = capsys.readouterr().out
    assert f"{len(problems)} problem(s)" in out and "shard-00002.h5" in out
    assert main(["data", "check", str(dataset.path), "--json"]) == 1
    assert len(json.loads(capsys.readouterr().out)) == len(problems)


def test_not_a_dataset_and_missing_transform(tmp_path):
    assert "not a dataset folder" in messages(check_dataset(tmp_path))[0]
    ds = prep.build_digits(tmp_path / "d", preprocessing=[prep.StepSpec("standardize")])
    os.remove(ds.path / "transform.safetensors")
    assert any("transform.safetensors" in s and "missing" in s for s in messages(check_dataset(ds.path)))


def test_info_and_png_grid(tmp_path, capsys):
    ds = prep.build_digits(tmp_path / "d", options=prep.WriterOptions(shard_rows=600))
    info = dataset_info(ds.path)
    assert (info["rows"], info["dim"], info["shards"], info["sample_shape"]) == (1797, 64, 3, [8, 8])
    assert info["bytes_on_disk"] > 1797 * 64 * 4
    from sklearn.datasets import load_digits

    x = load_digits().data / 16
    assert abs(info["feature_std"]["max"] - x.std(0).max()) < 1e-6
    assert abs(info["feature_mean"]["median"] - np.median(x.mean(0))) < 1e-6
    png = sample_grid(ds.path, tmp_path / "grid.png", count=16)
    from PIL import Image

    assert Image.open(png).size == (4 * (4 * 9 + 1), 4 * (4 * 9 + 1))
    assert main(["data", "info", str(ds.path), "--png", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert "rows 1797" in out and "per-feature std" in out and (tmp_path / "g.png").is_file()
    syn = prep.build_synthetic(tmp_path / "s", rows=100, dim=5)
    assert main(["data", "info", str(syn.path), "--png", str(tmp_path / "no.png")]) == 2


def test_png_grid_of_flat_rows(tmp_path, capsys):
    """Flat rows: a square dimension is drawn as squares (64 → 8×8); --shape H W picks any fitting shape."""
    from PIL import Image

    flat = prep.build_synthetic(tmp_path / "flat", rows=50, dim=64)
    assert flat.sample_shape == [64]
    assert main(["data", "info", str(flat.path), "--png", str(tmp_path / "sq.png"), "--samples", "16"]) == 0
    assert Image.open(tmp_path / "sq.png").size == (4 * (4 * 9 + 1), 4 * (4 * 9 + 1))  # 4×4 tiles of 8×8 (+1 border)
    assert main(["data", "info", str(flat.path), "--png", str(tmp_path / "r.png"), "--samples", "16", "--shape", "4", "16"]) == 0
    assert Image.open(tmp_path / "r.png").size == (4 * (4 * 17 + 1), 4 * (4 * 5 + 1))
    capsys.readouterr()
    syn = prep.build_synthetic(tmp_path / "s", rows=20, dim=10)
    assert main(["data", "info", str(syn.path), "--png", str(tmp_path / "no.png"), "--shape", "3", "3"]) == 2
    assert "--shape 3 3 does not fit rows of 10 features" in capsys.readouterr().err
    assert main(["data", "info", str(syn.path), "--png", str(tmp_path / "ok.png"), "--shape", "2", "5"]) == 0
