"""Workers and nodes that fail on Ray: every run must end with the θ of the run without the failure.

One ray.cluster_utils.Cluster for the module (bound to 127.0.0.1): a head node for the workers,
and a second node that one test adds and removes. Faults are injected at seeded points:
`ray.kill` on a worker actor from the driver, at the k-th unit the driver receives (with and
without letting Ray restart it), and `os._exit` / a hang inside the worker after its k-th unit
(the plain Worker class's test-only `inject_fault` knob).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from dist_sae.session import LocalSession, initial_theta
from dist_sae.api import train
from dist_sae.train.checkpoint import latest_checkpoint
from dist_sae.data.dataset import Dataset
from dist_sae.train.problem import PassProblem
from dist_sae.train.inputs import bind_dataset
from dist_sae.errors import TrainingError
from dist_sae.train.optim import Trainer

from util import config, make_dataset, smooth_patches

ray = pytest.importorskip("ray")

from dist_sae.cluster.evaluator import RayEvaluator  # noqa: E402
from dist_sae.cluster.ray_session import ClusterSession
from dist_sae.cluster.launcher import WorkerSpec  # noqa: E402

from raycluster import NODE, loopback_cluster  # noqa: E402

pytestmark = pytest.mark.ray

STEPS = 3  # L-BFGS steps per trial
TRIALS = 10


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Logical CPUs (bookkeeping): room for two sessions' workers and their replacements.
    with loopback_cluster(str(tmp_path_factory.mktemp("ray")), head_cpus=8) as (cluster, _):
        yield cluster


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """300 rows of 8×8 patches: 15 units of 20 rows."""
    path = tmp_path_factory.mktemp("faults") / "d"
    make_dataset(path, smooth_patches(300, seed=7), shard_rows=100, chunk_rows=20)
    return path


def ray_config(path, **overrides):
    items = {"model__hidden": [5], "data__block_rows": 20, "workers__engine": "ray", "workers__num": 2,
             "workers__max_restarts": 100, "workers__unit_timeout_s": 60, "optim__tolerance_change": 0}
    items.update(overrides)
    return bind_dataset(config(path, **items), Dataset.open(path))


def wait_until_up(workers) -> None:
    """Block until every worker answers (calls are retried while Ray restarts one)."""
    ray.get([w.info.options(max_task_retries=-1).remote() for w in workers])


def settle(evaluator: RayEvaluator, theta: np.ndarray) -> None:
    """Run passes until every worker the evaluator restarted has rejoined its dispatch.

    A restarted worker rejoins when its probe answers during a pass; until then it gets no units,
    and a kill of a worker holding no units is a restart nobody observes.
    """
    # By time, not by a pass count: passes of this small dataset take milliseconds, a restart (a
    # new process importing torch) seconds on a loaded machine.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if not evaluator._probes and not evaluator._down:
            return
        evaluator.run("pass1", theta, evaluator.units)
        time.sleep(0.05)
    raise AssertionError("a restarted worker never rejoined")


def lbfgs(problem, cfg, steps=STEPS) -> np.ndarray:
    trainer = Trainer(cfg, problem, initial_theta(cfg, None))
    for _ in range(steps):
        trainer.step()
    return trainer.theta.detach().numpy().copy()


@pytest.fixture(scope="module")
def session(cluster, data):
    session = ClusterSession(ray_config(data), Dataset.open(data))
    yield session
    session.close()


@pytest.fixture(scope="module")
def reference(session, data):
    """θ after STEPS L-BFGS steps on Ray without faults (checked against the single-process run)."""
    cfg = session.cfg
    theta = lbfgs(session.problem, cfg)
    local = LocalSession(cfg.with_overrides({"workers.engine": "local"}), Dataset.open(data))
    try:
        theta_local = lbfgs(local.problem, cfg)
    finally:
        local.close()
    assert np.max(np.abs(theta - theta_local)) <= 1e-10
    assert session.problem.evaluator.failures == 0
    return theta


class KillAt:
    """A pass 'progress bar' that ray.kill's a worker when the driver has received its k-th unit."""

    def __init__(self, evaluator: RayEvaluator, victim: int, at_unit: int, no_restart: bool) -> None:
        self.evaluator, self.victim, self.at_unit, self.no_restart = evaluator, victim, at_unit, no_restart
        self.seen = 0

    def __call__(self, kind: str, rows: int) -> KillAt:
        return self

    def update(self, rows: int) -> None:
        self.seen += 1
        if self.seen == self.at_unit:
            ray.kill(self.evaluator.workers[self.victim], no_restart=self.no_restart)

    def close(self) -> None:
        pass


def test_workers_killed_at_random_points_do_not_change_the_result(session, reference):
    """10 seeded trials, each killing one worker mid-pass; θ must equal the no-fault θ bit for bit."""
    evaluator = session.problem.evaluator
    # Plain on-demand dispatch: the end-of-pass rule may keep a worker it measured as slow idle, and
    # a kill of an idle worker is a restart the pass never sees.
    evaluator.balance = False
    results = []
    for seed in range(TRIALS):
        rng = np.random.default_rng(seed)
        victim = int(rng.integers(2))
        how = ["exit", "kill", "kill-for-good"][seed % 3]
        if how == "exit":
            # Counts the victim's own units; on-demand dispatch can starve a worker on a loaded
            # machine, so stay within what any worker reaches (15 units a pass, >= 6 passes a run).
            at = int(rng.integers(1, 12))
        else:
            # Counts every unit the driver receives. Kill mid-pass (its 2nd..10th of 15 units), when
            # the victim surely has units in flight: a kill between passes is a restart nobody sees.
            at = 15 * int(rng.integers(0, 3)) + int(rng.integers(2, 11))
        wait_until_up(evaluator.workers)  # the last trial's victim is back: one fault per trial
        settle(evaluator, reference)  # ... and takes units again, so a kill always hits work in flight
        failures = evaluator.failures
        if how == "exit":  # os._exit inside the worker after `at` more units; Ray restarts it
            ray.get(evaluator.workers[victim].inject_fault.remote(at, "exit"))
        else:  # ray.kill from the driver at its `at`-th unit; for good: a new actor replaces it
            evaluator.progress = KillAt(evaluator, victim, at, no_restart=how == "kill-for-good")
        try:
            theta = lbfgs(session.problem, session.cfg)
        finally:
            evaluator.progress = None
        assert evaluator.failures > failures, f"trial {seed}: the fault did not happen"
        results.append((seed, how, float(np.max(np.abs(theta - reference)))))
    print("\nkill trials (seed, fault, max |Δθ|):", results)
    assert all(delta == 0.0 for _, _, delta in results), results


def test_a_hung_worker_is_treated_as_dead_after_unit_timeout(session, reference, data):
    # 5 s: long enough that worker 1's replacement (a new process importing torch) is never taken for hung on a loaded machine
    cfg = session.cfg.with_overrides({"workers.unit_timeout_s": 5})
    wait_until_up(session.workers)  # none still restarting from the test before
    evaluator = RayEvaluator(cfg, Dataset.open(data), session.workers, launcher=session.launcher)
    ray.get(session.workers[1].inject_fault.remote(5, "hang"))
    theta = lbfgs(PassProblem(evaluator, cfg), cfg)
    assert evaluator.failures == 1
    assert len(evaluator.notes) == 1 and evaluator.notes[0].startswith("worker 1 failed") and "(hung)" in evaluator.notes[0], evaluator.notes
    assert np.array_equal(theta, reference)


def test_a_worker_dying_under_the_parameter_server_is_replaced(session, reference, caplog):
    wait_until_up(session.workers)
    stepper = session.stepper(initial_theta(session.cfg, None))
    ray.get(session.workers[0].inject_fault.remote(7, "exit"))
    for _ in range(STEPS):
        stepper.step()
    assert ray.get(session.server.worker_failures.remote()) == 1
    assert np.array_equal(stepper.theta(), reference)
    # The driver says so, once (the server's own log stays in Ray's session logs).
    lines = [r.getMessage() for r in caplog.records if r.name == "dist_sae.cluster.ray_session"]
    assert len(lines) == 1 and lines[0].startswith("worker 0 failed: "), lines
    assert "go to the other workers" in lines[0] and "99 restarts left" in lines[0], lines


def _arm_when_training_starts(after_units: int, stop: threading.Event, skip: str) -> None:
    """Background: when a new run's parameter server appears, make its worker 0 exit after some units."""
    while not stop.is_set():
        actors = ray.util.list_named_actors(all_namespaces=True)
        spaces = {a["namespace"] for a in actors if a["name"] == "dist_sae.ParameterServer"} - {skip}
        for a in actors:
            if a["namespace"] in spaces and a["name"] == "dist_sae.worker-0":
                ray.get(ray.get_actor(a["name"], namespace=a["namespace"]).inject_fault.remote(after_units, "exit"))
                return
        time.sleep(0.02)


def test_past_max_restarts_the_run_stops_with_a_checkpoint_and_resumes_exactly(session, data, tmp_path):
    # 16 steps, ~270 units on two workers: worker 0 reaches its 61st (the exit) whatever share of them it gets
    # (of 150 units in 8 steps it took 63-80 in 15 runs: too close). Step 1 has 45 units, so a step completes first.
    cfg = ray_config(data, workers__max_restarts=0, optim__steps=16, run__checkpoint_every=0, run__out=str(tmp_path / "run"))
    reference = train(cfg.with_overrides({"workers.engine": "local", "run.out": str(tmp_path / "ref")}))
    stop = threading.Event()
    arm = threading.Thread(target=_arm_when_training_starts, args=(60, stop, session.namespace), daemon=True)
    arm.start()
    try:
        with pytest.raises(TrainingError, match=r"worker 0 failed: .*more than workers.max_restarts=0.*"
                                                r"Stopped at step \d+: the last completed step \d+ is checkpointed") as info:
            train(cfg)
    finally:
        stop.set()
        arm.join(timeout=30)
    step = latest_checkpoint(tmp_path / "run")[0]["meta"]["step"]
    assert f"the last completed step {step} is checkpointed" in str(info.value) and 0 < step < 16
    resumed = train(cfg.with_overrides({"workers.max_restarts": 3}), resume=True)  # workers.* may change on resume
    assert resumed.steps == 16
    assert np.max(np.abs(resumed.theta - reference.theta)) <= 1e-10 * np.max(np.abs(reference.theta))


def test_a_removed_node_loses_its_worker_and_training_goes_on(cluster, data):
    node = cluster.add_node(**NODE, num_cpus=1, resources={"extra": 1})
    cfg = ray_config(data)
    specs = [WorkerSpec(), WorkerSpec(resources={"extra": 1})]
    session = ClusterSession(cfg, Dataset.open(data), worker_specs=specs)
    local = LocalSession(cfg.with_overrides({"workers.engine": "local"}), Dataset.open(data))
    try:
        assert session.worker_info[1]["node_id"] == node.node_id
        theta0 = initial_theta(cfg, None)
        remote, expected = session.stepper(theta0), local.stepper(theta0)
        remote.step()
        remover = threading.Thread(target=cluster.remove_node, args=(node,))
        remover.start()  # while the next steps run
        for _ in range(3):
            remote.step()
        remover.join(timeout=60)
        for _ in range(2):
            metrics = remote.step()
        for _ in range(6):
            expected.step()
        assert metrics["workers"] == 1  # the removed node's worker cannot be placed again: one is left
        assert np.max(np.abs(remote.theta() - expected.state_dict()["theta"].numpy())) <= 1e-10
    finally:
        session.close()
        local.close()
