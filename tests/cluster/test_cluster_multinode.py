"""Two Ray nodes on this machine (ray.cluster_utils.Cluster), bound to 127.0.0.1.

The second node advertises a custom resource `fake_gpu`; one worker is placed there by asking for
it. CI has no GPU, so the worker computes on the CPU (no GPU is assigned to it), and the results
must still equal the single-process engine's.
"""

from __future__ import annotations

import numpy as np
import pytest

from dist_sae.session import LocalSession, initial_theta
from dist_sae.data.dataset import Dataset
from dist_sae.train.inputs import bind_dataset
from dist_sae.train.problem import local_problem
from dist_sae import progress

from util import config, make_dataset, smooth_patches

ray = pytest.importorskip("ray")

from dist_sae.cluster.ray_session import ClusterSession
from dist_sae.cluster.launcher import WorkerSpec  # noqa: E402

from raycluster import loopback_cluster  # noqa: E402

pytestmark = pytest.mark.ray



@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    temp_dir = str(tmp_path_factory.mktemp("ray"))
    with loopback_cluster(temp_dir, head_cpus=2, extra_nodes=({"num_cpus": 2, "resources": {"fake_gpu": 1}},)) as (cluster, nodes):
        yield cluster, nodes[0]


def _ray_problem(tmp_path, rows: int, seed: int, shard_rows: int, overrides: list[str] = ()):
    """(dataset, Ray config, θ0) of a small smooth-patches dataset: float64, 48-row units, 1 thread a worker."""
    path = tmp_path / "d"
    make_dataset(path, smooth_patches(rows, seed=seed), shard_rows=shard_rows)
    ds = Dataset.open(path)
    cfg = bind_dataset(config(path, model__hidden=[5], data__block_rows=48, workers__engine="ray", workers__unit_timeout_s=60), ds)
    cfg = cfg.with_overrides(list(overrides))
    return ds, cfg, initial_theta(cfg, None)


def test_two_nodes_equal_single_process(two_nodes, tmp_path):
    cluster, gpu_node = two_nodes
    ds, cfg, theta0 = _ray_problem(tmp_path, 700, 9, 256)
    specs = [WorkerSpec(resources={"fake_gpu": 1}), WorkerSpec()]
    session = ClusterSession(cfg, ds, worker_specs=specs)
    local = LocalSession(cfg.with_overrides({"workers.engine": "local"}), ds)
    try:
        assert len(ray.nodes()) == 2
        info = session.worker_info
        assert info[0]["node_id"] == gpu_node.node_id  # placed by the custom resource
        assert info[0]["device"] == "cpu"  # no GPU assigned: computes on the CPU
        assert info[1]["node_id"] == cluster.head_node.node_id  # the head has the free CPUs left
        ref = local_problem(cfg, ds).evaluate(theta0)
        ev = session.problem.evaluate(theta0)
        assert abs(ev.loss - ref.loss) <= 1e-12 * abs(ref.loss)
        assert np.linalg.norm(ev.grad - ref.grad) <= 1e-12 * np.linalg.norm(ref.grad)
        assert sum(session.problem.evaluator.last_counts.values()) == len(ds.units(48))

        expected, remote = local.stepper(theta0), session.stepper(theta0)
        for _ in range(5):
            expected.step()
            remote.step()
        theta_ref = expected.state_dict()["theta"].numpy()
        assert np.max(np.abs(remote.state_dict()["theta"].numpy() - theta_ref)) <= 1e-10
        # The parameter server sits on the driver's node (the head), whatever the workers' nodes.
        assert ray.get(session.server.node_id.remote()) == cluster.head_node.node_id
    finally:
        session.close()
        local.close()


FAKE_GPU_POOLS = ("workers.pools=[{kind: gpu, num: 0, gpus: 1, cpus: 2, gpu_resource: fake_gpu}, "
                  "{kind: cpu, num: 0, cpus: 1}]")


def test_mixed_pools_both_kinds_take_units_and_equal_single_process(two_nodes, tmp_path):
    cluster, gpu_node = two_nodes
    ds, cfg, theta0 = _ray_problem(tmp_path, 900, 5, 300, [FAKE_GPU_POOLS])
    session = ClusterSession(cfg, ds)
    try:
        kinds = [session.launcher.kind(i) for i in range(session.num_workers)]
        # The GPU pool's 2 CPUs on the fake-GPU node are not counted again: the CPU pool gets the head's 2.
        assert kinds == ["gpu", "cpu", "cpu"]
        info = session.worker_info
        assert info[0]["node_id"] == gpu_node.node_id and info[0]["device"] == "cpu"  # placed as GPU, computes on CPU
        assert {i["node_id"] for i in info[1:]} == {cluster.head_node.node_id}
        ref = local_problem(cfg.with_overrides({"workers.engine": "local"}), ds).evaluate(theta0)
        ev = session.problem.evaluate(theta0)
        assert ev.loss == ref.loss and np.array_equal(ev.grad, ref.grad)  # float64, same device kind: bit for bit
        counts = session.problem.evaluator.last_counts
        assert counts[0] > 0 and counts[1] + counts[2] > 0  # both pools took units
        assert ev.stats["rows_per_s_gpu"] > 0 and ev.stats["rows_per_s_cpu"] > 0 and ev.stats["tail_s"] >= 0

        stepper = session.stepper(theta0)
        drawn: list[tuple[str, int]] = []
        stepper.bars = lambda kind, rows: drawn.append((kind, rows)) or progress.bar(rows, kind, quiet=True)
        stepper.poll_s = 0.005  # the step is short here: poll often, so the bars see its passes
        metrics = stepper.step()
        assert drawn and {kind for kind, _ in drawn} == {"onepass"} and {rows for _, rows in drawn} == {ds.rows}
        assert metrics["rows_per_s_gpu"] > 0 and metrics["rows_per_s_cpu"] > 0 and "tail_s" in metrics
        snap = ray.get(session.server.progress.remote())
        assert snap["kind"] == "onepass" and snap["done"] == snap["rows"] == ds.rows and not snap["running"]
        assert snap["workers"] == 3
    finally:
        session.close()


def test_unplaceable_pool_is_refused_before_any_work(two_nodes, tmp_path, capsys):
    from dist_sae.commands.main import main

    path, out = tmp_path / "d", tmp_path / "run"
    make_dataset(path, smooth_patches(300, seed=6), shard_rows=300)
    code = main(["train", "--data", str(path), "--out", str(out), "--quiet", "compute.threads=1",
                 "workers.pools=[{kind: gpu, gpus: 2, gpu_resource: fake_gpu}, {kind: cpu}]"])
    err = capsys.readouterr().err
    assert code == 2
    assert "workers.pools[0] (kind gpu, 1 CPU, 2 fake_gpu per worker) cannot be placed" in err and "1 fake_gpu" in err
    assert not out.exists()  # nothing of a run was written
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if "worker" in a["name"]]
