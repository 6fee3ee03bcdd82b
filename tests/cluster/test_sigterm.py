"""SIGTERM to `dist-sae train` on a local Ray (what Kubernetes, spot preemption and `ray job stop`
send before SIGKILL): the step in flight is abandoned, the last completed step checkpointed within
Ray's default grace period (RAY_JOB_STOP_WAIT_TIME_S=3), exit 143, and --resume is exact.
Also: the Ray token folder and file a local Ray uses are made private before it starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dist_sae.commands.main import main
from dist_sae.sae.model import load_model
from dist_sae.train.checkpoint import latest_checkpoint

from dist_sae.cluster.head import stop_session_group
from util import make_dataset, smooth_patches

REPO = Path(__file__).resolve().parents[2]
STEPS = 100  # SIGTERM comes after step 14: ~2 s of steps still to go
ARGS = ["--quiet", "model.hidden=[8]", f"optim.steps={STEPS}", "run.checkpoint_every=7", "run.report=false", "data.block_rows=100",
        "optim.tolerance_change=0", "optim.tolerance_grad=0", "workers.num=2"]
GRACE_S = 3.0  # Ray's RAY_JOB_STOP_WAIT_TIME_S default: SIGKILL follows SIGTERM after this


def metric_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")] if path.is_file() else []


def test_sigterm_mid_run_checkpoints_the_last_step_exits_143_and_resume_is_exact(tmp_path, capsys):
    data, run = tmp_path / "d", tmp_path / "run"
    make_dataset(data, smooth_patches(600, seed=6), shard_rows=200, chunk_rows=100)
    assert main(["train", "--local", "--data", str(data), "--out", str(tmp_path / "ref"), *ARGS]) == 0
    reference = load_model(tmp_path / "ref")[0].theta.detach().numpy()

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "dist_sae", "train", "--data", str(data), "--out", str(run), *ARGS],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while len(metric_steps(run)) < 10:  # mid-run: past the first checkpoint (step 7), with steps after it
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()  # as Ray, Kubernetes and the spot reclaim do after the grace period
        _, stderr = proc.communicate(timeout=30)
    finally:
        stop_session_group(proc)  # the local Ray it started, if it is still there
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "stopped on SIGTERM" in stderr, stderr
    completed = metric_steps(run)[-1]
    assert 10 <= completed < STEPS
    assert latest_checkpoint(run)[0]["meta"]["step"] == completed  # the last completed step, not the last periodic one
    # During a step (abandoned, rolled back; the last completed one is checkpointed now, or already was
    # when steps run up to a periodic checkpoint, as 8-14 do here), or just after one (it finished before
    # it could be abandoned). Each message names the checkpoint that holds the last completed step.
    newest = f"{run / 'checkpoints' / f'step-{completed:08d}'}"
    said = (f"the last completed step {completed} is checkpointed in {newest}", f"checkpoint {newest} written",
            f"the newest checkpoint {newest} (step {completed}) is kept")
    assert any(message in stderr for message in said), stderr

    assert main(["train", "--resume", str(run), "--local"]) == 0, capsys.readouterr().err
    theta = load_model(run)[0].theta.detach().numpy()
    assert np.linalg.norm(theta - reference) <= 1e-10 * np.linalg.norm(reference)
    assert metric_steps(run) == list(range(1, STEPS + 1))


def test_the_ray_token_folder_and_file_are_made_private(tmp_path):
    from dist_sae.cluster.runtime import private_token_home

    (tmp_path / ".ray").mkdir(mode=0o755)
    (tmp_path / ".ray" / "auth_token").write_text("t")
    (tmp_path / ".ray" / "auth_token").chmod(0o644)
    assert private_token_home(tmp_path) == tmp_path / ".ray"
    assert (tmp_path / ".ray").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600
    assert private_token_home(tmp_path / "new") == tmp_path / "new" / ".ray"
    assert (tmp_path / "new" / ".ray").stat().st_mode & 0o777 == 0o700
