"""Carrying out dispatch.FailurePolicy's decisions for the RayEvaluator: requeue, restart, replace, give up.

A worker that dies mid-pass (process killed, node removed) or hangs past workers.unit_timeout_s
loses only its unfinished units: Dispatcher.worker_failed puts them back in the queue. The worker
is then restarted by Ray or replaced by a new actor (through the launcher, when resources allow)
and rejoins its pass when an info() probe answers; past workers.max_restarts failures per run the
pass gives up with a TrainingError. Every failure handled leaves one line in `notes`, which the
parameter server hands to the driver.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

from dist_sae.errors import TrainingError
from dist_sae.cluster import runtime
from dist_sae.cluster.dispatch import Action, Dispatcher, FailurePolicy, WorkerStatus

log = logging.getLogger(__name__)


class Recovery:
    """The RayEvaluator's failure handling (a mixin: the evaluator holds the state it works on).

    Uses: workers (actor handles, replaced in place), launcher, policy (FailurePolicy), timeout_s,
    failures, notes, _rates, and the recovery state set by `_init_recovery`.
    """

    workers: list[Any]
    launcher: Any
    policy: FailurePolicy
    timeout_s: float
    failures: int
    notes: list[str]
    _rates: dict[int, float]

    def _init_recovery(self) -> None:
        self._probes: dict[Any, int] = {}  # info() call on a restarting/new worker -> its index
        self._down: dict[int, bool] = {}  # workers not taking units: index -> running as a new actor
        self._generation = [0] * len(self.workers)  # replacements started per worker index
        self._stalled_since: float | None = None
        self._pids: dict[int, int | None] = {}  # worker -> the process id its last unit ran in
        self._stale: dict[int, int | None] = {}  # a killed worker -> the process id that must not answer its probe

    def _wait_s(self, dispatcher: Dispatcher) -> float | None:
        """How long ray.wait may block: until the next worker would count as hung, or no limit."""
        deadlines = [self.policy.deadline(dispatcher.workers.values())]
        if self._stalled_since is not None:
            deadlines.append(self._stalled_since + self.timeout_s)
        deadlines = [d for d in deadlines if d is not None]
        return max(0.01, min(deadlines) - time.monotonic()) if deadlines else None

    def _check_stalled(self, dispatcher: Dispatcher, now: float) -> None:
        """Give up when no worker has been alive for unit_timeout_s (replacements cannot be placed)."""
        if dispatcher.live_workers or dispatcher.done:
            self._stalled_since = None
        elif self._stalled_since is None:
            self._stalled_since = now
        elif now - self._stalled_since > self.timeout_s:
            raise TrainingError(
                f"no worker has been alive for workers.unit_timeout_s={self.timeout_s:g}s: {len(self._down)} failed and "
                "their replacements did not start (does the cluster still have the CPUs/GPUs they need?)"
            )

    def _kill(self, worker: int) -> None:
        """Kill a hung worker's process; Ray restarts it (its restarts permitting)."""
        # ray.kill returns before the process is gone: until it is, the old (hung) process may still
        # answer the probe from a free concurrency slot, and units sent then fail a second time.
        self._stale[worker] = self._pids.get(worker)
        try:
            ray.kill(self.workers[worker], no_restart=False)
        except Exception as exc:  # already gone
            log.debug("killing worker %d: %s", worker, exc)

    def _failed(self, worker: int, why: str, dispatcher: Dispatcher, pending: dict[Any, tuple[int, int]]) -> None:
        """Requeue a failed worker's units, forget its outstanding calls, then replace it or give up."""
        requeued = dispatcher.worker_failed(worker)
        self._rates.pop(worker, None)  # its replacement is measured afresh
        for ref in [r for r, (w, _) in pending.items() if w == worker]:
            del pending[ref]  # a late result of the failed worker is never counted
        self._count_failure(dispatcher.workers[worker], why, requeued)
        self._restart(worker)

    def _count_failure(self, status: WorkerStatus, why: str, requeued: list[int]) -> None:
        self.failures += 1
        decision = self.policy.decide(status, self.failures)
        if decision.action is Action.GIVE_UP:
            raise TrainingError(f"worker {status.index} failed: {why}; {decision.reason}")
        note = f"worker {status.index} failed: {why}; its unfinished units {requeued} go to the other workers; {decision.reason}; "
        note += f"{self.policy.max_restarts - self.failures} restarts left"
        self.notes.append(note)
        log.warning("%s", note)

    def _restart(self, worker: int, new_actor: bool = False) -> None:
        """Wait (asynchronously) for the worker to come back: Ray's restart, or a new actor."""
        if new_actor:
            if self.launcher is None:
                log.warning("worker %d cannot be replaced here (no launcher); the others carry on", worker)
                self._down[worker] = True
                return
            try:
                ray.kill(self.workers[worker])  # so Ray does not also bring the old one back
            except Exception:
                pass
            self._generation[worker] += 1
            self.workers[worker] = self.launcher.start(worker, self._generation[worker])
        self._down[worker] = new_actor
        # Answers once the actor is up again: retried while Ray restarts it (a plain call would fail
        # at once with "the actor is restarting"), an error once it is dead for good, and pending
        # while a replacement cannot be placed (its node is gone).
        self._probes[self.workers[worker].info.options(max_task_retries=-1).remote()] = worker

    def _probe_done(self, ref: Any, dispatcher: Dispatcher) -> None:
        worker = self._probes.pop(ref)
        new_actor = self._down[worker]
        try:
            answer = ray.get(ref)
        except ray.exceptions.RayError as exc:
            error = runtime.library_error(exc, f"restarting worker {worker}")
            if not isinstance(error, TrainingError):
                raise error from None  # its constructor failed (data unreachable, no GPU): a real error
            if not new_actor:
                self._restart(worker, new_actor=True)  # Ray will not bring it back: start a new actor
                return
            status = dispatcher.workers.get(worker) or WorkerStatus(worker, alive=False)
            self._count_failure(status, f"its replacement did not start ({runtime.last_line(exc)})", [])
            self._restart(worker, new_actor=True)
            return
        stale = self._stale.get(worker)
        if stale is not None and answer.get("pid") == stale:  # the killed process, not yet gone: ask again
            time.sleep(0.05)
            self._probes[self.workers[worker].info.options(max_task_retries=-1).remote()] = worker
            return
        self._stale.pop(worker, None)
        del self._down[worker]
        dispatcher.worker_joined(worker)
        log.info("worker %d is back and takes units again", worker)
