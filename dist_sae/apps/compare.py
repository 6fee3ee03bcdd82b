"""Train several configurations on the same data and seed, and put the results side by side.

For each configuration: the final reconstruction error and FVU, mean activation per encoder layer,
dead units, L0 (mean active units per example) and wall time, all from one exact clean
evaluation of the trained model; then a table (markdown + JSON) and one figure of weight grids
and reconstructions.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_sae.api import evaluate, train
from dist_sae.config import load_config
from dist_sae.data.dataset import Dataset
from dist_sae.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Entry:
    name: str
    run_dir: Path
    row: dict[str, Any]


def compare(
    configs: list[str | Path],
    data: str | Path,
    out: str | Path,
    overrides: list[str] | None = None,
    names: list[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train each config on `data` with the same seed; write compare.json, compare.md and compare.png in `out`.

    Args:
        configs: YAML/JSON config files, one run each.
        overrides: `key=value` applied to every config (e.g. optim.steps=100, workers.engine=local).
        names: labels for the runs (default: the config files' stems).
    """
    if len(configs) < 2:
        raise ConfigError("compare needs at least two configs")
    names = list(names or [Path(c).stem for c in configs])
    if len(set(names)) != len(names):
        raise ConfigError(f"compare: run names must differ, got {names}; pass --names")
    out = Path(out)
    shared = list(overrides or [])
    # Validate every config and the data before anything is created or trained.
    cfgs = [load_config(c, shared + [f"data.path={data}", f"run.out={out / n}", "run.report=false"]) for c, n in zip(configs, names)]
    seeds = {c.run.seed for c in cfgs}
    if len(seeds) > 1:
        raise ConfigError(f"compare trains every config with the same seed, but the configs set run.seed to {sorted(seeds)}")
    Dataset.open(data)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, cfg in zip(names, cfgs):
        log.info("compare: training %s", name)
        t0 = time.perf_counter()
        result = train(cfg, overwrite=overwrite)
        wall = time.perf_counter() - t0
        ev, _ = evaluate(result.run_dir, data, [f"workers.engine={cfg.workers.engine}"])
        row = {
            "name": name,
            "sparsity": cfg.sparsity.kind,
            "architecture": _arch(cfg, Dataset.open(data).dim),
            "reconstruction": ev.terms["reconstruction"],
            "fvu": ev.stats["fvu"],
            "mean_activation": [float(m.mean()) for m in ev.layer_means],
            "dead_units": ev.stats["dead"],
            "l0": ev.stats["l0"],
            "J": ev.loss,
            "steps": result.steps,
            "wall_s": wall,
        }
        entries.append(Entry(name, result.run_dir, row))
    rows = [e.row for e in entries]
    (out / "compare.json").write_text(json.dumps({"data": str(data), "seed": seeds.pop(), "runs": rows}, indent=2) + "\n")
    (out / "compare.md").write_text(markdown_table(rows))
    figure = side_by_side(entries, Dataset.open(data), out / "compare.png")
    return {"runs": rows, "table": str(out / "compare.md"), "figure": str(figure)}


def _arch(cfg, dim: int) -> str:
    hidden = cfg.model.hidden
    return "-".join(str(s) for s in [dim, *hidden, *reversed(hidden[:-1]), dim])


def _fmt_list(values: list[float], fmt: str) -> str:
    return ", ".join(format(v, fmt) for v in values)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = "| run | sparsity | model | reconstruction | FVU | mean activation / layer | dead units | L0 | wall s |\n"
    head += "|---|---|---|---:|---:|---|---|---|---:|\n"
    body = "".join(
        f"| {r['name']} | {r['sparsity']} | {r['architecture']} | {r['reconstruction']:.4g} | {r['fvu']:.4f} | "
        f"{_fmt_list(r['mean_activation'], '.3f')} | {_fmt_list(r['dead_units'], 'd')} | {_fmt_list(r['l0'], '.2f')} | {r['wall_s']:.1f} |\n"
        for r in rows
    )
    return head + body


def side_by_side(entries: list[Entry], dataset: Dataset, path: Path, samples: int = 8) -> Path:
    """One column per run: its weight grid over originals/reconstructions of the same rows."""
    from dist_sae.report import viz
    from dist_sae.api import load
    from dist_sae.report.report import read_rows, sample_indices

    layout = viz.sample_layout(dataset.sample_shape, dataset.dim)
    originals = read_rows(dataset, sample_indices(dataset.rows, samples))
    fig, axes = viz.plt.subplots(2, len(entries), figsize=(3.2 * len(entries), 6.4), squeeze=False)
    for col, entry in enumerate(entries):
        model = load(entry.run_dir)
        w1 = model.named_tensors()["W1"].detach().numpy()
        grid = viz.weight_grid(w1, layout)
        recon = model.reconstruct(originals)
        lo, hi = float(originals.min()), float(originals.max())
        pairs = np.concatenate([viz.to_tiles(originals, layout), viz.to_tiles(recon, layout)])
        tiles = viz.tile_grid(np.clip((pairs - lo) / (hi - lo or 1.0), 0, 1), cols=samples, background=1.0)
        for row, image in enumerate((grid, tiles)):
            ax = axes[row][col]
            ax.imshow(image[:, :, 0] if image.shape[-1] == 1 else image, cmap="gray", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][col].set_title(f"{entry.name}\nFVU {entry.row['fvu']:.3f}, L0 {_fmt_list(entry.row['l0'], '.1f')}", fontsize=9)
    axes[0][0].set_ylabel("W1 (max. activating inputs)", fontsize=8)
    axes[1][0].set_ylabel("originals / reconstructions", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    viz.plt.close(fig)
    return path
