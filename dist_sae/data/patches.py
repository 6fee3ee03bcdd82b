"""The notes' exercise data: whitened natural images and seeded random p×p patches of them.

The images are scikit-image's bundled photographs (or a folder, or arrays), each whitened as a whole
in the frequency domain with Olshausen & Field's filter and scaled to unit variance, as the notes'
IMAGES.mat; then `count` patches are drawn with a seeded generator (the notes' sampleIMAGES).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dist_sae.data.storage import localize
from dist_sae.errors import DataError
from dist_sae.data.sources import Source, reblock
from dist_sae.data.images import list_images, load_image

log = logging.getLogger(__name__)

# scikit-image's bundled photographs (all load offline); colour ones are converted to gray.
NATURAL_IMAGES = ("camera", "astronaut", "coffee", "chelsea", "rocket", "grass", "gravel", "brick", "moon", "coins")


def natural_images() -> list[tuple[str, np.ndarray]]:
    """scikit-image's natural photographs as (name, gray float64 image in [0, 1])."""
    import skimage.color
    import skimage.data
    from skimage.util import img_as_float64

    out = []
    for name in NATURAL_IMAGES:
        img = img_as_float64(getattr(skimage.data, name)())
        if img.ndim == 3:
            img = skimage.color.rgb2gray(img[..., :3])
        out.append((name, img))
    return out


def whiten_image(img: np.ndarray, f0: float = 0.4) -> np.ndarray:
    """Olshausen & Field (1996) whitening of one whole gray image, then unit variance.

    Multiplies the spectrum by R(f) = f·exp(−(f/f0)⁴), f the radial frequency in cycles/pixel
    (Nyquist = 0.5; f0 = 0.4 is their 0.4·N cycles/image), which flattens the 1/f amplitude spectrum
    and rolls off the noisy highest frequencies. R(0) = 0, so the result has zero mean.
    """
    img = np.asarray(img, dtype=np.float64)
    fy = np.fft.fftfreq(img.shape[0])[:, None]
    fx = np.fft.fftfreq(img.shape[1])[None, :]
    rho = np.sqrt(fx * fx + fy * fy)
    filt = rho * np.exp(-((rho / f0) ** 4))
    white = np.real(np.fft.ifft2(np.fft.fft2(img) * filt))
    std = white.std()
    return white / std if std > 0 else white


class PatchSampler:
    """Seeded random p×p patches from a list of 2-D images (arrays or memmaps).

    For each patch: an image uniformly at random, then a position uniformly among the valid ones
    (the notes' sampleIMAGES). Draws happen block by block from one generator in a fixed internal
    block size, so the patches do not depend on the caller's block size.
    """

    DRAW_BLOCK = 4096

    def __init__(self, images: Sequence[np.ndarray], patch: int = 8, seed: int = 0) -> None:
        if patch < 1:
            raise DataError(f"patch size must be >= 1, got {patch}")
        for i, img in enumerate(images):
            if img.ndim != 2 or min(img.shape) < patch:
                raise DataError(f"image {i} has shape {img.shape}; patches of {patch}x{patch} need 2-D images at least that big")
        if not images:
            raise DataError("no images to sample patches from")
        self.images, self.patch, self.seed = list(images), patch, seed

    def sample(self, count: int) -> Iterator[np.ndarray]:
        """Yield float64 blocks (≤ DRAW_BLOCK, p·p) of `count` patches in total, row-major within a patch."""
        rng = np.random.default_rng(self.seed)
        p, n_img = self.patch, len(self.images)
        heights = np.array([img.shape[0] - p + 1 for img in self.images])
        widths = np.array([img.shape[1] - p + 1 for img in self.images])
        done = 0
        while done < count:
            b = min(self.DRAW_BLOCK, count - done)
            which = rng.integers(0, n_img, b)
            rows = (rng.random(b) * heights[which]).astype(np.int64)
            cols = (rng.random(b) * widths[which]).astype(np.int64)
            out = np.empty((b, p, p), dtype=np.float64)
            for i in np.unique(which):
                sel = np.flatnonzero(which == i)
                windows = np.lib.stride_tricks.sliding_window_view(self.images[i], (p, p))
                out[sel] = windows[rows[sel], cols[sel]]
            yield out.reshape(b, p * p)
            done += b

    def all(self, count: int) -> np.ndarray:
        """All `count` patches in memory (count, p·p): the direct call a build must match."""
        return np.concatenate(list(self.sample(count)))


class PatchSource(Source):
    """Patches of (optionally whitened) images; whitened images are kept in a temporary folder of
    .npy files and memory-mapped, so memory holds one image at a time however many there are."""

    name = "patches"
    dtype = "float32"

    def __init__(self, images: str | Path | Sequence[np.ndarray] | None = None, patch: int = 8, count: int = 10000, seed: int = 0, whiten: bool = True) -> None:
        super().__init__()
        self.patch, self.count, self.seed, self.whiten = patch, count, seed, whiten
        self.rows, self.dim, self.sample_shape = count, patch * patch, [patch, patch]
        self._tmp = tempfile.TemporaryDirectory(prefix="dist-sae-patches-")
        self.image_names: list[str] = []
        paths = []
        for name, img in self._iter_images(images):
            if whiten:
                img = whiten_image(img)
            path = Path(self._tmp.name) / f"{len(paths):06d}.npy"
            np.save(path, np.asarray(img, dtype=np.float64))
            paths.append(path)
            self.image_names.append(name)
        self.sampler = PatchSampler([np.load(p, mmap_mode="r") for p in paths], patch, seed)
        if whiten:
            self.preprocessing.append({"kind": "whiten_images", "filter": "f*exp(-(f/f0)^4)", "f0": 0.4, "then": "unit variance per image", "saved": False})

    def _iter_images(self, images) -> Iterator[tuple[str, np.ndarray]]:
        if images is None:
            yield from natural_images()
        elif isinstance(images, (str, Path)):
            folder = Path(localize(images))
            for f in list_images(folder):
                try:
                    yield f.relative_to(folder).as_posix(), load_image(f, "gray").astype(np.float64)
                except Exception as exc:
                    self.skipped[f.relative_to(folder).as_posix()] = f"{type(exc).__name__}: {exc}"
                    log.warning("skipping %s: cannot decode it (%s)", f, exc)
        else:
            for i, img in enumerate(images):
                yield f"array{i}", np.asarray(img, dtype=np.float64)

    def blocks(self, block_rows: int) -> Iterator[np.ndarray]:
        yield from reblock(self.sampler.sample(self.count), block_rows)

    def describe(self) -> dict[str, Any]:
        return {"kind": "patches", "patch": self.patch, "count": self.count, "seed": self.seed, "images": self.image_names[:100], "whitened": self.whiten}

    def close(self) -> None:
        self.sampler.images = []
        self._tmp.cleanup()


