"""Sessions: where passes run for a config, in this process or on a Ray cluster.

A session gives `problem` (exact evaluations: a train.problem.PassProblem) and `stepper(theta0)`
(all-or-nothing optimizer steps); LocalSession and cluster.ClusterSession have the same interface.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dist_sae.train.checkpoint import AtomicStepper
from dist_sae.config import Config
from dist_sae.data.dataset import Dataset
from dist_sae.train.problem import local_problem
from dist_sae.train.units import minibatches
from dist_sae.sae.model import SparseAutoencoder, load_weights_into
from dist_sae.train.optim import Trainer


def initial_theta(cfg: Config, init: str | Path | None) -> np.ndarray:
    model = SparseAutoencoder.from_config(cfg)
    if init is not None:
        load_weights_into(model, init)
    else:
        model.reset_parameters(cfg.run.seed)
    return model.theta.detach().numpy().copy()



class LocalSession:
    """Passes in this process. Sessions give `problem` (exact evaluations) and `stepper(theta0)`."""

    num_workers = 1

    def __init__(self, cfg: Config, dataset: Dataset) -> None:
        self.cfg, self.dataset = cfg, dataset
        self.problem = local_problem(cfg, dataset)

    def stepper(self, theta0: np.ndarray) -> AtomicStepper:
        parts = self.cfg.optim.batch_parts or self.num_workers
        batches = None if self.cfg.optim.full_batch else minibatches(self.dataset, self.cfg.optim.batch_size, parts)
        return AtomicStepper(Trainer(self.cfg, self.problem, theta0, batches))

    def close(self, fast: bool = False) -> None:
        self.problem.evaluator.close()



def open_session(cfg: Config, dataset: Dataset, theta0: np.ndarray | None = None):
    """A LocalSession, or a Ray ClusterSession (same interface) by workers.engine.

    theta0: the θ0 the caller will ask `stepper` for, when known (a Ray session then starts its
    parameter server together with its workers).
    """
    if cfg.workers.engine == "local":
        return LocalSession(cfg, dataset)
    from dist_sae.cluster.ray_session import ClusterSession  # the only place the API reaches Ray

    return ClusterSession(cfg, dataset, theta0=theta0)
