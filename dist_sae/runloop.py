"""A run directory and the training loop: what `train` does between opening a session and returning.

    run dir     refuse to mix two runs in one folder; resume reads the run's saved config
    resume      the checkpoint must match the data's fingerprint and the run's maths
    loop        step to optim.steps, writing metrics.jsonl, checkpoints, the model and run.json;
                checkpoint and stop cleanly on a failed step or Ctrl-C
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .checkpoint import CHECKPOINTS, list_checkpoints, save_checkpoint
from .config import Config, config_from_args
from .data import Dataset
from .errors import CheckpointError, DataError, DistSaeError, Interrupted
from .model import CONFIG_FILE, MODEL_FILE, SparseAutoencoder, save_model

log = logging.getLogger(__name__)


METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "run.json"
# Config keys a resumed run may change freely: they do not change the maths of the run.
# run.seed is not among them: it sets the batch order and the noise.
RESUMABLE_CHANGES = (
    "optim.steps", "workers.", "data.prefetch", "data.path", "data.cache_mb", "compute.threads",
    "run.out", "run.checkpoint_every", "run.keep_checkpoints", "run.log_every", "run.quiet", "run.tensorboard", "run.report",
)


class Stepper(Protocol):
    """A trainer, local or remote: what the training loop drives."""

    converged: bool

    def step(self) -> dict[str, Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final: dict[str, Any]  # the last metrics line
    seconds: float
    theta: np.ndarray


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ and that a resume may not change silently."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted(set(a) | set(b))
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in keys
        if a.get(k) != b.get(k) and not any(k == p or (p.endswith(".") and k.startswith(p)) for p in RESUMABLE_CHANGES)
    ]


def _holds_run(run_dir: Path) -> bool:
    """A model, a checkpoint or a metrics line: a folder with only config.json never made a step."""
    if not run_dir.is_dir():
        return False
    metrics = run_dir / METRICS_FILE
    checkpoints = run_dir / CHECKPOINTS
    return (
        (run_dir / MODEL_FILE).exists()
        or (checkpoints.is_dir() and any(checkpoints.iterdir()))
        or (metrics.is_file() and metrics.stat().st_size > 0)
    )


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder; changes nothing (prepare_run_dir does, later).

    Raises:
        CheckpointError: naming the folder and the flag to pass.
    """
    holds_run = _holds_run(run_dir)
    if resume and not holds_run:
        raise CheckpointError(f"--resume: {run_dir} holds no run to resume; leave out --resume to start one")
    if not resume and holds_run and not overwrite:
        raise CheckpointError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to replace it")


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create the run dir; refuse to mix two runs in one folder (with --overwrite, clear the old run)."""
    check_run_dir(run_dir, resume, overwrite)
    if not resume:
        for name in (CONFIG_FILE, METRICS_FILE, CHECKPOINTS, MODEL_FILE, SUMMARY_FILE, "report"):
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the metrics lines of steps <= `step` (a resumed run writes the later ones again).

    A line cut short by a kill is dropped too. The file is replaced atomically.

    Returns:
        The number of lines dropped.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            line_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            dropped += 1
            continue
        if line_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    return dropped


def resume_config(run_dir: str | Path, config: str | None = None, overrides: list[str] | None = None, **set_keys: Any) -> Config:
    """The config of `train --resume RUN_DIR`: the run's saved config.json (or `config`), then overrides.

    Raises:
        CheckpointError: the folder holds no run; DataError: the saved data folder is gone.
    """
    run_dir = Path(run_dir)
    saved = run_dir / CONFIG_FILE
    if config is None and not saved.is_file():
        raise CheckpointError(f"--resume: {run_dir} holds no run to resume (it has no {CONFIG_FILE})")
    set_keys = {**set_keys, "run.out": str(run_dir)}
    cfg = config_from_args(str(config or saved), list(overrides or []), **set_keys)
    data_given = set_keys.get("data.path") is not None or any(o.startswith("data.path=") for o in overrides or [])
    if config is None and not data_given and cfg.data.path and not Path(cfg.data.path).is_dir():
        raise DataError(
            f"the run's data folder {cfg.data.path} (data.path in {saved}) does not exist; give --data DIR "
            "(the same data; other data needs --allow-change)"
        )
    return cfg


def _progress(cfg: Config, total: int, initial: int):
    from tqdm.auto import tqdm

    disable = cfg.run.quiet or not sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=disable, dynamic_ncols=True)


def _check_resume(info: dict[str, Any], cfg: Config, dataset: Dataset, allow_change: bool) -> None:
    problems = []
    if info.get("fingerprint") != dataset.fingerprint:
        problems.append(f"dataset fingerprint {info.get('fingerprint')} -> {dataset.fingerprint} ({dataset.path})")
    problems += config_changes(info.get("config", {}), cfg.model_dump())
    if problems and not allow_change:
        raise CheckpointError(
            "cannot resume: the run differs from its checkpoint in " + "; ".join(problems)
            + ". Pass --allow-change to resume anyway"
        )


class _StopRequest:
    """Ctrl-C (SIGINT) while training: finish the current step, checkpoint, then stop (a clean stop).

    A second Ctrl-C stops at once; the stepper rolls its unfinished step back, so the last
    completed step is still checkpointed. Only the main thread can take signals: elsewhere (a
    notebook's worker thread) this does nothing and Ctrl-C is an ordinary KeyboardInterrupt.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after this step, with a checkpoint (Ctrl-C again to stop at once)")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _loop(cfg: Config, dataset: Dataset, run_dir: Path, stepper: Stepper, tensorboard=None) -> TrainResult:
    """Step to optim.steps, writing metrics, checkpoints, the model and a summary.

    Checkpoints every run.checkpoint_every steps, at the end, and when the run stops early: on a
    failed step (the stepper rolled it back, so the last completed step is saved) and on Ctrl-C.

    Raises:
        DistSaeError: the step that failed, the checkpoint kept and how to resume, in one message.
        errors.Interrupted: on Ctrl-C, after the checkpoint.
    """
    info = {"config": cfg.model_dump(), "fingerprint": dataset.fingerprint, "dataset": str(dataset.path)}
    state = stepper.state_dict()
    start = int(state["meta"]["step"])
    total = cfg.optim.steps
    every = cfg.run.checkpoint_every
    resume_hint = f"continue with `dist-sae train --resume {run_dir}`"
    existing = [p for p in list_checkpoints(run_dir) if p.name == f"step-{start:08d}"]
    saved: dict[str, Any] = {"step": start if existing else None, "path": existing[0] if existing else None}

    def save(state: dict[str, Any] | None = None) -> None:
        state = stepper.state_dict() if state is None else state
        saved["path"] = save_checkpoint(run_dir, state, info, cfg.run.keep_checkpoints)
        saved["step"] = int(state["meta"]["step"])

    def kept() -> str:
        if saved["path"] is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint {saved['path']} (step {saved['step']}) is kept"

    def hint() -> str:
        if saved["path"] is None:
            return "fix the cause and start the run again (it made no checkpoint to resume from)"
        return f"fix the cause, then {resume_hint}"

    def save_after_failure() -> str:
        """Checkpoint the last completed step if no checkpoint holds it yet; say what is kept."""
        try:
            state = stepper.state_dict()  # the failed step was rolled back
            done = int(state["meta"]["step"])
            if done > start and done != saved["step"]:
                save(state)
                return f"the last completed step {done} is checkpointed in {saved['path']}"
        except DistSaeError as exc:  # e.g. the disk is full, or the parameter server is gone
            log.warning("no checkpoint after the failure: %s", exc)
        return kept()

    t0 = time.perf_counter()
    last: dict[str, Any] = {}
    try:
        with open(run_dir / METRICS_FILE, "a") as metrics, _progress(cfg, total, start) as bar, _StopRequest() as stop:
            step = start
            while step < total and not stepper.converged:
                try:
                    last = stepper.step()
                except DistSaeError as exc:
                    raise type(exc)(f"{exc}. Stopped at step {step + 1}: {save_after_failure()}; {hint()}") from None
                except KeyboardInterrupt:
                    raise Interrupted(f"interrupted during step {step + 1}: {save_after_failure()}; {hint()}") from None
                step = last["step"]
                if step % cfg.run.log_every == 0 or step == total:
                    metrics.write(json.dumps(_jsonable(last)) + "\n")
                    metrics.flush()
                    if tensorboard is not None:
                        for key, value in last.items():
                            if isinstance(value, (int, float, np.floating, np.integer)) and key != "step":
                                tensorboard.add_scalar(key, float(value), step)
                bar.update(1)
                bar.set_postfix(J=f"{last['J']:.6g}")
                if every and step % every == 0:
                    save()
                if stop.requested and step < total:
                    if saved["step"] != step:
                        save()
                    raise Interrupted(f"stopped at step {step} on Ctrl-C: checkpoint {saved['path']} written; {resume_hint}")
        state = stepper.state_dict()
        if saved["step"] != int(state["meta"]["step"]):
            save(state)
        theta = state["theta"].numpy()
        model = SparseAutoencoder.from_config(cfg)
        save_model(model, run_dir, cfg, torch.from_numpy(theta))
        seconds = time.perf_counter() - t0
        summary = {
            "steps": int(state["meta"]["step"]),
            "converged": bool(stepper.converged),
            "seconds": seconds,
            "engine": cfg.workers.engine,
            "method": cfg.optim.method,
            "rho_hat_mode": "exact" if cfg.optim.full_batch else cfg.sparsity.rho_hat,
            "final": _jsonable(last),
        }
        (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    except OSError as exc:  # metrics, model or summary: the disk is full or gone
        raise CheckpointError(f"cannot write to {run_dir} ({exc.strerror or exc}); {kept()}. Free disk space, then {resume_hint}") from None
    return TrainResult(run_dir, summary["steps"], last, seconds, theta)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, (np.floating, np.integer)):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out
