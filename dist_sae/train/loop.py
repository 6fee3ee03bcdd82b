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
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from dist_sae.train.checkpoint import list_checkpoints, save_checkpoint, snapshot_state
from dist_sae.config import Config
from dist_sae.data.dataset import Dataset
from dist_sae.errors import CheckpointError, DistSaeError, Interrupted, Terminated
from dist_sae.sae.model import SparseAutoencoder, save_model
from dist_sae.train.rundir import METRICS_FILE, SUMMARY_FILE
from dist_sae import progress
from dist_sae.version import __version__

log = logging.getLogger(__name__)

# Steps per stepper call: up to STEP_RUN, and no more once RUN_S seconds have passed. A call to a
# remote trainer costs a round trip (~2.5 ms on the exercise on 2 cores, L-BFGS steps of ~16 ms),
# paid once per run; a stop request (Ctrl-C) and the progress bar wait for the run's end, at most
# RUN_S plus one step.
STEP_RUN = 32
RUN_S = 0.25


class Stepper(Protocol):
    """A trainer, local or remote: what the training loop drives."""

    converged: bool

    def step(self) -> dict[str, Any]: ...
    def steps(self, n: int, budget_s: float | None = None) -> list[dict[str, Any]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final: dict[str, Any]  # the last metrics line
    seconds: float  # the step loop: first step to model saved (run.json "seconds"); not Ray start-up or the report
    theta: np.ndarray
    finished: str = ""  # why a resume found the run already finished (it then changed nothing)


class _StopRequest:
    """Ctrl-C (SIGINT) while training: finish the steps in flight (one step, or the small steps of
    up to RUN_S seconds asked for in one call), checkpoint, then stop (a clean stop).

    A second Ctrl-C stops at once; the stepper rolls its unfinished step back, so the last
    completed step is still checkpointed. SIGTERM (`ray job stop`, Kubernetes, spot preemption:
    SIGKILL follows after a grace period) stops at once like that second Ctrl-C, without waiting
    for the step in flight. Only the main thread can take signals: elsewhere (a notebook's worker
    thread) this does nothing and Ctrl-C is an ordinary KeyboardInterrupt.
    """

    def __init__(self) -> None:
        self.requested = False
        self.terminated = False  # SIGTERM came: stop after the step in flight, or at once if it is abandoned
        # Only a step in flight is abandoned at once (Terminated raised into it, it rolls back);
        # between steps (metrics, progress, checkpoints) SIGTERM is only noted, and the loop stops
        # with a checkpoint of the step just done: an exception there would skip that checkpoint.
        self.stepping = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._terminate)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after the steps in flight, with a checkpoint (Ctrl-C again to stop at once)")

    def _terminate(self, signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one roll-back and checkpoint, not two
        self.terminated = True
        if self.stepping:
            raise Terminated("SIGTERM")

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def _loop(cfg: Config, dataset: Dataset, run_dir: Path, stepper: Stepper, tensorboard=None,
          resumed_from: dict[str, Any] | None = None, first_step: Callable[[], Any] | None = None) -> TrainResult:
    """Step to optim.steps, writing metrics, checkpoints, the model and a summary.

    Checkpoints and run.json record the dist_sae version; `resumed_from` ({"step", "version"} of
    the checkpoint a resume started from) goes into run.json too.

    Checkpoints every run.checkpoint_every steps, at the end, and when the run stops early: on a
    failed step (the stepper rolled it back, so the last completed step is saved), on Ctrl-C and
    on SIGTERM. Nothing is written before the first step has succeeded; `first_step()` is called
    then (a resume rewrites config.json and trims metrics.jsonl there) and may return a
    TensorBoard writer to use from then on.

    Raises:
        DistSaeError: the step that failed, the checkpoint kept and how to resume, in one message.
        errors.Interrupted: on Ctrl-C, after the checkpoint; errors.Terminated on SIGTERM.
    """
    info = {"config": cfg.model_dump(), "fingerprint": dataset.fingerprint, "dataset": dataset.location, "version": __version__}
    state = stepper.state_dict()
    start = int(state["meta"]["step"])
    total = cfg.optim.steps
    every = cfg.run.checkpoint_every
    resume_hint = f"continue with `dist-sae train --resume {run_dir}`"
    existing = [p for p in list_checkpoints(run_dir) if p.name == f"step-{start:08d}"]
    saved: dict[str, Any] = {"step": start if existing else None, "path": existing[0] if existing else None}

    # Periodic checkpoints are written on a thread while training goes on (a write with its fsyncs
    # took 12-80 ms, 10% of training at 5 ms per minibatch step and one every 50 steps); one write
    # at a time, and `saved` names a checkpoint only once it is complete on disk.
    writer = ThreadPoolExecutor(1, thread_name_prefix="dist-sae-checkpoint")
    pending: list[Any] = []  # the write in progress, if any

    def flush() -> None:
        """Wait for the checkpoint being written; raises its CheckpointError."""
        if pending:
            future = pending.pop()
            saved["path"], saved["step"] = future.result()

    def write(state: dict[str, Any]) -> tuple[Path, int]:
        t = time.perf_counter()
        path = save_checkpoint(run_dir, state, info, cfg.run.keep_checkpoints)
        log.info("checkpoint %s written in %.2fs", path, time.perf_counter() - t)
        return path, int(state["meta"]["step"])

    def save(state: dict[str, Any] | None = None, wait: bool = True) -> None:
        # A copy: a local trainer's optimizer state is the live tensors its next steps update.
        state = snapshot_state(stepper.state_dict() if state is None else state)
        flush()
        pending.append(writer.submit(write, state))
        if wait:
            flush()

    def kept() -> str:
        if saved["path"] is None:
            return "no checkpoint was written yet"
        return f"the newest checkpoint {saved['path']} (step {saved['step']}) is kept"

    def hint() -> str:
        if saved["path"] is None:
            return "fix the cause and start the run again (it made no checkpoint to resume from)"
        return f"fix the cause, then {resume_hint}"

    def save_after_failure() -> str:
        """Checkpoint the last completed step if no checkpoint holds it yet; say what is kept."""
        try:
            flush()
            state = stepper.state_dict()  # the failed step was rolled back
            done = int(state["meta"]["step"])
            if done > start and done != saved["step"]:
                save(state)
                return f"the last completed step {done} is checkpointed in {saved['path']}"
        except CheckpointError:  # the disk is full: that message says what is kept
            raise
        except DistSaeError as exc:  # e.g. the parameter server is gone
            log.warning("no checkpoint after the failure: %s", exc)
        return kept()

    t0 = time.perf_counter()
    last: dict[str, Any] = {}
    metrics = None
    step = start
    try:
        with progress.bar(total, "train", unit="step", quiet=cfg.run.quiet, initial=start) as bar, _StopRequest() as stop:
            # Steps are asked for in runs (STEP_RUN, RUN_S), ending at the next checkpoint.
            while step < total and not stepper.converged:
                n = min(total - step, STEP_RUN, every - step % every if every else STEP_RUN)
                try:
                    stop.stepping = True
                    try:
                        done = stepper.steps(n, RUN_S)
                    finally:  # a SIGTERM before this is handled below, as one during the step
                        stop.stepping = False
                except CheckpointError:
                    raise
                except DistSaeError as exc:
                    raise type(exc)(f"{exc}. Stopped at step {step + 1}: {save_after_failure()}; {hint()}") from None
                except Terminated:
                    raise Terminated(f"stopped on SIGTERM during step {step + 1}: {save_after_failure()}; {hint()}") from None
                except KeyboardInterrupt:
                    raise Interrupted(f"interrupted during step {step + 1}: {save_after_failure()}; {hint()}") from None
                if not done:  # converged
                    break
                if metrics is None:  # the first step succeeded: only now does the run dir change
                    tensorboard = (first_step() if first_step is not None else None) or tensorboard
                    metrics = open(run_dir / METRICS_FILE, "a")
                for last in done:
                    step = last["step"]
                    if step % cfg.run.log_every == 0 or step == total:
                        metrics.write(json.dumps(_jsonable(last)) + "\n")
                        if tensorboard is not None:
                            for key, value in last.items():
                                if isinstance(value, (int, float, np.floating, np.integer)) and key != "step":
                                    tensorboard.add_scalar(key, float(value), step)
                metrics.flush()
                bar.update(len(done))
                bar.set_postfix(J=f"{last['J']:.6g}")
                if stop.terminated:  # the steps in flight finished before they could be abandoned
                    flush()
                    if saved["step"] != step:
                        save()
                    raise Terminated(f"stopped on SIGTERM after step {step}: checkpoint {saved['path']} written; {resume_hint}")
                if every and step % every == 0:
                    save(wait=False)
                if stop.requested and step < total:
                    flush()
                    if saved["step"] != step:
                        save()
                    raise Interrupted(f"stopped at step {step} on Ctrl-C: checkpoint {saved['path']} written; {resume_hint}")
        flush()
        state = stepper.state_dict()
        if saved["step"] != int(state["meta"]["step"]):
            save(state)
        theta = state["theta"].numpy()
        model = SparseAutoencoder.from_config(cfg)
        seconds = time.perf_counter() - t0
        summary = {
            "version": __version__,
            "package": str(Path(__file__).resolve().parents[1]),  # the dist_sae folder that ran: checkout, wheel, job env
            "steps": int(state["meta"]["step"]),
            "converged": bool(stepper.converged),
            "seconds": seconds,
            "engine": cfg.workers.engine,
            "method": cfg.optim.method,
            "rho_hat_mode": "exact" if cfg.optim.full_batch else cfg.sparsity.rho_hat,
            "final": _jsonable(last),
        }
        if resumed_from is not None:
            summary["resumed_from"] = resumed_from
        try:
            save_model(model, run_dir, cfg, torch.from_numpy(theta))
            tmp = run_dir / (SUMMARY_FILE + ".tmp")
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
            tmp.replace(run_dir / SUMMARY_FILE)
        except Exception as exc:  # OSError, SafetensorError: the disk is full or gone
            (run_dir / (SUMMARY_FILE + ".tmp")).unlink(missing_ok=True)
            raise (exc if isinstance(exc, OSError) else OSError(f"{type(exc).__name__}: {exc}")) from None
    except OSError as exc:  # metrics, model or summary: the disk is full or gone
        raise CheckpointError(f"cannot write to {run_dir} ({exc.strerror or exc}): the disk is full or not writable; "
                              f"{kept()}. Free disk space, then {resume_hint}") from None
    finally:
        writer.shutdown(wait=True)  # a write still running when the loop fails is finished, not cut
        if metrics is not None:
            metrics.close()
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
