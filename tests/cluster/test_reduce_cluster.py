"""The three reductions (workers.reduce = server, grouped, tree) on a two-node ray.cluster_utils cluster.

J and ∇J must equal the single-process engine's bit for bit for any worker count and mode, with
workers killed mid-pass, a reduction task that crashes (Ray retries it) and a node removed while
its units' results wait in its object store. The model (64-256-64, P = 33,088: 265 kB of sums per
unit) is just big enough that results go to the object store, not inline to the caller.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest

from dist_sae.data.dataset import Dataset
from dist_sae.session import initial_theta
from dist_sae.train.inputs import bind_dataset
from dist_sae.train.problem import PassProblem, local_problem

from util import config, make_dataset, smooth_patches

ray = pytest.importorskip("ray")

from dist_sae.cluster.evaluator import RayEvaluator  # noqa: E402
from dist_sae.cluster.launcher import WorkerSpec  # noqa: E402
from dist_sae.cluster.ray_session import ClusterSession  # noqa: E402

from raycluster import NODE, loopback_cluster  # noqa: E402

pytestmark = pytest.mark.ray

MODES = ("server", "grouped", "tree")
UNITS = 30  # 600 rows in units of 20: groups of 6 units, 5 groups


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with loopback_cluster(str(tmp_path_factory.mktemp("ray")), head_cpus=4,
                          extra_nodes=({"num_cpus": 2, "resources": {"extra": 8}},)) as (cluster, nodes):
        yield cluster, nodes[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("reduce") / "d"
    make_dataset(path, smooth_patches(600, seed=11), shard_rows=200, chunk_rows=20)
    return path


def ray_config(path, mode="tree"):
    items = {"model__hidden": [256], "data__block_rows": 20, "workers__engine": "ray", "workers__unit_timeout_s": 60,
             "workers__max_restarts": 20, "workers__reduce": mode}
    return bind_dataset(config(path, **items), Dataset.open(path))


@pytest.fixture(scope="module")
def session(cluster, data):
    """8 workers with a quarter CPU each, alternating between the head and the second node."""
    specs = [WorkerSpec(num_cpus=0.25, resources={"extra": 1} if i % 2 else {}) for i in range(8)]
    session = ClusterSession(ray_config(data), Dataset.open(data), worker_specs=specs)
    yield session
    session.close()


@pytest.fixture(scope="module")
def reference(data):
    cfg = ray_config(data)
    theta = initial_theta(cfg, None)
    return theta, local_problem(cfg, Dataset.open(data)).evaluate(theta)


def evaluate(session, data, mode, workers, **kw):
    cfg = ray_config(data, mode)
    evaluator = RayEvaluator(cfg, Dataset.open(data), workers, launcher=session.launcher, **kw)
    return evaluator, PassProblem(evaluator, cfg)


def same(ev, ref) -> bool:
    return ev.loss == ref.loss and np.array_equal(ev.grad, ref.grad)


def test_every_mode_and_worker_count_gives_the_single_process_bits(session, data, reference):
    theta, ref = reference
    assert len(Dataset.open(data).units(20)) == UNITS
    # One-pass sums (the default for KL on layer 1): ∇J (P), S_W (256×64) and S_b (256) per unit.
    p = theta.size + 256 * 64 + 256
    received = {}
    for mode in MODES:
        for w in (1, 2, 3, 8):
            evaluator, problem = evaluate(session, data, mode, session.workers[:w])
            ev = problem.evaluate(theta)
            assert same(ev, ref), (mode, w)
            assert sum(evaluator.last_counts.values()) == UNITS
            received[mode, w] = ev.stats["reduce_bytes"]  # the pass's sums that reached the evaluator
    for w in (1, 2, 3, 8):
        assert received["server", w] >= UNITS * 8 * p  # every unit's P-vector
        assert 5 * 8 * p <= received["grouped", w] < 6 * 8 * p  # one per group
        assert 8 * p <= received["tree", w] < 2 * 8 * p  # the root only


def test_kills_mid_pass_give_the_no_fault_bits(session, data, reference):
    """Seeded trials per remote mode: a worker exits inside a unit, or is ray.kill'ed (for good or not)."""
    theta, ref = reference
    for mode in ("grouped", "tree"):
        # Plain on-demand dispatch (balance=False): the end-of-pass rule may leave a worker it
        # measured as slow idle, and a kill of an idle worker is never seen by the pass.
        evaluator, problem = evaluate(session, data, mode, session.workers, balance=False)
        for seed, how in enumerate(["exit", "kill", "kill-for-good"]):
            rng = np.random.default_rng(100 + seed)
            victim = int(rng.integers(len(evaluator.workers)))
            ray.get([w.info.options(max_task_retries=-1).remote() for w in evaluator.workers])
            failures, notes = evaluator.failures, len(evaluator.notes)
            if how == "exit":
                ray.get(evaluator.workers[victim].inject_fault.remote(int(rng.integers(0, 2)), "exit"))
            else:
                handle = evaluator.workers[victim]
                # The victim blocks inside its first unit of the pass (every worker gets units at first:
                # 16 of 30 are in flight), so the kill early in the pass surely lands inside a unit;
                # a kill between its units would be a restart nobody sees. Its restart clears the knob.
                ray.get(handle.inject_fault.remote(0, "hang"))
                evaluator.progress = at_unit(int(rng.integers(2, 10)), lambda: ray.kill(handle, no_restart=how == "kill-for-good"))
            try:
                ev = problem.evaluate(theta)
            finally:
                evaluator.progress = None
            assert evaluator.failures > failures, (mode, how)
            assert not any("hung" in note for note in evaluator.notes[notes:]), (mode, how)  # the kill, not the timeout
            assert same(ev, ref), (mode, how)


def test_a_crashed_reduction_task_is_retried(session, data, reference, tmp_path):
    theta, ref = reference
    for mode in ("grouped", "tree"):
        fault = tmp_path / f"crash-{mode}"
        fault.touch()
        _, problem = evaluate(session, data, mode, session.workers, reduce_fault=str(fault))
        ev = problem.evaluate(theta)
        assert not fault.exists()  # a task found it and killed its own process
        assert same(ev, ref), mode


def at_unit(k: int, action):
    """A pass 'progress bar' (evaluator.progress) that calls action() when the driver has received its k-th unit."""
    seen = itertools.count(1)
    bar = SimpleNamespace(close=lambda: None, update=lambda rows: action() if next(seen) == k else None)
    return lambda kind, rows: bar


def test_a_node_removed_mid_reduction_gives_the_same_bits(cluster, data, reference):
    """Last in the module: it takes a node away (its own one, so the session's stay)."""
    cluster, _ = cluster
    theta, ref = reference
    node = cluster.add_node(**NODE, num_cpus=1, resources={"doomed": 2})
    specs = [WorkerSpec(num_cpus=0.25), WorkerSpec(num_cpus=0.25, resources={"doomed": 1}),
             WorkerSpec(num_cpus=0.25, resources={"doomed": 1})]
    session = ClusterSession(ray_config(data), Dataset.open(data), worker_specs=specs)
    try:
        assert session.worker_info[1]["node_id"] == node.node_id
        evaluator = session.problem.evaluator
        evaluator.progress = at_unit(UNITS - 10, lambda: cluster.remove_node(node))  # late in the (one) pass
        ev = session.problem.evaluate(theta)
        assert same(ev, ref)
        assert evaluator.last_live == 1  # the removed node's workers cannot be placed again
    finally:
        session.close()
