"""The server's share of a pass against the worker count, for each reduction (workers.reduce).

    python -m dist_sae.bench.reduce_scaling [--workers 1,2,4,8,16,32] [--units 32] [--unit-rows 64]
        [--hidden 1024] [--nodes 4] [--reps 2] [--out reduce_scaling.json]

A ray.cluster_utils cluster on loopback (--nodes raylets with their own object stores, one
machine) holds max(--workers) small workers (a fractional CPU each, one torch thread),
spread round-robin over the nodes. For W = each worker count and each mode, exact evaluations
(pass 1 + pass 2) at one θ on a 784-d synthetic set give, per pass: the bytes of sums the
server received, the server's busy time on results (getting and adding them, not waiting), and
the pass time; all bit-compared with the single-process engine. Then the broadcast: a fresh θ is
pulled by one task per node, alone and all nodes at once (do the object store's pulls spread?).
Rows are deliberately few (the machine is shared): the server-side terms depend on U and P, not
on the rows.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from dist_sae.bench.compute import bench_config
from dist_sae.bench.synthetic import write_synthetic
from dist_sae.bench.timing import emit_report, log, med
from dist_sae.cluster.evaluator import RayEvaluator
from dist_sae.cluster.launcher import WorkerSpec
from dist_sae.cluster.multinode import loopback_nodes, pull_seconds
from dist_sae.cluster.ray_session import ClusterSession
from dist_sae.cluster.reduce import REDUCE_MODES
from dist_sae.session import initial_theta
from dist_sae.train.problem import PassProblem, local_problem


class Recording:
    """Wraps an evaluator: keeps the timings of every pass it runs."""

    def __init__(self, evaluator: RayEvaluator) -> None:
        self.evaluator, self.passes = evaluator, []
        self.units, self.rows = evaluator.units, evaluator.rows

    def run(self, kind, theta, units, g=None):
        sums, timing = self.evaluator.run(kind, theta, units, g)
        self.passes.append({"kind": kind, **timing})
        return sums, timing


def bench_mode(cfg, ds, workers, mode: str, theta, reference, reps: int) -> dict:
    cfg = cfg.with_overrides({"workers.reduce": mode})
    recording = Recording(RayEvaluator(cfg, ds, workers))
    problem = PassProblem(recording, cfg)
    problem.evaluate(theta)  # warm-up: θ upload, block caches, reduction task processes
    recording.passes.clear()
    walls, ev = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        ev = problem.evaluate(theta)
        walls.append(time.perf_counter() - t0)
    out: dict = {"evaluation_s": med(walls), "bit_identical_to_single_process": bool(ev.loss == reference.loss and np.array_equal(ev.grad, reference.grad))}
    for kind in ("pass1", "pass2"):
        runs = [p for p in recording.passes if p["kind"] == kind]
        out[kind] = {"server_bytes": int(med([p["reduce_bytes"] for p in runs])), "server_busy_s": med([p["reduce_s"] for p in runs]),
                     "pass_s": med([p["wall_s"] for p in runs])}
    return out


def bench_broadcast(nodes: list[str], size: int, reps: int) -> dict:
    """Seconds for a fresh θ of `size` floats to reach one other node, and every other node at once."""
    others = nodes[1:]
    pull_seconds(size, others)  # warm-up: the task processes
    one = med([pull_seconds(size, others[:1], seed=r) for r in range(reps)])
    every = med([pull_seconds(size, others, seed=r) for r in range(reps)])
    return {"theta_mb": size * 8 / 2**20, "nodes_pulling": len(others), "one_node_s": one, "all_nodes_s": every,
            "all_over_one": every / one,
            "note": "loopback: every node is on this machine, so this shows the object manager's concurrency, not a network's"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4,8,16,32", help="worker counts, comma-separated")
    parser.add_argument("--modes", default=",".join(REDUCE_MODES), help="reductions to compare")
    parser.add_argument("--units", type=int, default=32, help="work units per pass (>= the largest worker count)")
    parser.add_argument("--unit-rows", type=int, default=64, help="rows per unit (few: the machine is shared)")
    parser.add_argument("--dim", type=int, default=784)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--nodes", type=int, default=4, help="raylets of the loopback cluster")
    parser.add_argument("--store-mb", type=int, default=600, help="object store per node")
    parser.add_argument("--reps", type=int, default=2, help="timed evaluations per (W, mode), after one warm-up")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",") if w]
    modes = [m for m in args.modes.split(",") if m]
    report: dict = {"machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}, "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="dsae-reduce-") as tmp:
        path = Path(tmp) / "d"
        write_synthetic(path, args.units * args.unit_rows, args.dim, seed=3, shard_rows=args.units * args.unit_rows)
        ds, cfg = bench_config(path, args.hidden, **{"data.block_rows": args.unit_rows, "compute.threads": 1,
                                                     "workers.unit_timeout_s": 600, "sparsity.passes": 2})
        theta = initial_theta(cfg, None)
        reference = local_problem(cfg, ds).evaluate(theta)
        report.update({"model": f"{ds.dim}-{args.hidden}-{ds.dim}", "params": int(theta.size), "rows": ds.rows,
                       "units": len(ds.units(args.unit_rows)), "p_vector_bytes": int(theta.nbytes)})
        per_node = -(-max(counts) // args.nodes)
        with loopback_nodes(args.nodes, per_node, args.store_mb, head_cpus=1 + per_node) as nodes:
            specs = [WorkerSpec(num_cpus=0.25, resources={f"node{i % args.nodes}": 1}) for i in range(max(counts))]
            session = ClusterSession(cfg, ds, worker_specs=specs, dashboard=False)
            try:
                report["nodes"] = len({i["node_id"] for i in session.worker_info})
                results: dict = {}
                for w in counts:
                    for mode in modes:
                        log(f"W={w} {mode}")
                        results.setdefault(mode, {})[str(w)] = bench_mode(cfg, ds, session.workers[:w], mode, theta, reference, args.reps)
                report["scaling"] = results
                report["broadcast"] = bench_broadcast(nodes, theta.size, max(args.reps, 3))
            finally:
                session.close()
    report["summary"] = summarise(report, counts)
    emit_report(report, args.out)
    return 0


def summarise(report: dict, counts: list[int]) -> dict:
    """The issue's targets: tree's server bytes flat in W (<= 2 P-vectors + activations), busy time ratio at max W."""
    s, top, p = report["scaling"], str(max(counts)), report["p_vector_bytes"]
    out: dict = {}
    if "tree" in s:
        tree_bytes = [s["tree"][str(w)]["pass2"]["server_bytes"] for w in counts]
        out["tree_pass2_server_bytes"] = tree_bytes
        out["tree_bytes_constant_in_w"] = len(set(tree_bytes)) == 1
        out["tree_bytes_within_2_p_vectors"] = max(tree_bytes) <= 2 * p
    for mode in ("grouped", "tree"):
        if mode in s and "server" in s:
            busy = lambda m: s[m][top]["pass1"]["server_busy_s"] + s[m][top]["pass2"]["server_busy_s"]  # noqa: E731
            out[f"{mode}_over_server_busy_at_w{top}"] = busy(mode) / busy("server")
            out[f"{mode}_over_server_evaluation_s_at_w{top}"] = s[mode][top]["evaluation_s"] / s["server"][top]["evaluation_s"]
    out["all_bit_identical"] = all(r["bit_identical_to_single_process"] for m in s.values() for r in m.values())
    return out


if __name__ == "__main__":
    raise SystemExit(main())
