"""Atomic checkpoints: everything needed to resume a run exactly.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding
    theta.safetensors   θ, float64
    trainer.pt          optimizer state (L-BFGS history, Adam moments), ρ̂ state; loaded with
                        torch.load(weights_only=True), which never unpickles arbitrary objects
    state.json          step, epoch, data position, dataset fingerprint, config
    manifest.json       the SHA-256 of each file above, checked on load (torch.load does not check
                        its zip CRCs and safetensors has no checksum: flipped bits load silently)
It is written into `step-NNNNNNNN.tmp/`, every file fsynced, then renamed into place, so a kill
during the write leaves the previous checkpoint the newest valid one; any failure while writing
(a full disk) removes the partial folder. Only safetensors, JSON and
tensors-only torch files are ever read back: nothing is unpickled.

`AtomicStepper` makes a trainer step all-or-nothing, so that after a failed or interrupted
step the trainer's state is the last completed step's and can still be checkpointed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, save

from dist_sae.data.dataset import fsync_path
from dist_sae.errors import CheckpointError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
THETA, TRAINER, STATE = "theta.safetensors", "trainer.pt", "state.json"
COMPLETE = "manifest.json"  # SHA-256 of every other file; written last: a folder without it is not a checkpoint
_UNFINISHED = (".tmp", ".old")  # being written / being replaced: never loaded


def save_checkpoint(run_dir: str | Path, trainer_state: dict[str, Any], info: dict[str, Any], keep: int = 3) -> Path:
    """Write a checkpoint of `trainer_state` (from Trainer.state_dict) with JSON `info`; keep the newest `keep`.

    Every file's SHA-256 is taken from the bytes as they are written (no second read) and recorded
    in manifest.json, written last.

    Raises:
        CheckpointError: any failure while writing (a full disk shows as OSError, torch's
            RuntimeError or safetensors' SafetensorError); the partial folder is removed and the
            previous checkpoints stay valid.
    """
    root = Path(run_dir) / CHECKPOINTS
    step = int(trainer_state["meta"]["step"])
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        hashes = {
            THETA: _write(tmp / THETA, save({"theta": trainer_state["theta"].contiguous()})),
            TRAINER: _write(tmp / TRAINER, lambda f: torch.save(
                {k: trainer_state.get(k) for k in ("optimizer", "rho_means", "ema_means", "dead_units")}, f)),
            STATE: _write(tmp / STATE, (json.dumps({**info, "trainer": trainer_state["meta"]}, indent=2) + "\n").encode()),
        }
        _write(tmp / COMPLETE, (json.dumps({"sha256": hashes}, indent=2) + "\n").encode())
        fsync_path(tmp)
        _before_rename_hook(tmp)
        old = root / f"step-{step:08d}.old"
        if final.exists():  # rewriting a step: move the old copy aside first, so one is valid throughout
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        fsync_path(root)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, Exception):  # Ctrl-C or SIGTERM while writing: no partial folder left
            raise
        raise CheckpointError(
            f"cannot write checkpoint {final} ({_cause(exc)}): {_disk_state(root)}; the partial folder was removed and "
            f"{_previous(run_dir)}. Free disk space, then resume with `dist-sae train --resume {run_dir}`"
        ) from None
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write(path: Path, data: bytes | Callable[[Any], None]) -> str:
    """Write bytes (or let `data(file)` write) to `path`, fsynced; the SHA-256 of what was written."""
    with open(path, "wb") as raw:
        f = _HashingWriter(raw)
        if isinstance(data, bytes):
            f.write(data)
        else:
            data(f)
        raw.flush()
        os.fsync(raw.fileno())
    return f.sha256.hexdigest()


class _HashingWriter:
    """A write-only file object that hashes what passes through (torch.save writes to it)."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.sha256 = raw, hashlib.sha256()

    def write(self, data: Any) -> int:
        self.sha256.update(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def _cause(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[-1:] or [type(exc).__name__]
    return f"{type(exc).__name__}: {text if isinstance(text, str) else text[0]}"


def _disk_state(root: Path) -> str:
    try:
        free = shutil.disk_usage(root if root.exists() else root.parent).free
    except OSError:
        return "the disk is full or not writable"
    return f"the disk is full or not writable ({free / 2**20:.0f} MiB free there)"


def _previous(run_dir: str | Path) -> str:
    done = list_checkpoints(run_dir)
    return f"the previous checkpoint {done[-1]} is kept" if done else "no earlier checkpoint exists"


def _before_rename_hook(tmp: Path) -> None:
    """Test seam: fault-injection tests replace this to simulate a kill between write and rename."""


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (unfinished `.tmp` folders are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.endswith(_UNFINISHED) and (p / COMPLETE).is_file())


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer_state for Trainer.load_state_dict, info) from a checkpoint folder, its SHA-256s verified.

    Raises:
        CheckpointError: a file is missing, unreadable, or not the bytes that were written.
    """
    path = Path(path)
    try:
        expected = json.loads((path / COMPLETE).read_text())["sha256"]
        data = {}
        for name in (THETA, TRAINER, STATE):
            data[name] = (path / name).read_bytes()
            digest = hashlib.sha256(data[name]).hexdigest()
            if digest != expected.get(name):
                raise CheckpointError(f"{name} is damaged: its SHA-256 is {digest[:12]}…, the manifest says {str(expected.get(name))[:12]}…")
        info = json.loads(data[STATE])
        theta = load(data[THETA])["theta"]
        rest = torch.load(io.BytesIO(data[TRAINER]), weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(exc).__name__}: {exc})") from None
    return {"theta": theta, "meta": info["trainer"], **rest}, info


def latest_checkpoint(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The newest checkpoint that loads and verifies, skipping damaged ones with a warning; None if none."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("skipping damaged checkpoint (using the one before it): %s", exc)
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

    def steps(self, n: int, budget_s: float | None = None) -> list[dict[str, Any]]:
        """Up to `n` steps (fewer once converged, or once `budget_s` seconds have passed after a
        step) and their metrics, in one call (one round trip when the trainer is remote). A step
        that fails after some completed ones is rolled back and its error raised by the next call,
        so the completed steps' metrics are kept; so is one stopped by Ctrl-C or SIGTERM (the
        training loop then checkpoints the completed steps and stops, and raises nothing more)."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        done: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        for _ in range(n):
            if self.converged:
                break
            try:
                done.append(self.step())
            except BaseException as exc:  # KeyboardInterrupt and Terminated too: the completed steps stand
                if not done:
                    raise
                self._error = exc
                break
            if budget_s is not None and time.perf_counter() - t0 >= budget_s:
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
