"""The CLI as a user runs it: train, evaluate (--json, --grad-out), gradcheck, config, clear errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from dist_sae.api import evaluate
from dist_sae.commands.main import main

from util import make_dataset, random_rows


@pytest.fixture
def data(tmp_path):
    make_dataset(tmp_path / "d", random_rows(90, 6, seed=3), shard_rows=40)
    return str(tmp_path / "d")


def test_train_then_evaluate_json_and_gradient_export(tmp_path, data, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--local", "--quiet", "--data", data, "--out", out, "model.hidden=[4]", "optim.steps=5", "run.report=false"]) == 0
    assert "model:" in capsys.readouterr().out
    grad_file = str(tmp_path / "g.safetensors")
    assert main(["evaluate", "--local", "--model", out, "--data", data, "--json", "--grad-out", grad_file]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 90 and result["J"] > 0
    assert result["J"] == pytest.approx(result["reconstruction"] + result["weight_decay"] + result["sparsity"], rel=1e-12)
    grads = load_file(grad_file)
    assert sorted(grads) == ["W1", "W2", "b1", "b2"] and grads["W1"].shape == (4, 6)
    ev, _ = evaluate(out, data, ["workers.engine=local"])
    np.testing.assert_array_equal(np.concatenate([grads[k].ravel() for k in ("W1", "b1", "W2", "b2")]), ev.grad)


def test_evaluate_overrides_hyperparameters(tmp_path, data, capsys):
    out = str(tmp_path / "run")
    main(["train", "--local", "--quiet", "--data", data, "--out", out, "model.hidden=[4]", "optim.steps=2", "run.report=false"])
    capsys.readouterr()
    main(["evaluate", "--local", "--model", out, "--data", data, "--json"])
    base = json.loads(capsys.readouterr().out)
    main(["evaluate", "--local", "--model", out, "--data", data, "--json", "sparsity.beta=0"])
    assert json.loads(capsys.readouterr().out)["sparsity"] == 0 < base["sparsity"]


def test_gradcheck_prints_relative_error(data, capsys):
    """By default a seeded sample of 100 coordinates; --all checks every one (6-3-6: 45 parameters)."""
    assert main(["gradcheck", "--data", data, "model.hidden=[10]"]) == 0
    line = capsys.readouterr().out
    assert "‖num−ana‖/‖num+ana‖" in line and float(line.split("= ")[1].split()[0]) < 1e-9
    assert "over 100 of 136 parameters" in line
    assert main(["gradcheck", "--data", data, "--all", "model.hidden=[3]"]) == 0
    assert "over 45 of 45 parameters" in capsys.readouterr().out


def test_overrides_are_accepted_after_options(tmp_path, data, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "model.hidden=[4]", "--data", data, "--out", out, "--local", "--quiet", "optim.steps=3", "run.report=false"]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["hidden"] == [4]
    assert main(["train", "--data", data, "--out", out, "--local", "not-an-override"]) == 2
    assert "override 'not-an-override' is not key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--data", data, "--out", out, "--local", "a.b=1", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_version_is_printed_and_recorded_in_runs_and_checkpoints(tmp_path, data, capsys):
    import dist_sae
    from dist_sae.train.checkpoint import latest_checkpoint

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"dist-sae {dist_sae.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", dist_sae.__version__)  # semantic versioning
    out = tmp_path / "run"
    main(["train", "--local", "--quiet", "--data", data, "--out", str(out), "model.hidden=[4]", "optim.steps=2", "run.report=false"])
    summary = json.loads((out / "run.json").read_text())
    assert summary["version"] == dist_sae.__version__ and summary["package"] == str(Path(dist_sae.__file__).resolve().parent)
    assert latest_checkpoint(out)[1]["version"] == dist_sae.__version__
    capsys.readouterr()
    assert main(["train", "--local", "--quiet", "--resume", str(out), "optim.steps=3"]) == 0
    assert f"resumed from step 2 (checkpoint written by dist_sae {dist_sae.__version__})" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["resumed_from"] == {"step": 2, "version": dist_sae.__version__}


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--local", "--data", "/no/such/dir", "--out", "R"], "data folder /no/such/dir does not exist"),
        (["train", "--local", "--data", "D", "--out", "R", "sparsity.rho=2"], "sparsity.rho must be in (0, 1)"),
        (["train", "--local", "--data", "D", "--out", "R", "sparsity.betta=2"], "unknown config key 'sparsity.betta'"),
        (["evaluate", "--model", "/no/model", "--data", "D"], "no model at /no/model"),
    ],
)
def test_user_errors_are_one_clear_line(tmp_path, monkeypatch, capsys, data, argv, needle):
    monkeypatch.chdir(tmp_path)
    argv = [data if a == "D" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.startswith("error: ")


def test_config_command_prints_resolved_tree(capsys):
    assert main(["config", "model.hidden=[300, 30]", "sparsity.layers=[1,2]"]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert tree["model"]["hidden"] == [300, 30] and tree["sparsity"]["layers"] == [1, 2]


def test_parsing_a_command_line_imports_neither_torch_nor_ray():
    # What lets `dist-sae train` start Ray while torch is imported (cluster/runtime.connect_while),
    # and keeps `dist-sae --help` quick: the command modules import the API only when they run.
    code = ("import sys; from dist_sae.commands.main import build_parser, parse; "
            "parse(build_parser(), ['train', '--data', 'd', '--out', 'o', 'optim.steps=3']); "
            "print(sorted(m for m in ('torch', 'ray', 'h5py') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
