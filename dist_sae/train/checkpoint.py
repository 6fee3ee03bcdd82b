"""Atomic checkpoints: everything needed to resume a run exactly.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding
    theta.safetensors   θ, float64
    trainer.pt          optimizer state (L-BFGS history, Adam moments), ρ̂ state; loaded with
                        torch.load(weights_only=True), which never unpickles arbitrary objects
    state.json          step, epoch, data position, dataset fingerprint, config
It is written into `step-NNNNNNNN.tmp/`, every file fsynced, then renamed into place, so a kill
during the write leaves the previous checkpoint the newest valid one. Only safetensors, JSON and
tensors-only torch files are ever read back: nothing is unpickled.

`AtomicStepper` makes a trainer step all-or-nothing, so that after a failed or interrupted
step the trainer's state is the last completed step's and can still be checkpointed.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dist_sae.data.dataset import fsync_path
from dist_sae.errors import CheckpointError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE = "state.json"  # written last: a folder without it is not a checkpoint
_UNFINISHED = (".tmp", ".old")  # being written / being replaced: never loaded


def save_checkpoint(run_dir: str | Path, trainer_state: dict[str, Any], info: dict[str, Any], keep: int = 3) -> Path:
    """Write a checkpoint of `trainer_state` (from Trainer.state_dict) with JSON `info`; keep the newest `keep`.

    Raises:
        CheckpointError: when the disk is full or not writable; the previous checkpoints stay valid.
    """
    root = Path(run_dir) / CHECKPOINTS
    step = int(trainer_state["meta"]["step"])
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({"theta": trainer_state["theta"].contiguous()}, str(tmp / "theta.safetensors"))
        torch.save(
            {k: trainer_state.get(k) for k in ("optimizer", "rho_means", "ema_means", "dead_units")},
            tmp / "trainer.pt",
        )
        (tmp / COMPLETE).write_text(json.dumps({**info, "trainer": trainer_state["meta"]}, indent=2) + "\n")
        for file in tmp.iterdir():
            fsync_path(file)
        _before_rename_hook(tmp)
        old = root / f"step-{step:08d}.old"
        if final.exists():  # rewriting a step: move the old copy aside first, so one is valid throughout
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        fsync_path(root)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"cannot write checkpoint {final} ({exc.strerror or exc}); the previous checkpoint is kept. "
            "Free disk space, then resume with --resume"
        ) from None
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _before_rename_hook(tmp: Path) -> None:
    """Test seam: fault-injection tests replace this to simulate a kill between write and rename."""


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (unfinished `.tmp` folders are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.endswith(_UNFINISHED) and (p / COMPLETE).is_file())


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer_state for Trainer.load_state_dict, info) from a checkpoint folder."""
    path = Path(path)
    try:
        info = json.loads((path / COMPLETE).read_text())
        theta = load_file(str(path / "theta.safetensors"))["theta"]
        rest = torch.load(path / "trainer.pt", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(exc).__name__}: {exc})") from None
    return {"theta": theta, "meta": info["trainer"], **rest}, info


def latest_checkpoint(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The newest checkpoint that loads, skipping damaged ones with a warning; None if there is none."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("skipping damaged checkpoint: %s", exc)
    return None


def snapshot_state(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a Trainer.state_dict() that the trainer's later steps cannot change.

    Containers are copied, tensors held directly in a dict are cloned (optimizers update those in
    place: θ, Adam's moments, L-BFGS's direction and previous gradient); tensors inside lists are
    shared, because optimizers replace list entries rather than change them (L-BFGS's history
    appends new tensors and drops old ones), so the copy costs O(P), not O(history × P).
    """

    def copy(value: Any, in_list: bool = False) -> Any:
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(v, in_list=True) for v in value)
        if isinstance(value, torch.Tensor) and not in_list:
            return value.detach().clone()
        return value

    return copy(state)


class AtomicStepper:
    """A train.optim.Trainer whose steps are all or nothing, in this process or in the parameter server.

    A step that raises (or is interrupted) puts the trainer back: a failed L-BFGS step leaves θ at a
    line-search trial point and the history half updated; after the roll-back, state_dict() is the
    last completed step's again and can be checkpointed.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self._error: Exception | None = None  # a failed step's error, held back for the next steps() call

    @property
    def converged(self) -> bool:
        return self.trainer.converged

    def step(self) -> dict[str, Any]:
        """One optimizer step's metrics; on any exception the trainer is as before the step."""
        before = snapshot_state(self.trainer.state_dict())
        try:
            return self.trainer.step()
        except BaseException:
            self.trainer.load_state_dict(before)
            raise

    def steps(self, n: int) -> list[dict[str, Any]]:
        """Up to `n` steps (fewer once converged) and their metrics, in one call (one round trip
        when the trainer is remote). A step that fails after some completed ones is rolled back
        and its error raised by the next call, so the completed steps' metrics are kept."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        done: list[dict[str, Any]] = []
        for _ in range(n):
            if self.converged:
                break
            try:
                done.append(self.step())
            except Exception as exc:  # not KeyboardInterrupt: a stop request ends the call at once
                if not done:
                    raise
                self._error = exc
                break
        return done

    def state_dict(self) -> dict[str, Any]:
        return self.trainer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._error = None
        self.trainer.load_state_dict(state)

    def theta(self) -> np.ndarray:
        """θ of the last completed step, (P,) float64."""
        return self.trainer.theta.detach().numpy().copy()
