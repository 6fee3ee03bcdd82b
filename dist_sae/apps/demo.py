"""The demo: the notes' famous result, end to end, in one command (`dist-sae demo`).

    1. data   10,000 8×8 patches of the whitened natural photographs scikit-image ships, normalised
              to [0.1, 0.9] as in the notes (prep.build_patches); with digits=True, scikit-learn's
              8×8 digits (prep.build_digits)
    2. train  64-25-64 sigmoid sparse autoencoder, ρ = 0.01, λ = 1e-4, β = 3, 400 L-BFGS iterations,
              exact two-pass ρ̂, on a local Ray with one worker per CPU (or in-process with local=True)
    3. report RUN/report/report.html with the weight grid, reconstructions, curves and ρ̂ histogram

The demo folder holds `demo.json` (what was run), `data/` and `run/`. Running the demo again into a
folder that holds a demo replaces that demo; a folder holding anything else is refused unless
overwrite=True, and even then only `data/`, `run/` and `demo.json` are replaced.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dist_sae.config import Config, load_config
from dist_sae.errors import CheckpointError, Terminated

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_OUT = "dist_sae_demo"
MARKER = "demo.json"
DATA_DIR, RUN_DIR = "data", "run"

# The notes' exercise (docs/reproduction.md): what `dist-sae demo` trains.
NOTES_SETTINGS = {
    "model.hidden": [25],  # 64-25-64
    "model.activation": "sigmoid",
    "model.output": "sigmoid",  # the data is normalised to [0.1, 0.9]
    "loss.weight_decay": 1e-4,  # λ
    "sparsity.kind": "kl",
    "sparsity.rho": 0.01,  # ρ
    "sparsity.beta": 3.0,  # β
    "optim.method": "lbfgs",
    "optim.steps": 400,  # the notes' maxIter
    "compute.dtype": "float64",
}


@dataclass
class DemoResult:
    out: Path
    data_dir: Path
    run_dir: Path
    page: Path  # report.html
    weights: Path  # the weight-grid PNG
    # data (building it; on Ray, while Ray starts), steps (the step loop, run.json "seconds"), train
    # (steps + starting the Ray actors + the report), total (the whole command)
    seconds: dict[str, float] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)  # last metrics line
    first: dict[str, Any] = field(default_factory=dict)  # first metrics line


def prepare_demo_dir(out: Path, overwrite: bool) -> None:
    """Make `out` ready for a demo: a new or empty folder, or one holding a previous demo.

    Raises:
        CheckpointError: `out` is a file, or holds something else and overwrite is False.
    """
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; choose a folder for the demo")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not overwrite:
        raise CheckpointError(
            f"{out} is not empty and holds no previous demo ({MARKER}); choose another --out, "
            "or pass --overwrite to replace its data/ and run/ folders"
        )
    for name in (DATA_DIR, RUN_DIR, MARKER):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def demo_config(
    data: str | Path,
    run_dir: str | Path,
    steps: int = 400,
    local: bool = False,
    address: str | None = None,
    workers: int = 0,
    quiet: bool = False,
    seed: int = 0,
) -> Config:
    """The demo's config: the notes' settings and the engine.

    `--local` and Ray cut the data into the same units (the engine's default: 10,000 patches are 2
    units of 5,000 rows, one per worker of 2) and use one torch thread per process, so both paths
    compute the same float64 sums in the same order: the same θ and J, bit for bit.
    """
    items = {
        **NOTES_SETTINGS,
        "optim.steps": steps,
        "data.path": str(data),
        "run.out": str(run_dir),
        "run.seed": seed,
        "run.quiet": quiet,
        "run.report": True,
        "run.checkpoint_every": 100,
        # 10,000 × 64 is too small for intra-op threads to pay: one thread per process is as fast on
        # an idle machine and several times faster on a busy one (Ray workers use one each anyway).
        "compute.threads": 1,
        **_engine(local, address, workers),
    }
    return load_config(None, items)


def _engine(local: bool, address: str | None, workers: int) -> dict[str, Any]:
    """The demo's workers.* settings."""
    items: dict[str, Any] = {"workers.engine": "local" if local else "ray", "workers.num": workers}
    if address:
        items["workers.address"] = address
    return items


def _with_api(value: T) -> T:
    """`value`, once the API (torch) is imported too: both are done while Ray starts."""
    import dist_sae.api  # noqa: F401

    return value


def build_data(data_dir: Path, digits: bool, patches: int, seed: int):
    """The demo's dataset: the notes' whitened natural-image patches, or scikit-learn's digits."""
    from dist_sae.data import build as prep

    if digits:
        return prep.build_digits(data_dir, prep.WriterOptions(overwrite=True))
    return prep.build_patches(data_dir, prep.WriterOptions(overwrite=True), patch=8, count=patches, seed=seed, whiten=True, normalize="notes")


def run_demo(
    out: str | Path = DEFAULT_OUT,
    digits: bool = False,
    patches: int = 10000,
    steps: int = 400,
    local: bool = False,
    address: str | None = None,
    workers: int = 0,
    overwrite: bool = False,
    quiet: bool = False,
    seed: int = 0,
    fast_stop: bool = False,
) -> DemoResult:
    """Build the data, train the notes' sparse autoencoder and write its report.

    Args:
        out: the demo folder (default ./dist_sae_demo).
        digits: scikit-learn's 8×8 digits instead of natural-image patches.
        patches: patches to sample (natural images only).
        steps: L-BFGS iterations.
        local: train in this process instead of on a local Ray.
        address: Ray address to join instead of starting a local Ray.
        workers: Ray workers; 0: one per CPU.
        overwrite: use a non-empty `out` that holds no previous demo.
        quiet: no progress bars.
        seed: patch sampling and initialisation seed.
        fast_stop: see api.train (the CLI, whose process ends right after).

    Returns:
        DemoResult; `result.weights` is the weight-grid PNG.
    """
    out = Path(out)
    t0 = time.perf_counter()
    prepare_demo_dir(out, overwrite)
    settings = {
        "data": "digits" if digits else "patches",
        "patches": None if digits else patches,
        "steps": steps,
        "engine": "local" if local else "ray",
        "seed": seed,
        "status": "running",
    }
    (out / MARKER).write_text(json.dumps(settings, indent=2) + "\n")  # written first: a failed demo is still ours to replace
    connected = False
    try:
        if local:
            dataset = build_data(out / DATA_DIR, digits, patches, seed)
        else:  # Ray starts while the data is built and torch imported (runtime.connect_while)
            from dist_sae.cluster import runtime

            state, dataset = runtime.connect_while(load_config(None, _engine(local, address, workers)).workers,
                                                   lambda: _with_api(build_data(out / DATA_DIR, digits, patches, seed)))
            connected = state in ("started", "joined")  # ours to end: the session leaves it up
        t_data = time.perf_counter()
        from dist_sae.api import train

        cfg = demo_config(dataset.path, out / RUN_DIR, steps, local, address, workers, quiet, seed)
        result = train(cfg, overwrite=True, fast_stop=fast_stop)
    finally:
        if connected:  # after SIGTERM within the grace period: the fast stop, as api.train's
            runtime.stop_local(wait=not (fast_stop or isinstance(sys.exc_info()[1], Terminated)))
    t_end = time.perf_counter()
    run_dir = result.run_dir
    page = run_dir / "report" / "report.html"
    if not page.is_file():  # train() logs report failures; here the report is the point, so raise them
        from dist_sae.report.report import write_report

        page = write_report(run_dir, local=local).page
    from dist_sae.report.report import read_metrics

    metrics = read_metrics(run_dir / "metrics.jsonl")
    seconds = {"data": t_data - t0, "steps": result.seconds, "train": t_end - t_data, "total": t_end - t0}
    settings.update(status="done", seconds=seconds, rows=dataset.rows, report=str(page))
    (out / MARKER).write_text(json.dumps(settings, indent=2) + "\n")
    return DemoResult(
        out=out,
        data_dir=Path(dataset.path),
        run_dir=run_dir,
        page=page,
        weights=run_dir / "report" / "weights.png",
        seconds=seconds,
        final=metrics[-1] if metrics else result.final,
        first=metrics[0] if metrics else {},
    )
