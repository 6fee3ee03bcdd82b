"""ParameterServer: owns θ and the optimizer state; the workers only ever see θ read-only.

A plain class wrapping optim.Trainer over a train.problem.PassProblem whose evaluator is a RayEvaluator:
each evaluation puts θ in the object store once, has the workers stream their units, adds their
float64 partial sums in unit order, divides by m, adds weight decay, and the Trainer steps (L-BFGS
full-batch, or Adam/SGD on minibatches with the exact ρ̂ refreshed by a distributed pass 1).
The session makes it an actor pinned to the driver's node, so what it hands back stays local.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from dist_sae.train.checkpoint import AtomicStepper
from dist_sae.config import from_dict
from dist_sae.data.dataset import Dataset
from dist_sae.data.workunit import WorkUnit
from dist_sae.train.problem import PassProblem
from dist_sae.train.units import local_threads
from dist_sae.train.optim import Trainer
from dist_sae.cluster import runtime
from dist_sae.cluster.evaluator import RayEvaluator

log = logging.getLogger(__name__)


class ParameterServer:
    """θ, the optimizer and the step loop of one run.

    Args:
        config: the run's config as a dict (model.visible set).
        dataset_path: the dataset folder.
        workers: Ray actor handles of the workers.
        theta0: initial θ (P,) float64.
        batches: minibatch work units (minibatch methods), each a list of parts.
        launcher: a launcher.WorkerLauncher, so a worker that cannot be restarted is replaced.
    """

    def __init__(
        self,
        config: dict[str, Any],
        dataset_path: str,
        workers: list[Any],
        theta0: np.ndarray,
        batches: list[list[WorkUnit]] | None = None,
        launcher: Any = None,
    ) -> None:
        cfg = from_dict(config)
        # The optimizer's vector arithmetic (L-BFGS two-loop, line search) runs with the torch
        # threads of a --local run of the same config, so both give the same θ bit for bit. The
        # count is set again in every stepping call: the actor has concurrency groups, so its
        # methods run on pool threads, and OpenMP's thread count is a per-thread setting (a thread
        # that never set it uses every core: θ then differed from --local in the last bit).
        dataset = Dataset.open(dataset_path, verify_shards=False)
        self.evaluator = RayEvaluator(cfg, dataset, list(workers), launcher=launcher)  # no torch work: threads are set next
        self.threads = local_threads(cfg, self.evaluator.units)
        torch.set_num_threads(self.threads)
        self.problem = PassProblem(self.evaluator, cfg)
        self.stepper = AtomicStepper(Trainer(cfg, self.problem, np.array(theta0, dtype=np.float64), batches))

    def step(self) -> tuple[dict[str, Any], bool, list[str]]:
        """One optimizer step: (its metrics, converged, a line per worker failure handled in it).

        A step that fails (workers lost past workers.max_restarts, non-finite J, abandon()) leaves
        the trainer as it was before the step, so state_dict() is the last completed step's, fit
        to checkpoint.
        """
        torch.set_num_threads(self.threads)  # this call's thread (see __init__)
        metrics = self.stepper.step()
        return metrics, self.stepper.converged, self.take_notes()

    def take_notes(self) -> list[str]:
        """The worker-failure lines not yet handed to the driver."""
        notes, self.evaluator.notes[:] = list(self.evaluator.notes), []
        return notes

    def abandon(self) -> None:
        """Make the step in flight fail at once (it is rolled back); called in the session's
        "control" concurrency group while step() runs. Later steps fail too: the run is stopping."""
        self.evaluator.abandon.set()

    def steps(self, n: int, budget_s: float | None = None) -> tuple[list[dict[str, Any]], bool, list[str]]:
        """Up to `n` optimizer steps in one call, within `budget_s`: (their metrics, converged, worker-failure lines). See AtomicStepper.steps."""
        torch.set_num_threads(self.threads)  # this call's thread (see __init__)
        done = self.stepper.steps(n, budget_s)
        return done, self.stepper.converged, self.take_notes()

    def converged(self) -> bool:
        return self.stepper.converged

    def state_dict(self) -> dict[str, Any]:
        return self.stepper.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        self.stepper.load_state_dict(state)
        return self.stepper.converged

    def theta(self) -> np.ndarray:
        return self.stepper.theta()

    def node_id(self) -> str | None:
        """The Ray node the server runs on (the driver's, by the session's placement)."""
        return runtime.node_id()

    def progress(self) -> dict[str, Any]:
        """The running pass: {"seq", "kind", "rows", "done", "busy", "workers", "running"} (cluster.meter).

        Answered while step() runs when called in the "progress" concurrency group the session gives
        the actor (every other method still runs one at a time); it only copies a small dict under
        the meter's lock.
        """
        return self.evaluator.meter.snapshot()

    def worker_failures(self) -> int:
        """Worker failures handled so far in this run."""
        return self.evaluator.failures

    def last_counts(self) -> dict[int, int]:
        """Units each worker ran in the last pass."""
        return dict(self.evaluator.last_counts)
