"""Run directories: what makes a folder hold a run, preparing it, resuming it, its metrics file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


from dist_sae.train.checkpoint import CHECKPOINTS
from dist_sae.config import Config, config_from_args
from dist_sae.data.dataset import Dataset
from dist_sae.data.storage import is_url
from dist_sae.errors import CheckpointError, DataError
from dist_sae.sae.model import CONFIG_FILE, MODEL_FILE, SparseAutoencoder


METRICS_FILE = "metrics.jsonl"



SUMMARY_FILE = "run.json"



LOCK_FILE = ".lock"  # flock()ed for the life of a run; empty



# Config keys a resumed run may change freely: they do not change the maths of the run.
# run.seed is not among them: it sets the batch order and the noise.
RESUMABLE_CHANGES = (
    "optim.steps", "workers.", "data.prefetch", "data.path", "data.cache_mb", "data.local_cache", "data.local_cache_gb", "data.local_cache_verify",
    "data.read_ahead_shards", "compute.threads", "compute.lanes",
    "run.out", "run.checkpoint_every", "run.keep_checkpoints", "run.log_every", "run.quiet", "run.tensorboard", "run.report",
)



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



@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive flock on RUN_DIR/.lock for the block: one run (or resume) per folder.

    The lock file is created once, empty, and never written, truncated or removed afterwards (so
    a refused run changes nothing, and no lock is taken on a file about to be unlinked). The lock
    goes with the process: a killed run leaves no stale lock. A refused run names the holder from
    the kernel's lock table (/proc/locks), not from anything the holder wrote.

    Raises:
        CheckpointError: another process holds the lock (naming its PID and host).
    """
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        holder = flock_or_holder(fd)
        if holder is not None:
            raise CheckpointError(f"{run_dir} is in use by another run ({holder} holds {path}); wait for it to end, or give another --out")
        try:
            yield
        except BaseException:
            # A run refused before it wrote anything (bad placement, bad data) leaves no folder
            # behind when it made the folder itself: only the lock file is in it.
            if created and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
    finally:
        os.close(fd)  # releases the flock



def _lock_holder(st: os.stat_result) -> str | None:
    """"PID n on host h" of the flock holder of a file, from /proc/locks (this host's lock table); None if it lists none."""
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or parts[1] != "FLOCK":  # "->" lines are waiters, not holders
            continue
        major, minor, inode = parts[5].split(":")
        if (int(major, 16), int(minor, 16), int(inode)) == (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino):
            return f"PID {parts[4]} on host {socket.gethostname()}"
    return None


def flock_or_holder(fd: int, holder: Callable[[os.stat_result], str | None] = _lock_holder, tries: int = 3,
                    wait_s: float = 0.05) -> str | None:
    """Take an exclusive flock on `fd` and return None; or, when another process holds it, name the holder.

    A holder that this host's lock table does not list has either just released the lock (a short
    run ending between our refused flock and the lookup: seen in CI as two runs started together)
    or runs on another host: the flock is tried again `tries` times, `wait_s` apart, before the
    holder is called "a process on another host". holder: the lookup of a holder by file.
    """
    for _ in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        name = holder(os.fstat(fd))
        if name is not None:
            return name
        time.sleep(wait_s)
    return "a process on another host"



def check_shape(state: dict[str, Any], info: dict[str, Any], cfg: Config, run_dir: Path) -> None:
    """Refuse to resume with a model whose shape differs from the checkpoint's (--allow-change or not).

    Raises:
        CheckpointError: naming the change and how to start a new run from the checkpoint's weights.
    """
    saved = info.get("config", {}).get("model", {})
    theta = state["theta"]
    want = SparseAutoencoder.from_config(cfg).num_params
    keys = ("visible", "hidden", "tied")
    changes = [f"model.{k}: {saved.get(k)!r} -> {getattr(cfg.model, k)!r}" for k in keys if k in saved and saved[k] != getattr(cfg.model, k)]
    if want == theta.numel() and not changes:
        return
    step = int(state["meta"]["step"])
    raise CheckpointError(
        f"cannot resume {run_dir}: the model's shape changed ({'; '.join(changes) or 'model layout'}: "
        f"{theta.numel()} -> {want} parameters), and a checkpoint only continues its own model. "
        f"Start a new run instead, from this run's step-{step} weights where they fit: "
        f"`dist-sae train --out NEW_DIR --init {run_dir / CHECKPOINTS / f'step-{step:08d}' / 'theta.safetensors'} ...`"
    )



def finished_at(state: dict[str, Any], cfg: Config) -> str:
    """Why a resumed run is already finished ("" if it is not): optim.steps reached, or converged."""
    meta = state["meta"]
    if int(meta["step"]) >= cfg.optim.steps:
        return f"optim.steps={cfg.optim.steps} reached"
    return "converged (L-BFGS met its tolerance)" if meta.get("converged") else ""



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
    if config is None and not data_given and cfg.data.path and not is_url(cfg.data.path) and not Path(cfg.data.path).is_dir():
        raise DataError(
            f"the run's data folder {cfg.data.path} (data.path in {saved}) does not exist; give --data DIR "
            "(the same data; other data needs --allow-change)"
        )
    return cfg



def _check_resume(info: dict[str, Any], cfg: Config, dataset: Dataset, allow_change: bool) -> None:
    problems = []
    if info.get("fingerprint") != dataset.fingerprint:
        problems.append(f"dataset fingerprint {info.get('fingerprint')} -> {dataset.fingerprint} ({dataset.location})")
    problems += config_changes(info.get("config", {}), cfg.model_dump())
    if problems and not allow_change:
        raise CheckpointError(
            "cannot resume: the run differs from its checkpoint in " + "; ".join(problems)
            + ". Pass --allow-change to resume anyway"
        )
