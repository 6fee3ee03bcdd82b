"""Row sources for `dist-sae data build`: each streams (B, dim) blocks, the same ones on every pass.

A source knows its dim, sample shape, row count (when it can tell), and what it did to the values
(`preprocessing`, e.g. scaling bytes to [0, 1] or whitening whole images). `blocks(block_rows)` may
be called several times (fitting dataset-wide preprocessing takes passes) and yields the same rows in
the same order each time; memory is bounded by one block. The patch source (the notes' exercise)
lives in dist_sae/patches.py; `prep.SOURCES` maps `--from` kinds to classes.
"""

from __future__ import annotations

import gzip
import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_sae.data.storage import localize
from dist_sae.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Range:
    """Shard `shard` of a build: input items [start, stop) (rows, or files of a folder).

    A build is cut into ranges by the input alone (`Source.ranges`), never by the number of
    workers, so the shards, and the fingerprint over their row hashes, are the same however many
    processes write them.
    """

    shard: int
    start: int
    stop: int


class Source:
    """Base: subclasses set name, dim, sample_shape, rows (or None), dtype, and implement blocks().

    A source that can be cut (npy, idx, images, image-folder patches, synthetic, datasets) also
    has `items` (rows, or files) and `range_blocks(r, block_rows)`, the blocks of one Range alone;
    `ranges` cuts it into shards of `per_shard` items. Parallel builds write one shard per range.
    """

    name: str = "source"
    dim: int
    sample_shape: list[int]
    rows: int | None = None
    dtype: str = "float32"  # the dtype the values naturally have after the source's own scaling

    def __init__(self) -> None:
        self.preprocessing: list[dict[str, Any]] = []
        self.skipped: dict[str, str] = {}  # file -> reason, filled while streaming

    def blocks(self, block_rows: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    @property
    def items(self) -> int | None:
        """What ranges count (rows here; files for folders); None when the source cannot be cut."""
        return self.rows if type(self).range_blocks is not Source.range_blocks else None

    @property
    def planned_rows(self) -> int | None:
        """The rows a build expects (before skips), for shard sizes and progress bars."""
        return self.rows

    def items_per_shard(self, rows: int) -> int:
        """Items (rows here) in a shard of about `rows` rows."""
        return rows

    def ranges(self, per_shard: int) -> list[Range] | None:
        """Consecutive ranges of `per_shard` items, one per shard; None when the source cannot be cut."""
        n = self.items
        if n is None:
            return None
        return [Range(k, start, min(start + per_shard, n)) for k, start in enumerate(range(0, n, per_shard))]

    def range_blocks(self, r: Range, block_rows: int) -> Iterator[np.ndarray]:
        """The rows of range r alone, in blocks of at most block_rows (the same rows `blocks` gives there)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name}

    def close(self) -> None:
        """Release temporary files (patch sources keep whitened images on disk)."""


# ---- npy / npz --------------------------------------------------------------------------------------


def open_npy(path: str | Path) -> np.ndarray:
    """Memory-map a .npy array (or the first array of a .npz; npz members are read lazily when stored)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file {path} does not exist")
    try:
        if path.suffix == ".npz":
            archive = np.load(path, mmap_mode="r", allow_pickle=False)
            if not archive.files:
                raise DataError(f"{path} holds no arrays")
            return _npz_member(path, archive.files[0])
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path} is not a NumPy array file ({exc}); give a .npy or .npz written by numpy.save") from None


def _npz_member(path: Path, member: str) -> np.ndarray:
    """Memory-map an uncompressed (stored) npz member in place; a compressed one is loaded (numpy cannot map it)."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member if member.endswith(".npy") else member + ".npy")
        if info.compress_type == zipfile.ZIP_STORED:
            with zf.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(fh)
                header_len = fh.tell()
            with open(path, "rb") as raw:
                raw.seek(info.header_offset)
                local = raw.read(30)
                name_len, extra_len = struct.unpack("<HH", local[26:30])
            offset = info.header_offset + 30 + name_len + extra_len + header_len
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
        log.warning("%s: member %s is compressed and will be loaded into memory; use numpy.savez (not savez_compressed) or .npy for big arrays", path, member)
        return np.load(path, allow_pickle=False)[member]


class NpySource(Source):
    name = "npy"

    def __init__(self, path: str | Path, sample_shape: list[int] | None = None) -> None:
        super().__init__()
        path = localize(path)
        self.path = Path(path)
        x = open_npy(path)
        if x.ndim < 2:
            raise DataError(f"{path}: expected an array of rows (rows, features...), got shape {x.shape}")
        self.array = x
        self.rows = x.shape[0]
        self.dim = int(np.prod(x.shape[1:]))
        self.sample_shape = list(sample_shape or x.shape[1:])
        self.dtype = str(x.dtype) if x.dtype.kind == "f" else "float32"

    def __getstate__(self) -> dict[str, Any]:  # a memory map pickles as a copy: a worker maps the file again
        return {k: v for k, v in self.__dict__.items() if k != "array"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.array = open_npy(self.path)

    def blocks(self, block_rows: int) -> Iterator[np.ndarray]:
        yield from self.range_blocks(Range(0, 0, self.rows), block_rows)

    def range_blocks(self, r: Range, block_rows: int) -> Iterator[np.ndarray]:
        x = self.array
        if isinstance(x, np.memmap) and x.flags.c_contiguous:
            # Plain reads, not the mapping: touched pages of a mapping count in the process's RSS
            # until the kernel reclaims them, so a mapped pass over 100 GB looks like 100 GB resident.
            row_bytes = self.dim * x.dtype.itemsize
            with open(x.filename, "rb") as fh:
                for start in range(r.start, r.stop, block_rows):
                    take = min(block_rows, r.stop - start)
                    fh.seek(x.offset + start * row_bytes)
                    block = np.fromfile(fh, dtype=x.dtype, count=take * self.dim)
                    if block.size != take * self.dim:
                        raise DataError(f"{self.path} is truncated: rows from {start} are missing")
                    yield block.reshape(take, self.dim)
            return
        flat = x.reshape(self.rows, self.dim)
        for start in range(r.start, r.stop, block_rows):
            yield np.asarray(flat[start : min(start + block_rows, r.stop)])

    def describe(self) -> dict[str, Any]:
        return {"kind": "npy", "path": str(self.path), "shape": list(self.array.shape), "dtype": str(self.array.dtype)}


# ---- IDX (MNIST, Fashion-MNIST) ---------------------------------------------------------------------

IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def read_idx_header(path: str | Path) -> tuple[np.dtype, list[int], int]:
    """(dtype, dims, header bytes) of an IDX file: 0x00 0x00, type code, ndim, then ndim big-endian uint32."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file {path} does not exist")
    try:
        with _open_maybe_gzip(path) as fh:
            head = fh.read(4)
            if len(head) < 4 or head[:2] != b"\x00\x00" or head[2] not in IDX_TYPES or head[3] == 0:
                raise DataError(f"{path} is not an IDX file (bad magic {head.hex()}); give an MNIST-style *-ubyte or *-ubyte.gz file")
            ndim = head[3]
            raw = fh.read(4 * ndim)
            if len(raw) < 4 * ndim:
                raise DataError(f"{path}: IDX header is truncated")
            dims = list(struct.unpack(f">{ndim}I", raw))
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path} cannot be read ({type(exc).__name__}: {exc})") from None
    return np.dtype(IDX_TYPES[head[2]]), dims, 4 + 4 * ndim


class IdxSource(Source):
    """An IDX array read as a stream (gzip or plain); uint8 pixels are scaled to [0, 1] unless scale=False."""

    name = "idx"

    def __init__(self, path: str | Path, scale: bool = True) -> None:
        super().__init__()
        path = localize(path)
        self.path = Path(path)
        self.file_dtype, dims, self.header = read_idx_header(path)
        if len(dims) < 2:
            raise DataError(f"{path} holds a 1-D IDX array of {dims[0]} values (a label file?); give the images file")
        self.rows = dims[0]
        self.sample_shape = dims[1:]
        self.dim = int(np.prod(dims[1:]))
        self.scale = 1.0 / 255.0 if (scale and self.file_dtype == np.dtype(">u1")) else None
        if self.scale is not None:
            self.preprocessing.append({"kind": "scale", "factor": self.scale, "why": "uint8 pixels to [0, 1]"})
        self.dtype = "float64" if self.file_dtype == np.dtype(">f8") else "float32"

    def blocks(self, block_rows: int) -> Iterator[np.ndarray]:
        yield from self.range_blocks(Range(0, 0, self.rows), block_rows)

    def range_blocks(self, r: Range, block_rows: int) -> Iterator[np.ndarray]:
        row_bytes = self.dim * self.file_dtype.itemsize
        with _open_maybe_gzip(self.path) as fh:
            fh.seek(self.header + r.start * row_bytes)  # a gzip file decompresses up to here
            done = r.start
            while done < r.stop:
                take = min(block_rows, r.stop - done)
                try:
                    buf = fh.read(take * row_bytes)
                except (OSError, EOFError) as exc:
                    raise DataError(f"{self.path}: cannot read rows {done}:{done + take} ({type(exc).__name__}: {exc}); the file is corrupt") from None
                if len(buf) < take * row_bytes:
                    got = done + len(buf) // row_bytes
                    raise DataError(f"{self.path} is truncated: the header says {self.rows} rows, the file holds {got}; download it again")
                block = np.frombuffer(buf, dtype=self.file_dtype).reshape(take, self.dim)
                block = block.astype(np.float64 if self.dtype == "float64" else np.float32)
                if self.scale is not None:
                    block *= np.float32(self.scale)
                yield block
                done += take

    def describe(self) -> dict[str, Any]:
        return {"kind": "idx", "path": str(self.path), "dims": [self.rows, *self.sample_shape], "file_dtype": self.file_dtype.str}


# ---- image folders ----------------------------------------------------------------------------------


def reblock(blocks: Iterator[np.ndarray], block_rows: int) -> Iterator[np.ndarray]:
    """Re-cut a stream of blocks to block_rows rows (the last may be shorter)."""
    buf: list[np.ndarray] = []
    held = 0
    for b in blocks:
        buf.append(b)
        held += len(b)
        while held >= block_rows:
            cat = np.concatenate(buf)
            yield cat[:block_rows]
            rest = cat[block_rows:]
            buf, held = ([rest] if len(rest) else []), len(rest)
    if held:
        yield np.concatenate(buf)


# ---- digits -----------------------------------------------------------------------------------------


def digits_array(size: int = 8) -> np.ndarray:
    """scikit-learn's 1797 8×8 digits scaled to [0, 1] (0..16 / 16), float32 (1797, size, size).

    size != 8 upsamples each digit bilinearly with Pillow (e.g. 28 for the 784-300-30-300-784 runs).
    """
    from sklearn.datasets import load_digits

    x = load_digits().images.astype(np.float32) / np.float32(16.0)
    if size == 8:
        return x
    from PIL import Image

    out = np.empty((len(x), size, size), dtype=np.float32)
    for i, img in enumerate(x):
        out[i] = np.asarray(Image.fromarray(img, mode="F").resize((size, size), Image.BILINEAR))
    return np.clip(out, 0.0, 1.0)


class DigitsSource(Source):
    name = "digits"

    def __init__(self, size: int = 8) -> None:
        super().__init__()
        if size < 1:
            raise DataError(f"digits size must be >= 1, got {size}")
        self.size = size
        self.array = digits_array(size)
        self.rows, self.dim, self.sample_shape = len(self.array), size * size, [size, size]
        self.preprocessing.append({"kind": "scale", "factor": 1 / 16, "why": "0..16 to [0, 1]"})
        if size != 8:
            self.preprocessing.append({"kind": "resize", "size": [size, size], "method": "bilinear"})

    def blocks(self, block_rows: int) -> Iterator[np.ndarray]:
        flat = self.array.reshape(self.rows, self.dim)
        for start in range(0, self.rows, block_rows):
            yield flat[start : start + block_rows]

    def describe(self) -> dict[str, Any]:
        return {"kind": "digits", "size": self.size, "origin": "sklearn.datasets.load_digits"}


# ---- synthetic data with planted sparse structure ----------------------------------------------------


class SyntheticSource(Source):
    """N rows x = sigmoid(s·D + noise): s has `active` of `atoms` codes on per row, D a seeded dictionary.

    Rows are made in fixed generator blocks, each from its own seeded stream, so any block of rows can
    be regenerated alone and the data do not depend on the caller's block size. Values lie in (0, 1).
    """

    name = "synthetic"
    GEN_BLOCK = 8192

    def __init__(self, rows: int, dim: int = 64, seed: int = 0, atoms: int = 32, active: int = 3, noise: float = 0.05) -> None:
        super().__init__()
        if rows < 1 or dim < 1 or atoms < 1 or not 0 < active <= atoms:
            raise DataError(f"synthetic needs rows, dim, atoms >= 1 and 0 < active <= atoms (got {rows}, {dim}, {atoms}, {active})")
        self.rows, self.dim, self.sample_shape = int(rows), int(dim), [int(dim)]
        self.seed, self.atoms, self.active, self.noise = seed, atoms, active, noise
        self.dictionary = self.make_dictionary(dim, atoms, seed)

    @staticmethod
    def make_dictionary(dim: int, atoms: int, seed: int) -> np.ndarray:
        """(atoms, dim) unit-norm atoms, scaled by 3 so an active atom moves the sigmoid visibly."""
        d = np.random.default_rng([seed, 0]).standard_normal((atoms, dim))
        return 3.0 * d / np.linalg.norm(d, axis=1, keepdims=True)

    def generate(self, index: int) -> np.ndarray:
        """Generator block `index`: rows [index·GEN_BLOCK, ...), float32."""
        start = index * self.GEN_BLOCK
        b = min(self.GEN_BLOCK, self.rows - start)
        rng = np.random.default_rng([self.seed, 1, index])
        chosen = np.argsort(rng.random((b, self.atoms)), axis=1)[:, : self.active]
        codes = np.zeros((b, self.atoms))
        np.put_along_axis(codes, chosen, rng.uniform(0.5, 1.5, (b, self.active)), axis=1)
        z = codes @ self.dictionary + self.noise * rng.standard_normal((b, self.dim))
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)

    def blocks(self, block_rows: int) -> Iterator[np.ndarray]:
        yield from self.range_blocks(Range(0, 0, self.rows), block_rows)

    def range_blocks(self, r: Range, block_rows: int) -> Iterator[np.ndarray]:
        first, last = r.start // self.GEN_BLOCK, -(-r.stop // self.GEN_BLOCK)
        gen = (self.generate(i)[max(r.start - i * self.GEN_BLOCK, 0) : r.stop - i * self.GEN_BLOCK] for i in range(first, last))
        yield from reblock(gen, block_rows)

    def describe(self) -> dict[str, Any]:
        return {"kind": "synthetic", "rows": self.rows, "dim": self.dim, "seed": self.seed, "atoms": self.atoms, "active": self.active, "noise": self.noise}

