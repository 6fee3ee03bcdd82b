"""The report of a run: pictures and one static page, `RUN_DIR/report/report.html`.

    weights.png          the notes' visualisation: each first-layer unit's norm-bounded maximally
                         activating input, tiled (works for the first layer of stacked models)
    reconstructions.png  a fixed sample of rows and their reconstructions, in the original pixel
                         space (the dataset's saved transform is inverted)
    curves.png           J and its terms, ρ̂ mean/min/max and FVU against step (metrics.jsonl)
    rho_hat.png          histogram of the exact per-unit ρ̂ of each encoder layer, ρ marked
    summary.json         the numbers on the page

The page uses relative links only, so the folder can be copied or opened from disk. Written at the
end of training when run.report is true, or by `dist-sae report RUN_DIR`. No Ray here: the pass 1
for ρ̂ goes through whatever session problem the caller hands in (or one this module opens).
"""

from __future__ import annotations

import html
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dist_sae.report import viz
from dist_sae.data.reader import BlockReader
from dist_sae.data.dataset import Dataset
from dist_sae.data.transforms import load_transform
from dist_sae.data.workunit import WorkUnit
from dist_sae.session import open_session
from dist_sae.train.rundir import METRICS_FILE, SUMMARY_FILE
from dist_sae.train.inputs import bind_dataset, inherited_transform, input_transform
from dist_sae.errors import DataError
from dist_sae.sae.model import CONFIG_FILE, MODEL_FILE, load_model
from dist_sae.sae.objective import Objective

log = logging.getLogger(__name__)

REPORT_DIR = "report"
REPORT_PAGE = "report.html"


@dataclass
class Report:
    """What `write_report` wrote: the page, the pictures by name, and the numbers shown."""

    page: Path
    images: dict[str, Path] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; a torn last line (a run killed mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d is not JSON; skipped", path, number)
    return rows


def read_rows(dataset: Dataset, indices: np.ndarray) -> np.ndarray:
    """Rows of the dataset at global indices (sorted), one small read per row: (k, dim)."""
    starts = np.cumsum([0] + [s.rows for s in dataset.shards])
    out = np.empty((len(indices), dataset.dim), dtype=np.float64)
    with BlockReader(dataset) as reader:
        for i, index in enumerate(indices):
            shard = int(np.searchsorted(starts, index, side="right") - 1)
            row = int(index - starts[shard])
            out[i] = reader.read(WorkUnit.of(i, shard, row, row + 1))[0]
    return out


def sample_indices(rows: int, count: int) -> np.ndarray:
    """A fixed, evenly spread sample of row indices: the same rows in every report of a dataset."""
    count = min(count, rows)
    return np.unique(np.linspace(0, rows - 1, count).round().astype(np.int64))


def _rho_targets(cfg) -> dict[int, float]:
    sp = cfg.sparsity
    return dict(zip(sp.layers, sp.per_layer("rho"))) if sp.kind == "kl" else {}


def exact_layer_means(cfg, dataset: Dataset, theta: np.ndarray, problem=None, local: bool = False) -> list[np.ndarray]:
    """Pass 1 over the whole dataset: the exact mean activation of every encoder unit, per layer.

    Uses `problem` (a session's PassProblem) when given; otherwise opens a session as the config
    says (a Ray one for workers.engine=ray), or an in-process one with local=True.
    """
    if problem is not None:
        return [np.asarray(m) for m in problem.layer_means(theta)]
    run_cfg = bind_dataset(cfg, dataset)
    if local:
        run_cfg = run_cfg.with_overrides({"workers.engine": "local"})
    session = open_session(run_cfg, dataset)
    try:
        return [np.asarray(m) for m in session.problem.layer_means(theta)]
    finally:
        session.close()


def write_report(
    run_dir: str | Path,
    data: str | Path | None = None,
    problem=None,
    local: bool = False,
    samples: int = 20,
    layer_means: list[np.ndarray] | None = None,
    exact_rho: bool = True,
) -> Report:
    """Write `RUN_DIR/report/` (pictures, summary.json, report.html) for a trained run.

    Args:
        run_dir: a run directory holding model.safetensors and config.json.
        data: dataset folder for reconstructions and ρ̂ (default: the run's data.path).
        problem: a session's problem to run the pass 1 for ρ̂ on (default: open one).
        local: open an in-process session rather than the configured engine.
        samples: rows shown in the reconstruction picture.
        layer_means: per-layer mean activations, if already known (skips the pass 1).
        exact_rho: compute ρ̂ with a pass 1; False uses the last metrics line (no histogram).

    Returns:
        The Report; `report.page` is the HTML file.

    Raises:
        ModelError: the run directory has no readable model.
    """
    run_dir = Path(run_dir)
    model, cfg = load_model(run_dir)
    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    rep = Report(out / REPORT_PAGE)
    metrics = read_metrics(run_dir / METRICS_FILE)
    run_summary = json.loads((run_dir / SUMMARY_FILE).read_text()) if (run_dir / SUMMARY_FILE).is_file() else {}
    rho = _rho_targets(cfg)
    obj = Objective.from_config(cfg)
    theta = model.theta.detach().numpy().copy()

    dataset = None
    data = data or cfg.data.path
    if data:
        try:
            dataset = Dataset.open(data)
        except DataError as exc:
            rep.notes.append(f"dataset unavailable, so no reconstructions or ρ̂ histogram: {exc}")
    else:
        rep.notes.append("the run names no dataset (data.path), so no reconstructions or ρ̂ histogram")
    if dataset is not None:  # other raw data gets the training data's saved preprocessing, as in evaluate
        cfg = cfg.with_overrides(inherited_transform(cfg.data.path, dataset))
    # data.transform: rows are preprocessed as they are read (raw data, a saved transform).
    read_transform = input_transform(cfg)
    seen_dim = None if dataset is None else (read_transform.out_dim(dataset.dim) if read_transform else dataset.dim)
    if dataset is not None and seen_dim != model.visible:
        rep.notes.append(f"{dataset.path} gives rows of {seen_dim} features but the model takes {model.visible}; dataset ignored")
        dataset = None
    pictures = dataset is not None and dataset.dim == model.visible  # W1's columns are the stored pixels
    layout = viz.sample_layout(dataset.sample_shape if pictures else [model.visible], model.visible)
    if layout.note:
        rep.notes.append(layout.note)

    w1 = model.param("W1").detach().numpy()
    rep.images["weights"] = viz.save_weight_grid(w1, layout, out / "weights.png")

    if dataset is not None:
        indices = sample_indices(dataset.rows, samples)
        x = read_rows(dataset, indices)
        if read_transform is not None:  # show the raw rows, and the reconstructions mapped back to them
            x_hat = read_transform.inverse(model.reconstruct(read_transform.apply(x)))
            transform = None
            layout_rows = viz.sample_layout(dataset.sample_shape, dataset.dim)
        else:
            x_hat = model.reconstruct(x)
            transform = load_transform(dataset.path)
            layout_rows = layout
        if read_transform is not None:
            rep.summary["reconstruction_space"] = f"raw rows (the data.transform of {cfg.data.transform} inverted)"
        elif transform is not None:
            x, x_hat = transform.inverse(x), transform.inverse(x_hat)
            rep.summary["reconstruction_space"] = "original pixels (the dataset's transform inverted)"
        else:
            rep.summary["reconstruction_space"] = "as stored (the dataset has no saved transform)"
        rep.images["reconstructions"] = viz.save_reconstructions(np.asarray(x), np.asarray(x_hat), layout_rows, out / "reconstructions.png")
        rep.summary["sample_rows"] = [int(i) for i in indices]

    if metrics:
        rep.images["curves"] = viz.save_curves(metrics, out / "curves.png", rho)
    else:
        rep.notes.append(f"no {METRICS_FILE}, so no training curves")

    if layer_means is None and dataset is not None and exact_rho:
        layer_means = exact_layer_means(cfg, dataset, theta, problem, local)
    if layer_means is not None:
        q = [obj.q_of_mean(np.asarray(m, dtype=np.float64)) for m in layer_means]
        rep.images["rho_hat"] = viz.save_rho_hist(q, out / "rho_hat.png", rho)
        rep.summary["layers"] = [_layer_summary(i, m, rho.get(i)) for i, m in enumerate(q, start=1)]
        rep.summary["rho_hat_source"] = "exact pass 1 over the whole dataset at the final θ"
    elif metrics:
        last = metrics[-1]
        rep.summary["layers"] = [
            {"layer": i, "mean": last.get(f"rho_hat{i}_mean"), "min": last.get(f"rho_hat{i}_min"), "max": last.get(f"rho_hat{i}_max"),
             "rho": rho.get(i), "dead": last.get(f"dead{i}"), "saturated": last.get(f"saturated{i}")}
            for i in range(1, len(model.hidden) + 1)
        ]
        rep.summary["rho_hat_source"] = f"last line of {METRICS_FILE} (step {last.get('step')}), no histogram"

    rep.summary.update(_run_summary(cfg, run_summary, metrics))
    rep.summary["notes"] = rep.notes
    rep.summary["images"] = {k: p.name for k, p in rep.images.items()}
    (out / "summary.json").write_text(json.dumps(rep.summary, indent=2, default=float) + "\n")
    rep.page.write_text(_page(run_dir, cfg, rep))
    return rep


def _layer_summary(layer: int, q: np.ndarray, rho: float | None) -> dict[str, Any]:
    row = {"layer": layer, "units": int(q.size), "mean": float(q.mean()), "min": float(q.min()), "max": float(q.max()), "rho": rho}
    if rho is not None:
        row["dead"] = int((q < rho / 10).sum())
        row["saturated"] = int((q > 1 - rho / 10).sum())
    return row


def _run_summary(cfg, run_summary: dict[str, Any], metrics: list[dict[str, Any]]) -> dict[str, Any]:
    last = run_summary.get("final") or (metrics[-1] if metrics else {})
    first = metrics[0] if metrics else {}
    return {
        "architecture": "-".join(str(s) for s in [cfg.model.visible, *cfg.model.hidden, *reversed(cfg.model.hidden[:-1]), cfg.model.visible]),
        "activation": cfg.model.activation,
        "output": cfg.model.output,
        "sparsity": cfg.sparsity.kind,
        "method": cfg.optim.method,
        "engine": run_summary.get("engine", cfg.workers.engine),
        "steps": run_summary.get("steps", last.get("step")),
        "converged": run_summary.get("converged"),
        "seconds": run_summary.get("seconds"),
        "version": run_summary.get("version"),
        "rho_hat_mode": last.get("rho_hat_mode", run_summary.get("rho_hat_mode")),
        "rho_hat_staleness": last.get("rho_hat_staleness"),
        "J_first": first.get("J"),
        "J_final": last.get("J"),
        "terms_final": {k.removeprefix("J_"): last.get(k) for k in ("J_reconstruction", "J_weight_decay", "J_sparsity")},
        "fvu_final": last.get("fvu"),
        "examples_per_s": last.get("examples_per_s"),
        "workers": last.get("workers"),
    }


# ---- the page ------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; } figure { margin: 1.5em 0; } figcaption { color: #555; font-size: 0.9em; }
.note { color: #8a5a00; }
"""

_CAPTIONS = {
    "weights": "Weights: each square is one first-layer hidden unit's norm-bounded maximally activating input "
    "x<sub>j</sub> = W1<sub>ij</sub> / &radic;&Sigma;<sub>j</sub> W1<sub>ij</sub><sup>2</sup> (mid-gray is 0; each square is scaled to its own range).",
    "reconstructions": "Reconstructions: a fixed sample of rows (top) and the model's output (bottom), each pair on one intensity scale.",
    "curves": "Training curves from metrics.jsonl: J and its terms; ρ̂ mean (solid), min (dotted), max (dashed) per layer; fraction of variance unexplained.",
    "rho_hat": "Histogram of each unit's ρ̂, its mean activation over the whole dataset at the final weights; the dashed line is the target ρ.",
}


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


def _page(run_dir: Path, cfg, rep: Report) -> str:
    s = rep.summary
    esc = html.escape
    rows = "".join(
        f"<tr><th>{esc(label)}</th><td>{esc(_fmt(s.get(key)))}</td></tr>"
        for key, label in (
            ("architecture", "network"), ("activation", "hidden activation"), ("output", "output activation"),
            ("sparsity", "sparsity penalty"), ("method", "optimizer"), ("engine", "engine"), ("workers", "workers (last step)"),
            ("steps", "steps"), ("converged", "converged"), ("seconds", "step-loop seconds (first step to model saved; without starting Ray or this report)"),
            ("version", "written by dist_sae"),
            ("rho_hat_mode", "ρ̂ mode"), ("rho_hat_staleness", "ρ̂ staleness (steps)"),
            ("J_first", "J at step 1"), ("J_final", "J final"), ("terms_final", "terms final"),
            ("fvu_final", "FVU final"), ("examples_per_s", "examples/s (last step)"),
        )
    )
    layer_rows = "".join(
        "<tr>" + "".join(f"<td>{esc(_fmt(layer.get(k)))}</td>" for k in ("layer", "rho", "mean", "min", "max", "dead", "saturated")) + "</tr>"
        for layer in s.get("layers", [])
    )
    layers = (
        f"<h2>Mean activation per layer</h2><p>{esc(s.get('rho_hat_source', ''))}; dead: ρ̂ &lt; ρ/10, saturated: ρ̂ &gt; 1 − ρ/10.</p>"
        "<table><tr><th>layer</th><th>ρ</th><th>mean ρ̂</th><th>min</th><th>max</th><th>dead</th><th>saturated</th></tr>"
        f"{layer_rows}</table>"
        if layer_rows else ""
    )
    figures = "".join(
        f'<figure id="{name}"><a href="{esc(path.name)}"><img src="{esc(path.name)}" alt="{name}"></a>'
        f"<figcaption>{_CAPTIONS[name]}</figcaption></figure>"
        for name, path in rep.images.items()
    )
    notes = "".join(f'<p class="note">Note: {esc(n)}</p>' for n in rep.notes)
    files = [(f"../{name}", name) for name in (MODEL_FILE, CONFIG_FILE, METRICS_FILE, SUMMARY_FILE) if (run_dir / name).is_file()]
    files.append(("summary.json", "summary.json"))
    links = " · ".join(f'<a href="{esc(href)}">{esc(label)}</a>' for href, label in files)
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>dist_sae report: {esc(run_dir.name)}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>Sparse autoencoder report</h1><p>Run <code>{esc(str(run_dir))}</code>, data <code>{esc(str(cfg.data.path))}</code>. "
        f"Files: {links}</p>\n{notes}<table>{rows}</table>\n{layers}\n{figures}\n</body></html>\n"
    )
