"""On-demand dispatch of work units to workers: a pure policy over status records.

Every worker keeps up to `depth` units in flight; whenever one finishes, it gets the next queued
unit. So a fast (GPU) worker takes more units than a slow one, and no worker idles while another
holds a long queue. With an affinity map (unit -> the worker that ran it last pass, whose block
cache holds its rows), a worker first takes its own units, then any other queued unit: the cache
is hit when the workers keep pace, and the balance is still on demand when they do not. The policy knows nothing of Ray: the evaluator feeds it events (a unit
finished, a worker died) and asks it what to send where. A dead worker's units go back to the
front of the queue, so every unit is still counted exactly once.

Mixed pools: given each unit's rows and each worker's measured rows/s, a worker under half the
fastest worker's speed (a CPU beside a GPU) takes units from the back of the queue, where data.taper
cut them small, while the fast ones take the large units at the front; and a worker takes a unit
only if it would finish it before the workers faster than it could get through the queue, else it
takes the last queued unit if that fits, or waits. So a 1-core worker never starts a large unit
that a GPU would finish sooner, and the units left when the pass ends are small. Who runs a unit
never changes its sum, so this may depend on timing.

FailurePolicy decides what a failure means for the run, from the same status records: a worker
whose unit has not finished within `unit_timeout_s` of its last progress is hung (treated as
dead); a dead worker's units are requeued, and it is replaced while the run's failures stay
within `max_restarts`; past that, the run gives up (and stops with a checkpoint).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum


SLOW = 0.5  # a worker under this fraction of the fastest one's speed takes the small units at the back


class UnitState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


@dataclass
class UnitStatus:
    """Where one work unit stands within one pass."""

    unit_id: int
    state: UnitState = UnitState.QUEUED
    worker: int | None = None  # index of the worker running (or that ran) it
    attempts: int = 0  # times it was handed out


@dataclass
class WorkerStatus:
    """One worker's share of a pass."""

    index: int
    alive: bool = True
    in_flight: set[int] = field(default_factory=set)  # unit ids sent, not yet finished
    done: int = 0  # units finished in this pass
    failures: int = 0
    busy_since: float | None = None  # monotonic time of its last progress while it has units in flight


class Dispatcher:
    """Hands out units on demand, `depth` in flight per live worker, lowest unit id first.

    Args:
        unit_ids: the units of the pass.
        workers: the indices of the workers taking part.
        depth: units in flight per worker (2: one computing, one being read ahead).
        affinity: unit id -> preferred worker (e.g. the one that ran it last pass).
        rows: unit id -> its rows; with `rates`, turns on the end-of-pass rule (module docstring).
        rates: worker index -> measured rows/s; the rule is off while a live worker has none.
    """

    def __init__(
        self, unit_ids: list[int], workers: list[int], depth: int = 2, affinity: dict[int, int] | None = None,
        rows: dict[int, int] | None = None, rates: dict[int, float] | None = None,
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth
        self.units = {uid: UnitStatus(uid) for uid in unit_ids}
        if len(self.units) != len(unit_ids):
            raise ValueError("unit ids of a pass must be distinct")
        self.workers = {w: WorkerStatus(w) for w in workers}
        self.affinity = dict(affinity or {})
        self.rows = dict(rows or {})
        self.rates = rates if rows else None  # the caller's dict: rates it learns during the pass count
        self._queued_rows = sum(self.rows.get(u, 0) for u in unit_ids)
        self.queued = len(unit_ids)  # units waiting to be handed out
        self._flight_rows = 0
        # Queues in unit order, with lazy deletion (an entry whose unit is no longer queued is
        # skipped), so each hand-out costs O(1) amortised however many units there are.
        order = sorted(unit_ids)
        self.queue: deque[int] = deque(order)  # every queued unit
        self._own: dict[int, deque[int]] = {w: deque() for w in workers}  # units a worker has affinity with
        self._orphans: deque[int] = deque()  # units no live worker has affinity with
        for uid in order:
            self._home(uid).append(uid)

    def _home(self, uid: int) -> deque[int]:
        preferred = self.affinity.get(uid)
        w = self.workers.get(preferred) if preferred is not None else None
        return self._own[w.index] if w is not None and w.alive else self._orphans

    # ---- queries -------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return all(u.state is UnitState.DONE for u in self.units.values())

    @property
    def live_workers(self) -> list[int]:
        return [w.index for w in self.workers.values() if w.alive]

    def counts(self) -> dict[int, int]:
        """Units finished per worker in this pass."""
        return {w.index: w.done for w in self.workers.values()}

    # ---- policy --------------------------------------------------------------------------

    def assign(self, below: int | None = None, now: float | None = None) -> list[tuple[int, int]]:
        """The (worker, unit_id) pairs to send now, marked as running.

        Round-robin over live workers with spare slots, so the first units of a pass are spread
        over all workers; afterwards a slot frees when its unit finishes (on demand). A worker takes
        the lowest queued unit it has affinity with, else the lowest queued unit no live worker has
        affinity with, else the lowest queued unit (it helps a slower worker).

        Args:
            below: only hand out units with id < below (bounds how far ahead of an ordered consumer
                the results may run).
            now: monotonic time (default: time.monotonic()); starts a worker's hang clock.
        """
        now = time.monotonic() if now is None else now
        out: list[tuple[int, int]] = []
        progress = True
        while progress:
            progress = False
            for w in self.workers.values():
                if not (w.alive and len(w.in_flight) < self.depth):
                    continue
                uid = self._take(w.index, below)
                if uid is None:
                    continue
                unit = self.units[uid]
                unit.state, unit.worker = UnitState.RUNNING, w.index
                unit.attempts += 1
                self._queued_rows -= self.rows.get(uid, 0)
                self.queued -= 1
                self._flight_rows += self.rows.get(uid, 0)
                if not w.in_flight:
                    w.busy_since = now
                w.in_flight.add(uid)
                out.append((w.index, uid))
                progress = True
        return out

    def _take(self, worker: int, below: int | None) -> int | None:
        if below is None and self._slow(worker):
            return self._take_last(worker)
        for q in (self._own[worker], self._orphans, self.queue):
            while q and self.units[q[0]].state is not UnitState.QUEUED:
                q.popleft()  # taken through another queue (lazy deletion)
            if q and (below is None or q[0] < below):
                if below is None and not self._in_time(worker, q[0]):
                    return self._take_last(worker)
                return q.popleft()
        return None

    def _take_last(self, worker: int) -> int | None:
        """The highest queued unit (the smallest, with data.taper) if `worker` finishes it in time."""
        while self.queue and self.units[self.queue[-1]].state is not UnitState.QUEUED:
            self.queue.pop()
        if self.queue and self._in_time(worker, self.queue[-1]):
            return self.queue.pop()
        return None

    def _slow(self, worker: int) -> bool:
        """Under SLOW of the fastest live worker's measured speed."""
        rates = self.rates or {}
        known = [rates.get(w.index, 0.0) for w in self.workers.values() if w.alive]
        return 0 < rates.get(worker, 0.0) < SLOW * max(known, default=0.0)

    def _in_time(self, worker: int, uid: int) -> bool:
        """Whether `worker` would finish `uid` before others could get through the queue (unit
        included) and their own units in flight: for a worker with nothing in flight, the workers
        faster than it (so the fastest always takes a unit); for a read-ahead unit, all others.
        Unmeasured workers count as neither."""
        rates = self.rates or {}
        mine = rates.get(worker, 0.0)
        backlog = sum(self.rows.get(u, 0) for u in self.workers[worker].in_flight)
        others = [w for w in self.workers.values() if w.alive and w.index != worker and rates.get(w.index, 0.0) > 0]
        if backlog == 0:
            others = [w for w in others if rates[w.index] > mine]
        if mine <= 0 or not others:
            return True
        ahead = self._queued_rows + sum(self.rows.get(u, 0) for w in others for u in w.in_flight)
        return (backlog + self.rows.get(uid, 0)) / mine <= ahead / sum(rates[w.index] for w in others)

    def complete(self, worker: int, unit_id: int, now: float | None = None) -> None:
        """Record that `worker` finished `unit_id` (at monotonic time `now`: its last progress).

        Raises:
            RuntimeError: the unit was not running on that worker (a second result for one unit).
        """
        unit = self.units[unit_id]
        w = self.workers[worker]
        if unit.state is not UnitState.RUNNING or unit.worker != worker or unit_id not in w.in_flight:
            raise RuntimeError(f"work unit {unit_id} finished on worker {worker} but was {unit.state.value} on {unit.worker}")
        unit.state = UnitState.DONE
        self._flight_rows -= self.rows.get(unit_id, 0)
        w.in_flight.discard(unit_id)
        w.done += 1
        w.busy_since = (time.monotonic() if now is None else now) if w.in_flight else None

    def worker_failed(self, worker: int) -> list[int]:
        """Mark a worker dead and put its in-flight units back at the front of the queue.

        Units it had affinity with become anyone's.

        Returns:
            The requeued unit ids (they will be handed to live workers by the next `assign`).
        """
        w = self.workers[worker]
        w.alive = False
        w.failures += 1
        requeued = sorted(w.in_flight)
        for uid in requeued:
            unit = self.units[uid]
            unit.state, unit.worker = UnitState.QUEUED, None
            self._queued_rows += self.rows.get(uid, 0)
            self.queued += 1
            self._flight_rows -= self.rows.get(uid, 0)
        w.in_flight.clear()
        w.busy_since = None
        orphans = sorted(set(self._orphans) | set(self._own[worker]) | set(requeued))
        self._orphans = deque(orphans)
        self._own[worker] = deque()
        self.queue = deque(sorted(set(self.queue) | set(requeued)))
        return requeued

    def worker_joined(self, worker: int) -> None:
        """A worker (new, or a replacement of a failed one under the same index) can take units."""
        w = self.workers.get(worker)
        if w is None:
            self.workers[worker] = WorkerStatus(worker)
            self._own[worker] = deque()
        else:
            w.alive = True

    def stalled(self) -> bool:
        """True when units remain but no live worker can take them."""
        return not self.done and not self.live_workers


class Action(str, Enum):
    REPLACE = "replace"  # requeue its units, start a replacement, carry on with the others meanwhile
    GIVE_UP = "give_up"  # too many failures in this run: stop (with a checkpoint of the last step)


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str  # one line for the log or the error message


@dataclass(frozen=True)
class FailurePolicy:
    """What a worker failure means for the run: a pure function of status records (no Ray).

    Attributes:
        max_restarts: worker failures tolerated per run (workers.max_restarts).
        unit_timeout_s: a worker with units in flight and no progress for this long is hung
            (workers.unit_timeout_s).
    """

    max_restarts: int
    unit_timeout_s: float

    def hung(self, workers: Iterable[WorkerStatus], now: float) -> list[int]:
        """Live workers with units in flight that made no progress within unit_timeout_s."""
        return [
            w.index for w in workers
            if w.alive and w.in_flight and w.busy_since is not None and now - w.busy_since > self.unit_timeout_s
        ]

    def deadline(self, workers: Iterable[WorkerStatus]) -> float | None:
        """The monotonic time at which the first busy worker would count as hung (None: none is busy)."""
        times = [w.busy_since + self.unit_timeout_s for w in workers if w.alive and w.in_flight and w.busy_since is not None]
        return min(times) if times else None

    def decide(self, failed: WorkerStatus, run_failures: int) -> Decision:
        """Replace `failed` or give up, given the run's failures so far (this one included).

        The failed worker's units are requeued either way (Dispatcher.worker_failed), so a run
        that gives up could still be resumed exactly from its last checkpoint.
        """
        if run_failures <= self.max_restarts:
            return Decision(Action.REPLACE, f"replacing it (worker failure {run_failures} of at most workers.max_restarts={self.max_restarts} per run)")
        return Decision(
            Action.GIVE_UP,
            f"{run_failures} worker failures in this run, more than workers.max_restarts={self.max_restarts}; "
            "fix the cause (node preemption, out of memory, hung I/O) or raise workers.max_restarts, then resume",
        )
