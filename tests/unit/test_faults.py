"""Faults without Ray: the failure policy, all-or-nothing steps, and a killed or interrupted driver.

The Ray side (workers killed, hung or lost with their node) is in test_faults_cluster.py.
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
import pytest
import torch

from dist_sae.session import LocalSession, initial_theta
from dist_sae.api import train
from dist_sae.train.checkpoint import latest_checkpoint, list_checkpoints
from dist_sae.cluster.dispatch import Action, Dispatcher, FailurePolicy, UnitState, WorkerStatus
from dist_sae.config import load_config
from dist_sae.data.dataset import Dataset
from dist_sae.train.inputs import bind_dataset
from dist_sae.errors import DataError
from dist_sae.sae.model import load_model

from util import config, make_dataset, smooth_patches

REPO = Path(__file__).resolve().parents[2]


# ---- the failure policy: pure, no Ray ------------------------------------------------------


def test_policy_replaces_up_to_max_restarts_then_gives_up():
    policy = FailurePolicy(max_restarts=2, unit_timeout_s=10.0)
    worker = WorkerStatus(1, alive=False)
    assert policy.decide(worker, 1).action is Action.REPLACE
    assert policy.decide(worker, 2).action is Action.REPLACE
    give_up = policy.decide(worker, 3)
    assert give_up.action is Action.GIVE_UP and "workers.max_restarts=2" in give_up.reason
    assert FailurePolicy(0, 1.0).decide(worker, 1).action is Action.GIVE_UP


def test_a_worker_without_progress_for_unit_timeout_is_hung():
    policy = FailurePolicy(max_restarts=3, unit_timeout_s=10.0)
    d = Dispatcher(list(range(6)), [0, 1], depth=2)
    d.assign(now=0.0)  # each worker holds two units; their clocks start
    d.complete(0, 0, now=8.0)  # worker 0 made progress at t=8; worker 1 none since t=0
    assert policy.hung(d.workers.values(), now=9.0) == []
    assert policy.hung(d.workers.values(), now=10.5) == [1]
    assert policy.deadline(d.workers.values()) == 10.0
    assert policy.hung(d.workers.values(), now=18.5) == [0, 1]
    d.complete(1, 1, now=18.6)
    d.complete(1, 3, now=18.7)
    assert d.workers[1].busy_since is None  # idle: no clock
    assert policy.hung(d.workers.values(), now=100.0) == [0]


def test_a_replaced_worker_rejoins_and_every_unit_is_counted_once():
    d = Dispatcher([0, 1, 2, 3], [0, 1], depth=1)
    assert d.assign() == [(0, 0), (1, 1)]
    assert d.worker_failed(1) == [1]
    d.complete(0, 0)
    assert d.assign() == [(0, 1)]  # the lost unit first
    d.worker_joined(1)  # its replacement answered
    assert d.assign() == [(1, 2)]
    d.worker_joined(2)  # a worker index the pass did not start with
    assert d.assign() == [(2, 3)]
    for w, uid in ((0, 1), (1, 2), (2, 3)):
        d.complete(w, uid)
    assert d.done and d.counts() == {0: 2, 1: 1, 2: 1}


@pytest.mark.parametrize("seed", range(20))
def test_random_failures_keep_exactly_once_accounting(seed):
    """Seeded random schedules of completions, failures and rejoins: each unit done exactly once."""
    rng = np.random.default_rng(seed)
    units = list(range(int(rng.integers(5, 60))))
    d = Dispatcher(units, [0, 1, 2], depth=int(rng.integers(1, 4)))
    counted: list[int] = []
    running: list[tuple[int, int]] = []
    while not d.done:
        running += d.assign()
        dead = [w for w, s in d.workers.items() if not s.alive]
        if dead and (not running or rng.random() < 0.3):
            d.worker_joined(int(rng.choice(dead)))
            continue
        if not running:
            continue
        w, uid = running[int(rng.integers(len(running)))]
        if rng.random() < 0.15:
            d.worker_failed(w)  # its results that arrive later are dropped, like the evaluator does
            running = [(ww, u) for ww, u in running if ww != w]
            with pytest.raises(RuntimeError):
                d.complete(w, uid)
        else:
            d.complete(w, uid)
            counted.append(uid)
            running.remove((w, uid))
    assert sorted(counted) == units
    assert all(u.state is UnitState.DONE for u in d.units.values())


# ---- all-or-nothing steps ----------------------------------------------------------------


@pytest.fixture(scope="module")
def patches(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "d"
    make_dataset(path, smooth_patches(400, seed=4), shard_rows=150, chunk_rows=50)
    return path


@pytest.mark.parametrize("method", ["lbfgs", "adam"])
def test_a_failed_step_is_rolled_back_and_the_run_continues_exactly(patches, method):
    cfg = bind_dataset(
        config(patches, model__hidden=[5], optim__method=method, optim__batch_size=100, data__block_rows=50),
        Dataset.open(patches),
    )
    theta0 = initial_theta(cfg, None)
    plain, faulty = LocalSession(cfg, Dataset.open(patches)), LocalSession(cfg, Dataset.open(patches))
    try:
        ref = plain.stepper(theta0)
        for _ in range(6):
            ref.step()
        stepper = faulty.stepper(theta0)
        for _ in range(3):
            stepper.step()
        before = stepper.state_dict()
        evaluate, calls = faulty.problem.evaluate, []

        def fail(*args, **kwargs):  # L-BFGS: its start point is cached, so this is inside the line search
            calls.append(1)
            raise DataError("shard x.h5 cannot be read")

        faulty.problem.evaluate = fail
        with pytest.raises(DataError):
            stepper.step()
        assert calls
        after = stepper.state_dict()
        assert after["meta"] == before["meta"] and torch.equal(after["theta"], before["theta"])
        faulty.problem.evaluate = evaluate
        for _ in range(3):
            stepper.step()
        assert torch.equal(stepper.state_dict()["theta"], ref.state_dict()["theta"])
    finally:
        plain.close()
        faulty.close()


def test_a_failed_step_checkpoints_the_last_completed_one_and_resume_is_exact(patches, tmp_path, monkeypatch):
    from dist_sae.train.optim import Trainer

    common = dict(model__hidden=[5], data__block_rows=50, run__checkpoint_every=0, optim__tolerance_change=0)
    full = train(config(patches, run__out=str(tmp_path / "full"), optim__steps=7, **common))
    evaluate_full, calls = Trainer._evaluate_full, []

    def fail_later(self, theta):
        calls.append(1)
        if len(calls) == 9:
            raise DataError("shard x.h5: rows 0:50 cannot be read")
        return evaluate_full(self, theta)

    monkeypatch.setattr(Trainer, "_evaluate_full", fail_later)
    cfg = config(patches, run__out=str(tmp_path / "run"), optim__steps=7, **common)
    with pytest.raises(DataError, match=r"cannot be read\. Stopped at step \d+: the last completed step (\d+) is checkpointed") as info:
        train(cfg)
    done = int(info.value.args[0].split("the last completed step ")[1].split()[0])
    assert 0 < done < 7 and not (tmp_path / "run" / "model.safetensors").exists()
    assert latest_checkpoint(tmp_path / "run")[0]["meta"]["step"] == done
    monkeypatch.setattr(Trainer, "_evaluate_full", evaluate_full)
    resumed = train(cfg, resume=True)
    np.testing.assert_allclose(resumed.theta, full.theta, rtol=1e-10, atol=1e-13)


# ---- the driver killed (SIGKILL) or interrupted (SIGINT) -------------------------------------

STEPS = 200  # the signal comes at the first checkpoint (step 2): ~1.5 s of steps still to go, not 0.3 s
TRAIN_ARGS = ["model.hidden=[8]", f"optim.steps={STEPS}", "run.checkpoint_every=2", "run.report=false", "data.block_rows=200",
              "optim.tolerance_change=0", "optim.tolerance_grad=0"]


@pytest.fixture(scope="module")
def driver_data(tmp_path_factory):
    """Data and the final θ of the uninterrupted run (in this process)."""
    root = tmp_path_factory.mktemp("driver")
    make_dataset(root / "d", smooth_patches(600, seed=6), shard_rows=200, chunk_rows=100)
    cfg = load_config(None, TRAIN_ARGS + [f"data.path={root / 'd'}", f"run.out={root / 'ref'}", "workers.engine=local",
                                          "run.quiet=true"])
    return root / "d", train(cfg).theta


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dist_sae", *args]


def _start_and_signal(data: Path, run: Path, sig: int) -> tuple[int, str]:
    """Start a local training run, send `sig` once its first checkpoint exists; (exit status, stderr)."""
    proc = subprocess.Popen(
        _cli("train", "--local", "--quiet", "--data", str(data), "--out", str(run), *TRAIN_ARGS),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 90
    while not list_checkpoints(run):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr


def _resume_and_compare(run: Path, theta_ref: np.ndarray, capsys) -> None:
    """`dist-sae train --resume RUN` (in this process: the CLI code, without another interpreter's start)."""
    from dist_sae.commands.main import main

    assert main(["train", "--resume", str(run)]) == 0, capsys.readouterr().err
    model, _ = load_model(run)
    theta = model.theta.detach().numpy()
    assert np.linalg.norm(theta - theta_ref) <= 1e-10 * np.linalg.norm(theta_ref)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # lines the killed run wrote after its checkpoint are not doubled


def test_sigkill_mid_run_then_resume_equals_the_uninterrupted_run(driver_data, tmp_path, capsys):
    data, theta_ref = driver_data
    status, _ = _start_and_signal(data, tmp_path / "run", signal.SIGKILL)
    assert status == -signal.SIGKILL
    assert not (tmp_path / "run" / "model.safetensors").exists()
    _resume_and_compare(tmp_path / "run", theta_ref, capsys)


def test_sigint_checkpoints_exits_130_and_resume_equals_the_uninterrupted_run(driver_data, tmp_path, capsys):
    data, theta_ref = driver_data
    run = tmp_path / "run"
    status, stderr = _start_and_signal(data, run, signal.SIGINT)
    assert status == 130, stderr
    assert "Traceback" not in stderr
    newest = latest_checkpoint(run)[0]["meta"]["step"]
    assert f"stopped at step {newest} on Ctrl-C: checkpoint" in stderr and f"--resume {run}" in stderr
    lines = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1] == newest  # it stopped right after checkpointing the step it finished
    _resume_and_compare(run, theta_ref, capsys)


def test_resume_truncates_metrics_after_the_checkpoint_and_a_line_cut_short(tmp_path):
    from dist_sae.train.rundir import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "J": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "J"')
    assert truncate_metrics(path, 3) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert truncate_metrics(path, 3) == 0 and truncate_metrics(tmp_path / "none.jsonl", 3) == 0


def _loop_setup(tmp_path, steps: int):
    """(dataset, config, local session) of a small L-BFGS run into tmp_path/run, for driving train.loop._loop."""
    make_dataset(tmp_path / "d", smooth_patches(200, seed=3), shard_rows=100)
    ds = Dataset.open(tmp_path / "d")
    cfg = bind_dataset(config(tmp_path / "d", optim__steps=steps, run__checkpoint_every=0, run__out=str(tmp_path / "run")), ds)
    (tmp_path / "run").mkdir()
    return ds, cfg, LocalSession(cfg, ds)


def test_sigterm_between_steps_stops_after_the_step_with_its_checkpoint(tmp_path):
    """SIGTERM while the loop writes a step's metrics (no step in flight) is noted, not raised there:
    the loop checkpoints the step just done and stops, with the message that says so."""
    from dist_sae.errors import Terminated
    from dist_sae.train.loop import _loop

    ds, cfg, session = _loop_setup(tmp_path, steps=200)
    try:
        stepper = session.stepper(initial_theta(cfg, None))
        # first_step runs after the first call's steps (a run: STEP_RUN, RUN_S) have succeeded,
        # between steps: where their metrics lines are written.
        with pytest.raises(Terminated, match="stopped on SIGTERM after step [0-9]+: checkpoint") as stopped:
            _loop(cfg, ds, tmp_path / "run", stepper, first_step=lambda: os.kill(os.getpid(), signal.SIGTERM))
    finally:
        session.close()
    step = int(latest_checkpoint(tmp_path / "run")[0]["meta"]["step"])
    assert f"after step {step}:" in str(stopped.value) and 1 <= step <= 32  # the first run's last step, long before 200


def test_sigterm_inside_a_run_of_steps_keeps_the_completed_ones(tmp_path):
    """SIGTERM in the 4th step of a run (steps come several to a call): steps 1-3 keep their metrics
    lines and the checkpoint, the 4th is rolled back, and the message names step 3."""
    from dist_sae.errors import Terminated
    from dist_sae.train.loop import _loop

    ds, cfg, session = _loop_setup(tmp_path, steps=30)
    try:
        stepper = session.stepper(initial_theta(cfg, None))
        step, calls = stepper.trainer.step, []

        def step_with_sigterm():  # the signal arrives while the 4th step runs (a fault injected here)
            calls.append(1)
            if len(calls) == 4:
                os.kill(os.getpid(), signal.SIGTERM)
            return step()

        stepper.trainer.step = step_with_sigterm
        with pytest.raises(Terminated, match="stopped on SIGTERM after step 3: checkpoint"):
            _loop(cfg, ds, tmp_path / "run", stepper)
    finally:
        session.close()
    assert int(latest_checkpoint(tmp_path / "run")[0]["meta"]["step"]) == 3
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
