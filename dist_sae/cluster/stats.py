"""The out-of-core statistics passes of dist_sae.data.transforms, run as Ray tasks over work units.

Each task reads one unit of the dataset, applies the steps fitted so far, and returns the float64
partial sums of `transforms.unit_sums`; the driver adds them in unit order with
`transforms.reduce_sums`. Same functions, same order as the local pass over the same units, so the
statistics equal the local ones bit for bit, whatever the number of workers.
"""

from __future__ import annotations

import ray
import ray.exceptions

from dist_sae.sections import WorkersConfig
from dist_sae.errors import DataError, DistSaeError
from dist_sae.data.reader import BlockReader
from dist_sae.data.dataset import Dataset
from dist_sae.data.transforms import SumsFn, Transform, reduce_sums, unit_sums
from dist_sae.cluster.runtime import connect
from dist_sae.data.workunit import WorkUnit


def unit_partial_sums(dataset_dir: str, unit: WorkUnit, kind: str, center, pre: Transform) -> dict:
    """Partial sums of one work unit (a plain function; `ray.remote` wraps it below)."""
    dataset = Dataset.open(dataset_dir, verify_shards=False)
    with BlockReader(dataset) as reader:
        block = reader.read(unit)
    return unit_sums(pre.apply(block, dtype="float64"), kind, center)


def ray_sums_fn(dataset: Dataset, block_rows: int, address: str | None = None, max_in_flight: int = 64) -> SumsFn:
    """A transforms.SumsFn whose passes run as Ray tasks (joining `address`, or a local Ray on 127.0.0.1).

    The dataset folder must be readable by every node at the same path (shared storage). At most
    `max_in_flight` tasks run at once, so the driver holds a bounded number of partial sums.
    """
    connect(WorkersConfig(address=address), dashboard=False)
    remote = ray.remote(num_cpus=1)(unit_partial_sums)
    # Each shard cut alone, as DatasetSource.range_blocks streams it: the same blocks, so the same sums
    # as a build or transform without Ray.
    units = dataset.units(block_rows, align=False, pack=False)
    folder = dataset.url or str(dataset.path.resolve())

    def run(kind: str, center, pre: Transform) -> dict:
        center_ref, pre_ref = ray.put(center), ray.put(pre)
        pending = [remote.remote(folder, u, kind, center_ref, pre_ref) for u in units[:max_in_flight]]
        submitted = len(pending)

        def ordered():
            nonlocal submitted
            while pending:
                ref = pending.pop(0)
                if submitted < len(units):
                    pending.append(remote.remote(folder, units[submitted], kind, center_ref, pre_ref))
                    submitted += 1
                try:
                    yield ray.get(ref)  # in unit order: the reduction below is the local one
                except ray.exceptions.RayTaskError as exc:  # a DataError in a task is raised as itself
                    cause = getattr(exc, "cause", None)
                    raise (cause if isinstance(cause, DistSaeError) else DataError(f"statistics pass over {folder} failed: {exc}")) from None

        return reduce_sums(ordered())

    return run
