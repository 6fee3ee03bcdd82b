"""RayEvaluator: runs a pass over Ray worker actors, with the interface of engine.LocalEvaluator.

θ goes into the object store once per distinct θ (pass 1 and pass 2 at one θ share it); each
worker call carries the reference and a key, and a worker reloads its model only when the key
changes. Units are handed out on demand (dispatch.Dispatcher) and the partial sums are added in
unit-id order (objective.OrderedReducer), so the float64 result is bit-identical for any number of
workers and any split of the units between them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray

from ..config import Config
from ..data import Dataset, WorkUnit
from ..engine import PASS_KINDS
from ..errors import TrainingError
from ..objective import OrderedReducer, Sums
from . import runtime
from .dispatch import Dispatcher

log = logging.getLogger(__name__)

IN_FLIGHT = 2  # units per worker: one computing, one being read (the worker has max_concurrency=2)


class RayEvaluator:
    """Passes over the data on Ray workers.

    Args:
        cfg: the run's config (data.block_rows, workers.unit_timeout_s).
        dataset: the dataset (its units are cut here, with the engine's rules).
        workers: Ray actor handles of cluster.worker.Worker.
        depth: units in flight per worker.
    """

    def __init__(self, cfg: Config, dataset: Dataset, workers: list[Any], depth: int = IN_FLIGHT) -> None:
        if not workers:
            raise TrainingError("the Ray evaluator needs at least one worker")
        self.cfg = cfg
        self.workers = list(workers)
        self.depth = depth
        self.units = dataset.units(cfg.data.block_rows)
        self.rows = dataset.rows
        self.timeout_s = cfg.workers.unit_timeout_s
        self.last_counts: dict[int, int] = {}  # units each worker ran in the last pass
        self._theta_digest: bytes | None = None
        self._theta_ref: Any = None
        self._passes = 0
        self.progress = None  # optional (kind, rows) -> progress bar with update(n) and close(), as LocalEvaluator
        self._affinity: dict[int, int] = {}  # unit id -> worker that ran it last (holds it in its cache)

    # ---- θ in the object store -----------------------------------------------------------

    def _put_theta(self, theta: np.ndarray) -> tuple[str, Any]:
        """(key, ObjectRef) of θ, put once per distinct θ."""
        theta = np.ascontiguousarray(theta, dtype=np.float64)
        digest = hashlib.sha1(theta.tobytes()).digest()
        if digest != self._theta_digest:
            self._theta_ref = ray.put(theta)
            self._theta_digest = digest
        return digest.hex(), self._theta_ref

    # ---- passes --------------------------------------------------------------------------

    def _drive(self, units: list[WorkUnit], submit, consume, below=None) -> dict[int, int]:
        """Dispatch `units` on demand until all are consumed.

        Args:
            submit: (worker handle, unit) -> ObjectRef.
            consume: (unit, result) -> None, called as results arrive.
            below: optional () -> unit id bound for Dispatcher.assign.

        Returns:
            Units run per worker index.
        """
        by_id = {u.id: u for u in units}
        dispatcher = Dispatcher(list(by_id), list(range(len(self.workers))), self.depth, self._affinity)
        pending: dict[Any, tuple[int, int]] = {}
        while not dispatcher.done:
            for w, uid in dispatcher.assign(below() if below else None):
                pending[submit(self.workers[w], by_id[uid])] = (w, uid)
            if not pending:
                raise TrainingError("no worker can take the remaining work units")
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.timeout_s)
            if not ready:
                raise TrainingError(
                    f"no work unit finished within workers.unit_timeout_s={self.timeout_s:g}s; a worker hangs "
                    "(or units are slower than that: raise workers.unit_timeout_s)"
                )
            for ref in ready:
                w, uid = pending.pop(ref)
                result = runtime.get(ref, f"work unit {uid} on worker {w}")
                dispatcher.complete(w, uid)
                self._affinity[uid] = w
                consume(by_id[uid], result)
        return dispatcher.counts()

    def run(self, kind: str, theta: np.ndarray, units: list[WorkUnit], g: list[np.ndarray] | None = None) -> tuple[Sums, dict[str, float]]:
        """The ordered float64 sum of a pass (pass1, pass2, onepass) over `units`, and timings."""
        if kind not in PASS_KINDS:
            raise ValueError(f"unknown pass {kind!r}")
        t0 = time.perf_counter()
        self._passes += 1
        theta_key, theta_ref = self._put_theta(theta)
        g_key = f"{theta_key}:{self._passes}" if g is not None else None
        # g is a few floats per hidden unit: sent inline with each call rather than through the store.
        g_arg = [np.asarray(v, dtype=np.float64) for v in g] if g is not None else None
        reducer = OrderedReducer([u.id for u in units])
        timing = {"read_s": 0.0, "compute_s": 0.0}
        bar = self.progress(kind, sum(u.rows for u in units)) if self.progress else None

        def submit(worker, unit):
            return worker.run.remote(kind, unit, theta_key, theta_ref, g_key, g_arg)

        def consume(unit, result):
            uid, sums, stats = result
            if uid != unit.id:
                raise TrainingError(f"worker returned unit {uid} for unit {unit.id}")
            try:
                reducer.add(uid, sums)
            except RuntimeError as exc:
                raise TrainingError(f"{kind}: {exc}") from None
            timing["read_s"] += stats["read_s"]
            timing["compute_s"] += stats["compute_s"]
            if bar is not None:
                bar.update(unit.rows)

        try:
            self.last_counts = self._drive(units, submit, consume)
        finally:
            if bar is not None:
                bar.close()
        if not reducer.done:
            raise TrainingError(f"{kind}: the pass ended with units missing from the reduction")
        wall = time.perf_counter() - t0
        # io_s / compute_s: worker-seconds reading and computing, summed over workers (reads overlap compute).
        return reducer.total, {"io_s": timing["read_s"], "compute_s": timing["compute_s"], "wall_s": wall, "workers": len(self.workers)}

    def map_units(self, kind: str, theta: np.ndarray, units: list[WorkUnit], layer: int | None = None) -> Iterator[tuple[WorkUnit, np.ndarray]]:
        """Yield (unit, per-row output) in unit order for kind `encode` or `reconstruct`.

        At most a few units per worker run ahead of the one to be yielded next, so memory stays
        bounded however slow the consumer is.
        """
        if kind not in ("encode", "reconstruct"):
            raise ValueError(f"unknown transform {kind!r}")
        theta_key, theta_ref = self._put_theta(theta)
        order = sorted(units, key=lambda u: u.id)
        window = 2 * self.depth * len(self.workers)
        done: dict[int, np.ndarray] = {}
        position = 0  # index in `order` of the next unit to yield
        by_id = {u.id: u for u in order}
        dispatcher = Dispatcher([u.id for u in order], list(range(len(self.workers))), self.depth, self._affinity)
        pending: dict[Any, tuple[int, int]] = {}
        while position < len(order):
            bound = order[position + window].id if position + window < len(order) else None
            for w, uid in dispatcher.assign(bound):
                ref = self.workers[w].transform.remote(kind, by_id[uid], theta_key, theta_ref, layer)
                pending[ref] = (w, uid)
            if order[position].id not in done:
                if not pending:
                    raise TrainingError("no worker can take the remaining work units")
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.timeout_s)
                if not ready:
                    raise TrainingError(f"no work unit finished within workers.unit_timeout_s={self.timeout_s:g}s")
                for ref in ready:
                    w, uid = pending.pop(ref)
                    got_id, out = runtime.get(ref, f"{kind} of work unit {uid} on worker {w}")
                    dispatcher.complete(w, uid)
                    self._affinity[uid] = w
                    done[got_id] = out
            while position < len(order) and order[position].id in done:
                unit = order[position]
                position += 1
                yield unit, done.pop(unit.id)

    def close(self) -> None:
        """Nothing to release here: the session owns (and kills) the worker actors."""
        self._theta_ref = None
