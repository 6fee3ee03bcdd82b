"""Building datasets from every source: round trips in value and order, streaming, atomic failures."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
from PIL import Image

from dist_sae.data import build as prep
from dist_sae.data.sources import NpySource
from dist_sae.commands.main import main
from dist_sae.data.dataset import Dataset
from dist_sae.errors import DataError
from dist_sae.data.patches import PatchSampler, natural_images, whiten_image
from dist_sae.data.sources import SyntheticSource, digits_array

from util import read_all


def write_idx(path, arr: np.ndarray, gz: bool) -> None:
    codes = {np.dtype("u1"): 0x08, np.dtype(">i2"): 0x0B, np.dtype(">f4"): 0x0D}
    head = bytes([0, 0, codes[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = head + arr.tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def assert_no_leftovers(out) -> None:
    assert not out.exists()
    assert not out.with_name(out.name + ".partial").exists()
    assert not out.with_name(out.name + ".staging").exists()


# ---- npy / npz ----------------------------------------------------------------------------


def test_npy_round_trip_in_order(tmp_path):
    x = np.random.default_rng(0).standard_normal((230, 3, 4))
    np.save(tmp_path / "x.npy", x)
    ds = prep.build_from_npy(tmp_path / "x.npy", tmp_path / "ds", options=prep.WriterOptions(shard_rows=100, block_rows=37))
    assert [s.rows for s in ds.shards] == [100, 100, 30]
    assert ds.sample_shape == [3, 4] and ds.dtype == "float64"
    np.testing.assert_array_equal(read_all(ds.path), x.reshape(230, 12))


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_round_trip(tmp_path, compressed):
    x = np.random.default_rng(1).random((50, 6)).astype(np.float32)
    (np.savez_compressed if compressed else np.savez)(tmp_path / "x.npz", data=x)
    ds = prep.build_from_npy(tmp_path / "x.npz", tmp_path / "ds", options=prep.WriterOptions(shards=3))
    assert len(ds.shards) == 3
    np.testing.assert_array_equal(read_all(ds.path), x)


def test_shard_size_in_bytes(tmp_path):
    x = np.zeros((1000, 25), dtype=np.float32)  # 100 bytes a row
    np.save(tmp_path / "x.npy", x)
    ds = prep.build(NpySource(tmp_path / "x.npy"), tmp_path / "ds", options=prep.WriterOptions(shard_bytes="30KB"))
    assert [s.rows for s in ds.shards] == [300, 300, 300, 100]


# ---- IDX ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    x = np.random.default_rng(2).integers(0, 256, (13, 5, 4), dtype=np.uint8)
    path = tmp_path / ("img-idx3-ubyte" + (".gz" if gz else ""))
    write_idx(path, x, gz)
    ds = prep.build_idx(path, tmp_path / "ds", options=prep.WriterOptions(shard_rows=5, block_rows=4))
    assert ds.sample_shape == [5, 4] and ds.rows == 13 and len(ds.shards) == 3
    np.testing.assert_array_equal(read_all(ds.path), x.reshape(13, 20).astype(np.float32) * np.float32(1 / 255))
    raw = prep.build_idx(path, tmp_path / "raw", scale=False)
    np.testing.assert_array_equal(read_all(raw.path), x.reshape(13, 20))


def test_idx_other_types_and_errors(tmp_path):
    x = (np.arange(24).reshape(6, 4) - 10).astype(">i2")
    write_idx(tmp_path / "a.idx", x, gz=False)
    np.testing.assert_array_equal(read_all(prep.build_idx(tmp_path / "a.idx", tmp_path / "a").path), x.astype(np.float32))
    labels = np.arange(5, dtype=np.uint8)
    write_idx(tmp_path / "labels.idx", labels, gz=True)
    with pytest.raises(DataError, match="label file"):
        prep.build_idx(tmp_path / "labels.idx", tmp_path / "l")
    whole = np.zeros((10, 3, 3), dtype=np.uint8)
    write_idx(tmp_path / "cut.idx", whole, gz=False)
    data = (tmp_path / "cut.idx").read_bytes()
    (tmp_path / "cut.idx").write_bytes(data[:-20])
    with pytest.raises(DataError, match=r"cut\.idx is truncated"):
        prep.build_idx(tmp_path / "cut.idx", tmp_path / "cut", options=prep.WriterOptions(shard_rows=2, block_rows=2))
    assert_no_leftovers(tmp_path / "cut")
    (tmp_path / "junk.idx").write_bytes(b"not an idx file")
    with pytest.raises(DataError, match="not an IDX file"):
        prep.build_idx(tmp_path / "junk.idx", tmp_path / "j")


# ---- image folders ---------------------------------------------------------------------------


def make_image_folder(root, rng, size=(6, 5), rgb=False):
    """Gray/RGB PNG and TIFF files in a sub-folder tree, plus one undecodable file; returns the expected arrays in order."""
    (root / "b").mkdir(parents=True)
    names = ["a1.png", "a2.tif", "b/c.png", "b/d.tiff"]
    arrays = []
    for name in names:
        shape = (*size, 3) if rgb else size
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(img).save(root / name)
        arrays.append(img.astype(np.float32) / np.float32(255))
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "notes.txt").write_text("ignored")
    return arrays


def test_image_folder_round_trip_skips_undecodable(tmp_path):
    expected = make_image_folder(tmp_path / "imgs", np.random.default_rng(3))
    ds = prep.build_images(tmp_path / "imgs", tmp_path / "ds", options=prep.WriterOptions(shard_rows=3, block_rows=2))
    assert ds.sample_shape == [6, 5] and ds.rows == 4
    np.testing.assert_array_equal(read_all(ds.path), np.stack([a.reshape(-1) for a in expected]))
    meta = json.loads((ds.path / "dataset.json").read_text())
    assert meta["skipped"]["count"] == 1 and "b/broken.png" in meta["skipped"]["files"]


def test_image_folder_rgb_resize_and_crop(tmp_path, capsys):
    expected = make_image_folder(tmp_path / "imgs", np.random.default_rng(4), size=(8, 12), rgb=True)
    ds = prep.build_images(tmp_path / "imgs", tmp_path / "rgb", mode="rgb")
    assert ds.sample_shape == [8, 12, 3]
    np.testing.assert_array_equal(read_all(ds.path), np.stack([a.reshape(-1) for a in expected]))
    crop = prep.build_images(tmp_path / "imgs", tmp_path / "crop", mode="rgb", size=(8, 8), fit="crop")
    np.testing.assert_array_equal(read_all(crop.path), np.stack([a[:, 2:10].reshape(-1) for a in expected]))
    rc = main(["data", "build", "--from", "images", str(tmp_path / "imgs"), "--size", "4", "--out", str(tmp_path / "small"), "-q"])
    out = capsys.readouterr().out
    assert rc == 0 and "skipped 1 file" in out and "b/broken.png" in out
    assert Dataset.open(tmp_path / "small").sample_shape == [4, 4]


def test_image_size_mismatch_fails_cleanly(tmp_path):
    make_image_folder(tmp_path / "imgs", np.random.default_rng(5))
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp_path / "imgs" / "b" / "z.png")
    out = tmp_path / "ds"
    with pytest.raises(DataError, match=r"z\.png is 9x9.*--size"):
        prep.build_images(tmp_path / "imgs", out, options=prep.WriterOptions(shard_rows=1, block_rows=1))
    assert_no_leftovers(out)


# ---- patches, digits, synthetic ------------------------------------------------------------


def notes_normalise(x: np.ndarray) -> np.ndarray:
    """The notes' sampleIMAGES normalisation, in memory (MATLAB std: ddof=1)."""
    y = x - x.mean(axis=1, keepdims=True)
    pstd = 3 * y.std(ddof=1)
    return (np.clip(y, -pstd, pstd) / pstd + 1) * 0.4 + 0.1


def test_notes_exercise_defaults_via_cli(tmp_path):
    out = tmp_path / "patches"
    assert main(["data", "build", "--from", "patches", "--out", str(out), "-q"]) == 0
    ds = Dataset.open(out)
    assert (ds.rows, ds.dim, ds.sample_shape) == (10000, 64, [8, 8])
    x = read_all(out)
    assert x.min() >= 0.1 - 1e-6 and x.max() <= 0.9 + 1e-6
    assert [p["kind"] for p in ds.preprocessing] == ["whiten_images", "notes"]
    # the same patches as a direct call of the sampler with the same seed, normalised in memory
    sampler = PatchSampler([whiten_image(img) for _, img in natural_images()], patch=8, seed=0)
    np.testing.assert_allclose(x, notes_normalise(sampler.all(10000)), atol=1e-6)


def test_patches_from_folder_independent_of_block_size(tmp_path):
    rng = np.random.default_rng(6)
    (tmp_path / "imgs").mkdir()
    images = []
    for i, shape in enumerate([(40, 50), (33, 30)]):
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / "imgs" / f"{i}.png")
        images.append(img / 255.0)
    a = prep.build_patches(tmp_path / "a", images=tmp_path / "imgs", patch=5, count=9000, seed=3, whiten=False, normalize=None, options=prep.WriterOptions(block_rows=1000))
    b = prep.build_patches(tmp_path / "b", images=tmp_path / "imgs", patch=5, count=9000, seed=3, whiten=False, normalize=None, options=prep.WriterOptions(block_rows=777, shard_rows=2000))
    # the per-image rule, written out: file i gives 9000 / 2 patches from default_rng([seed, i]), in file order
    expected = []
    for i, img in enumerate(images):
        rng = np.random.default_rng([3, i])
        rows = (rng.random(4500) * (img.shape[0] - 4)).astype(int)
        cols = (rng.random(4500) * (img.shape[1] - 4)).astype(int)
        expected += [img[r : r + 5, c : c + 5].ravel() for r, c in zip(rows, cols)]
    np.testing.assert_allclose(read_all(a.path), np.array(expected), atol=1e-7)
    np.testing.assert_array_equal(read_all(a.path), read_all(b.path))
    assert a.sample_shape == [5, 5]


def test_whiten_image_flattens_spectrum():
    img = natural_images()[0][1]
    white = whiten_image(img)
    assert abs(white.mean()) < 1e-10 and abs(white.std() - 1) < 1e-10
    # neighbouring pixels of a natural image are strongly correlated; whitening removes much of that
    # (not all: R(f) also rolls off the top frequencies, and these photos fall faster than 1/f)
    corr = lambda a: np.corrcoef(a[:, :-1].ravel(), a[:, 1:].ravel())[0, 1]  # noqa: E731
    assert corr(img) > 0.95 and corr(white) < 0.65


def test_digits_round_trip(tmp_path):
    from sklearn.datasets import load_digits

    ds = prep.build_digits(tmp_path / "d", options=prep.WriterOptions(shard_rows=500))
    assert (ds.rows, ds.sample_shape, len(ds.shards)) == (1797, [8, 8], 4)
    np.testing.assert_array_equal(read_all(ds.path), (load_digits().images.astype(np.float32) / np.float32(16)).reshape(1797, 64))
    big = prep.build_digits(tmp_path / "d28", size=28)
    assert big.sample_shape == [28, 28] and big.dim == 784
    np.testing.assert_array_equal(read_all(big.path), digits_array(28).reshape(1797, 784))
    assert 0 <= read_all(big.path).min() and read_all(big.path).max() <= 1


def test_synthetic_round_trip_independent_of_blocks(tmp_path):
    rows = 20000
    ds = prep.build_synthetic(tmp_path / "s", rows=rows, dim=16, seed=7, options=prep.WriterOptions(shard_rows=7000, block_rows=3000))
    src = SyntheticSource(rows, 16, 7)
    expected = np.concatenate([src.generate(i) for i in range(-(-rows // src.GEN_BLOCK))])
    x = read_all(ds.path)
    np.testing.assert_array_equal(x, expected)
    assert [s.rows for s in ds.shards] == [7000, 7000, 6000]
    assert 0 < x.min() and x.max() < 1
    # planted structure: with 4 atoms, one active per row, the logits lie near 4 lines (+ noise 0.05²)
    planted = prep.build_synthetic(tmp_path / "p", rows=5000, dim=16, seed=1, atoms=4, active=1)
    z = np.log(read_all(planted.path) / (1 - read_all(planted.path)))
    eig = np.linalg.eigvalsh(np.cov(z.T))[::-1]
    assert eig[3] > 0.1 and eig[4:].max() < 0.01


# ---- atomic failures ----------------------------------------------------------------------


def test_failed_build_leaves_nothing_and_keeps_existing(tmp_path):
    x = np.random.default_rng(8).random((300, 4))
    x[250, 2] = np.nan
    np.save(tmp_path / "bad.npy", x)
    out = tmp_path / "ds"
    with pytest.raises(DataError, match=r"bad\.npy: non-finite .* rows 250\.\.250"):
        prep.build_from_npy(tmp_path / "bad.npy", out, options=prep.WriterOptions(shard_rows=100, block_rows=50))
    assert_no_leftovers(out)
    # an existing dataset survives a failed --overwrite build untouched
    np.save(tmp_path / "good.npy", x[:200])
    prep.build_from_npy(tmp_path / "good.npy", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError):
        prep.build_from_npy(tmp_path / "bad.npy", out, options=prep.WriterOptions(shard_rows=100, block_rows=50, overwrite=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not out.with_name("ds.partial").exists()
    # and a failure in a preprocessing pass (before any shard) leaves nothing either
    with pytest.raises(DataError, match="non-finite"):
        prep.build_from_npy(tmp_path / "bad.npy", tmp_path / "z", preprocessing=[prep.StepSpec("zca", 0.1)])
    assert_no_leftovers(tmp_path / "z")


def test_cli_errors_name_the_file(tmp_path, capsys):
    rc = main(["data", "build", "--from", "npy", str(tmp_path / "missing.npy"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "missing.npy does not exist" in capsys.readouterr().err
    np.save(tmp_path / "x.npy", np.zeros((4, 2)))
    assert main(["data", "build", "--from", "npy", str(tmp_path / "x.npy"), "--out", str(tmp_path / "o"), "-q"]) == 0
    rc = main(["data", "build", "--from", "npy", str(tmp_path / "x.npy"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "already exists" in capsys.readouterr().err


# ---- ranges: what a parallel build writes, shard by shard ----------------------------------------


def test_ranges_of_every_cuttable_source_are_its_rows_in_order(tmp_path):
    """Each range builds alone (range_blocks) and the ranges, in order, are the source's rows; the
    default shard size depends on the input only (about TARGET_SHARDS shards, none under MIN_SHARD_ROWS)."""
    from dist_sae.data.images import ImageFolderSource
    from dist_sae.data.patches import FolderPatchSource
    from dist_sae.data.sources import IdxSource

    x = np.random.default_rng(2).integers(0, 256, (50, 3, 4), dtype=np.uint8)
    write_idx(tmp_path / "x.idx.gz", x, gz=True)
    np.save(tmp_path / "x.npy", x.reshape(50, 12).astype(np.float32))
    make_image_folder(tmp_path / "imgs", np.random.default_rng(8))
    sources = [NpySource(tmp_path / "x.npy"), IdxSource(tmp_path / "x.idx.gz"), SyntheticSource(20000, 3, seed=1), ImageFolderSource(tmp_path / "imgs"), FolderPatchSource(tmp_path / "imgs", 2, 37)]
    for source in sources:
        whole = np.concatenate(list(source.blocks(7)))
        ranges = source.ranges(max(2, source.items // 5))  # synthetic: 4000 rows, across its 8192-row generator blocks
        assert [r.start for r in ranges[1:]] == [r.stop for r in ranges[:-1]] and ranges[-1].stop == source.items
        parts = np.concatenate([b for r in ranges for b in source.range_blocks(r, 4)])
        np.testing.assert_array_equal(parts, whole, err_msg=source.name)
    big = prep.plan_ranges(SyntheticSource(300_000, 4), prep.WriterOptions(), 4, "float32")
    assert len(big) == prep.TARGET_SHARDS and big[0].stop == -(-300_000 // prep.TARGET_SHARDS)
    assert len(prep.plan_ranges(SyntheticSource(3000, 4), prep.WriterOptions(), 4, "float32")) == 3  # MIN_SHARD_ROWS = 1024
    assert len(prep.build(SyntheticSource(3000, 4), tmp_path / "small").shards) == 3


def test_images_shards_are_file_ranges_and_skips_only_shorten_them(tmp_path):
    make_image_folder(tmp_path / "imgs", np.random.default_rng(9))  # a1, a2, b/broken, b/c, b/d
    ds = prep.build_images(tmp_path / "imgs", tmp_path / "ds", prep.WriterOptions(shard_rows=3))
    assert [s.rows for s in ds.shards] == [2, 2]  # files a1 a2 b/broken | b/c b/d
