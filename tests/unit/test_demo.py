"""The demo at a reduced size: data from prep, training, the report; its folder rules; one tiny run on Ray."""

from __future__ import annotations

import json

import pytest

from dist_sae.apps import demo
from dist_sae.commands.main import main
from dist_sae.data.dataset import Dataset
from dist_sae.errors import CheckpointError
from dist_sae.report.report import read_metrics

from util import check_report_links


def test_reduced_demo_learns_sparse_features_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--local", "--quiet", "--out", str(out), "--patches", "1500", "--steps", "40"]) == 0
    lines = capsys.readouterr().out.splitlines()
    weights = out / "run" / "report" / "weights.png"
    assert lines[-1] == f"weights: {weights}"  # the last line says where the weight grid is
    rows = read_metrics(out / "run" / "metrics.jsonl")
    first, last = rows[0], rows[-1]
    assert last["step"] == 40 and last["J"] < 0.1 * first["J"]  # J falls
    # Mean activation approaches ρ = 0.01 from the initial ~0.5.
    assert first["rho_hat1_mean"] > 0.3 and abs(last["rho_hat1_mean"] - 0.01) < 0.005
    assert last["rho_hat_mode"] == "exact" and last["rho_hat_staleness"] == 0
    assert weights.is_file()
    assert "weights.png" in check_report_links(out / "run" / "report" / "report.html")
    ds = Dataset.open(out / "data")
    assert ds.rows == 1500 and ds.sample_shape == [8, 8]
    marker = json.loads((out / demo.MARKER).read_text())
    assert marker["status"] == "done" and marker["engine"] == "local"

    # Re-running into its own folder replaces the previous demo.
    assert main(["demo", "--local", "--quiet", "--out", str(out), "--digits", "--steps", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"weights: {weights}"
    assert Dataset.open(out / "data").rows == 1797 and read_metrics(out / "run" / "metrics.jsonl")[-1]["step"] == 3


def test_demo_folder_rules(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="holds no previous demo"):
        demo.prepare_demo_dir(other, overwrite=False)
    (other / "run").mkdir()
    demo.prepare_demo_dir(other, overwrite=True)  # replaces only what a demo writes
    assert (other / "notes.txt").read_text() == "keep me" and not (other / "run").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="is a file"):
        demo.prepare_demo_dir(tmp_path / "file", overwrite=True)
    previous = tmp_path / "old"
    (previous / "run").mkdir(parents=True)
    (previous / demo.MARKER).write_text("{}")
    demo.prepare_demo_dir(previous, overwrite=False)
    assert list(previous.iterdir()) == []


def test_cli_refuses_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("")
    assert main(["demo", "--local", "--quiet", "--out", str(tmp_path), "--steps", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
