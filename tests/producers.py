"""Inputs made by the formats' own producers (not by dist_sae): WebDataset tars written by the
webdataset package's TarWriter, Parquet written by Hugging Face `datasets` and by pyarrow.

Images are seeded gray/RGB JPEGs and PNGs of a few sizes; `expected_rows` decodes the same bytes
with Pillow alone, the independent reference the built rows must equal.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def encoded_images(count: int, seed: int = 0, size=(24, 20), fmt: str = "JPEG") -> list[bytes]:
    """`count` seeded smooth RGB images (so JPEG keeps them recognisable), encoded as fmt."""
    rng = np.random.default_rng(seed)
    out = []
    h, w = size
    for _ in range(count):
        base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format=fmt, quality=90)
        out.append(buf.getvalue())
    return out


def expected_rows(images: list[bytes], size=None) -> np.ndarray:
    """Pillow alone: gray, bilinear resize to size (H, W), /255, flattened: the reference rows."""
    rows = []
    for data in images:
        img = Image.open(io.BytesIO(data)).convert("L")
        if size is not None and (img.height, img.width) != tuple(size):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        rows.append(np.asarray(img, dtype=np.float32).reshape(-1) / np.float32(255.0))
    return np.stack(rows)


def write_tars(folder: Path, images: list[bytes], per_tar: int, ext: str = "jpg", extra: dict[int, dict] | None = None) -> list[Path]:
    """WebDataset shards `train-000000.tar`, ... of `per_tar` records each (key, image, .cls) by TarWriter.

    extra: record index -> members to write instead of the image (e.g. {"txt": b"..."}: no image).
    """
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for t, start in enumerate(range(0, len(images), per_tar)):
        path = folder / f"train-{t:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(start, min(start + per_tar, len(images))):
                sample = (extra or {}).get(i) or {ext: images[i]}
                sink.write({"__key__": f"{i:06d}", "cls": str(i % 10).encode(), **sample})
        paths.append(path)
    return paths


def write_hf_parquet(path: Path, images: list[bytes]) -> Path:
    """Hugging Face `datasets`: an Image column ({bytes, path} struct) written by to_parquet."""
    from datasets import Dataset, Image as HFImage

    path.parent.mkdir(parents=True, exist_ok=True)
    ds = Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images], "label": list(range(len(images)))})
    ds.cast_column("image", HFImage()).to_parquet(str(path))
    return path


def write_arrow_parquet(path: Path, images: list[bytes], row_group_size: int, column: str = "jpeg") -> Path:
    """pyarrow directly: a binary column of encoded images in row groups of row_group_size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": list(range(len(images))), column: pa.array(images, type=pa.binary())})
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return path
