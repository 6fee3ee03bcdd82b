"""Small data and config helpers shared by the tests (no Ray)."""

from __future__ import annotations

import numpy as np

from dist_sae.config import load_config
from dist_sae.data import write_array


def random_rows(rows: int, dim: int, seed: int = 0, low: float = 0.1, high: float = 0.9) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, size=(rows, dim))


def smooth_patches(count: int, patch: int = 8, seed: int = 0) -> np.ndarray:
    """Natural-image-like patches: crops of 1/f-ish smoothed noise images, mapped to [0.1, 0.9]."""
    rng = np.random.default_rng(seed)
    size = 64
    f = np.fft.fftfreq(size)
    radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    radius[0, 0] = 1.0
    out = np.empty((count, patch * patch))
    images = []
    for _ in range(8):
        spectrum = np.fft.fft2(rng.standard_normal((size, size))) / radius
        images.append(np.real(np.fft.ifft2(spectrum)))
    for i in range(count):
        img = images[rng.integers(len(images))]
        r, c = rng.integers(0, size - patch, size=2)
        p = img[r : r + patch, c : c + patch].ravel()
        out[i] = p - p.mean()
    std = 3 * out.std()
    return np.clip(out, -std, std) / std * 0.4 + 0.5


def make_dataset(path, x: np.ndarray, shard_rows: int, dtype: str = "float64", **kw):
    return write_array(path, x, shard_rows=shard_rows, dtype=dtype, chunk_rows=kw.pop("chunk_rows", 16), **kw)


def config(data=None, **overrides):
    """A local-engine float64 config with dotted overrides given as keyword args (dots as __)."""
    # One torch thread: local runs then sum exactly as Ray workers (1 thread each) do, and stay fast
    # while other test processes share the cores.
    items = {"workers.engine": "local", "compute.dtype": "float64", "compute.threads": 1, "run.quiet": True, "run.report": False}
    if data is not None:
        items["data.path"] = str(data)
    items.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(None, items)
