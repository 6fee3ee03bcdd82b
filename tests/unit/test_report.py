"""Pictures and the report page: the notes' weight visualisation, layouts, links, metrics, TensorBoard."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from dist_sae.report import report, viz
from dist_sae.train.rundir import METRICS_FILE
from dist_sae.api import train
from dist_sae.commands.main import main
from dist_sae.errors import ConfigError
from dist_sae.sae.model import load_model

from util import check_report_links, config, make_dataset, smooth_patches


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    x = smooth_patches(600, seed=1)
    make_dataset(root / "data", x, shard_rows=250, sample_shape=[8, 8])
    cfg = config(root / "data", model__hidden=[9], optim__steps=25, run__out=str(root / "run"), run__report=True)
    train(cfg)
    return root / "run", x


# ---- viz ------------------------------------------------------------------------------------


def test_max_activating_inputs_are_unit_norm_rows_of_w1():
    w1 = np.random.default_rng(0).normal(size=(5, 12))
    x = viz.max_activating_inputs(w1)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0)
    np.testing.assert_allclose(x * np.linalg.norm(w1, axis=1, keepdims=True), w1)
    # The maximally activating norm-1 input: no other unit vector gives a larger W1[i]·x.
    probes = np.random.default_rng(1).normal(size=(1000, 12))
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    assert (probes @ w1[0] <= x[0] @ w1[0] + 1e-12).all()


@pytest.mark.parametrize(
    "shape, dim, expected",
    [
        ([8, 8], 64, (8, 8, 1, True)),
        ([28, 28, 1], 784, (28, 28, 1, True)),
        ([4, 4, 3], 48, (4, 4, 3, True)),
        ([10], 10, (3, 4, 1, False)),
        ([2, 3, 4], 24, (5, 5, 1, False)),
    ],
)
def test_sample_layouts(shape, dim, expected):
    layout = viz.sample_layout(shape, dim)
    assert tuple(layout[:4]) == expected
    assert bool(layout.note) == (not expected[3])


def test_weight_grid_tiles_one_square_per_unit_grayscale_and_rgb(tmp_path):
    w1 = np.random.default_rng(0).normal(size=(25, 64))
    grid = viz.weight_grid(w1, viz.sample_layout([8, 8], 64))
    assert grid.shape == (5 * 9 + 1, 5 * 9 + 1, 1)  # 5×5 tiles of 8×8 with 1-pixel borders
    tile = grid[1:9, 10:18, 0]  # unit 1 (row 0, column 1)
    expected = viz.contrast_tiles(viz.to_tiles(viz.max_activating_inputs(w1[1:2]), viz.sample_layout([8, 8], 64)))[0, :, :, 0]
    np.testing.assert_allclose(tile, expected)
    rgb = viz.weight_grid(w1[:, :48], viz.sample_layout([4, 4, 3], 48))
    assert rgb.shape[2] == 3
    path = viz.save_png(rgb, tmp_path / "rgb.png")
    with Image.open(path) as img:
        assert img.mode == "RGB" and min(img.size) >= 320


# ---- the report of a run --------------------------------------------------------------------


def test_training_writes_a_report_whose_links_resolve(trained_run):
    run_dir, x = trained_run
    page = run_dir / report.REPORT_DIR / report.REPORT_PAGE
    images = check_report_links(page)
    assert {"weights.png", "reconstructions.png", "curves.png", "rho_hat.png"} <= set(images)
    with Image.open(page.parent / "weights.png") as img:
        assert img.mode == "L"  # grayscale 8×8 patches


def test_report_rho_hat_is_the_exact_mean_activation(trained_run):
    run_dir, x = trained_run
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    model, _ = load_model(run_dir)
    means = model.encode(x, layer=1).mean(axis=0)  # independent reference: all rows at once
    (layer,) = summary["layers"]
    assert layer["units"] == 9 and layer["rho"] == 0.01
    assert layer["mean"] == pytest.approx(means.mean(), rel=1e-12)
    assert layer["min"] == pytest.approx(means.min(), rel=1e-12)
    assert layer["dead"] == int((means < 0.001).sum())
    assert summary["rho_hat_mode"] == "exact" and summary["J_final"] < summary["J_first"]


def test_metrics_lines_carry_every_monitored_value(trained_run):
    run_dir, _ = trained_run
    rows = report.read_metrics(run_dir / METRICS_FILE)
    assert [r["step"] for r in rows] == list(range(1, 26))
    keys = {
        "J", "J_reconstruction", "J_weight_decay", "J_sparsity", "rho_hat1_mean", "rho_hat1_min", "rho_hat1_max",
        "dead1", "saturated1", "fvu", "examples_per_s", "io_s", "compute_s", "workers", "rho_hat_mode", "rho_hat_staleness",
    }
    assert keys <= set(rows[-1]), keys - set(rows[-1])
    assert rows[-1]["workers"] == 1 and rows[-1]["io_s"] >= 0 and rows[-1]["compute_s"] > 0


def test_reconstructions_are_shown_through_the_inverse_transform(trained_run, monkeypatch, tmp_path):
    run_dir, x = trained_run
    shown = {}

    class Shift:  # a stand-in for the dataset's saved transform
        def inverse(self, y):
            return np.asarray(y) * 10.0 - 3.0

    def capture(originals, outputs, layout, path, **kw):
        shown["x"], shown["x_hat"] = originals, outputs
        return viz.save_png(np.zeros((4, 4, 1)), path)

    monkeypatch.setattr(report, "load_transform", lambda path: Shift())
    monkeypatch.setattr(viz, "save_reconstructions", capture)
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    rep = report.write_report(copy, samples=5, exact_rho=False)
    rows = rep.summary["sample_rows"]
    np.testing.assert_allclose(shown["x"], x[rows] * 10.0 - 3.0)
    model, _ = load_model(run_dir)
    np.testing.assert_allclose(shown["x_hat"], model.reconstruct(x[rows]) * 10.0 - 3.0)
    assert rep.summary["rho_hat_source"].startswith("last line of metrics.jsonl")
    assert "rho_hat" not in rep.images  # no pass: no histogram


def test_report_without_data_still_draws_weights_and_curves(trained_run, tmp_path, capsys):
    run_dir, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("report"))
    assert main(["report", str(copy), "--data", str(tmp_path / "gone")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any("dataset unavailable" in line for line in out)
    assert out[-1] == f"weights: {copy / 'report' / 'weights.png'}"
    images = check_report_links(copy / "report" / "report.html")
    assert "weights.png" in images and "curves.png" in images and "reconstructions.png" not in images


def test_report_of_stacked_model_shows_its_first_layer(tmp_path):
    x = smooth_patches(200, seed=2)
    make_dataset(tmp_path / "d", x, shard_rows=200, sample_shape=[8, 8])
    cfg = config(tmp_path / "d", model__hidden=[16, 4], sparsity__layers=[1, 2], optim__steps=3, run__out=str(tmp_path / "run"))
    train(cfg)
    rep = report.write_report(tmp_path / "run", local=True)
    with Image.open(rep.images["weights"]) as img:
        assert img.size == (333, 333)  # W1's 16 units: 4×4 tiles of 8×8 + borders = 37 px, enlarged 9×
    assert [layer["units"] for layer in rep.summary["layers"]] == [16, 4]
    check_report_links(rep.page)


def test_tensorboard_without_the_package_is_a_clear_config_error(tmp_path):
    try:
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    make_dataset(tmp_path / "d", smooth_patches(50), shard_rows=50)
    cfg = config(tmp_path / "d", model__hidden=[3], optim__steps=1, run__out=str(tmp_path / "run"), run__tensorboard=True)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-headless-shell")), reason="no headless Chromium")
def test_report_renders_in_headless_chromium(trained_run, tmp_path):
    run_dir, _ = trained_run
    page = run_dir / "report" / "report.html"
    browser = shutil.which("chromium-headless-shell") or shutil.which("chromium")
    shot = tmp_path / "page.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,2400", "--virtual-time-budget=3000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60)
    assert "Sparse autoencoder report" in dom.stdout and dom.stdout.count("<img") == 4
    subprocess.run([browser, *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=60, check=True)
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("L"), dtype=float)
    assert pixels.std() > 10  # not a blank page: text and pictures drew


def test_pass_progress_bars_are_off_when_quiet_or_not_a_terminal(monkeypatch):
    import io
    import sys

    from dist_sae import progress

    assert progress.pass_bars(quiet=True) is None
    assert progress.pass_bars(quiet=False) is None  # pytest's stderr is not a terminal
    assert progress.bar(10, "x").disable

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress.pass_bars(quiet=True) is None
    factory = progress.pass_bars(quiet=False)
    bar = factory("pass1", 1000)
    assert not bar.disable and bar.total == 1000 and bar.desc == "pass1"
    bar.close()
