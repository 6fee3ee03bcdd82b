"""`dist-sae compare`: same data and seed, a table and a figure."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from dist_sae.commands.main import main
from dist_sae.errors import ConfigError
from dist_sae.apps.compare import compare

from util import make_dataset, smooth_patches


@pytest.fixture(scope="module")
def patches(tmp_path_factory):
    path = tmp_path_factory.mktemp("cmp") / "d"
    make_dataset(path, smooth_patches(400, seed=2), shard_rows=150, sample_shape=[8, 8])
    return path


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_compare_kl_topk_plain(tmp_path, patches, capsys):
    common = "model:\n  hidden: [16]\n"
    kl = _write(tmp_path / "kl.yaml", common + "sparsity:\n  kind: kl\n  rho: 0.05\n")
    topk = _write(tmp_path / "topk.yaml", common + "  activation: linear\n  output: linear\nsparsity:\n  kind: topk\n  k: 3\n")
    plain = _write(tmp_path / "plain.yaml", common + "sparsity:\n  kind: none\n")
    assert main(["compare", kl, topk, plain, "--data", str(patches), "--out", str(tmp_path / "cmp"), "--local",
                 "--set", "optim.steps=15"]) == 0
    printed = capsys.readouterr().out
    assert "| kl |" in printed and "figure:" in printed
    runs = {r["name"]: r for r in json.loads((tmp_path / "cmp" / "compare.json").read_text())["runs"]}
    assert runs["topk"]["l0"] == [3.0]  # exactly k active per example
    assert runs["kl"]["mean_activation"][0] < runs["plain"]["mean_activation"][0]
    assert all(r["steps"] <= 15 and r["wall_s"] > 0 and 0 < r["fvu"] for r in runs.values())
    with Image.open(tmp_path / "cmp" / "compare.png") as image:
        assert image.size[0] > 400


def test_compare_rejects_different_seeds_before_training(tmp_path, patches):
    a = _write(tmp_path / "a.yaml", "run:\n  seed: 1\n")
    b = _write(tmp_path / "b.yaml", "run:\n  seed: 2\n")
    with pytest.raises(ConfigError, match="same seed"):
        compare([a, b], patches, tmp_path / "out", ["workers.engine=local"])
    assert not (tmp_path / "out" / "a").exists()


def test_compare_with_a_missing_config_exits_2_and_creates_nothing(tmp_path, patches, capsys):
    a = _write(tmp_path / "a.yaml", "model:\n  hidden: [4]\n")
    out = tmp_path / "out"
    assert main(["compare", a, str(tmp_path / "missing.yaml"), "--data", str(patches), "--out", str(out), "--local"]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
    assert not out.exists()
    assert main(["compare", a, a, "--names", "x,y", "--data", str(tmp_path / "no-data"), "--out", str(out), "--local"]) == 2
    assert not out.exists()
