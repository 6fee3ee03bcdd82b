"""Ray: exact evaluations on W workers vs the single-process engine, and the terms of the scaling model.

    ray2_vs_local   examples/s of Ray with 2 workers / the single-process engine, >= 1e6 rows

Needs a running Ray (run_suite starts a local one, bound to 127.0.0.1).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch

from dist_sae.bench.compute import bench_config
from dist_sae.bench.timing import interleaved, med, summary
from dist_sae.cluster import runtime
from dist_sae.cluster.ray_session import ClusterSession
from dist_sae.sae.sums import add_sums
from dist_sae.session import initial_theta
from dist_sae.train.problem import local_problem


def bench_ray(path: Path, hidden: int, reps: int, workers: list[int], block_rows: int = 16384, components: bool = False) -> dict:
    """Exact two-pass evaluations on Ray with each worker count and in this process, interleaved."""
    ds, cfg = bench_config(path, hidden, **{"data.block_rows": block_rows, "sparsity.passes": 2})
    theta = initial_theta(cfg, None)
    local = local_problem(cfg, ds)
    sessions: dict[int, ClusterSession] = {}
    try:
        for n in workers:
            sessions[n] = ClusterSession(cfg.with_overrides({"workers.num": n}), ds, dashboard=False)
        fns = {"local": partial(local.evaluate, theta)}
        fns.update({f"ray_{n}": partial(session.problem.evaluate, theta) for n, session in sessions.items()})
        times = interleaved(fns, reps)
        ref = local.evaluate(theta).grad
        out: dict = {"model": f"{ds.dim}-{hidden}-{ds.dim}", "rows": ds.rows, "params": int(theta.size),
                     "units": len(local.units), "local_threads": torch.get_num_threads(), "times": summary(times),
                     "examples_per_s": {k: ds.rows / med(v) for k, v in times.items()}}
        for n, session in sessions.items():
            ev = session.problem.evaluate(theta)
            out[f"ray_{n}_grad_equal_local"] = bool(np.array_equal(ev.grad, ref))
            out[f"ray_{n}_vs_local"] = med(times["local"]) / med(times[f"ray_{n}"])
            out[f"ray_{n}_units_per_worker"] = session.problem.evaluator.last_counts
        if components:  # the terms of docs/scaling.md's cost model, measured here
            out["components"] = _components(local, theta, hidden, max(reps, 5))
        return out
    finally:
        for session in sessions.values():
            session.close()
        local.evaluator.close()


def _components(local, theta: np.ndarray, hidden: int, reps: int) -> dict:
    """θ's upload, one reduction step, and one unit's pass 1 and pass 2 in this process."""
    t_put = interleaved({"put": lambda: runtime.put(theta + 0.0)}, reps)["put"]
    part = {"grad": np.ones(theta.size), "act": np.ones(hidden), "rows": np.array(1.0)}
    t_add = interleaved({"add": lambda: add_sums({k: v.copy() for k, v in part.items()}, part)}, reps)["add"]
    unit = local.units[0]
    runner = local.evaluator.runner
    runner.set_theta(theta, "bench")
    block = runner.load(unit)
    t_unit = interleaved({"p1": lambda: runner.compute("pass1", unit, block),
                          "p2": lambda: runner.compute("pass2", unit, block)}, reps)
    return {"put_theta_s": med(t_put), "add_one_unit_sums_s": med(t_add),
            "pass1_unit_s": med(t_unit["p1"]), "pass2_unit_s": med(t_unit["p2"]),
            "unit_rows": unit.rows, "theta_mb": theta.nbytes / 2**20}
