"""Starting worker actors: at the start of a run, and again to replace one that died.

A WorkerLauncher is plain data (picklable), so the session hands it to the parameter server,
whose evaluator replaces a dead worker itself. Each actor is restartable by Ray (`max_restarts`):
a worker process that dies (killed, out of memory) comes back with its constructor rerun, while
the units it held are redispatched by the evaluator, never retried by Ray behind its back
(`max_task_retries=0`), so the dispatcher's exactly-once accounting stays the only one. A worker
that cannot come back (killed for good, restarts used up) is replaced by a new actor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dist_sae.config import from_dict

from dist_sae.sections import PoolConfig
from dist_sae.cluster import runtime
from dist_sae.cluster.worker import Worker, worker_threads


def worker_name(index: int, generation: int = 0) -> str:
    """`dist_sae.worker-N`; a replacement started as a new actor is `dist_sae.worker-N.G`."""
    base = f"{runtime.ACTOR_PREFIX}.worker-{index}"
    return base if generation == 0 else f"{base}.{generation}"


@dataclass
class WorkerSpec:
    """Placement of one worker beyond the workers.* defaults (tests, mixed clusters).

    Attributes:
        resources: extra Ray custom resources the worker needs, e.g. {"fake_gpu": 1}.
        num_cpus, num_gpus: override workers.cpus_per_worker / workers.gpus_per_worker.
        delay_s: test-only: the worker sleeps this long per unit (a slow worker).
        kind: "cpu" or "gpu", what the worker is counted as (metrics, progress); None: "gpu"
            when it reserves GPUs, else "cpu".
    """

    resources: dict[str, float] = field(default_factory=dict)
    num_cpus: float | None = None
    num_gpus: float | None = None
    delay_s: float = 0.0
    kind: str | None = None

    @classmethod
    def of_pool(cls, pool: PoolConfig) -> WorkerSpec:
        """A worker of a workers.pools entry: Ray's GPU resource as num_gpus, any other as a custom resource."""
        gpus = pool.gpu_share
        real = pool.gpu_resource == "GPU"
        custom = {pool.gpu_resource: gpus} if gpus > 0 and not real else {}
        return cls(resources=custom, num_cpus=pool.cpus, num_gpus=gpus if real else 0.0, kind=pool.kind)


@dataclass
class WorkerLauncher:
    """Starts worker N (by its WorkerSpec) as a named Ray actor in the run's namespace.

    Args:
        config: the run's config as a dict (model.visible and an absolute data.path set).
        dataset_path: the dataset folder, reachable from every node.
        namespace: the run's Ray namespace.
        specs: one WorkerSpec per worker index.
    """

    config: dict[str, Any]
    dataset_path: str
    namespace: str
    specs: list[WorkerSpec]

    def kind(self, index: int) -> str:
        """What worker `index` is counted as: "cpu" or "gpu"."""
        spec = self.specs[index]
        if spec.kind:
            return spec.kind
        gpus = from_dict(self.config).workers.gpus_per_worker if spec.num_gpus is None else spec.num_gpus
        return "gpu" if gpus > 0 else "cpu"

    def start(self, index: int, generation: int = 0) -> Any:
        """A new actor for worker `index` (generation > 0: a replacement; the name says which)."""
        import ray  # only when an actor is made: the dataclass itself travels without it

        cfg = from_dict(self.config)
        spec = self.specs[index]
        cpus = cfg.workers.cpus_per_worker if spec.num_cpus is None else spec.num_cpus
        gpus = cfg.workers.gpus_per_worker if spec.num_gpus is None else spec.num_gpus
        actor = ray.remote(Worker).options(
            name=worker_name(index, generation),
            namespace=self.namespace,
            num_cpus=cpus,
            num_gpus=gpus,
            resources=spec.resources or None,
            max_concurrency=2,  # one call computes while the next reads its unit (read-ahead)
            # Ray brings a dead worker process back (constructor rerun) up to this often; the run's
            # own limit (FailurePolicy, same setting, counted over all workers) binds first.
            max_restarts=cfg.workers.max_restarts,
            max_task_retries=0,  # lost units are redispatched by the evaluator, not rerun by Ray
        )
        threads = worker_threads(cfg.compute.threads, cpus)
        return actor.remote(self.config, self.dataset_path, index, gpus, threads, spec.delay_s)
