"""A multi-node ray.cluster_utils.Cluster on loopback, shared by the multi-node and fault tests."""

from __future__ import annotations

import contextlib

import ray
from ray.cluster_utils import Cluster

from dist_sae.cluster import runtime

NODE = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * 1024**2}


@contextlib.contextmanager
def loopback_cluster(temp_dir: str, head_cpus: int, extra_nodes: tuple[dict, ...] = ()):
    """Yield (cluster, [added nodes]) with the driver connected; everything binds to 127.0.0.1 and
    is shut down on exit. A Ray session already open in this process is closed first."""
    if ray.is_initialized():
        ray.shutdown()
    with runtime.loopback_only():
        cluster = Cluster(
            initialize_head=True,
            head_node_args={**NODE, "num_cpus": head_cpus, "include_dashboard": False, "temp_dir": temp_dir},
        )
        nodes = [cluster.add_node(**NODE, **extra) for extra in extra_nodes]
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
