"""Pictures of a sparse autoencoder: weight grids, reconstructions, curves, ρ̂ histograms.

Pure functions over NumPy arrays and metrics rows; each `plot_*` / `save_*` writes one PNG.
Matplotlib runs on the Agg backend (files only, no display). Nothing here reads a run directory:
`report.py` gathers what to draw.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")  # files only: never open a window, work on headless machines
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


class Layout(NamedTuple):
    """How one row of n features is drawn as a picture."""

    height: int
    width: int
    channels: int  # 1 (grayscale) or 3 (RGB)
    is_image: bool  # False: a plain vector folded into a square-ish tile
    note: str  # why a fallback was used ("" for images)


def sample_layout(sample_shape: list[int], dim: int) -> Layout:
    """The picture layout of a row from the dataset's `sample_shape` (dataset.json).

    [h, w] and [h, w, 1] are grayscale, [h, w, 3] is RGB; anything else is a vector of `dim` values
    folded into the most square h × w with h·w >= dim (padded with zeros).
    """
    shape = [int(s) for s in sample_shape]
    if len(shape) == 2 and shape[0] * shape[1] == dim:
        return Layout(shape[0], shape[1], 1, True, "")
    if len(shape) == 3 and shape[2] in (1, 3) and math.prod(shape) == dim:
        return Layout(shape[0], shape[1], shape[2], True, "")
    width = math.ceil(math.sqrt(dim))
    height = math.ceil(dim / width)
    return Layout(height, width, 1, False, f"sample_shape {shape} is not a picture; each {dim}-vector is folded into {height}×{width}")


def to_tiles(rows: np.ndarray, layout: Layout) -> np.ndarray:
    """Rows (k, n) as pictures (k, h, w, c); vectors are zero-padded to h·w."""
    rows = np.asarray(rows, dtype=np.float64)
    k, n = rows.shape
    need = layout.height * layout.width * layout.channels
    if n < need:
        rows = np.concatenate([rows, np.zeros((k, need - n))], axis=1)
    return rows.reshape(k, layout.height, layout.width, layout.channels)


def max_activating_inputs(w1: np.ndarray) -> np.ndarray:
    """The notes' visualisation: x_j = W1[i, j] / sqrt(Σ_j W1[i, j]²), the norm-bounded input that
    maximally activates hidden unit i. w1 is (hidden, visible); the result has the same shape."""
    w1 = np.asarray(w1, dtype=np.float64)
    norms = np.sqrt((w1 * w1).sum(axis=1, keepdims=True))
    return w1 / np.where(norms > 0, norms, 1.0)


def tile_grid(tiles: np.ndarray, cols: int | None = None, pad: int = 1, background: float = 0.0) -> np.ndarray:
    """Tiles (k, h, w, c) with values in [0, 1] arranged in a grid with `pad` pixels between them.

    Returns (H, W, c) in [0, 1]. cols defaults to ceil(sqrt(k)).
    """
    k, h, w, c = tiles.shape
    cols = cols or math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    grid = np.full((pad + rows * (h + pad), pad + cols * (w + pad), c), background, dtype=np.float64)
    for i in range(k):
        r, q = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top : top + h, left : left + w] = tiles[i]
    return grid


def contrast_tiles(tiles: np.ndarray) -> np.ndarray:
    """Per-tile display scaling of signed filters (the notes' display_network): zero is mid-gray,
    ±max|x| of each tile is black/white. (k, h, w, c) -> [0, 1]."""
    centred = tiles - tiles.mean(axis=(1, 2, 3), keepdims=True)
    scale = np.abs(centred).max(axis=(1, 2, 3), keepdims=True)
    return 0.5 + 0.5 * centred / np.where(scale > 0, scale, 1.0)


def save_png(image: np.ndarray, path: str | Path, min_size: int = 320) -> Path:
    """Write an (H, W, c) array in [0, 1] as an 8-bit PNG, enlarged by an integer factor (nearest
    neighbour, so pixels stay sharp) until its shorter side is at least `min_size`."""
    image = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
    if image.shape[2] == 1:
        image = image[:, :, 0]
    scale = max(1, math.ceil(min_size / min(image.shape[:2])))
    image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    path = Path(path)
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(path)
    return path


def weight_grid(w1: np.ndarray, layout: Layout) -> np.ndarray:
    """The weight-grid picture of W1 (hidden, visible): one norm-bounded maximal input per unit, tiled."""
    tiles = to_tiles(max_activating_inputs(w1), layout)
    return tile_grid(contrast_tiles(tiles), background=0.0)


def save_weight_grid(w1: np.ndarray, layout: Layout, path: str | Path) -> Path:
    return save_png(weight_grid(w1, layout), path)


def _display_range(values: np.ndarray) -> tuple[float, float]:
    """[0, 1] when the pixels already lie there (pictures), else the values' own range."""
    lo, hi = float(values.min()), float(values.max())
    if lo >= -0.02 and hi <= 1.02:
        return 0.0, 1.0
    return lo, hi if hi > lo else lo + 1.0


def save_reconstructions(originals: np.ndarray, outputs: np.ndarray, layout: Layout, path: str | Path, cols: int = 10) -> Path:
    """Originals over their reconstructions, both (k, n) in the original pixel space.

    Each original and its reconstruction share one intensity scale, so they compare by eye.
    Non-picture rows are drawn as line plots instead.
    """
    k = originals.shape[0]
    if not layout.is_image:
        return _save_vector_reconstructions(originals, outputs, path)
    cols = min(cols, k)
    pairs = []
    for i in range(k):
        lo, hi = _display_range(np.concatenate([originals[i], outputs[i]]))
        pairs.append([(to_tiles(v[None], layout)[0] - lo) / (hi - lo) for v in (originals[i], outputs[i])])
    blank = np.ones_like(pairs[0][0])
    rows = []  # per block of `cols` samples: a row of originals over a row of reconstructions
    for start in range(0, k, cols):
        block = pairs[start : start + cols] + [[blank, blank]] * (cols - len(pairs[start : start + cols]))
        rows += [tile_grid(np.stack([p[0] for p in block]), cols, background=1.0),
                 tile_grid(np.stack([p[1] for p in block]), cols, background=1.0)[1:]]
    image = np.clip(np.concatenate(rows, axis=0), 0, 1)
    height, width = image.shape[:2]
    fig = plt.figure(figsize=(min(12, 0.9 * cols + 1.4), 0.9 * height / (layout.height + 1) + 0.3))
    ax = fig.add_axes((0.11, 0.02, 0.88, 0.96))
    ax.imshow(image[:, :, 0] if layout.channels == 1 else image, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="equal")
    step = layout.height + 1
    ax.set_yticks([step * (r + 0.5) for r in range(len(rows))], ["original", "reconstruction"] * (len(rows) // 2), fontsize=8)
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(length=0)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _save_vector_reconstructions(originals: np.ndarray, outputs: np.ndarray, path: str | Path, shown: int = 6) -> Path:
    shown = min(shown, originals.shape[0])
    fig, axes = plt.subplots(shown, 1, figsize=(8, 1.4 * shown), squeeze=False, sharex=True)
    for i in range(shown):
        ax = axes[i, 0]
        ax.plot(originals[i], lw=1, label="original")
        ax.plot(outputs[i], lw=1, label="reconstruction")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("feature")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r]
    if not pairs:
        return np.empty(0), np.empty(0)
    steps, values = zip(*pairs)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def save_curves(rows: list[dict[str, Any]], path: str | Path, rho: dict[int, float] | None = None) -> Path:
    """Training curves from metrics.jsonl rows: J and each term; ρ̂ mean/min/max per layer; FVU."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.13, top=0.92, wspace=0.22)
    ax = axes[0]
    for key, label in (("J", "J"), ("J_reconstruction", "reconstruction"), ("J_weight_decay", "weight decay"), ("J_sparsity", "sparsity")):
        steps, values = _series(rows, key)
        if steps.size and (values > 0).any():
            ax.plot(steps[values > 0], values[values > 0], label=label, lw=2 if key == "J" else 1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("objective J and its terms")
    ax.legend(fontsize=8)
    ax = axes[1]
    layer = 1
    while any(f"rho_hat{layer}_mean" in r for r in rows):
        for stat, style in (("mean", "-"), ("min", ":"), ("max", "--")):
            steps, values = _series(rows, f"rho_hat{layer}_{stat}")
            ax.plot(steps, values, style, color=f"C{layer - 1}", label=f"layer {layer} {stat}")
        if rho and layer in rho:
            ax.axhline(rho[layer], color=f"C{layer - 1}", alpha=0.4, lw=3, label=f"ρ (layer {layer})")
        layer += 1
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("ρ̂: mean activation per unit")
    ax.legend(fontsize=7)
    ax = axes[2]
    steps, values = _series(rows, "fvu")
    ax.plot(steps, values)
    ax.set_xlabel("step")
    ax.set_title("fraction of variance unexplained")
    if values.size and (values > 0).all():
        ax.set_yscale("log")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def save_rho_hist(layer_means: list[np.ndarray], path: str | Path, rho: dict[int, float] | None = None) -> Path:
    """Histogram of the per-unit ρ̂ of each encoder layer, with the target ρ marked."""
    n = len(layer_means)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.6), squeeze=False)
    for i, means in enumerate(layer_means, start=1):
        ax = axes[0, i - 1]
        means = np.asarray(means, dtype=np.float64)
        ax.hist(means, bins=min(50, max(10, means.size // 2)), color=f"C{i - 1}")
        if rho and i in rho:
            ax.axvline(rho[i], color="k", ls="--", label=f"ρ = {rho[i]:g}")
            ax.legend(fontsize=8)
        ax.set_title(f"layer {i}: {means.size} units, mean activation {means.mean():.4g}")
        ax.set_xlabel("ρ̂ (mean activation over the whole dataset)")
        ax.set_ylabel("units")
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
