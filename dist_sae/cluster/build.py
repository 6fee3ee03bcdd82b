"""Parallel builds: the ranges of a dist_sae.data.build run as Ray tasks, one shard each.

`ray_runner(...)` is a dist_sae.data.ranges.RangeRunner: every range of the input (files of an image
folder, rows of an array, IDX file or synthetic set) becomes one task running the plain
`ranges.write_range`, which decodes its inputs and writes its shard straight into the output's
`.partial` folder. At most `workers` tasks run at once; results come back to the driver in range
order (only the shard's name, rows and hash: no data passes through it), so the manifest lists
the shards in source order and the dataset equals the single-process build whatever the worker
count. A task whose worker dies is run again by Ray (`max_retries`); the retry starts from a clean
scratch folder, so no partial shard survives. The output folder appears only when every shard is
written (the driver's DatasetWriter renames it into place).

Plain tasks, not Ray Data (`read_images` + `map_batches`): measured in docs/scaling.md; the tasks
keep the exact shard boundaries, skip lists and per-range seeds that the fingerprint needs, and
write without passing rows through a second stage.
"""

from __future__ import annotations

import logging

import ray
import ray.exceptions

from dist_sae.cluster.runtime import connect
from dist_sae.config import WorkersConfig
from dist_sae.data.ranges import RangeJob, RangeResult, RangeRunner, range_steps
from dist_sae.data.sources import Range
from dist_sae.errors import DataError, DistSaeError

log = logging.getLogger(__name__)

def range_task(job: RangeJob, r: Range):
    """One range in a Ray worker, as a streaming generator: each block's rows, then the RangeResult."""
    yield from range_steps(job, r)


def _failure(exc: Exception, r: Range) -> DistSaeError:
    """The error a failed range raises in the driver: a DataError from the task as itself."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, DistSaeError):
        return cause
    return DataError(f"building shard {r.shard} (input items {r.start}..{r.stop - 1}) failed: {type(exc).__name__}: {exc}")


def ray_runner(address: str | None = None, workers: int | None = None, max_retries: int = 3) -> RangeRunner:
    """A RangeRunner on Ray: joins `address` (or starts a private local Ray on 127.0.0.1, with
    `workers` CPUs) at the first build; at most `workers` tasks at once (default: every CPU).

    The input and the output folder must be at the same path on every node (shared storage).
    """

    def run(job: RangeJob, ranges: list[Range], progress):
        connect(WorkersConfig(address=address), dashboard=False, num_cpus=workers)
        cap = max(1, workers or int(ray.cluster_resources().get("CPU", 1)))
        task = ray.remote(num_cpus=1, max_retries=max_retries, num_returns="streaming")(range_task)
        job_ref = ray.put(job)
        running: dict = {}  # a task's ObjectRefGenerator -> its range index
        done: dict[int, RangeResult] = {}
        failed: dict[int, DistSaeError] = {}
        submitted = next_out = 0
        try:
            while next_out < len(ranges):
                first_bad = min(failed, default=len(ranges))
                if next_out >= first_bad:  # every range before the first failure is in: its error is the first
                    raise failed[first_bad]
                while submitted < first_bad and len(running) < cap:
                    running[task.remote(job_ref, ranges[submitted])] = submitted
                    submitted += 1
                ready, _ = ray.wait(list(running), num_returns=1)
                for gen in ready:  # a generator is ready when it has yielded again or ended
                    index = running[gen]
                    try:
                        step = ray.get(next(gen))
                    except StopIteration:
                        continue
                    except (ray.exceptions.RayError, DistSaeError) as exc:
                        failed[index] = _failure(exc, ranges[index])
                        del running[gen]
                        continue
                    if isinstance(step, RangeResult):
                        done[index] = step
                        del running[gen]
                    else:
                        progress(step)
                while next_out in done:
                    yield done.pop(next_out)
                    next_out += 1
        finally:
            for gen in running:  # a failed or abandoned build: stop its tasks before the folder goes
                ray.cancel(gen, force=True)
            if running:
                ray.wait(list(running), num_returns=len(running), timeout=10)

    return run


def _ray_data(workers: int):
    """ray.data set up for a peer measurement (rows in order, `workers` CPUs), or why it cannot be."""
    try:
        import ray.data
    except ImportError as exc:
        return f"not measured: Ray Data does not import here ({exc})"
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(cpu=workers)
    return ray.data


def ray_data_rate(folder, size: tuple[int, int], workers: int) -> float | str:
    """Rows/s of the design not chosen: Ray Data's read_images + map_batches (scale to [0, 1]) over
    the folder, ordered, on `workers` CPUs, rows consumed and nothing written (dist_sae.bench.build
    measures it next to ray_runner); a sentence instead when Ray Data does not import (it needs pandas)."""
    import time

    import numpy as np

    data = _ray_data(workers)
    if isinstance(data, str):
        return data
    t = time.perf_counter()
    ds = data.read_images(str(folder), size=size, mode="L", include_paths=False, file_extensions=["jpg", "jpeg", "png"])
    ds = ds.map_batches(lambda b: {"x": b["image"].reshape(len(b["image"]), -1).astype(np.float32) / 255.0}, batch_format="numpy")
    rows = sum(len(b["x"]) for b in ds.iter_batches(batch_size=1024, batch_format="numpy"))
    return rows / (time.perf_counter() - t)


def ray_data_records_rate(kind: str, paths: list[str], size: tuple[int, int], workers: int, column: str = "image") -> float | str:
    """Images/s of the Ray Data peer of `--from webdataset|parquet`: read_webdataset (members as
    bytes, no decoder) or read_parquet (the one column) + map_batches decoding with Pillow to gray
    and resizing bilinearly to `size` as dist_sae does, on `workers` CPUs, rows consumed and nothing
    written (dist_sae.bench.sources measures it next to ray_runner); a sentence when Ray Data does not import."""
    import io
    import time

    import numpy as np
    from PIL import Image

    data = _ray_data(workers)
    if isinstance(data, str):
        return data

    def decode(blobs) -> dict:
        rows = np.empty((len(blobs), size[0] * size[1]), dtype=np.float32)
        for i, data in enumerate(blobs):
            with Image.open(io.BytesIO(data)) as img:
                rows[i] = np.asarray(img.convert("L").resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32).reshape(-1) / 255.0
        return {"x": rows}

    t = time.perf_counter()
    if kind == "webdataset":
        ds = data.read_webdataset(paths, decoder=None).map_batches(lambda b: decode(b["jpg"]), batch_format="numpy")
    else:
        ds = data.read_parquet(paths, columns=[column]).map_batches(
            lambda b: decode(b.column(column).combine_chunks().field("bytes").to_pylist()), batch_format="pyarrow")
    rows = sum(len(b["x"]) for b in ds.iter_batches(batch_size=1024, batch_format="numpy"))
    return rows / (time.perf_counter() - t)
