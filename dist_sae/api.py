"""The Python API: train, evaluate, gradcheck, load. The CLI is a thin shell over these.

`workers.engine` picks where passes run: `local` (this process, no Ray) or `ray` (parameter server
and workers on a Ray cluster; a local one bound to 127.0.0.1 is started when no address is given).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dist_sae.train.checkpoint import latest_checkpoint
from dist_sae.config import Config, load_config
from dist_sae.data.dataset import Dataset
from dist_sae.data.storage import shard_cache
from dist_sae.train.inputs import bind_dataset, inherited_transform
from dist_sae.train.problem import local_problem
from dist_sae.errors import CheckpointError, ConfigError, Terminated
from dist_sae.sae.model import CONFIG_FILE, SparseAutoencoder, load_model
from dist_sae.sae.objective import Evaluation
from dist_sae.train.loop import TrainResult, _loop
from dist_sae.train.rundir import (
    METRICS_FILE, SUMMARY_FILE, _check_resume, check_run_dir, check_shape, finished_at, prepare_run_dir, run_lock,
    truncate_metrics,
)
from dist_sae.session import initial_theta, open_session
from dist_sae import progress
from dist_sae.version import __version__

log = logging.getLogger(__name__)


def train(
    cfg: Config,
    init: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    allow_change: bool = False,
    fast_stop: bool = False,
) -> TrainResult:
    """Train a sparse autoencoder as configured; outputs go to `cfg.run.out`.

    Args:
        cfg: the validated config; `data.path` and `run.out` must be set.
        init: optional `.safetensors` with initial weights (W1, b1, ...).
        resume: continue the newest valid checkpoint in the run dir.
        overwrite: replace a run already in the run dir.
        allow_change: let a resume change config keys that alter the run's maths, or use other data.
        fast_stop: stop a private local Ray that the run started without ray.shutdown's wait for
            each of its processes in turn (0.6 s; the CLI, whose process ends right after). Always
            so after SIGTERM, within the grace period.

    Raises:
        DistSaeError subclasses naming the file, field or value at fault.
    """
    if not cfg.data.path:
        raise ConfigError("no data: give --data DIR (or data.path=DIR)")
    if not cfg.run.out:
        raise ConfigError("no run directory: give --out DIR (or run.out=DIR)")
    writer_class = _tensorboard_class(cfg)  # fails before any work when the package is missing
    dataset = Dataset.open(cfg.data.path, cache=shard_cache(cfg.data))
    if dataset.url is None:  # NaN at shard edges; an object-store dataset is checked as its shards are read
        dataset.check_edges()
    cfg = bind_dataset(cfg, dataset)
    run_dir = Path(cfg.run.out)
    if resume and not run_dir.is_dir():
        check_run_dir(run_dir, resume, overwrite)  # "holds no run": refused without making the folder
    with run_lock(run_dir):  # one run per folder, taken before the folder is looked at
        return _train_locked(cfg, dataset, run_dir, writer_class, init, resume, overwrite, allow_change, fast_stop)


def _train_locked(cfg: Config, dataset: Dataset, run_dir: Path, writer_class, init, resume: bool, overwrite: bool,
                  allow_change: bool, fast_stop: bool = False) -> TrainResult:
    # Everything a user can get wrong is checked before the run dir is touched: nothing of an
    # existing run is overwritten by a run that cannot start. A resume changes no file of the run
    # until its first step has succeeded.
    check_run_dir(run_dir, resume, overwrite)
    checkpoint, resumed_from = None, None
    if resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise CheckpointError(
                f"--resume: {run_dir} has no valid checkpoint (the run stopped before its first one); "
                "start it again with --overwrite"
            )
        check_shape(*checkpoint, cfg, run_dir)
        _check_resume(checkpoint[1], cfg, dataset, allow_change)
        why = finished_at(checkpoint[0], cfg)
        if why:
            return _finished(run_dir, checkpoint[0], why)
        resumed_from = {"step": int(checkpoint[0]["meta"]["step"]), "version": checkpoint[1].get("version", "before 0.2.0")}
        if resumed_from["version"] != __version__:
            log.warning("resuming a checkpoint written by dist_sae %s with dist_sae %s", resumed_from["version"], __version__)
    theta0 = initial_theta(cfg, init)
    session = open_session(cfg, dataset, theta0)
    tensorboard = None

    def first_step():
        """After the resumed run's first step: its config and metrics change only now."""
        nonlocal tensorboard
        step = int(checkpoint[0]["meta"]["step"])
        dropped = truncate_metrics(run_dir / METRICS_FILE, step)
        cfg.save(run_dir / CONFIG_FILE)
        log.info("resumed %s at step %d (checkpoint written by dist_sae %s; %d metrics lines after it dropped)",
                 run_dir, step, resumed_from["version"], dropped)
        tensorboard = writer_class(str(run_dir / "tensorboard")) if writer_class else None
        return tensorboard

    try:
        if not resume:
            prepare_run_dir(run_dir, resume=False, overwrite=overwrite)
            cfg.save(run_dir / CONFIG_FILE)
            tensorboard = writer_class(str(run_dir / "tensorboard")) if writer_class else None
        if hasattr(session.problem.evaluator, "progress"):
            session.problem.evaluator.progress = progress.pass_bars(cfg.run.quiet)
        stepper = session.stepper(theta0)
        if checkpoint is not None:
            stepper.load_state_dict(checkpoint[0])
        result = _loop(cfg, dataset, run_dir, stepper, tensorboard, resumed_from, first_step if resume else None)
        if cfg.run.report:
            _write_report(run_dir, session.problem)
        return result
    finally:
        if tensorboard is not None:
            tensorboard.close()
        t = time.perf_counter()
        session.close(fast=fast_stop or isinstance(sys.exc_info()[1], Terminated))  # SIGTERM: within the grace period
        log.info("session closed in %.2fs", time.perf_counter() - t)


def _finished(run_dir: Path, state: dict, why: str) -> TrainResult:
    """The result of resuming a run that is already done: read, nothing written."""
    summary = {}
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        pass
    step = int(state["meta"]["step"])
    return TrainResult(run_dir, step, summary.get("final") or {}, 0.0, state["theta"].numpy(), finished=why)


def _tensorboard_class(cfg: Config):
    """TensorBoard's SummaryWriter class when run.tensorboard is true, else None (an optional dependency)."""
    if not cfg.run.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("run.tensorboard=true needs the tensorboard package: pip install tensorboard (or set run.tensorboard=false)") from None
    return SummaryWriter


def _write_report(run_dir: Path, problem) -> None:
    """The end-of-training report; a failure here is logged, never loses the trained model."""
    from dist_sae.report.report import write_report

    try:
        page = write_report(run_dir, problem=problem).page
        log.info("report: %s", page)
    except Exception as exc:  # the model is already saved; say how to retry
        log.warning("the report could not be written (%s: %s); retry with `dist-sae report %s`", type(exc).__name__, exc, run_dir,
                    exc_info=log.isEnabledFor(logging.DEBUG))


def evaluate(model: str | Path, data: str | Path, overrides: list[str] | None = None) -> tuple[Evaluation, Config]:
    """Exact J, its terms and ∇J of a saved model over a dataset (hyperparameters from the model's config)."""
    model_obj, cfg = load_model(model, infer_architecture=True)
    cfg = cfg.with_overrides([o for o in overrides or [] if o.startswith("data.local_cache")])
    dataset = Dataset.open(data, cache=shard_cache(cfg.data))
    # Noise belongs to training passes; evaluate reports the clean objective unless told otherwise.
    # New raw data gets the training data's saved preprocessing.
    inherit = inherited_transform(cfg.data.path, dataset)
    cfg = cfg.with_overrides(["noise.kind=none"] + inherit + list(overrides or []) + [f"data.path={data}"])
    cfg = bind_dataset(cfg, dataset)
    theta = model_obj.theta.detach().numpy().copy()
    session = open_session(cfg, dataset)
    try:
        return session.problem.evaluate(theta), cfg
    finally:
        session.close()


def gradcheck(cfg: Config, epsilon: float = 1e-4, coords: int = 0, init: str | Path | None = None,
              quiet: bool = True) -> dict[str, float]:
    """Compare ∇J with central differences (docs/maths.md), in float64 in this process.

    Args:
        coords: check this many coordinates of θ, drawn with run.seed (0: all of them).
        quiet: no progress bar over the coordinates (two exact evaluations each).

    Returns:
        {"relative_error": ‖num−ana‖/‖num+ana‖, "coords": n, "params": P}
    """
    if not cfg.data.path:
        raise ConfigError("no data: give --data DIR (or data.path=DIR)")
    cfg = cfg.with_overrides({"compute.dtype": "float64", "workers.engine": "local"})
    dataset = Dataset.open(cfg.data.path, cache=shard_cache(cfg.data))
    cfg = bind_dataset(cfg, dataset)
    problem = local_problem(cfg, dataset)
    try:
        theta = initial_theta(cfg, init)
        analytic = problem.evaluate(theta).grad
        idx = np.arange(theta.size)
        if 0 < coords < theta.size:
            idx = np.sort(np.random.default_rng(cfg.run.seed).choice(theta.size, coords, replace=False))
        numeric = np.empty(idx.size)
        with progress.bar(idx.size, "gradcheck", unit="coord", quiet=quiet) as bar:
            for n, i in enumerate(idx):
                plus, minus = theta.copy(), theta.copy()
                plus[i] += epsilon
                minus[i] -= epsilon
                numeric[n] = (problem.evaluate(plus).loss - problem.evaluate(minus).loss) / (2 * epsilon)
                bar.update(1)
    finally:
        problem.evaluator.close()
    ana = analytic[idx]
    denom = np.linalg.norm(numeric + ana)
    rel = float(np.linalg.norm(numeric - ana) / denom) if denom > 0 else float(np.linalg.norm(numeric - ana))
    return {"relative_error": rel, "coords": int(idx.size), "params": int(theta.size)}


def load(run_dir: str | Path, dtype: torch.dtype = torch.float64) -> SparseAutoencoder:
    """The trained torch module of a run dir (or model file); its config is `module.config`."""
    model, cfg = load_model(run_dir, dtype)
    model.config = cfg
    return model.eval()


def evaluate_at_init(data: str | Path, overrides: list[str] | None = None) -> Evaluation:
    """Exact J and ∇J at the seeded initialisation of the configured model (benchmarks, checks)."""
    cfg = load_config(None, list(overrides or []) + [f"data.path={data}"])
    dataset = Dataset.open(data, cache=shard_cache(cfg.data))
    cfg = bind_dataset(cfg, dataset)
    session = open_session(cfg, dataset)
    try:
        return session.problem.evaluate(initial_theta(cfg, None))
    finally:
        session.close()
