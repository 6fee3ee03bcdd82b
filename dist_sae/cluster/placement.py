"""Worker pools on a cluster: how many workers of each kind fit, checked before any work starts.

A run's workers come in pools (config.PoolConfig: kind, num, cpus, gpus per worker). The plan
packs the pools in the order given onto the cluster's nodes, node by node, each pool taking what
the pools before it left: a GPU pool's reserved CPUs are not counted again for a later CPU pool,
and a worker is placed only where one node holds all it reserves (Ray places an actor on one node).
Pure functions over node resource dicts (as `ray.nodes()` reports them), so tests need no Ray.
"""

from __future__ import annotations

import logging
import math

from dist_sae.sections import PoolConfig
from dist_sae.errors import ConfigError

log = logging.getLogger(__name__)


def demand(pool: PoolConfig) -> dict[str, float]:
    """The Ray resources one worker of the pool reserves, e.g. {"CPU": 4, "GPU": 1}."""
    return {"CPU": pool.cpus, **({pool.gpu_resource: pool.gpu_share} if pool.gpu_share > 0 else {})}


def _fits(free: dict[str, float], need: dict[str, float]) -> int:
    """Workers reserving `need` that one node's `free` resources hold."""
    return min(math.floor(free.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0)


def _describe(index: int, pool: PoolConfig) -> str:
    need = ", ".join(f"{v:g} {k}" for k, v in demand(pool).items())
    return f"workers.pools[{index}] (kind {pool.kind}, {need} per worker)"


def plan_pools(pools: list[PoolConfig], nodes: list[dict[str, float]]) -> list[int]:
    """Workers per pool: `num`, or as many as fit (num 0), packed in order onto `nodes`.

    Args:
        pools: the run's workers.pools.
        nodes: total resources of each alive node, e.g. [{"CPU": 16}, {"CPU": 8, "GPU": 1}].

    Raises:
        ConfigError: a pool no node can hold one worker of, or an automatic pool that gets none:
            one message naming the pool, what it reserves and what the nodes have.
    """
    free = [dict(n) for n in nodes]
    counts = []
    for i, pool in enumerate(pools):
        need = demand(pool)
        room = [_fits(f, need) for f in free]
        if not any(_fits(dict(n), need) for n in nodes):
            have = "; ".join(", ".join(f"{v:g} {k}" for k, v in sorted(n.items()) if k in need) or "none of it" for n in nodes)
            raise ConfigError(
                f"{_describe(i, pool)} cannot be placed: no node of the Ray cluster has that much (nodes have: {have}); "
                + ("add GPU nodes, or drop the gpu pool" if pool.kind == "gpu" else "lower the pool's cpus")
            )
        total = sum(room)
        if pool.num == 0 and total == 0:
            raise ConfigError(
                f"{_describe(i, pool)} with num 0 gets no worker: the pools before it took every node's room; "
                "give the earlier pools a num, or this one"
            )
        n = pool.num or total
        if n > total:
            # Like workers.num today: the rest wait for nodes (an autoscaling cluster adds them).
            log.warning("%s asks for %d workers but the cluster has room for %d now; the rest wait for nodes", _describe(i, pool), n, total)
        left = n
        for f, r in zip(free, room):
            take = min(r, left)
            for k, v in need.items():
                f[k] = f.get(k, 0.0) - take * v
            left -= take
        counts.append(n)
    return counts


def node_resources(nodes: list[dict]) -> list[dict[str, float]]:
    """The total resources of each alive node from `ray.nodes()`."""
    return [dict(n.get("Resources", {})) for n in nodes if n.get("Alive", True)]
