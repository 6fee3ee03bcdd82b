"""Out-of-core preprocessing against in-memory NumPy references; saved transforms; the Ray pass."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dist_sae.data import build as prep
from dist_sae.data.dataset import Dataset
from dist_sae.errors import DataError
from dist_sae.data.transforms import TRANSFORM_FILE, StepSpec, Transform, load_transform, local_sums_fn, reduce_sums, unit_sums

from util import correlated, numpy_zca, read_all


@pytest.fixture
def sharded(tmp_path):
    x = correlated()
    np.save(tmp_path / "x.npy", x)
    ds = prep.build_from_npy(tmp_path / "x.npy", tmp_path / "raw", options=prep.WriterOptions(shard_rows=700))  # 5 shards
    assert len(ds.shards) >= 3 and ds.dtype == "float64"
    return x, ds


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_out_of_core_zca_equals_numpy(sharded, tmp_path, eps):
    x, ds = sharded
    out = prep.transform_dataset(ds.path, tmp_path / "zca", [StepSpec("zca", eps)], options=prep.WriterOptions(block_rows=333))
    y = read_all(out.path)
    np.testing.assert_allclose(y, numpy_zca(x, eps), rtol=0, atol=1e-10)
    if eps == 0:
        np.testing.assert_allclose(np.cov(y.T, bias=True), np.eye(x.shape[1]), atol=1e-10)
    # the saved transform maps raw rows to the stored ones and back
    t = load_transform(out.path)
    np.testing.assert_allclose(t.apply(x), y, atol=1e-10)
    np.testing.assert_allclose(t.inverse(y), x, atol=1e-9)


def test_whitened_patches_have_identity_covariance(tmp_path):
    """Patches of whitened images, ZCA-whitened on build over 4 shards: covariance ≈ I (ε tiny)."""
    ds = prep.build_patches(tmp_path / "p", count=4000, normalize=None, preprocessing=[StepSpec("zca", 1e-9)], options=prep.WriterOptions(dtype="float64", shard_rows=1000))
    y = read_all(ds.path)
    assert len(ds.shards) == 4
    np.testing.assert_allclose(np.cov(y.T, bias=True), np.eye(64), atol=1e-6)
    assert [p["kind"] for p in ds.preprocessing] == ["whiten_images", "zca"]
    notes = prep.build_patches(tmp_path / "n", count=4000, preprocessing=[StepSpec("zca", 1e-9)], options=prep.WriterOptions(dtype="float64"))
    np.testing.assert_allclose(np.cov(read_all(notes.path).T, bias=True), np.eye(64), atol=1e-5)


def test_pca_standardize_notes_match_numpy(sharded, tmp_path):
    x, ds = sharded
    k = 5
    pca = read_all(prep.transform_dataset(ds.path, tmp_path / "pca", [StepSpec("pca", 0.01, components=k)]).path)
    mu = x.mean(0)
    lam, u = np.linalg.eigh(np.cov(x.T, bias=True))
    lam, u = lam[::-1][:k], u[:, ::-1][:, :k]
    ref = (x - mu) @ u / np.sqrt(lam + 0.01)
    np.testing.assert_allclose(np.abs(pca), np.abs(ref), atol=1e-10)  # eigenvector signs are a convention
    assert Dataset.open(tmp_path / "pca").sample_shape == [k]
    std = read_all(prep.transform_dataset(ds.path, tmp_path / "std", [StepSpec("standardize")]).path)
    np.testing.assert_allclose(std, (x - mu) / x.std(0), atol=1e-10)
    notes = read_all(prep.transform_dataset(ds.path, tmp_path / "notes", [StepSpec("notes")]).path)
    y = x - x.mean(1, keepdims=True)
    pstd = 3 * y.std(ddof=1)
    np.testing.assert_allclose(notes, (np.clip(y, -pstd, pstd) / pstd + 1) * 0.4 + 0.1, atol=1e-12)
    # a full-rank PCA inverts exactly; a truncated one projects
    t = load_transform(tmp_path / "pca")
    assert t.inverse(pca).shape == x.shape


def test_statistics_do_not_depend_on_blocking(sharded):
    x, _ = sharded
    sums = [reduce_sums(unit_sums(x[i : i + b], "cov", x.mean(0)) for i in range(0, len(x), b)) for b in (7, 500, 3000)]
    for s in sums[1:]:
        np.testing.assert_allclose(s["outer"], sums[0]["outer"], rtol=1e-12)
    # and the same blocking gives bit-identical sums (the reduction is a fixed left fold)
    again = local_sums_fn(lambda: (x[i : i + 500] for i in range(0, len(x), 500)))("cov", x.mean(0), Transform())
    np.testing.assert_array_equal(again["outer"], sums[1]["outer"])


def test_transform_composes_with_the_input_transform(tmp_path):
    """transform IN OUT keeps IN's saved steps first, so the saved transform still maps raw rows."""
    raw = prep.build_patches(tmp_path / "raw", count=2000, normalize=None, options=prep.WriterOptions(dtype="float64"))
    notes = prep.build_patches(tmp_path / "notes", count=2000, options=prep.WriterOptions(dtype="float64"))
    zca = prep.transform_dataset(notes.path, tmp_path / "zca", [StepSpec("zca", 0.1)])
    t = load_transform(zca.path)
    assert [s.spec.kind for s in t.steps] == ["notes", "zca"]
    np.testing.assert_allclose(t.apply(read_all(raw.path)), read_all(zca.path), atol=1e-10)
    # inverse goes back through the dataset-wide part only: mean-free (clipped) patches in raw units
    back = t.inverse(read_all(zca.path))
    x = read_all(raw.path)
    pstd = t.steps[0].tensors["pstd"]
    np.testing.assert_allclose(back, np.clip(x - x.mean(1, keepdims=True), -pstd, pstd), atol=1e-9)


def test_saved_transform_is_safetensors_not_pickle(tmp_path):
    from safetensors.numpy import load_file

    ds = prep.build_digits(tmp_path / "d", preprocessing=[StepSpec("standardize"), StepSpec("pca", 0.1, 10)])
    tensors = load_file(str(ds.path / TRANSFORM_FILE))
    assert set(tensors) == {"step0.mean", "step0.std", "step1.mean", "step1.eigvals", "step1.eigvecs"}
    meta = json.loads((ds.path / "dataset.json").read_text())
    assert [s["kind"] for s in meta["transform"]["steps"]] == ["standardize", "pca"]
    assert ds.dim == 10 and load_transform(ds.path).apply(np.zeros((3, 8, 8)).reshape(3, 64)).shape == (3, 10)
    assert load_transform(prep.build_digits(tmp_path / "plain").path) is None


def test_bad_requests(sharded, tmp_path):
    _, ds = sharded
    with pytest.raises(DataError, match="PCA or ZCA"):
        prep.transform_dataset(ds.path, tmp_path / "o", [StepSpec("pca"), StepSpec("zca")])
    np.save(tmp_path / "flat.npy", np.ones((50, 4)))
    with pytest.raises(DataError, match="singular"):
        prep.build_from_npy(tmp_path / "flat.npy", tmp_path / "f", preprocessing=[StepSpec("zca", 0.0)])
    assert not (tmp_path / "f").exists() and not (tmp_path / "f.partial").exists()
    with pytest.raises(DataError, match="unknown preprocessing"):
        StepSpec("whatever")


def test_cli_transform(sharded, tmp_path, capsys):
    from dist_sae.commands.main import main

    _, ds = sharded
    assert main(["data", "transform", str(ds.path), str(tmp_path / "z"), "--zca", "--epsilon", "0.01", "-q"]) == 0
    assert "zca" in capsys.readouterr().out
    assert [s.spec.kind for s in load_transform(tmp_path / "z").steps] == ["zca"]


def test_pca_keeps_k_components_of_mean_free_rows_without_epsilon(tmp_path):
    """Notes-normalised rows are mean-free, so the covariance has a zero eigenvalue; PCA that keeps
    only the leading components never divides by it and must not call the covariance singular."""
    from dist_sae.data.build import build_from_npy
    from dist_sae.data.transforms import StepSpec

    x = np.random.default_rng(0).normal(size=(300, 6)) * np.array([3.0, 2.0, 1.5, 1.0, 0.5, 0.2])
    x -= x.mean(axis=1, keepdims=True)  # every row sums to 0: one zero eigenvalue
    np.save(tmp_path / "x.npy", x)
    ds = build_from_npy(tmp_path / "x.npy", tmp_path / "p", preprocessing=[StepSpec("pca", components=3)])
    assert ds.dim == 3
    with pytest.raises(DataError, match="singular"):
        build_from_npy(tmp_path / "x.npy", tmp_path / "z", preprocessing=[StepSpec("zca")])


def test_whitening_on_fewer_rows_than_dimensions_warns_with_the_numbers(tmp_path, caplog):
    """15 rows of 32 features: ZCA (and PCA keeping more than 14 components) is set by ε, not data."""
    from dist_sae.data.build import build_from_npy

    np.save(tmp_path / "x.npy", np.random.default_rng(1).normal(size=(15, 32)))
    with caplog.at_level("WARNING", logger="dist_sae.data.transforms"):
        build_from_npy(tmp_path / "x.npy", tmp_path / "z", preprocessing=[StepSpec("zca", 0.1)])
    text = caplog.text
    assert "zca whitening fitted on 15 rows of 32 dimensions" in text and "rank <= 14" in text
    assert "at least 33" in text and "--pca 14" in text and "--epsilon" in text
    caplog.clear()
    with caplog.at_level("WARNING", logger="dist_sae.data.transforms"):
        build_from_npy(tmp_path / "x.npy", tmp_path / "p", preprocessing=[StepSpec("pca", 0.1, 10)])
    assert caplog.text == ""  # 10 components from rank 14: determined by the data
