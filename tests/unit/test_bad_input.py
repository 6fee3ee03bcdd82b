"""Bad input and bad numbers: one clear line, a non-zero exit, no traceback, nothing overwritten.

Each case runs the real CLI (`dist_sae.commands.main.main`) in this process and checks the message names
the file, field or value, and that an existing run and its checkpoints are byte-for-byte intact.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dist_sae.train import checkpoint
from dist_sae.commands.main import main
from dist_sae.errors import DataError

from util import make_dataset, random_rows

COMMON = ["--local", "--quiet", "model.hidden=[3]", "run.report=false", "run.checkpoint_every=2", "optim.tolerance_change=0"]


def files(folder: Path) -> dict[str, bytes]:
    """Every file under a folder, by relative path: to show nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(capsys, *args: str, match: str) -> str:
    """Run the CLI, expect exit 2 and one `error:` line containing `match`; return it."""
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert err.startswith("error: ") and "\n" not in err, err
    assert match in err, err
    return err


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A dataset and a finished 4-step run on it (checkpoints at steps 2 and 4)."""
    root = tmp_path_factory.mktemp("bad_input")
    make_dataset(root / "d", random_rows(60, 4, seed=1), shard_rows=20)
    assert main(["train", "--data", str(root / "d"), "--out", str(root / "run"), *COMMON, "optim.steps=4"]) == 0
    return root


@pytest.fixture
def run(good):
    """The good run and a snapshot of its files, checked unchanged after the test."""
    before = files(good / "run")
    yield good / "run"
    assert files(good / "run") == before


def _copy_data(good: Path, tmp_path: Path) -> Path:
    shutil.copytree(good / "d", tmp_path / "d")
    return tmp_path / "d"


def test_missing_shard(good, run, tmp_path, capsys):
    data = _copy_data(good, tmp_path)
    (data / "shard-00001.h5").unlink()
    fails(capsys, "train", "--data", str(data), "--out", str(tmp_path / "new"), *COMMON, match=f"shard {data / 'shard-00001.h5'} listed")
    fails(capsys, "train", "--data", str(data), "--out", str(run), "--overwrite", *COMMON, match="is missing")
    assert not (tmp_path / "new").exists()


def test_corrupt_shard(good, run, tmp_path, capsys):
    data = _copy_data(good, tmp_path)
    (data / "shard-00002.h5").write_bytes(b"not an HDF5 file" * 100)
    fails(capsys, "train", "--data", str(data), "--out", str(tmp_path / "new"), *COMMON,
          match=f"shard {data / 'shard-00002.h5'} cannot be read as HDF5")
    fails(capsys, "train", "--resume", str(run), "--data", str(data), "optim.steps=6", match="rebuild or remove it")
    assert not (tmp_path / "new").exists()


def test_init_weights_of_the_wrong_shape(good, run, tmp_path, capsys):
    init = tmp_path / "init.safetensors"
    save_file({"W1": torch.zeros(3, 5), "b1": torch.zeros(3), "W2": torch.zeros(5, 3), "b2": torch.zeros(5)}, str(init))
    fails(capsys, "train", "--data", str(good / "d"), "--out", str(run), "--overwrite", "--init", str(init), *COMMON,
          match=f"{init}: tensor W1 has shape (3, 5), the model needs (3, 4)")


def test_resumed_run_on_data_of_another_dimension(good, run, tmp_path, capsys):
    make_dataset(tmp_path / "wide", random_rows(30, 7, seed=2), shard_rows=30)
    fails(capsys, "train", "--resume", str(run), "--data", str(tmp_path / "wide"), "optim.steps=6",
          match="the model takes 4 inputs")


def test_resumed_run_on_other_data_of_the_same_dimension(good, run, tmp_path, capsys):
    make_dataset(tmp_path / "other", random_rows(60, 4, seed=9), shard_rows=20)
    err = fails(capsys, "train", "--resume", str(run), "--data", str(tmp_path / "other"), "optim.steps=6",
                match="dataset fingerprint")
    assert "--allow-change" in err


def test_non_finite_data(good, tmp_path, capsys):
    x = random_rows(60, 4, seed=1)
    x[33, 1] = np.inf
    make_dataset(tmp_path / "nan", x, shard_rows=20)
    err = fails(capsys, "train", "--data", str(tmp_path / "nan"), "--out", str(tmp_path / "r"), *COMMON,
                match=f"shard {tmp_path / 'nan' / 'shard-00001.h5'}: non-finite values (NaN/Inf) in rows 13..13")
    assert "before training" in err and not (tmp_path / "r").exists()  # found at the shard's edge, before the run dir
    # The failed run made no step: once the data is fixed, the same folder takes a new run.
    assert main(["train", "--data", str(good / "d"), "--out", str(tmp_path / "r"), *COMMON, "optim.steps=2"]) == 0


@pytest.mark.parametrize(("override", "message"), [
    ("sparsity.rho=2", "invalid config: sparsity: sparsity.rho must be in (0, 1), got 2"),
    ("optim.steps=-1", "optim.steps: Input should be greater than or equal to 0"),
    ("sparsity.bta=3", "unknown config key 'sparsity.bta'"),
    ("model.activation=relu", "use sparsity.kind=l1 or sparsity.kind=topk"),
])
def test_invalid_config(good, run, capsys, override, message):
    fails(capsys, "train", "--data", str(good / "d"), "--out", str(run), "--overwrite", *COMMON, override, match=message)


def test_run_dir_that_holds_another_run(good, run, capsys):
    fails(capsys, "train", "--data", str(good / "d"), "--out", str(run), *COMMON,
          match=f"{run} already holds a run; pass --resume to continue it or --overwrite to replace it")


def test_resume_of_a_folder_without_a_run(tmp_path, capsys):
    fails(capsys, "train", "--resume", str(tmp_path / "nothing"), match="holds no run to resume")
    fails(capsys, "train", "--resume", match="--resume needs the run directory")


def test_disk_full_while_checkpointing(good, tmp_path, capsys, monkeypatch):
    shutil.copytree(good / "run", tmp_path / "run")
    checkpoints = files(tmp_path / "run" / "checkpoints")
    model = (tmp_path / "run" / "model.safetensors").read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save", full)
    err = fails(capsys, "train", "--resume", str(tmp_path / "run"), "optim.steps=8",
                match=f"cannot write checkpoint {tmp_path / 'run' / 'checkpoints' / 'step-00000006'} (OSError: No space left on device)")
    assert f"the previous checkpoint {tmp_path / 'run' / 'checkpoints' / 'step-00000004'} is kept" in err
    assert files(tmp_path / "run" / "checkpoints") == checkpoints
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == model


def test_disk_full_while_writing_the_model(good, tmp_path, capsys, monkeypatch):
    import dist_sae.sae.model

    shutil.copytree(good / "run", tmp_path / "run")
    model = (tmp_path / "run" / "model.safetensors").read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dist_sae.sae.model, "save_file", full)
    err = fails(capsys, "train", "--resume", str(tmp_path / "run"), "optim.steps=6",
                match=f"cannot write to {tmp_path / 'run'} (No space left on device)")
    assert f"{tmp_path / 'run' / 'checkpoints' / 'step-00000006'} (step 6) is kept" in err
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == model


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_non_finite_objective_stops_and_keeps_the_last_good_checkpoint(good, tmp_path, capsys):
    out = tmp_path / "r"
    err = fails(capsys, "train", "--data", str(good / "d"), "--out", str(out), *COMMON, "optim.method=gd", "optim.lr=1e300",
                "run.checkpoint_every=1", "optim.steps=5",
                match="J or ∇J became non-finite at step 2")
    assert f"the newest checkpoint {out / 'checkpoints' / 'step-00000001'} (step 1) is kept" in err
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-00000001"]
    assert not (out / "model.safetensors").exists()


def test_a_damaged_or_pickled_checkpoint_is_skipped_never_unpickled(good, tmp_path, capsys, caplog):
    shutil.copytree(good / "run", tmp_path / "run")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"evil": Payload()}, tmp_path / "run" / "checkpoints" / "step-00000004" / "trainer.pt")
    state, _ = checkpoint.latest_checkpoint(tmp_path / "run")
    assert state["meta"]["step"] == 2 and not marker.exists()
    assert "skipping damaged checkpoint" in caplog.text and "step-00000004" in caplog.text


def test_debug_shows_the_traceback(good, tmp_path):
    with pytest.raises(DataError):
        main(["--debug", "train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"), *COMMON])
