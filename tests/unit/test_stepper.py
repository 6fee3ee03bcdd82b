"""Steps asked for in runs (train.checkpoint.AtomicStepper.steps, train.loop's STEP_RUN and RUN_S)."""

from __future__ import annotations

import itertools
import time

import pytest

from dist_sae.api import train
from dist_sae.train.checkpoint import AtomicStepper
from dist_sae.train.loop import STEP_RUN
from util import config, make_dataset, smooth_patches


class Counter:
    """A trainer whose state is a step count; step k sleeps `sleep_s` and fails when k is in `fail`."""

    def __init__(self, sleep_s: float = 0.0, converge_at: int | None = None, fail: tuple[int, ...] = ()) -> None:
        self.count, self.sleep_s, self.converge_at, self.fail = 0, sleep_s, converge_at, fail
        self.step_error: type[BaseException] = RuntimeError

    @property
    def converged(self) -> bool:
        return self.converge_at is not None and self.count >= self.converge_at

    def step(self):
        self.count += 1
        time.sleep(self.sleep_s)
        if self.count in self.fail:
            raise self.step_error(f"step {self.count} failed")
        return {"step": self.count}

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def test_a_run_ends_at_n_steps_at_the_budget_or_at_convergence():
    assert [m["step"] for m in AtomicStepper(Counter()).steps(5)] == [1, 2, 3, 4, 5]
    assert len(AtomicStepper(Counter()).steps(5, budget_s=10.0)) == 5
    # Steps of at least 50 ms within 0.12 s: the run ends after the step that passes the budget, the
    # third at the latest (a stalled machine passes it sooner), never later and never all 32.
    assert 1 <= len(AtomicStepper(Counter(sleep_s=0.05)).steps(32, budget_s=0.12)) <= 3
    assert len(AtomicStepper(Counter(sleep_s=0.05)).steps(32, budget_s=0.0)) == 1  # always at least one step
    assert [m["step"] for m in AtomicStepper(Counter(converge_at=2)).steps(32, budget_s=1.0)] == [1, 2]


def test_a_stop_inside_a_run_keeps_the_steps_before_it():
    trainer = Counter(fail=(3,))
    trainer.step_error = KeyboardInterrupt  # Ctrl-C (or SIGTERM's Terminated) inside step 3
    stepper = AtomicStepper(trainer)
    assert [m["step"] for m in stepper.steps(5, budget_s=1.0)] == [1, 2] and trainer.count == 2
    with pytest.raises(KeyboardInterrupt):
        stepper.steps(5)
    first = Counter(fail=(1,))
    first.step_error = KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):  # nothing completed in this run: raised at once
        AtomicStepper(first).steps(5)
    assert first.count == 0


def test_a_failing_step_in_a_run_keeps_the_steps_before_it_and_is_raised_next():
    trainer = Counter(fail=(3,))
    stepper = AtomicStepper(trainer)
    assert [m["step"] for m in stepper.steps(5, budget_s=1.0)] == [1, 2]
    assert trainer.count == 2  # the failed step was rolled back
    with pytest.raises(RuntimeError, match="step 3 failed"):
        stepper.steps(5, budget_s=1.0)


def test_full_batch_training_asks_for_steps_in_runs(tmp_path, monkeypatch):
    make_dataset(tmp_path / "d", smooth_patches(300, seed=1), shard_rows=100)
    calls: list[int] = []
    original = AtomicStepper.steps

    def counted(self, n, budget_s=None):
        done = original(self, n, budget_s)
        calls.append(len(done))
        return done

    monkeypatch.setattr(AtomicStepper, "steps", counted)
    cfg = config(tmp_path / "d", model__hidden=[4], optim__method="lbfgs", optim__steps=40, run__out=str(tmp_path / "r"),
                 run__checkpoint_every=25)
    result = train(cfg)
    assert result.steps == 40 and sum(calls) == 40
    # Small L-BFGS steps go several to a call, never past a checkpoint (25) or STEP_RUN.
    assert len(calls) < 40 and max(calls) <= STEP_RUN and 25 in itertools.accumulate(calls)
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 40  # every step's metrics line, though steps came in runs
