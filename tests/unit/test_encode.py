"""Using the features: encode/reconstruct a dataset into a new shard set; dist_sae.load's encode/decode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import dist_sae
from dist_sae.api import train
from dist_sae.commands.main import main
from dist_sae.apps.encode import encode_dataset, reconstruct_dataset
from dist_sae.errors import DataError, ModelError

from util import config, make_dataset, random_rows, read_all


@pytest.fixture(scope="module")
def stacked_run(tmp_path_factory):
    """A 10-6-3-6-10 model and a dataset of 3 shards cut into several work units."""
    root = tmp_path_factory.mktemp("encode")
    x = random_rows(250, 10, seed=4)
    make_dataset(root / "data", x, shard_rows=100, chunk_rows=16)
    cfg = config(root / "data", model__hidden=[6, 3], sparsity__layers=[1, 2], optim__steps=8, data__block_rows=32, run__out=str(root / "run"))
    train(cfg)
    return root, x


@pytest.mark.parametrize("layer", [None, 1])
def test_encode_equals_loaded_model_encode_on_the_same_rows(stacked_run, tmp_path, layer):
    root, x = stacked_run
    result = encode_dataset(root / "run", root / "data", tmp_path / "codes", layer=layer, local=True, overrides=["data.block_rows=32"])
    codes = read_all(tmp_path / "codes")
    model = dist_sae.load(root / "run")
    # Same rows, same float64 maths; only BLAS blocking (32-row units vs all rows at once) may move the last bit.
    np.testing.assert_allclose(codes, model.encode(x, layer=layer), rtol=1e-13, atol=0)
    ds = result.dataset
    assert ds.dim == (3 if layer is None else 6) and ds.sample_shape == [ds.dim]
    assert [s.rows for s in ds.shards] == [100, 100, 50]  # the input's shard layout
    assert ds.meta["source"]["kind"] == "encode" and ds.meta["source"]["layer"] == (layer or 2)


def test_reconstruct_equals_loaded_model_reconstruct(stacked_run, tmp_path):
    root, x = stacked_run
    reconstruct_dataset(root / "run", root / "data", tmp_path / "recon", local=True, dtype="float32")
    out = read_all(tmp_path / "recon")
    assert out.dtype == np.float32
    expected = dist_sae.load(root / "run").reconstruct(x)
    np.testing.assert_allclose(out, expected.astype(np.float32), rtol=1e-6, atol=0)


def test_cli_encode_then_train_on_the_codes(stacked_run, tmp_path, capsys):
    root, x = stacked_run
    out = tmp_path / "codes"
    assert main(["encode", "--local", "--quiet", "--model", str(root / "run"), "--data", str(root / "data"), "--out", str(out), "--layer", "1"]) == 0
    assert "wrote 250 rows of 6 features in 3 shard(s)" in capsys.readouterr().out
    assert main(["encode", "--local", "--model", str(root / "run"), "--data", str(root / "data"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    # The codes are an ordinary dataset: the next layer of a stack trains on them.
    cfg = config(out, model__hidden=[2], optim__steps=2, run__out=str(tmp_path / "run2"))
    assert train(cfg).steps == 2


def test_encode_errors_name_the_problem(stacked_run, tmp_path):
    root, _ = stacked_run
    make_dataset(tmp_path / "wide", random_rows(20, 7), shard_rows=20)
    with pytest.raises(DataError, match="the model takes 10 inputs .* has rows of 7 features"):
        encode_dataset(root / "run", tmp_path / "wide", tmp_path / "o", local=True)
    with pytest.raises(ModelError, match="--layer 3 is out of range"):
        encode_dataset(root / "run", root / "data", tmp_path / "o", layer=3, local=True)
    with pytest.raises(ModelError, match="no model at"):
        encode_dataset(tmp_path / "nothing", root / "data", tmp_path / "o", local=True)
    assert not (tmp_path / "o").exists()


def test_load_returns_module_with_config_and_numpy_or_torch_encode_decode(stacked_run):
    root, x = stacked_run
    model = dist_sae.load(root / "run")
    assert isinstance(model, torch.nn.Module) and model.config.model.hidden == [6, 3] and not model.training
    codes = model.encode(x)
    assert isinstance(codes, np.ndarray) and codes.shape == (250, 3)
    x_hat = model.decode(codes)
    assert isinstance(x_hat, np.ndarray)
    np.testing.assert_allclose(x_hat, model.reconstruct(x), rtol=1e-12, atol=1e-12)
    t = torch.from_numpy(x)
    torch.testing.assert_close(model.decode(model.encode(t)), torch.from_numpy(x_hat))
    saved = json.loads((root / "run" / "config.json").read_text())
    assert saved["model"]["hidden"] == [6, 3]


def test_raw_data_gets_the_training_transform_and_reconstructions_keep_it(tmp_path):
    from dist_sae.data import build as prep
    from dist_sae.data.transforms import load_transform

    trained_on = prep.build_patches(tmp_path / "notes", count=300, seed=5, options=prep.WriterOptions(quiet=True))  # normalised, transform saved
    raw = prep.build_patches(tmp_path / "raw", count=300, seed=5, normalize=None, options=prep.WriterOptions(quiet=True))  # same patches, no transform
    cfg = config(trained_on.path, model__hidden=[5], optim__steps=4, run__out=str(tmp_path / "run"))
    train(cfg)
    transform = load_transform(trained_on.path)
    model = dist_sae.load(tmp_path / "run")
    encode_dataset(tmp_path / "run", raw.path, tmp_path / "codes", local=True)
    np.testing.assert_allclose(read_all(tmp_path / "codes"), model.encode(transform.apply(read_all(raw.path))), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(read_all(tmp_path / "codes"), model.encode(read_all(trained_on.path)), rtol=1e-5, atol=1e-6)
    out = reconstruct_dataset(tmp_path / "run", trained_on.path, tmp_path / "recon", local=True).dataset
    assert out.sample_shape == [8, 8] and load_transform(out.path) is not None  # invertible like its input
