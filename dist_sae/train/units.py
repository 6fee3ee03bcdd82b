"""How the data is cut into work units (a full pass, minibatches), and the single-process thread rule that depends on it."""

from __future__ import annotations

import numpy as np
import torch

from dist_sae.config import Config
from dist_sae.data.dataset import Dataset
from dist_sae.data.workunit import PASS_MIN_UNITS, WorkUnit
from dist_sae.sae.model import layer_sizes

TORCH_DEFAULT_THREADS = torch.get_num_threads()  # at import, before any PassRunner changes it


def minibatches(dataset: Dataset, batch_size: int, parts: int) -> list[list[WorkUnit]]:
    """Minibatches of `batch_size` contiguous rows (within a shard), each split into `parts` work units.

    Unit ids are unique across all batches, so a batch's parts reduce in a fixed order.
    """
    batches, next_id = [], 0
    for shard, info in enumerate(dataset.shards):
        for start in range(0, info.rows, batch_size):
            stop = min(start + batch_size, info.rows)
            bounds = np.linspace(start, stop, min(parts, stop - start) + 1).round().astype(int)
            batch = []
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                batch.append(WorkUnit.of(next_id, shard, int(lo), int(hi)))
                next_id += 1
            batches.append(batch)
    return batches


SMALL_UNIT_WORK = 2**25  # rows × parameters of a work unit under which one torch thread is faster


def local_threads(cfg: Config, units: list[WorkUnit]) -> int:
    """Torch threads of the single-process engine: compute.threads, else by the size of a work unit.

    Intra-op threads pay only on large products: on the notes' exercise (10,000 rows, 64-25-64,
    then in 1,024-row units) an exact evaluation took 26.5 ms with 2 threads and 17.1 ms with 1
    on a quiet 2-core machine (float32: 66.7 and 9.5 ms), while 784-1024-784 on 4,096-row units
    runs 1.7× faster on 2. So 0 means all the cores torch sees when a unit's rows × the model's
    parameters reach SMALL_UNIT_WORK (the largest pass unit, or the minibatch), else 1.

    A function of the config and the data only, deliberately not of the machine's load: the thread
    count changes the float summation order inside matrix products, so a load-dependent choice
    would make two runs of the same config differ in their last bits (and L-BFGS amplifies that
    over hundreds of steps). On a machine shared with other busy processes set compute.threads=1:
    intra-op threads that share their cores spin-wait on each other (measured up to 40× slower on
    a busy 2-core machine; see the README's performance section).
    """
    if cfg.compute.threads > 0:
        return cfg.compute.threads
    rows = max((u.rows for u in units), default=0)
    if not cfg.optim.full_batch:
        rows = min(rows, cfg.optim.batch_size)
    sizes = layer_sizes(cfg.model.visible, cfg.model.hidden)
    params = sum((fan_in + 1) * fan_out for fan_in, fan_out in zip(sizes[:-1], sizes[1:]))
    return 1 if rows * params < SMALL_UNIT_WORK else TORCH_DEFAULT_THREADS


def local_lanes(cfg: Config, units: list[WorkUnit], threads: int, device: torch.device) -> int:
    """Lanes of the single-process engine (train/lanes.py): compute.lanes, else one per core where
    each unit runs on one torch thread on the CPU, else 1 (large units use the cores inside their
    products). Never more than the units of a full pass."""
    if cfg.compute.lanes > 0:
        count = cfg.compute.lanes
    elif device.type != "cpu" or threads != 1:
        return 1
    else:
        count = TORCH_DEFAULT_THREADS
    return max(1, min(count, len(units)))


def pass_units(cfg: Config, dataset: Dataset) -> list[WorkUnit]:
    """The work units of a full pass, cut the same way by every engine."""
    return dataset.units(cfg.data.block_rows, min_units=PASS_MIN_UNITS, taper=cfg.data.taper)
