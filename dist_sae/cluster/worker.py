"""Worker: streams work units through an engine.PassRunner and returns float64 partial sums.

A plain class. The session makes it a Ray actor with `max_concurrency=2`: while one call computes
(under the compute lock; torch releases the GIL), the next call loads its unit (HDF5 or the
runner's block cache), so reads overlap compute (read-ahead) without a thread of our own. The
dispatcher sends a unit back to the worker that ran it before, so the cache is hit. Everything returned is numpy on the CPU,
whatever device the worker computes on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
import warnings
from typing import Any

import numpy as np
import torch

from dist_sae.config import from_dict
from dist_sae.data.workunit import WorkUnit
from dist_sae.train.codes import CodeJob, write_code_shard
from dist_sae.train.passes import PassRunner
from dist_sae.train.inputs import resolve_device
from dist_sae.sae.sums import Sums, fold

log = logging.getLogger(__name__)


def worker_threads(compute_threads: int, cpus_per_worker: float) -> int:
    """Torch intra-op threads of a worker: compute.threads, else its CPU share (at least 1)."""
    return compute_threads or max(1, int(cpus_per_worker))


def _node_id() -> str | None:
    """The Ray node this runs on, or None outside Ray (the class is usable without it)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


def _ray_temp_dir() -> str | None:
    """This node's Ray temp dir (e.g. /tmp/ray), or None outside Ray."""
    try:
        import ray

        return ray._private.worker._global_node.get_temp_dir_path() if ray.is_initialized() else None
    except Exception:
        return None


class Worker:
    """One worker: θ in, per-unit float64 sums out.

    Args:
        config: the run's config as a dict (model.visible set).
        dataset_path: the dataset folder; on a cluster it must be reachable from every node.
        index: this worker's number (names it, orders nothing).
        gpus: GPUs Ray assigned to this worker; > 0 (with compute.device auto) computes on cuda.
        threads: torch intra-op threads (0: torch's default).
        delay_s: test-only: sleep this long per unit, to simulate a slow worker.
    """

    def __init__(
        self,
        config: dict[str, Any],
        dataset_path: str,
        index: int = 0,
        gpus: float = 0.0,
        threads: int = 0,
        delay_s: float = 0.0,
    ) -> None:
        cfg = from_dict(config)
        if cfg.data.local_cache is None and _ray_temp_dir():  # node-local by construction (a home may be NFS)
            cfg = cfg.with_overrides({"data.local_cache": os.path.join(_ray_temp_dir(), "dist_sae_cache")})
        self.index = index
        self.delay_s = delay_s
        device = resolve_device(cfg.compute.device, gpus)
        self.runner = PassRunner(cfg, dataset_path, device, threads)
        # OpenMP's (and MKL's) thread count is a per-thread setting, and Ray runs this actor's calls
        # on pool threads that never set it. Seen: a unit's sums depended on which of them ran it
        # (its products threaded or not), so two runs of one config, or Ray and --local, differed
        # in the last bit (blocks of 1,000 rows, 12-6-12; test_cluster). Every call sets the count
        # on its own thread first (_own_threads), as the parameter server does.
        self.threads = threads
        self._compute = threading.Lock()  # one unit computes at a time; the other call reads
        self._reads = ThreadPoolExecutor(1, thread_name_prefix="dist-sae-encode-read",
                                         initializer=self._own_threads)  # an encode shard's next unit, read ahead
        self._g_key: object = None
        self._fault: tuple[str, int] | None = None  # test-only: (exit | hang, units left before it)
        self._node = _node_id()
        self._pid = os.getpid()  # in each unit's stats: a killed worker's probe must not be answered by its old process

    def _own_threads(self) -> None:
        """Give the calling thread this worker's torch thread count (see __init__)."""
        if self.threads > 0:
            torch.set_num_threads(self.threads)

    def inject_fault(self, after_units: int, kind: str = "exit") -> None:
        """Test-only fault knob: after `after_units` more units, fail inside the next one.

        kind "exit" ends the process (os._exit, as a killed or preempted worker); "hang" blocks
        forever (as a worker stuck on I/O), so workers.unit_timeout_s must catch it. A worker that
        Ray restarts reruns its constructor, which clears the knob: it fails once.
        """
        if kind not in ("exit", "hang"):
            raise ValueError(f"unknown fault {kind!r}")
        self._fault = (kind, after_units)

    def _maybe_fail(self) -> None:
        if self._fault is None:
            return
        kind, left = self._fault
        if left > 0:
            self._fault = (kind, left - 1)
            return
        if kind == "exit":
            os._exit(1)
        threading.Event().wait()  # hang: never returns

    def info(self) -> dict[str, Any]:
        """Where and how this worker computes (for logs, tests and `ray list actors`)."""
        return {
            "index": self.index,
            "device": str(self.runner.device),
            "threads": self.threads or torch.get_num_threads(),  # this call's thread may not have set it
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "node_id": _node_id(),
            "buffers": self.runner.buffers_made(),  # bounded, however many units this worker ran
        }

    def _set_theta(self, theta: np.ndarray | bytes, theta_key: object) -> None:
        # θ arrives as a read-only view of the object store, or as the bytes of a small θ sent with
        # the call; either way it is only copied into the model.
        if isinstance(theta, bytes):
            theta = np.frombuffer(theta, dtype=np.float64)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.runner.set_theta(theta, theta_key)  # skipped when theta_key is the one loaded

    def _load(self, theta_key: object, theta: np.ndarray | bytes, g_key: object, g: list[bytes] | None) -> None:
        self._set_theta(theta, theta_key)
        if g_key is None or g_key != self._g_key:
            self.runner.set_g(None if g is None else [np.frombuffer(v, dtype=np.float64) for v in g])
            self._g_key = g_key

    def run(
        self,
        kind: str,
        unit: tuple[int, ...],
        theta_key: object,
        theta: np.ndarray | bytes,
        g_key: object = None,
        g: list[bytes] | None = None,
    ) -> tuple[int, Sums, dict[str, float]]:
        """Partial sums of one unit for pass1, pass2 or onepass.

        Args:
            unit: the rows to run, as WorkUnit.flat() gives them.
            theta_key: names θ; the model is reloaded only when it changes.
            theta: θ (P,) float64 (Ray passes it from the object store, read-only), or its bytes.
            g_key, g: names and holds the KL′ vectors of pass 2, float64 bytes (None otherwise).

        Returns:
            (unit id, float64 sums incl. "rows", {"read_s", "compute_s"}).
        """
        t0 = time.perf_counter()
        self._own_threads()  # load converts (data.transform), compute multiplies: both on this thread
        unit = WorkUnit.from_flat(unit)
        # Outside the lock, so it overlaps the other call's compute: HDF5 (or the worker's block
        # cache, data.cache_mb), data.transform, conversion to the compute dtype and device.
        block = self.runner.load(unit)
        t1 = time.perf_counter()
        with self._compute:
            self._maybe_fail()
            t2 = time.perf_counter()
            self._load(theta_key, theta, g_key, g)
            sums = self.runner.compute(kind, unit, block)
            if self.delay_s:
                time.sleep(self.delay_s)
            t3 = time.perf_counter()
        self.runner.release(block)  # its buffers are reused by the next load (the sums do not refer to it)
        return unit.id, sums, {"read_s": t1 - t0, "wait_s": t2 - t1, "compute_s": t3 - t2, "pid": self._pid}

    def run_many(self, kind: str, units: list[tuple[int, ...]], *context: Any) -> list[tuple[int, Sums, dict[str, float]]]:
        """`run` for each of several units (context: its theta_key, theta, g_key, g), answered in one
        reply: the evaluator merges small units into one call (RayEvaluator.calls)."""
        return [self.run(kind, unit, *context) for unit in units]

    def run_fold(self, kind: str, units: list[tuple[int, ...]], *context: Any) -> tuple[int, Sums, dict[str, Any]]:
        """`run` for each unit of a whole reduction group (context: its theta_key, theta, g_key, g),
        answered as (first unit id, the group's sum, stats summed over its units): the left fold
        in unit order that the server's reducer would compute (sae/sums.py), so one sum travels."""
        stats = dict.fromkeys(("read_s", "wait_s", "compute_s"), 0.0)

        def parts():
            for unit in units:
                _, sums, unit_stats = self.run(kind, unit, *context)
                for key in stats:
                    stats[key] += unit_stats[key]
                yield sums

        return units[0][0], fold(parts()), {**stats, "pid": self._pid}

    def run_kept(self, kind: str, unit: tuple[int, ...], *context: Any) -> tuple[tuple[int, dict[str, Any]], Sums]:
        """`run` (context: its theta_key, theta, g_key, g), with the sums as a second return value:
        called with num_returns=2, they stay in this node's object store for the grouped or tree
        reduction (cluster/reduce.py), and only (unit id, stats incl. "node": this node's id) and
        the sums' reference go to the caller."""
        uid, sums, stats = self.run(kind, unit, *context)
        return (uid, {**stats, "node": self._node}), sums

    def write_codes(self, job: CodeJob, shard: int, units: list[tuple[int, ...]], theta_key: object,
                    theta: np.ndarray | bytes) -> dict[str, Any]:
        """Compute output shard `shard` from its units (WorkUnit.flat()) and store it in job.folder
        (train/codes.py); its ShardInfo as a dict. The evaluator sends one shard at a time; the
        next unit of the shard is read ahead on this worker's read thread while one computes."""
        self._own_threads()

        def compute(block):
            with self._compute:
                self._maybe_fail()
                self._set_theta(theta, theta_key)
                out = self.runner.transform(job.kind, block, job.layer)
                if self.delay_s:
                    time.sleep(self.delay_s)
            return out

        info = write_code_shard(self.runner, job, shard, [WorkUnit.from_flat(u) for u in units], compute, self._reads)
        return dataclasses.asdict(info)

    def close(self) -> None:
        self._reads.shutdown(wait=True)
        self.runner.close()
