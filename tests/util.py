"""Small data and config helpers shared by the tests (no Ray)."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from PIL import Image

from dist_sae.config import load_config
from dist_sae.data.dataset import Dataset
from dist_sae.data.reader import BlockReader
from dist_sae.data.workunit import WorkUnit
from dist_sae.data.writer import write_array


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


def global_rows(unit: WorkUnit, shard_rows: list[int]) -> np.ndarray:
    """The dataset-wide indices of a unit's rows (shards concatenated in order)."""
    offsets = np.cumsum([0] + list(shard_rows))
    return np.concatenate([np.arange(offsets[s] + a, offsets[s] + b) for s, a, b in unit.spans])


def read_all(path) -> np.ndarray:
    ds = Dataset.open(path)
    with BlockReader(ds) as reader:
        return np.concatenate([reader.read(WorkUnit.of(i, i, 0, s.rows)) for i, s in enumerate(ds.shards)])


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])


def check_report_links(page: Path) -> list[str]:
    """Every image and link of the page is a relative path that exists; every image decodes. Returns the images."""
    parser = _Links()
    parser.feed(page.read_text())
    assert parser.images
    for href in parser.images + parser.links:
        assert "://" not in href and not href.startswith("/"), f"{href} is not a relative link"
        target = page.parent / href
        assert target.is_file(), f"{page} links {href}, which does not exist"
    for src in parser.images:
        with Image.open(page.parent / src) as img:
            img.load()  # decodes the whole file
            assert img.size[0] > 10 and img.size[1] > 10
    return parser.images


def correlated(rows=3000, dim=12, seed=0) -> np.ndarray:
    """Rows with a strongly non-diagonal covariance and a non-zero mean, float64."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((dim, dim)) * np.linspace(3, 0.2, dim)
    return rng.standard_normal((rows, dim)) @ mix.T + rng.uniform(-2, 5, dim)


def numpy_zca(x: np.ndarray, eps: float) -> np.ndarray:
    """The in-memory reference (the notes: sigma = x·xᵀ/m on mean-free data)."""
    mu = x.mean(axis=0)
    d = x - mu
    lam, u = np.linalg.eigh(d.T @ d / len(x))
    return d @ (u @ np.diag(1 / np.sqrt(lam + eps)) @ u.T).T
