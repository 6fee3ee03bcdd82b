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
from dist_sae.train.passes import local_problem

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


def test_two_nodes_equal_single_process(two_nodes, tmp_path):
    cluster, gpu_node = two_nodes
    path = tmp_path / "d"
    make_dataset(path, smooth_patches(700, seed=9), shard_rows=256)
    ds = Dataset.open(path)
    cfg = bind_dataset(config(path, model__hidden=[5], data__block_rows=48, workers__engine="ray", workers__unit_timeout_s=60), ds)
    theta0 = initial_theta(cfg, None)
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
