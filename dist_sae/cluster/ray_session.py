"""ClusterSession: the Ray counterpart of session.LocalSession (same interface).

Builds the worker actors (one per CPU slot or GPU, or as workers.pools asks), a driver-side
PassProblem over a RayEvaluator (for `evaluate`), and on `stepper(theta0)` a ParameterServer actor pinned to the driver's node,
driven through a thin proxy. Actors are named `dist_sae.ParameterServer` and `dist_sae.worker-N`
in a namespace unique to the run, so `ray list actors` and the dashboard (workers.dashboard) show them and two runs
on one cluster do not clash.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dist_sae.config import Config

from dist_sae.sections import WorkersConfig
from dist_sae.data.dataset import Dataset
from dist_sae.train.problem import PassProblem
from dist_sae.train.units import minibatches
from dist_sae.errors import ConfigError, TrainingError
from dist_sae.cluster import runtime
from dist_sae.cluster.evaluator import RayEvaluator
from dist_sae.cluster.launcher import WorkerLauncher, WorkerSpec
from dist_sae.cluster.meter import POLL_S, PassBars
from dist_sae.cluster.placement import node_resources, plan_pools
from dist_sae.cluster.server import ParameterServer

log = logging.getLogger(__name__)

SERVER_NAME = f"{runtime.ACTOR_PREFIX}.ParameterServer"
CONTROL = "control"  # the server's concurrency group for calls made while a step runs (abandon)
ABANDON_WAIT_S = 30.0  # longest wait for an abandoned step to end (a hung server: then given up)


def worker_count(workers: WorkersConfig, resources: dict[str, float]) -> int:
    """workers.num, else one per GPU share (gpus_per_worker > 0) or per CPU share of the cluster."""
    if workers.num:
        return workers.num
    if workers.gpus_per_worker > 0:
        return max(1, int(resources.get("GPU", 0.0) // workers.gpus_per_worker))
    return max(1, int(resources.get("CPU", 0.0) // workers.cpus_per_worker))


def worker_specs_of(cfg: Config, resources: dict[str, float], nodes: list[dict[str, float]]) -> list[WorkerSpec]:
    """The workers of a run: workers.pools packed onto `nodes` (placement.plan_pools), else the plain keys'."""
    pools = cfg.workers.pools
    if not pools:
        return [WorkerSpec() for _ in range(worker_count(cfg.workers, resources))]
    counts = plan_pools(pools, nodes)
    return [WorkerSpec.of_pool(pool) for pool, n in zip(pools, counts) for _ in range(n)]


def check_placement(cfg: Config, resources: dict[str, float]) -> None:
    """Fail before any work starts when the run asks for GPUs the cluster does not have.

    Raises:
        ConfigError: naming the setting and what to change.
    """
    w = cfg.workers
    gpus = resources.get("GPU", 0.0)
    if w.gpus_per_worker > 0 and gpus < w.gpus_per_worker:
        raise ConfigError(
            f"workers.gpus_per_worker={w.gpus_per_worker:g} but the Ray cluster has {gpus:g} GPU(s); "
            "set workers.gpus_per_worker=0 to compute on CPUs, or add GPU nodes to the cluster"
        )
    if cfg.compute.device == "cuda" and w.gpus_per_worker <= 0 and not w.pools:
        raise ConfigError(
            "compute.device=cuda on Ray needs workers.gpus_per_worker > 0 (Ray hides GPUs from workers that reserve none); "
            "set workers.gpus_per_worker=1, or compute.device=auto"
        )


class RemoteStepper:
    """The train.loop.Stepper interface over a ParameterServer actor: each call is one round trip."""

    def __init__(self, server: Any, bars: Any = None, poll_s: float = POLL_S) -> None:
        self._server = server
        self.bars = bars  # (kind, rows) -> progress bar: the passes of each step are drawn (cluster.meter)
        self.poll_s = poll_s
        self.converged = bool(runtime.get(server.converged.remote(), "starting the parameter server"))

    def step(self) -> dict[str, Any]:
        return self._run(self._server.step.remote(), "a training step")

    def steps(self, n: int, budget_s: float | None = None) -> list[dict[str, Any]]:
        """Up to `n` steps, within `budget_s`, in one round trip (the loop's way: a round trip costs more than a small step)."""
        return self._run(self._server.steps.remote(n, budget_s), "training steps")

    def _run(self, ref: Any, what: str) -> Any:
        """The result of a step call: the pass bars drawn while it runs, the step abandoned on
        Ctrl-C twice or SIGTERM, and the server's worker-failure lines printed."""
        def snapshot() -> dict[str, Any]:  # answered while step() runs, in the server's own "progress" group
            return runtime.get(self._server.progress.options(concurrency_group="progress").remote(), "reading pass progress", timeout=10)

        with PassBars(snapshot, self.bars, self.poll_s):
            try:
                result, self.converged, notes = runtime.get(ref, what)
            except KeyboardInterrupt:  # the server abandons the step and rolls it back
                if not self._abandon(ref):
                    raise
                # The step had finished already: hand it over (the loop stops after it, with a checkpoint).
                result, self.converged, notes = runtime.get(ref, what)
            except BaseException:
                self._print_notes(self._take_notes())
                raise
        self._print_notes(notes)
        return result

    def _abandon(self, ref: Any, timeout_s: float = ABANDON_WAIT_S) -> bool:
        """Have the server drop the step in flight; wait until it has rolled back or completed.

        The server looks at the request whenever a unit's result comes in, so the step ends
        within about a unit's time either way. Waiting for that, rather than for a fixed 2 s as
        before, matters: a step that completed after the wait gave up was checkpointed (the
        checkpoint asks the server, which answers once the step is over) without its metrics line
        (seen once under load: checkpoint at step 11, metrics up to 10).

        Returns:
            True when the step had completed after all (its result is in `ref`).
        """
        try:
            self._server.abandon.options(concurrency_group=CONTROL).remote()
            ready, _ = ray.wait([ref], timeout=timeout_s)
            if ready:
                ray.get(ref)
                return True
        except Exception as exc:  # abandoned (rolled back), or Ray is going away
            log.debug("abandoning the step: %s", exc)
        return False

    def _take_notes(self) -> list[str]:
        try:
            return ray.get(self._server.take_notes.options(concurrency_group=CONTROL).remote(), timeout=5)
        except Exception:
            return []

    @staticmethod
    def _print_notes(notes: list[str]) -> None:
        for note in notes:  # the server's log stays in Ray's session logs; the user sees this line
            log.warning("%s", note)

    def state_dict(self) -> dict[str, Any]:
        return runtime.get(self._server.state_dict.remote(), "reading the trainer state")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.converged = bool(runtime.get(self._server.load_state_dict.remote(state), "loading the trainer state"))

    def theta(self) -> np.ndarray:
        return runtime.get(self._server.theta.remote(), "reading θ")

    def last_counts(self) -> dict[int, int]:
        return runtime.get(self._server.last_counts.remote(), "reading the unit counts")


class ClusterSession:
    """Passes on Ray workers; `problem` evaluates from the driver, `stepper` trains on a server actor.

    Args:
        cfg: the run's config (model.visible set, as session.open_session gets it).
        dataset: the opened dataset; its folder must be reachable from every node.
        worker_specs: one WorkerSpec per worker to place them by hand (overrides workers.num).
        dashboard: start the dashboard (on 127.0.0.1) with a new local Ray (None: workers.dashboard).
        theta0: the θ0 that `stepper` will be asked for, when known: the parameter server then
            starts together with the workers (its imports overlap theirs) instead of after them.
    """

    def __init__(self, cfg: Config, dataset: Dataset, worker_specs: list[WorkerSpec] | None = None,
                 dashboard: bool | None = None, theta0: np.ndarray | None = None) -> None:
        self.cfg, self.dataset = cfg, dataset
        self.workers: list[Any] = []
        self.server: Any = None
        self.worker_info: list[dict[str, Any]] = []
        # Actors may run in another working directory (a Ray job's): give them an absolute path.
        self.dataset_path = dataset.url or str(Path(dataset.path).resolve())
        self._config = cfg.with_overrides({"data.path": self.dataset_path}).model_dump()
        self._ray = runtime.connect_run(cfg.workers, len(worker_specs) if worker_specs else None, dashboard)
        self._server_theta0: np.ndarray | None = None  # θ0 of a started server no stepper has taken yet
        try:
            resources = ray.cluster_resources()
            check_placement(cfg, resources)
            specs = worker_specs or worker_specs_of(cfg, resources, node_resources(ray.nodes()))
            self.namespace = runtime.run_namespace()
            self.launcher = WorkerLauncher(self._config, self.dataset_path, self.namespace, list(specs))
            self.workers = [self.launcher.start(i) for i in range(len(specs))]
            if theta0 is not None:
                self._start_server(theta0)
            # Surfaces constructor errors (no GPU, unreadable data) before any work is sent.
            self.worker_info = runtime.get(
                [w.info.remote() for w in self.workers], "starting the workers", timeout=cfg.workers.unit_timeout_s
            )
            log.info("%d Ray workers in namespace %s: %s", len(self.workers), self.namespace,
                     ", ".join(f"{self.launcher.kind(n)}:{i['device']}@{i['host']}" for n, i in enumerate(self.worker_info)))
            # The evaluator shares self.workers: a worker it replaces is the session's (close kills it).
            self.problem = PassProblem(RayEvaluator(cfg, dataset, self.workers, launcher=self.launcher), cfg)
        except BaseException:
            self.close()
            raise

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    def stepper(self, theta0: np.ndarray) -> RemoteStepper:
        """A trainer on a ParameterServer actor on the driver's node, starting from θ0."""
        if self._server_theta0 is None or not np.array_equal(self._server_theta0, theta0):
            self._start_server(theta0)
        self._server_theta0 = None  # the next stepper gets a fresh server
        return RemoteStepper(self.server, bars=getattr(self.problem.evaluator, "progress", None))

    def _start_server(self, theta0: np.ndarray) -> None:
        """(Re)start the ParameterServer actor from θ0; returns at once (its constructor runs on its own)."""
        theta0 = np.array(theta0, dtype=np.float64)  # a copy: what `stepper` compares against
        parts = self.cfg.optim.batch_parts or self.num_workers
        batches = None if self.cfg.optim.full_batch else minibatches(self.dataset, self.cfg.optim.batch_size, parts)
        if self.server is not None:
            ray.kill(self.server)
            self.server = None
            _wait_until_unnamed(SERVER_NAME, self.namespace)
        self.server = (
            # progress() and abandon() have concurrency groups of their own, so the driver's pass
            # bars and a stop request are answered while step() runs; every other call still waits
            # for the step (one at a time, as before).
            ray.remote(concurrency_groups={"progress": 1, CONTROL: 1})(ParameterServer)
            .options(
                name=SERVER_NAME,
                namespace=self.namespace,
                num_cpus=0,  # it only adds sums and steps; the CPU slots are the workers'
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=runtime.node_id(), soft=False),
            )
            .remote(self._config, self.dataset_path, list(self.workers), theta0, batches, self.launcher)
        )
        self._server_theta0 = theta0

    def close(self, fast: bool = False) -> None:
        """Kill the actors this session made; shut Ray down only if this session started it.

        A session that joined a running cluster disconnects from it; one that found this process
        already connected leaves the connection alone. `fast` (after SIGTERM, the process is about
        to exit within a grace period): a local Ray this session started is told to stop, not
        waited for (runtime.stop_local(wait=False)).
        """
        problem = getattr(self, "problem", None)
        if problem is not None:
            problem.evaluator.close()  # its reducer actors (workers.reduce=grouped, tree)
        actors = ([self.server] if self.server is not None else []) + list(self.workers)
        actors += _named_actors(getattr(self, "namespace", None))  # replacements started by the server
        for actor in actors:
            try:
                ray.kill(actor)
            except Exception:  # already dead, or Ray is gone
                pass
        self.server = None
        self.workers[:] = []
        if self._ray in ("started", "joined"):
            runtime.stop_local(wait=not fast)
            self._ray = "closed"


def _named_actors(namespace: str | None) -> list[Any]:
    """Handles of the live named actors of a run's namespace (empty when Ray is gone)."""
    if namespace is None or not ray.is_initialized():
        return []
    handles = []
    try:
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["namespace"] == namespace:
                try:
                    handles.append(ray.get_actor(entry["name"], namespace=namespace))
                except ValueError:  # gone meanwhile
                    pass
    except Exception:  # Ray is shutting down
        return []
    return handles


def _wait_until_unnamed(name: str, namespace: str, timeout_s: float = 30.0) -> None:
    """Wait until a killed actor's name is free again (ray.kill returns before it is)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return
        time.sleep(0.05)
    raise TrainingError(f"the Ray actor {namespace}/{name} did not go away within {timeout_s:g}s after it was killed")
