"""PassRunner: the work of one worker, θ in, one work unit's float64 partial sums out.

The same code computes a unit in this process (train/problem.py's LocalEvaluator) and in a Ray
worker (cluster/worker.py), so the single-process engine is the reference the cluster must equal.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from dist_sae.config import Config
from dist_sae.data.dataset import Dataset
from dist_sae.data.reader import BlockReader, BufferPool
from dist_sae.data.storage import shard_cache
from dist_sae.data.workunit import Span, WorkUnit
from dist_sae.sae.model import SparseAutoencoder
from dist_sae.sae.objective import Objective
from dist_sae.sae.sums import Sums, data_block_sums
from dist_sae.sae.blocks import onepass_block, pass1_block, pass2_block
from dist_sae.sae.backward import BACKWARDS, Workspace
from dist_sae.train.inputs import input_transform, row_noise

DTYPES = {"float32": torch.float32, "float64": torch.float64}
PASS_KINDS = ("pass1", "pass2", "onepass")
STREAM_BUFFERS = 2  # block buffers kept for reuse beyond data.prefetch: the block in compute + one being read


class PassRunner:
    """Computes the partial sums of one work unit: what a worker does, with or without Ray.

    Args:
        cfg: the run's config (model.visible set).
        dataset: the dataset (or its folder).
        device: torch device to compute on.
        threads: torch intra-op threads (0 leaves torch's default).
        backward: how pass 2 differentiates: auto (the hand-written fast path where it covers the
            model, else autograd), autograd, or handwritten (an error where it does not apply).
        lanes: units computed at once on threads (train/lanes.py): the block pools keep enough
            buffers for each to hold a block.
    """

    def __init__(
        self, cfg: Config, dataset: Dataset | str, device: str | torch.device = "cpu", threads: int = 0, backward: str = "auto",
        lanes: int = 1,
    ) -> None:
        if backward not in BACKWARDS:
            raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
        if threads > 0:
            torch.set_num_threads(threads)
        self.cfg = cfg
        self.backward = backward
        self.obj = Objective.from_config(cfg)
        self.dataset = dataset if isinstance(dataset, Dataset) else Dataset.open(dataset, verify_shards=False, cache=shard_cache(cfg.data))
        self.reader = BlockReader(self.dataset)
        self.device = torch.device(device)
        self.dtype = DTYPES[cfg.compute.dtype]
        self.model = SparseAutoencoder.from_config(cfg, self.dtype, self.device)
        self.input_transform = input_transform(cfg)  # raw rows -> what the model was trained on
        self.cache_budget = cfg.data.cache_mb * 2**20
        self._cache: dict[tuple[Span, ...], torch.Tensor] = {}  # unit.spans -> block
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()
        # Streamed (uncached) blocks live in reused buffers (reader.BufferPool says why): the rows
        # as stored (rows, n) that the reader reads into, and, where the compute dtype or
        # data.transform differs, the converted (rows, n') tensor. Both go back with `release`.
        self._dim = self.dataset.dim if self.input_transform is None else self.input_transform.out_dim(self.dataset.dim)  # n'
        keep, cap = cfg.data.prefetch + STREAM_BUFFERS * max(1, lanes), cfg.data.block_rows
        self._staging = BufferPool(lambda n: np.empty((n, self.dataset.dim), np.dtype(self.dataset.dtype)), cap, keep, _address)
        self._blocks = BufferPool(lambda n: torch.empty((n, self._dim), dtype=self.dtype), cap, keep, _address)
        self._convert = self.input_transform is not None or np.dtype(self.dataset.dtype) != np.dtype(cfg.compute.dtype)
        # The blocks' (B, h) intermediates, reused (compute runs one block at a time): made at
        # block_rows on the CPU, where untouched pages cost nothing; on a GPU at the rows a block needs.
        self.workspace = Workspace(cap if self.device.type == "cpu" else 0)
        self._data_sums: dict[tuple[Span, ...], Sums] = {}  # Σx, Σ‖x‖² per unit: n + 1 floats, θ-free
        self.g: list[torch.Tensor] | None = None
        self.dead: torch.Tensor | None = None
        self.noise = cfg.noise
        self.seed = cfg.run.seed
        self._theta_key: object = None

    def set_theta(self, theta: np.ndarray, key: object = None) -> None:
        """Load θ (P,) into the model, unless `key` says it is the one already loaded."""
        if key is not None and key == self._theta_key:
            return
        with torch.no_grad():
            self.model.theta.copy_(torch.from_numpy(np.asarray(theta)))
        self._theta_key = key

    def set_g(self, g: list[np.ndarray] | None) -> None:
        """Pass 2's constants (SparsityState.constants): KL′ per penalised layer, then the AuxK dead mask."""
        consts = [torch.as_tensor(v, dtype=self.dtype, device=self.device) for v in (g or [])]
        n_kl = len(self.obj.layers) if self.obj.kind == "kl" else 0
        self.g = consts[:n_kl] or None
        self.dead = consts[n_kl].bool() if len(consts) > n_kl else None

    def to_device(self, block: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows (B, n) as a compute-dtype tensor on the device; on the CPU, into `out` when it fits."""
        if self.input_transform is not None:
            block = self.input_transform.apply(block, dtype=np.float64)  # whitening in full precision
        x = torch.from_numpy(block)
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, self.dtype, non_blocking=True)
        if out is not None and out.shape == x.shape:
            return out.copy_(x)
        return x.to(self.dtype)

    def load(self, unit: WorkUnit) -> torch.Tensor:
        """The unit's rows as a compute-dtype tensor on the device, from the block cache when there.

        Blocks are cached while the cache stays within data.cache_mb; past that, they stream, in
        reused buffers: hand each block back with `release` once its compute is done (a block not
        released is simply not reused). Safe to call from a read-ahead thread.
        """
        key = unit.spans
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        size = unit.rows * self._dim * self.dtype.itemsize
        with self._cache_lock:
            keep = key not in self._cache and self._cache_bytes + size <= self.cache_budget
            if keep:
                self._cache_bytes += size  # reserved now, so a concurrent load sees it
        if not keep:
            return self._stream(unit)
        try:
            x = self.to_device(self.reader.read(unit))  # fresh memory: the cache's from now on
        except BaseException:
            with self._cache_lock:
                self._cache_bytes -= size
            raise
        with self._cache_lock:
            self._cache[key] = x
        return x

    def _stream(self, unit: WorkUnit) -> torch.Tensor:
        """An uncached block: read into a pooled buffer and, where it needs converting on the CPU, converted into another."""
        staging = self._staging.take(unit.rows)  # (rows, n) stored dtype
        try:
            rows = self.reader.read(unit, out=staging)
            out = self._blocks.take(unit.rows) if self._convert and self.device.type == "cpu" else None
            x = self.to_device(rows, out)
        except BaseException:
            self._staging.give(staging)
            raise
        if x.device.type != "cpu" or x.data_ptr() != _address(staging):  # its rows were copied out
            self._staging.give(staging)
        return x

    def release(self, x: torch.Tensor) -> None:
        """Hand back a block from `load` once its compute is done: a streamed block's buffers are reused."""
        if x.device.type == "cpu" and not self._blocks.give(x):
            self._staging.give(x)  # a block that is the read buffer itself (stored as the compute dtype)

    def buffers_made(self) -> dict[str, int]:
        """Buffers allocated so far for streamed blocks (read as stored, converted) and the blocks'
        intermediates (workspace): a few each, however many units ran."""
        return {"read": self._staging.made, "converted": self._blocks.made, "workspace": self.workspace.made}

    def corrupt(self, x: torch.Tensor, unit: WorkUnit) -> torch.Tensor | None:
        """The denoising input for a unit's rows, or None without noise.

        The noise is drawn on the CPU in float64, seeded by (run seed, shard, row chunk), so each row
        gets the same corruption whichever worker or device runs it, however the rows are cut into
        work units, in pass 1 and pass 2 alike.
        """
        if self.noise.kind == "none":
            return None
        draws = row_noise(self.noise.kind, self.seed, unit.spans, x.shape[1])
        if self.noise.kind == "gaussian":
            return x + (draws * self.noise.sigma).to(x.device, x.dtype)
        return x * (draws >= self.noise.p).to(x.device, x.dtype)

    def compute(self, kind: str, unit: WorkUnit, block: np.ndarray | torch.Tensor, ws: Workspace | None = None) -> Sums:
        """Partial sums of one unit's rows (as read, or as `load` gives them) for pass1, pass2 or onepass.

        ws: where the intermediates go (default: the runner's own; a lane of train/lanes.py brings its own).
        """
        ws = self.workspace if ws is None else ws
        x = block if isinstance(block, torch.Tensor) else self.to_device(block)
        x_in = self.corrupt(x, unit)
        if kind == "pass1":
            return pass1_block(self.model, x if x_in is None else x_in, ws)
        if kind == "pass2":
            return pass2_block(self.model, self.obj, x, self.g, x_in, self.dead, self.data_sums(unit, x), self.backward, ws)
        if kind == "onepass":
            return onepass_block(self.model, self.obj, x, x_in, self.data_sums(unit, x), self.backward, ws)
        raise ValueError(f"unknown pass {kind!r}")

    def data_sums(self, unit: WorkUnit, x: torch.Tensor) -> Sums:
        """The unit's Σx and Σ‖x‖² (for the FVU); they do not depend on θ, so they are kept with cached blocks."""
        key = unit.spans
        sums = self._data_sums.get(key)
        if sums is None:
            sums = data_block_sums(x)
            if key in self._cache:  # bounded by data.cache_mb like the blocks themselves
                self._data_sums[key] = sums
        return sums

    @torch.no_grad()
    def transform(self, kind: str, block: np.ndarray | torch.Tensor, layer: int | None = None) -> np.ndarray:
        """Per-row outputs of a block: `encode` (codes of encoder `layer`, default innermost) or `reconstruct`."""
        x = block if isinstance(block, torch.Tensor) else self.to_device(block)
        if kind == "encode":
            out = self.model.encode_layers(x, upto=layer or self.model.num_encoder)[-1]
        elif kind == "reconstruct":
            out = self.model(x).output
        else:
            raise ValueError(f"unknown transform {kind!r}")
        return out.to(device="cpu").numpy()

    def run_unit(self, kind: str, unit: WorkUnit) -> Sums:
        return self.compute(kind, unit, self.load(unit))

    def close(self) -> None:
        self.reader.close()
        self._cache.clear()
        self._data_sums.clear()
        self._blocks.clear()
        self._staging.clear()


def _address(a: np.ndarray | torch.Tensor) -> int:
    """Where an array's or a tensor's first element is (a view of a buffer's first rows: the buffer's)."""
    return a.data_ptr() if isinstance(a, torch.Tensor) else a.__array_interface__["data"][0]
