"""RayEvaluator: runs a pass over Ray worker actors, with the interface of train.problem.LocalEvaluator.

θ goes into the object store once per distinct θ (pass 1 and pass 2 at one θ share it); each
worker call carries the reference and a key, and a worker reloads its model only when the key
changes. Units are handed out on demand (dispatch.Dispatcher) and the partial sums are added in
the canonical order of sae/sums.py, here (workers.reduce=server: sums.OrderedReducer) or by
reducer actors near the data (grouped, tree: cluster/reduce.py), so the float64 result is bit-identical for
any number of workers, any split of the units between them, and any reduction mode.

Faults: a worker that dies mid-pass (process killed, node removed) or hangs past
workers.unit_timeout_s loses only its unfinished units; they go back to the queue and the others
take them, so the pass still counts every unit once and its sum is the one without the failure.
The worker is restarted by Ray or replaced by a new actor (when resources allow) and rejoins when
it answers; past workers.max_restarts failures per run the pass gives up with a TrainingError
(dispatch.FailurePolicy decides; cluster/recovery.py carries out its decisions).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray

from dist_sae.config import Config
from dist_sae.data.dataset import Dataset, ShardInfo
from dist_sae.data.workunit import MIN_UNIT_ROWS, WorkUnit
from dist_sae.train.codes import CodeJob
from dist_sae.train.passes import PASS_KINDS
from dist_sae.train.units import pass_units
from dist_sae.errors import StorageError, TrainingError
from dist_sae.sae.sums import OrderedReducer, Sums, unit_groups
from dist_sae.cluster import runtime
from dist_sae.cluster.reduce import LostResults, Reducers, RemoteReduction, nbytes, resolve_mode
from dist_sae.cluster.dispatch import Dispatcher, FailurePolicy
from dist_sae.cluster.recovery import Recovery
from dist_sae.cluster.meter import PassMeter

log = logging.getLogger(__name__)

Call = tuple[WorkUnit, ...]  # consecutive units sent to one worker in one message


def _named(call: Call) -> str:
    return f"work unit {call[0].id}" if len(call) == 1 else f"work units {call[0].id}-{call[-1].id}"

INLINE_THETA_BYTES = 64 * 1024  # θ up to this size travels inside each call (Ray inlines arguments under 100 KB)
IN_FLIGHT = 2  # units per worker: one computing, one being read (the worker has max_concurrency=2)

# Errors that say the worker (or its node, or the result it stored there) is gone, not that the
# unit is wrong: the unit is redone elsewhere. Anything else a unit raises stops the pass.
WORKER_LOST = (
    ray.exceptions.RayActorError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError,
)


class RayEvaluator(Recovery):
    """Passes over the data on Ray workers.

    Args:
        cfg: the run's config (data.block_rows, workers.unit_timeout_s).
        dataset: the dataset (its units are cut here, with the engine's rules).
        workers: Ray actor handles of cluster.worker.Worker. The list itself is kept (not copied):
            a replacement actor takes its dead predecessor's place in it.
        depth: units in flight per worker.
        launcher: starts a new actor for a worker that Ray will not bring back; None: such a
            worker is not replaced and the others carry on.
        reduce_fault: test-only: a file path; the first grouped/tree reducer call that finds it
            deletes it and kills its own process (Ray restarts the reducer and reruns the call).
        balance: the dispatcher's end-of-pass rule from measured rows/s (off: plain on-demand, for
            the benchmark's before/after).
    """

    def __init__(self, cfg: Config, dataset: Dataset, workers: list[Any], depth: int = IN_FLIGHT, launcher: Any = None,
                 reduce_fault: str | None = None, balance: bool = True) -> None:
        if not workers:
            raise TrainingError("the Ray evaluator needs at least one worker")
        self.cfg = cfg
        self.workers = workers if isinstance(workers, list) else list(workers)
        self.depth = depth
        self.launcher = launcher
        self.policy = FailurePolicy(cfg.workers.max_restarts, cfg.workers.unit_timeout_s)
        self.failures = 0  # worker failures in this run, all workers together
        self.last_live = len(self.workers)  # workers alive at the end of the last pass
        self._init_recovery()
        self.units = pass_units(cfg, dataset)
        self.rows = dataset.rows
        self.timeout_s = cfg.workers.unit_timeout_s
        self.last_counts: dict[int, int] = {}  # units each worker ran in the last pass
        self._theta_digest: bytes | None = None
        self._theta_ref: Any = None
        self._passes = 0
        self.progress = None  # optional (kind, rows) -> progress bar with update(n) and close(), as LocalEvaluator
        self._affinity: dict[int, int] = {}  # unit id -> worker that ran it last (holds it in its cache)
        self.reduce_fault = reduce_fault
        self.reducers = Reducers()  # per-node reduction actors (grouped, tree), started on first use
        self.get_s = 0.0  # time spent in ray.get of unit results (the server's receive time)
        # Device kind of each worker ("cpu"/"gpu", as placed), its measured rows/s (for the
        # dispatcher's end-of-pass rule), and the current pass's progress (ParameterServer.progress).
        self.kinds = [launcher.kind(i) if launcher is not None else "cpu" for i in range(len(self.workers))]
        self._rates: dict[int, float] = {}
        self.balance = balance
        self.meter = PassMeter()
        self.notes: list[str] = []  # one line per worker failure handled, for the driver to print
        self.abandon = threading.Event()  # set (from another thread): the pass in flight stops at once

    # ---- θ in the object store -----------------------------------------------------------

    def _put_theta(self, theta: np.ndarray) -> tuple[str, Any]:
        """(key, θ or its ObjectRef): a small θ goes inline with each call, a large one is put once per distinct θ.

        Below INLINE_THETA_BYTES the store costs more than it saves: ray.put, then every worker asks
        the owner for the object before it can start (measured 1.5 ms of the server's 7.5 ms per
        minibatch step for the 64-25-64 model, 26 KB); Ray copies small arguments into the call itself.
        Inline θ travels as bytes, which Ray serializes 30× faster than an ndarray (units, likewise,
        travel as tuples of ints: WorkUnit.flat()).
        """
        theta = np.ascontiguousarray(theta, dtype=np.float64)
        digest = hashlib.sha1(theta.tobytes()).digest()
        if digest != self._theta_digest:
            self._theta_ref = theta.tobytes() if theta.nbytes <= INLINE_THETA_BYTES else ray.put(theta)
            self._theta_digest = digest
        return digest.hex(), self._theta_ref

    # ---- passes --------------------------------------------------------------------------

    def _results(self, calls: list[Call], submit, below=None, seed: dict[int, int] | None = None,
                 depth: int | None = None) -> Iterator[tuple[Call, Any]]:
        """Dispatch `calls` on demand; yield (call, result) as results arrive, each call exactly once.

        A call is a run of consecutive units sent to one worker in one message (see `calls`), known
        to the dispatcher by its first unit's id; a failed call is redone whole.

        Args:
            submit: (worker index, call) -> ObjectRef.
            below: optional () -> unit id bound for Dispatcher.assign.
            seed: unit id -> worker, for units no worker has run yet (affinity of the last pass wins).
            depth: calls in flight per worker (default self.depth).

        Raises:
            TrainingError: past workers.max_restarts worker failures, or no worker left.
            DistSaeError: what a unit raised (a DataError stays a DataError).
        """
        by_id = {call[0].id: call for call in calls}
        live = [w for w in range(len(self.workers)) if w not in self._down]
        rows = {cid: sum(u.rows for u in call) for cid, call in by_id.items()} if below is None and self.balance else None  # not for ordered output
        dispatcher = Dispatcher(list(by_id), live, depth or self.depth, {**(seed or {}), **self._affinity}, rows, self._rates)
        pending: dict[Any, tuple[int, int]] = {}
        units_done = dict.fromkeys(live, 0)  # units (not calls) each worker ran
        while not dispatcher.done:
            for w, uid in dispatcher.assign(below() if below else None):
                pending[submit(w, by_id[uid])] = (w, uid)
            self.meter.busy(sum(1 for s in dispatcher.workers.values() if s.alive and s.in_flight), len(dispatcher.live_workers),
                            dispatcher.queued)
            # Probes first: ray.wait reports ready refs in list order, and a stream of finished units
            # must not keep a worker that is back from rejoining.
            waiting = list(self._probes) + list(pending)
            if not waiting:
                raise TrainingError(
                    f"no worker is left to run the remaining work units: {len(self._down)} of {len(self.workers)} "
                    "workers failed and cannot be replaced"
                )
            ready, _ = ray.wait(waiting, num_returns=1, timeout=self._wait_s(dispatcher))
            if self.abandon.is_set():  # looked at whenever a unit finishes: within a unit's time
                raise TrainingError("the pass was abandoned: the run is stopping")
            for ref in ready:
                if ref in self._probes:
                    self._probe_done(ref, dispatcher)
                    continue
                w, uid = pending.pop(ref)
                try:
                    t_get = time.perf_counter()
                    result = ray.get(ref)
                    self.get_s += time.perf_counter() - t_get
                except WORKER_LOST as exc:
                    self._failed(w, f"it was lost while running {_named(by_id[uid])} ({runtime.last_line(exc)})", dispatcher, pending)
                    continue
                except ray.exceptions.RayError as exc:
                    error = runtime.library_error(exc, f"{_named(by_id[uid])} on worker {w}")
                    if not isinstance(error, StorageError):
                        raise error from None
                    # A shard that stays unreadable (after the storage retries) fails the unit like a worker fault.
                    self._failed(w, f"{_named(by_id[uid])}: {error}", dispatcher, pending)
                    continue
                dispatcher.complete(w, uid)
                for unit in by_id[uid]:
                    self._affinity[unit.id] = w
                units_done[w] = units_done.get(w, 0) + len(by_id[uid])
                yield by_id[uid], result
            now = time.monotonic()
            for w in self.policy.hung(dispatcher.workers.values(), now):
                stuck = min(dispatcher.workers[w].in_flight)
                self._kill(w)
                self._failed(w, f"{_named(by_id[stuck])} made no progress within workers.unit_timeout_s={self.timeout_s:g}s (hung)",
                             dispatcher, pending)
            self._check_stalled(dispatcher, now)
        self.last_counts = units_done
        self.last_live = len(dispatcher.live_workers)

    def run(self, kind: str, theta: np.ndarray, units: list[WorkUnit], g: list[np.ndarray] | None = None) -> tuple[Sums, dict[str, float]]:
        """The canonical float64 sum of a pass (pass1, pass2, onepass) over `units`, and timings.

        Timings include the server side of the reduction: reduce_s (seconds getting results and
        adding them, not waiting for them) and reduce_bytes (bytes of sums received).
        """
        if kind not in PASS_KINDS:
            raise ValueError(f"unknown pass {kind!r}")
        t0 = time.perf_counter()
        self._passes += 1
        theta_key, theta_ref = self._put_theta(theta)
        g_key = f"{theta_key}:{self._passes}" if g is not None else None
        # g is a few floats per hidden unit: sent inline with each call rather than through the store.
        g_arg = [np.asarray(v, dtype=np.float64).tobytes() for v in g] if g is not None else None
        mode = resolve_mode(self.cfg.workers.reduce, kind, len(units))
        reducer = OrderedReducer([u.id for u in units])
        remote = RemoteReduction([u.id for u in units], mode, self.reducers, self.reduce_fault) if mode != "server" else None
        kept: dict[int, Any] = {}  # unit id -> ref of its sums in the store (its latest submission)
        timing = {"read_s": 0.0, "compute_s": 0.0, "add_s": 0.0, "bytes": 0}
        self.get_s = 0.0
        bar = self.progress(kind, sum(u.rows for u in units)) if self.progress else None
        self.meter.start(kind, sum(u.rows for u in units), len(self.workers) - len(self._down))

        calls, folds = self.calls(units) if remote is None else ([(u,) for u in units], {})

        def submit(w, call):
            if remote is None:
                method = self.workers[w].run_fold if call[0].id in folds else self.workers[w].run_many
                return method.remote(kind, [u.flat() for u in call], theta_key, theta_ref, g_key, g_arg)
            unit, = call
            meta, kept[unit.id] = self.workers[w].run_kept.options(num_returns=2).remote(kind, unit.flat(), theta_key, theta_ref, g_key, g_arg)
            return meta

        def consume(call, result, bar):
            """A call's result: one unit's (id, sums, stats), or a folded group's (its first id, sums, stats)."""
            uid, sums, stats = result if remote is None else (result[0], None, result[1])
            if uid != call[0].id:
                raise TrainingError(f"worker returned unit {uid} for unit {call[0].id}")
            t_add = time.perf_counter()
            if remote is not None:
                remote.unit_done(uid, kept.pop(uid), stats.get("node"))
            else:
                try:
                    if uid in folds:
                        reducer.add_group(folds[uid], sums)
                    else:
                        reducer.add(uid, sums)
                except RuntimeError as exc:
                    raise TrainingError(f"{kind}: {exc}") from None
                timing["bytes"] += nbytes(sums)
            timing["add_s"] += time.perf_counter() - t_add
            timing["read_s"] += stats["read_s"]
            timing["compute_s"] += stats["compute_s"]
            worker = self._affinity[uid]  # set by _results to the worker that ran it
            self._pids[worker] = stats.get("pid")
            rows = sum(u.rows for u in call)
            self.meter.done(self.kinds[worker], rows)
            busy_s = max(stats["read_s"], stats["compute_s"])  # reads overlap compute: the slower one paces it
            if busy_s > 0:
                rate = rows / busy_s
                self._rates[worker] = 0.5 * (self._rates.get(worker, rate) + rate)
            if bar is not None:
                bar.update(rows)

        try:
            # The server reduction takes consecutive small units in one call (a whole reduction
            # group folded by the worker, or several units' sums); grouped and tree keep each
            # unit's sums in the store of the node that ran it, so one unit per call.
            for call, results in self._results(calls, submit, seed=self._group_seed(units, mode)):
                if remote is not None or call[0].id in folds:
                    consume(call, results, bar)
                    continue
                for unit, result in zip(call, results):
                    consume((unit,), result, bar)
        finally:
            if bar is not None:
                bar.close()
        total = reducer.total if remote is None else self._finish(kind, remote, units, submit, consume)
        if total is None or (remote is None and not reducer.done):
            raise TrainingError(f"{kind}: the pass ended with units missing from the reduction")
        wall = time.perf_counter() - t0
        busy = self.get_s + timing["add_s"] + (remote.busy_s if remote is not None else 0.0)
        received = timing["bytes"] + (remote.received_bytes if remote is not None else 0)
        # io_s / compute_s: worker-seconds reading and computing, summed over workers (reads overlap compute).
        # tail_s: first worker idle with no unit left to hand out -> pass end; rows_per_s_<kind>: rows
        # each device kind ran per second.
        return total, {"io_s": timing["read_s"], "compute_s": timing["compute_s"], "wall_s": wall, "workers": self.last_live,
                       "reduce_s": busy, "reduce_bytes": received, **self.meter.finish()}

    def calls(self, units: list[WorkUnit]) -> tuple[list[Call], dict[int, int]]:
        """`units` as calls of consecutive units (one message to a worker and one reply per call),
        and the calls the worker folds: {first unit id: reduction group index}.

        Only units under MIN_UNIT_ROWS rows travel together (data.block_rows set that small, or a
        minibatch's parts; small shards are already packed into large units, workunit.cut_units):
        - A whole reduction group (sae/sums.py) of such units, up to block_rows rows, is one call
          that the worker folds into the group's sum, in the group's own order (the same floats
          as here), so its reply is one unit's size: a reply of several units' sums (past Ray's
          100 KB inline limit) took 2.4-2.8 ms against 1.2 ms for one on a 2-core machine. Only
          when the pass has a group for every live worker, so that none idles (a minibatch's few
          parts stay one per worker).
        - Otherwise consecutive ones go together up to min(block_rows, rows / (depth × live
          workers)) rows a call, so every live worker still gets `depth` calls.
        Units of MIN_UNIT_ROWS or more, the tapered pieces included, stay one per call. The pass's
        sum is the canonical one either way: only the messages change.
        """
        live = max(1, len(self.workers) - len(self._down))
        cap = min(self.cfg.data.block_rows, -(-sum(u.rows for u in units) // (self.depth * live)))
        by_id = {u.id: u for u in units}
        groups = [[by_id[i] for i in ids] for ids in unit_groups(list(by_id))]
        calls: list[list[WorkUnit]] = []
        folds: dict[int, int] = {}
        rows = 0  # rows of the last call
        for j, group in enumerate(groups):
            if (len(groups) >= live and len(group) > 1 and all(u.rows < MIN_UNIT_ROWS for u in group)
                    and sum(u.rows for u in group) <= self.cfg.data.block_rows):
                folds[group[0].id] = j
                calls.append(group)
                continue
            for unit in group:
                last = calls[-1] if calls and calls[-1][0].id not in folds else None
                if last and unit.rows < MIN_UNIT_ROWS and last[-1].rows < MIN_UNIT_ROWS and rows + unit.rows <= cap:
                    last.append(unit)
                    rows += unit.rows
                else:
                    calls.append([unit])
                    rows = unit.rows
        return [tuple(call) for call in calls], folds

    def _group_seed(self, units: list[WorkUnit], mode: str) -> dict[int, int] | None:
        """grouped/tree: give each reduction group to one live worker (group j -> the j-th, round
        robin), so a group's fold finds its units on its own node; None for the server reduction."""
        live = [w for w in range(len(self.workers)) if w not in self._down]
        if mode == "server" or not live:
            return None
        return {uid: live[j % len(live)] for j, group in enumerate(unit_groups([u.id for u in units])) for uid in group}

    def _finish(self, kind: str, remote: RemoteReduction, units: list[WorkUnit], submit, consume) -> Sums:
        """The remote reduction's sum; unit results lost with a node are rerun, then it is rebuilt."""
        by_id = {u.id: u for u in units}
        for _ in range(self.cfg.workers.max_restarts + 1):
            try:
                return remote.finish()
            except LostResults as lost:
                log.warning("%s: the reduction lost unit results with their node (%s); rerunning units %s",
                            kind, lost, lost.units)
                for call, result in self._results([(by_id[u],) for u in lost.units], submit):
                    consume(call, result, None)
        raise TrainingError(f"{kind}: the reduction failed more than workers.max_restarts={self.cfg.workers.max_restarts} times")

    def write_shards(self, job: CodeJob, shards: dict[int, tuple[WorkUnit, ...]], theta: np.ndarray) -> Iterator[tuple[int, ShardInfo]]:
        """Compute and store output shards on the workers (train/codes.py), each shard one call, handed
        out on demand; yield (index, ShardInfo) as each is stored. Only names, row counts and hashes
        come back: the rows go from the worker to the output. A shard whose worker fails is written
        again by another (its attempt's scratch file is discarded), so the output is unchanged."""
        theta_key, theta_ref = self._put_theta(theta)
        calls = [shards[k] for k in sorted(shards)]
        index = {call[0].id: k for k, call in zip(sorted(shards), calls)}

        def submit(w, call):
            return self.workers[w].write_codes.remote(job, index[call[0].id], [u.flat() for u in call], theta_key, theta_ref)

        # One shard at a time per worker: a shard is seconds of work that reads ahead within itself
        # (a second call's compute, hashing and HDF5 writes only contend with the first's: 1M rows of
        # 64-256 on 2 workers took 2.4-3.0 s with two shards in flight per worker, 2.1 s with one).
        for call, info in self._results(calls, submit, depth=1):
            yield index[call[0].id], ShardInfo(**info)

    def close(self) -> None:
        """Kill the reducer actors; the session owns (and kills) the worker actors."""
        self._theta_ref = None
        self._probes.clear()
        self.reducers.close()
