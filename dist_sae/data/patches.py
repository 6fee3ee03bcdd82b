"""The notes' exercise data: whitened natural images and seeded random p×p patches of them.

The images are scikit-image's bundled photographs (or a folder, or arrays), each whitened as a whole
in the frequency domain with Olshausen & Field's filter and scaled to unit variance, as the notes'
IMAGES.mat; then `count` patches are drawn with a seeded generator.

Two sampling rules. Bundled photographs or arrays (few images, all in memory): the notes'
sampleIMAGES, an image uniformly at random for each patch, from one seeded stream (PatchSource).
An image folder (any number of files): seeded per image, so that any range of files builds alone
and a parallel build equals the single-process one (FolderPatchSource): file i of the sorted list
gives n_i = count // N patches (one more for i < count % N), at positions uniform among the valid
ones, drawn from numpy's default_rng([seed, i]); rows come file by file, in file order.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from dist_sae.data.storage import is_url, listing, localize
from dist_sae.errors import DataError
from dist_sae.data.sources import Range, Source, reblock
from dist_sae.data.images import IMAGE_SUFFIXES, FileList, decode_image, image_files, load_image
from dist_sae.data.parquet import ParquetSource
from dist_sae.data.records import RecordSource
from dist_sae.data.wds import WebDatasetSource

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
    fx = np.fft.rfftfreq(img.shape[1])[None, :]  # a real image: half the spectrum (R is even in fx), half the FFT work
    rho = np.sqrt(fx * fx + fy * fy)
    filt = rho * np.exp(-((rho / f0) ** 4))
    white = np.fft.irfft2(np.fft.rfft2(img) * filt, s=img.shape)
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
    """Patches of (optionally whitened) photographs or arrays, the notes' rule; whitened images are kept in a temporary folder of
    .npy files and memory-mapped, so memory holds one image at a time however many there are."""

    name = "patches"
    dtype = "float32"

    def __init__(self, images: Sequence[np.ndarray] | None = None, patch: int = 8, count: int = 10000, seed: int = 0, whiten: bool = True) -> None:
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




def image_patches(img: np.ndarray, patch: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` p×p patches of one 2-D image at positions uniform among the valid ones: (count, p·p) float64."""
    rows = (rng.random(count) * (img.shape[0] - patch + 1)).astype(np.int64)
    cols = (rng.random(count) * (img.shape[1] - patch + 1)).astype(np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(img, (patch, patch))
    return windows[rows, cols].reshape(count, patch * patch)


def seeded_patches(img: np.ndarray, where: str, patch: int, count: int, seed: int, index: int, whiten: bool) -> np.ndarray:
    """Image `index`'s share of patches (the per-image rule): whitened (if asked), from default_rng([seed, index])."""
    if min(img.shape) < patch:
        raise DataError(f"{where} is {img.shape[1]}x{img.shape[0]}, smaller than the {patch}x{patch} patches")
    return image_patches(whiten_image(img) if whiten else img, patch, count, np.random.default_rng([seed, index]))


class FolderPatchSource(FileList, Source):
    """Patches of an image folder, seeded per image (see the module docstring for the rule).

    Nothing is staged: a range of files is decoded, whitened and sampled by whoever builds it, so
    memory holds one image and one block of patches. A file that cannot be decoded is skipped and
    listed; its patches are missing from the count. Ranges count files (`items`).
    """

    name = "patches"
    dtype = "float32"

    def __init__(self, folder: str | Path, patch: int = 8, count: int = 10000, seed: int = 0, whiten: bool = True) -> None:
        super().__init__()
        if patch < 1 or count < 1:
            raise DataError(f"patch size and count must be >= 1, got {patch} and {count}")
        folder = localize(folder)  # an s3:// folder is downloaded into the node-local cache
        self.folder, self.patch, self.count, self.seed, self.whiten = Path(folder), patch, count, seed, whiten
        self.files = image_files(folder)
        n = len(self.files)
        self.per_file = np.full(n, count // n, dtype=np.int64)
        self.per_file[: count % n] += 1
        self.dim, self.sample_shape = patch * patch, [patch, patch]
        self.rows = None  # count, less the share of files that cannot be decoded
        if whiten:
            self.preprocessing.append({"kind": "whiten_images", "filter": "f*exp(-(f/f0)^4)", "f0": 0.4, "then": "unit variance per image", "saved": False})

    @property
    def items(self) -> int:
        return len(self.files)

    @property
    def planned_rows(self) -> int:
        return self.count

    def items_per_shard(self, rows: int) -> int:
        return max(1, rows // max(1, int(self.per_file[0])))

    def blocks(self, block_rows: int) -> Iterator[np.ndarray]:
        yield from self.range_blocks(Range(0, 0, len(self.files)), block_rows)

    def range_blocks(self, r: Range, block_rows: int) -> Iterator[np.ndarray]:
        def per_image():
            for i in range(r.start, r.stop):
                if self.per_file[i] == 0:
                    continue
                f = Path(self.files[i])
                rel = f.relative_to(self.folder).as_posix()
                try:
                    img = load_image(f, "gray").astype(np.float64)
                except Exception as exc:  # Pillow's decode errors: skip the file, as the image-folder source does
                    self.skipped[rel] = f"{type(exc).__name__}: {exc}"
                    log.warning("skipping %s: cannot decode it (%s)", f, exc)
                    continue
                yield seeded_patches(img, str(f), self.patch, int(self.per_file[i]), self.seed, i, self.whiten)

        yield from reblock(per_image(), block_rows)

    def describe(self) -> dict[str, Any]:
        return {"kind": "patches", "path": str(self.folder), "files": len(self.files), "patch": self.patch, "count": self.count, "seed": self.seed, "whitened": self.whiten, "sampling": "per image", "skipped": len(self.skipped)}


class RecordPatchSource(Source):
    """Patches of the images of a record source (WebDataset tars, Parquet), the folder's per-image rule.

    Record i of the whole input (in the source's order; records without a usable image count too)
    gives its share of `count` from default_rng([seed, i]), as file i of a folder does. The rule
    needs the record count up front: Parquet footers give it; tars are counted from their headers
    first (a local tar by seeking, an object by streaming it once). Ranges count the source's items.
    """

    name = "patches"
    dtype = "float32"

    def __init__(self, records: RecordSource, patch: int = 8, count: int = 10000, seed: int = 0, whiten: bool = True) -> None:
        super().__init__()
        if patch < 1 or count < 1:
            raise DataError(f"patch size and count must be >= 1, got {patch} and {count}")
        if getattr(records, "raw_pixels", False):
            raise DataError(f"{records.path}: holds raw pixel rows, not encoded images; --from patches cuts its patches from images")
        self.records, self.patch, self.count, self.seed, self.whiten = records, patch, count, seed, whiten
        counts = records.item_counts()
        self.first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # record index of each item's first record
        n = max(1, int(self.first[-1]))
        self.per_record = np.full(n, count // n, dtype=np.int64)
        self.per_record[: count % n] += 1
        self.dim, self.sample_shape = patch * patch, [patch, patch]
        self.rows = None
        self.skipped = records.skipped
        self.path = records.path
        if whiten:
            self.preprocessing.append({"kind": "whiten_images", "filter": "f*exp(-(f/f0)^4)", "f0": 0.4, "then": "unit variance per image", "saved": False})

    @property
    def items(self) -> int:
        return self.records.items

    @property
    def planned_rows(self) -> int:
        return self.count

    def items_per_shard(self, rows: int) -> int:
        return self.records.items_per_shard(rows // max(1, int(self.per_record[0])))

    def blocks(self, block_rows: int) -> Iterator[np.ndarray]:
        yield from self.range_blocks(Range(0, 0, self.items), block_rows)

    def range_blocks(self, r: Range, block_rows: int) -> Iterator[np.ndarray]:
        self.records.skipped = self.skipped  # a range task resets self.skipped: the records list there

        def per_image():
            for k in range(r.start, r.stop):
                for j, (name, payload) in enumerate(self.records.item_records(k)):
                    i = int(self.first[k]) + j
                    if i >= self.first[k + 1]:
                        break  # more records than the header count (a damaged tar): beyond its share
                    if self.per_record[i] == 0:
                        continue
                    try:
                        if isinstance(payload, Exception):
                            raise payload
                        img = decode_image(payload, "gray").astype(np.float64)
                    except Exception as exc:  # the record is listed; its patches are missing, as a folder's bad file's
                        self.records.skip(name, exc)
                        continue
                    yield seeded_patches(img, f"{self.path}: {name}", self.patch, int(self.per_record[i]), self.seed, i, self.whiten)

        yield from reblock(per_image(), block_rows)

    def describe(self) -> dict[str, Any]:
        return {"kind": "patches", "images": self.records.describe(), "records": int(self.first[-1]), "patch": self.patch, "count": self.count,
                "seed": self.seed, "whitened": self.whiten, "sampling": "per image", "skipped": len(self.skipped)}

    def close(self) -> None:
        self.records.close()


def image_set_kind(images: str | Path) -> str:
    """'webdataset', 'parquet' or 'images' for an image source path: by its suffix, else by what a folder holds."""
    text = str(images).rstrip("/").lower()
    for kind, suffixes in (("webdataset", (".tar",)), ("parquet", (".parquet", ".pq"))):
        if text.endswith(suffixes):
            return kind
    if is_url(images):  # a prefix: what its objects are (one listing, not a download)
        names = {PurePosixPath(name).suffix.lower() for name in listing(str(images))}
    elif Path(images).is_dir():
        names = {Path(f).suffix.lower() for _, _, fs in os.walk(images) for f in fs}
    else:
        return "images"  # (an error naming the path follows)
    if names & {".tar"} and not names & IMAGE_SUFFIXES:
        return "webdataset"
    if names & {".parquet", ".pq"} and not names & IMAGE_SUFFIXES:
        return "parquet"
    return "images"


def patch_source(images: str | Path | Sequence[np.ndarray] | None = None, patch: int = 8, count: int = 10000, seed: int = 0, whiten: bool = True,
                 image_key: str | None = None, column: str = "image") -> Source:
    """The patch source for `images`: per-image sampling for a folder, WebDataset tars or Parquet
    files (image_key, column: as for those sources), the notes' rule for photographs or arrays."""
    if isinstance(images, (str, Path)):
        kind = image_set_kind(images)
        if kind == "webdataset":
            return RecordPatchSource(WebDatasetSource(str(images), image_key=image_key), patch, count, seed, whiten)
        if kind == "parquet":
            return RecordPatchSource(ParquetSource(str(images), column=column), patch, count, seed, whiten)
        return FolderPatchSource(images, patch, count, seed, whiten)
    return PatchSource(images, patch, count, seed, whiten)
