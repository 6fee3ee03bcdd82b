"""Never lose a run (no Ray): a refused resume changes nothing, verified checkpoints, a full disk,
one run per folder, a half-made run dir, a model file without config.json.

Each case runs the real CLI (`dist_sae.commands.main.main`, or `python -m dist_sae` where two
processes are needed) and checks the run directory byte for byte (content hashes and mtimes).
SIGTERM and Ray's token are in tests/cluster/test_sigterm.py, `ray job stop` in tests/cluster/test_jobs.py.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from safetensors import SafetensorError

from dist_sae.commands.main import main
from dist_sae.sae.model import load_model
from dist_sae.train import checkpoint
from dist_sae.train.rundir import flock_or_holder, run_lock

from util import make_dataset, random_rows

REPO = Path(__file__).resolve().parents[2]
COMMON = ["--local", "--quiet", "model.hidden=[3]", "run.report=false", "run.checkpoint_every=2", "optim.tolerance_change=0",
          "optim.tolerance_grad=0"]


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """(SHA-256, mtime) of every file and folder under `folder` (itself included)."""
    out = {".": ("dir", folder.stat().st_mtime_ns)}
    for p in sorted(folder.rglob("*")):
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(folder))] = (digest, p.stat().st_mtime_ns)
    return out


def one_error(capsys, args: list[str], *needles: str) -> str:
    """Run the CLI: exit 2, one `error:` line holding every needle."""
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def theta_of(run: Path) -> np.ndarray:
    return load_model(run)[0].theta.detach().numpy()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A dataset, a finished 4-step run on it (checkpoints at steps 2 and 4), and a 6-step run's θ."""
    root = tmp_path_factory.mktemp("safety")
    make_dataset(root / "d", random_rows(60, 4, seed=1), shard_rows=20)
    assert main(["train", "--data", str(root / "d"), "--out", str(root / "run"), *COMMON, "optim.steps=4"]) == 0
    assert main(["train", "--data", str(root / "d"), "--out", str(root / "six"), *COMMON, "optim.steps=6"]) == 0
    return root


def copy_run(good: Path, tmp_path: Path, name: str = "run") -> Path:
    shutil.copytree(good / "run", tmp_path / name)
    return tmp_path / name


# ---- 1, 2: a refused or finished resume touches nothing -----------------------------------------


def test_resume_with_a_changed_shape_is_refused_and_changes_nothing(good, tmp_path, capsys):
    run = copy_run(good, tmp_path)
    before = snapshot(run)
    one_error(capsys, ["train", "--resume", str(run), "--allow-change", "model.hidden=[5]", "optim.steps=6"],
              "model.hidden: [3] -> [5]", "--init", "Start a new run")
    assert snapshot(run) == before
    assert main(["train", "--resume", str(run), "optim.steps=6"]) == 0  # the run is still whole


def test_resume_of_a_finished_run_says_so_and_changes_nothing(good, tmp_path, capsys):
    run = copy_run(good, tmp_path)
    before = snapshot(run)
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "is finished at step 4 (optim.steps=4 reached)" in out and "raise optim.steps" in out and "nan" not in out
    assert snapshot(run) == before


def test_a_resume_whose_first_step_fails_changes_nothing(good, tmp_path, capsys, monkeypatch):
    from dist_sae.errors import DataError
    from dist_sae.train.optim import Trainer

    run = copy_run(good, tmp_path)
    before = snapshot(run)

    def fail(self, theta):
        raise DataError("shard x.h5: rows 0:20 cannot be read")

    monkeypatch.setattr(Trainer, "_evaluate_full", fail)
    one_error(capsys, ["train", "--resume", str(run), "--allow-change", "optim.steps=6", "sparsity.beta=2"], "cannot be read")
    assert snapshot(run) == before  # config.json (beta changed) and metrics.jsonl are rewritten only after a step


# ---- 3: a shard that decodes to NaN ---------------------------------------------------------------


def test_nan_at_a_shard_edge_is_found_before_the_run_dir_is_made(good, tmp_path, capsys):
    shutil.copytree(good / "d", tmp_path / "d")
    with h5py.File(tmp_path / "d" / "shard-00001.h5", "r+") as f:
        f["x"][19, 2] = np.nan
    one_error(capsys, ["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"), *COMMON],
              "shard-00001.h5: non-finite values (NaN/Inf) in rows 19..19")
    assert not (tmp_path / "r" / "config.json").exists()


def test_a_run_dir_half_made_by_a_failed_start_does_not_block_a_rerun(good, tmp_path, capsys):
    data = tmp_path / "d"
    make_dataset(data, random_rows(300, 4, seed=1), shard_rows=300, chunk_rows=20)
    with h5py.File(data / "shard-00000.h5", "r+") as f:
        clean = f["x"][150].copy()
        f["x"][150, 0] = np.nan  # in the middle: only a full read finds it
    args = ["train", "--data", str(data), "--out", str(tmp_path / "r"), *COMMON, "optim.steps=2"]
    one_error(capsys, args, "non-finite values (NaN/Inf) in rows 150..150")
    assert not checkpoint.list_checkpoints(tmp_path / "r")
    with h5py.File(data / "shard-00000.h5", "r+") as f:
        f["x"][150] = clean
    assert main(args) == 0, capsys.readouterr().err  # no --overwrite needed: the folder held no run


# ---- 5: flipped bytes in a checkpoint ---------------------------------------------------------------


def _xor_64_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def _flip_a_mantissa_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-8] ^= 0x01  # the lowest mantissa bit of θ's last float64
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [("trainer.pt", _xor_64_bytes), ("theta.safetensors", _flip_a_mantissa_bit)])
def test_flipped_bytes_are_detected_and_the_older_checkpoint_is_used(good, tmp_path, capsys, caplog, damage):
    name, corrupt = damage
    damaged, reference = copy_run(good, tmp_path, "damaged"), copy_run(good, tmp_path, "reference")
    corrupt(damaged / "checkpoints" / "step-00000004" / name)
    shutil.rmtree(reference / "checkpoints" / "step-00000004")
    assert checkpoint.latest_checkpoint(reference)[0]["meta"]["step"] == 2
    assert main(["train", "--resume", str(damaged), "optim.steps=6"]) == 0
    assert f"skipping damaged checkpoint (using the one before it): checkpoint {damaged / 'checkpoints' / 'step-00000004'}" in caplog.text
    assert f"{name} is damaged: its SHA-256" in caplog.text
    assert main(["train", "--resume", str(reference), "optim.steps=6"]) == 0
    np.testing.assert_array_equal(theta_of(damaged), theta_of(reference))
    np.testing.assert_allclose(theta_of(damaged), theta_of(good / "six"), rtol=1e-10, atol=1e-13)


# ---- 6: the disk fills during a checkpoint ----------------------------------------------------------


def _torch_disk_full(obj, f, *args, **kwargs):
    f.write(b"\0" * 4096)  # a partial file, then torch's own error on a full device
    raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 4032")


def _safetensors_disk_full(*args, **kwargs):
    raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")


def _os_disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("target,full", [("torch.save", _torch_disk_full), ("save", _safetensors_disk_full), ("save", _os_disk_full)])
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_resume_is_exact(good, tmp_path, capsys, monkeypatch,
                                                                                     target, full):
    run = tmp_path / "run"
    real = checkpoint.torch.save if target == "torch.save" else checkpoint.save
    calls = []

    def second_fails(*args, **kwargs):
        calls.append(1)
        return full(*args, **kwargs) if len(calls) == 2 else real(*args, **kwargs)

    monkeypatch.setattr(checkpoint.torch if target == "torch.save" else checkpoint, target.split(".")[-1], second_fails)
    step2 = run / "checkpoints" / "step-00000002"
    one_error(capsys, ["train", "--data", str(good / "d"), "--out", str(run), *COMMON, "optim.steps=6"],
              "cannot write checkpoint", "step-00000004", "the disk is full", f"the previous checkpoint {step2} is kept",
              f"resume with `dist-sae train --resume {run}`")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]  # no .tmp left
    checkpoint.load_checkpoint(step2)  # intact: its SHA-256s verify
    assert not (run / "model.safetensors").exists()
    monkeypatch.undo()  # space freed
    assert main(["train", "--resume", str(run)]) == 0
    np.testing.assert_allclose(theta_of(run), theta_of(good / "six"), rtol=1e-10, atol=1e-13)


# ---- 7: one run per folder --------------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dist_sae", *args]


def test_a_locked_run_dir_is_refused_naming_the_holder(good, tmp_path):
    run = copy_run(good, tmp_path)
    before = snapshot(run)
    with run_lock(run):
        done = subprocess.run(_cli("train", "--resume", str(run), *COMMON, "optim.steps=6"), cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    assert f"is in use by another run (PID {os.getpid()} on host {os.uname().nodename}" in done.stderr
    assert snapshot(run) == before


def test_a_lock_whose_holder_ends_during_the_lookup_is_taken(tmp_path):
    """A holder that /proc/locks no longer lists (its run just ended) is no reason to refuse: the flock
    is tried again and taken. A holder still there is named; one never listed is on another host."""
    import fcntl
    import socket

    path = tmp_path / ".lock"
    path.touch()
    held, mine, other = (os.open(path, os.O_RDONLY) for _ in range(3))
    fcntl.flock(held, fcntl.LOCK_EX)

    def ended(st):  # the holder's run ends while it is looked up: no holder is listed (None)
        os.close(held)

    try:
        assert flock_or_holder(mine, holder=ended, wait_s=0) is None  # taken on the retry
        assert flock_or_holder(other) == f"PID {os.getpid()} on host {socket.gethostname()}"
        assert flock_or_holder(other, holder=lambda st: None, wait_s=0) == "a process on another host"
    finally:
        os.close(mine)
        os.close(other)


def test_two_runs_started_together_into_one_folder_one_runs(good, tmp_path):
    run = tmp_path / "run"
    args = _cli("train", "--data", str(good / "d"), "--out", str(run), *COMMON, "optim.steps=30", "run.log_every=1")
    procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=180), *p.communicate()) for p in procs]
    assert sorted(r[0] for r in results) == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    assert loser[2].count("\n") == 1 and ("is in use by another run (PID" in loser[2] or "already holds a run" in loser[2]), loser
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in lines] == list(range(1, 31))  # each step once


# ---- evaluate a bare model file ----------------------------------------------------------------------


def test_evaluate_a_model_file_without_config_infers_the_layer_sizes(good, tmp_path, capsys, caplog):
    shutil.copy(good / "run" / "model.safetensors", tmp_path / "W.safetensors")
    assert main(["evaluate", "--model", str(good / "run"), "--data", str(good / "d"), "--local", "--json"]) == 0
    with_config = capsys.readouterr().out
    assert main(["evaluate", "--model", str(tmp_path / "W.safetensors"), "--data", str(good / "d"), "--local", "--json"]) == 0
    assert capsys.readouterr().out == with_config  # the run used the default activations and loss settings
    assert "model.visible=4, model.hidden=[3], model.tied=false were read from its tensors' shapes" in caplog.text
