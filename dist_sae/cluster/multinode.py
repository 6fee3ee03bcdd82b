"""Several Ray nodes on one machine (ray.cluster_utils, loopback only), and timing θ's pulls: for benchmarks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dist_sae.cluster import runtime


@contextmanager
def loopback_nodes(count: int, cpus: float, store_mb: int, head_cpus: float | None = None) -> Iterator[list[str]]:
    """`count` raylets bound to 127.0.0.1, node i advertising the custom resource `node{i}`
    (so a worker can be placed on it), with this process connected; yields their node ids."""
    node = {"node_ip_address": "127.0.0.1", "object_store_memory": store_mb * 2**20}
    with runtime.loopback_only():
        cluster = Cluster(initialize_head=True, head_node_args={**node, "num_cpus": head_cpus or cpus,
                                                                "include_dashboard": False, "resources": {"node0": 1000}})
        for i in range(1, count):
            cluster.add_node(**node, num_cpus=cpus, resources={f"node{i}": 1000})
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        yield [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    finally:
        ray.shutdown()
        cluster.shutdown()


@ray.remote(num_cpus=0)
def _pull(ref_list) -> float:
    t0 = time.perf_counter()
    ray.get(ref_list[0])  # inside a list: not resolved by Ray before the task starts
    return time.perf_counter() - t0


def pull_seconds(size: int, nodes: list[str], seed: int = 0) -> float:
    """Seconds from putting a fresh float64 vector of `size` here until every node in `nodes` holds it."""
    ref = ray.put(np.random.default_rng(seed).standard_normal(size))  # new: no node has it yet
    t0 = time.perf_counter()
    ray.get([_pull.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote([ref]) for n in nodes])
    return time.perf_counter() - t0
