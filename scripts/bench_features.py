"""Are the demo's features edge detectors? Quantitative checks of the weight grid, as JSON.

Runs the full demo (10,000 whitened 8×8 natural-image patches, 64-25-64, 400 L-BFGS iterations), or
reads an existing run with --run, and measures every first-layer unit's norm-bounded maximally
activating input x = W1[i] / ‖W1[i]‖ (the notes' visualisation), next to the same measures of the
untrained network (the seeded initialisation the run started from):

    orientation   orientation selectivity of the 2-D power spectrum: |Σ_k P(k) e^{2iθ_k}| / Σ_k P(k)
                  over non-DC frequencies k (1: all power along one orientation, an edge or grating;
                  ~0.1-0.2: white noise). A unit "has one dominant orientation" when it is >= 0.5.
    spread        energy-weighted radius of gyration of x² in pixels (small: localised; 3.24 is the
                  value for energy spread evenly over 8×8).
    top8_energy   fraction of Σx² in the filter's 8 strongest pixels (1/8 of the patch; 0.125 = even).

Usage:
    python scripts/bench_features.py [--local] [--out DIR] [--json FILE]
    python scripts/bench_features.py --run dist_sae_demo/run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def orientation_selectivity(tile: np.ndarray) -> float:
    """|Σ P e^{2iθ}| / Σ P over the non-DC frequencies of a 2-D filter's power spectrum."""
    h, w = tile.shape
    power = np.abs(np.fft.fft2(tile - tile.mean())) ** 2
    fy = np.fft.fftfreq(h)[:, None] * np.ones((1, w))
    fx = np.ones((h, 1)) * np.fft.fftfreq(w)[None, :]
    keep = (fy != 0) | (fx != 0)
    theta = np.arctan2(fy, fx)
    p = power[keep]
    return float(np.abs((p * np.exp(2j * theta[keep])).sum()) / p.sum()) if p.sum() > 0 else 0.0


def spatial_spread(tile: np.ndarray) -> float:
    """Energy-weighted radius of gyration (pixels) of a filter's squared values."""
    energy = tile**2 / (tile**2).sum()
    ys, xs = np.indices(tile.shape)
    cy, cx = (energy * ys).sum(), (energy * xs).sum()
    return float(np.sqrt((energy * ((ys - cy) ** 2 + (xs - cx) ** 2)).sum()))


def top_energy(tile: np.ndarray, k: int = 8) -> float:
    e = np.sort((tile**2).ravel())[::-1]
    return float(e[:k].sum() / e.sum())


def measure(w1: np.ndarray, shape: tuple[int, int]) -> dict:
    """Summary statistics of the edge measures over the units of W1 (hidden, visible)."""
    from dist_sae.report.viz import max_activating_inputs

    tiles = max_activating_inputs(w1).reshape(-1, *shape)
    osi = np.array([orientation_selectivity(t) for t in tiles])
    spread = np.array([spatial_spread(t) for t in tiles])
    top = np.array([top_energy(t) for t in tiles])
    return {
        "units": int(len(tiles)),
        "orientation_median": float(np.median(osi)),
        "dominant_orientation_fraction": float((osi >= 0.5).mean()),
        "spread_median_px": float(np.median(spread)),
        "top8_energy_median": float(np.median(top)),
        "orientation_per_unit": [round(float(v), 4) for v in osi],
        "spread_per_unit": [round(float(v), 3) for v in spread],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="measure this trained run instead of running the demo")
    parser.add_argument("--out", default="bench_out/features_demo", help="demo folder (default bench_out/features_demo)")
    parser.add_argument("--local", action="store_true", help="train in-process instead of on a local Ray")
    parser.add_argument("--patches", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--json", help="also write the JSON here")
    args = parser.parse_args(argv)

    from dist_sae.data.dataset import Dataset
    from dist_sae.sae.model import SparseAutoencoder, load_model

    result: dict = {"benchmark": "features"}
    if args.run:
        run_dir = Path(args.run)
    else:
        from dist_sae.apps.demo import run_demo

        t0 = time.perf_counter()
        demo = run_demo(args.out, patches=args.patches, steps=args.steps, local=args.local, quiet=True)
        result["demo"] = {"engine": "local" if args.local else "ray", "wall_s": time.perf_counter() - t0, **demo.seconds,
                          "J_first": demo.first.get("J"), "J_final": demo.final.get("J"),
                          "rho_hat_mean_final": demo.final.get("rho_hat1_mean"), "weights_png": str(demo.weights)}
        run_dir = demo.run_dir
    model, cfg = load_model(run_dir)
    shape = tuple(Dataset.open(cfg.data.path).sample_shape) if cfg.data.path and Path(cfg.data.path).is_dir() else (8, 8)
    if len(shape) != 2:
        print(f"error: sample shape {list(shape)} is not a 2-D picture", file=sys.stderr)
        return 2
    untrained = SparseAutoencoder.from_config(cfg)
    untrained.reset_parameters(cfg.run.seed)  # exactly the θ the run started from
    result["run"] = str(run_dir)
    result["trained"] = measure(model.param("W1").detach().numpy(), shape)
    result["untrained"] = measure(untrained.param("W1").detach().numpy(), shape)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
