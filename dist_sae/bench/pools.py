"""Mixed worker pools: the pass tail before and after unit sizing, and the cost of the pass bars.

    python -m dist_sae.bench.pools [--out pools.json] [--skip-ray]

The tail of a pass is the time from the first worker going idle, with no unit left to hand out, to
the pass's end (a worker kept waiting while a faster one takes the queue is not out of work); "before" is
plain on-demand dispatch over units of data.block_rows, "after" adds data.taper (the last three
units cut into halves, quarters and eighths) and the dispatcher's end-of-pass rule (a worker slower
than the fastest takes a unit only if it finishes it by the pool's expected end).

1. simulated: the real cluster.dispatch.Dispatcher driven by a discrete-event clock, workers
   computing rows at fixed speeds (a GPU as K CPU workers' speed, 16 one-core CPU workers, as on
   cluster.yaml), a Ray call's overhead per unit; the third pass is measured (rates known).
2. ray (this machine): a local Ray, 3 workers and 1 slowed by a per-unit sleep (WorkerSpec.delay_s),
   exact evaluations before/after, and the same for 2 equal workers (what the taper costs them);
   and training steps with and without the driver polling the
   server's progress() (cluster.meter.PassBars), drawn into a bar that writes nowhere.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from dist_sae.bench.timing import emit_report
from dist_sae.cluster.dispatch import Dispatcher
from dist_sae.data.workunit import WorkUnit, taper_units

CALL_S = 0.001  # a Ray call's overhead per unit (measured ~1 ms on loopback)


def simulate(speeds: list[float], units: list[WorkUnit], balance: bool, depth: int = 2, passes: int = 3) -> dict:
    """Wall time, tail and ideal time of the last of `passes` passes; worker w computes speeds[w] rows/s."""
    rows = {u.id: u.rows for u in units}
    rates: dict[int, float] = {}
    affinity: dict[int, int] = {}
    workers = list(range(len(speeds)))
    for _ in range(passes):
        d = Dispatcher(list(rows), workers, depth, affinity, rows if balance else None, rates)
        fifo: dict[int, deque] = {w: deque() for w in workers}
        finish: dict[int, float | None] = {w: None for w in workers}
        first_idle = None
        counts = [0] * len(speeds)

        def hand_out(now: float) -> None:
            nonlocal first_idle
            for w, uid in d.assign(now=now):
                fifo[w].append(uid)
                if finish[w] is None:
                    finish[w] = now + CALL_S + rows[uid] / speeds[w]
            if first_idle is None and not d.queued and any(not q for q in fifo.values()):
                first_idle = now

        now = 0.0
        hand_out(now)
        while not d.done:
            w = min((f, w) for w, f in finish.items() if f is not None)[1]
            now = finish[w]
            uid = fifo[w].popleft()
            d.complete(w, uid, now=now)
            affinity[uid] = w
            counts[w] += 1
            rates[w] = speeds[w]
            finish[w] = now + CALL_S + rows[fifo[w][0]] / speeds[w] if fifo[w] else None
            hand_out(now)
    ideal = sum(rows.values()) / sum(speeds)
    tail = now - (now if first_idle is None else first_idle)
    return {"wall": now, "tail": tail, "ideal": ideal, "wall_over_ideal": now / ideal, "tail_over_wall": tail / now,
            "units_fastest": counts[0], "units": len(units)}


def cut(rows: int, block_rows: int) -> list[WorkUnit]:
    return [WorkUnit.of(i, 0, s, min(s + block_rows, rows)) for i, s in enumerate(range(0, rows, block_rows))]


def simulated(rows: int = 1_000_000, block_rows: int = 16384, cpu_rows_per_s: float = 60_000.0) -> dict:
    """Before/after on pools like cluster.yaml's: 1 GPU (K× a core) + 16 one-core CPU workers, and 16 CPUs alone."""
    plain, tapered = cut(rows, block_rows), taper_units(cut(rows, block_rows))
    out = {"rows": rows, "block_rows": block_rows, "cpu_rows_per_s": cpu_rows_per_s, "call_s": CALL_S}
    pools = {"16_cpu": [cpu_rows_per_s] * 16, "16_cpu_one_half_speed": [cpu_rows_per_s] * 15 + [cpu_rows_per_s / 2]}
    for k in (10, 50, 200):
        pools[f"1_gpu_{k}x_16_cpu"] = [k * cpu_rows_per_s] + [cpu_rows_per_s] * 16
    for name, speeds in pools.items():
        out[name] = {
            "before": simulate(speeds, plain, balance=False),
            "taper_only": simulate(speeds, tapered, balance=False),
            "rule_only": simulate(speeds, plain, balance=True),
            "after": simulate(speeds, tapered, balance=True),
        }
    return out


def ray_measured(tmp: Path, repeats: int = 5) -> dict:
    """A local Ray on this machine: tails before/after with one slow worker, and the pass bars' cost."""
    from dist_sae.bench.synthetic import write_synthetic
    from dist_sae.cluster import runtime
    from dist_sae.cluster.evaluator import RayEvaluator
    from dist_sae.cluster.launcher import WorkerSpec
    from dist_sae.cluster.ray_session import ClusterSession
    from dist_sae.config import load_config
    from dist_sae.data.dataset import Dataset
    from dist_sae.progress import bar
    from dist_sae.session import initial_theta
    from dist_sae.train.inputs import bind_dataset
    from dist_sae.train.problem import PassProblem

    write_synthetic(tmp / "d", 200_000, 64, seed=3)
    ds = Dataset.open(tmp / "d")
    base = {"model.hidden": [25], "compute.dtype": "float64", "compute.threads": 1, "data.block_rows": 16384,
            "data.path": str(tmp / "d"), "run.quiet": True, "workers.unit_timeout_s": 120}
    out: dict = {"rows": ds.rows, "model": "64-25-64", "workers": "3 + 1 slowed by 0.2 s per unit", "repeats": repeats}
    runtime.start_local(num_cpus=8, dashboard=False)
    try:
        slow = [WorkerSpec(), WorkerSpec(), WorkerSpec(), WorkerSpec(delay_s=0.2)]
        runs = (("before", slow, False, False), ("after", slow, True, True),  # one slow worker of 4
                ("same_2_before", [WorkerSpec()] * 2, False, False), ("same_2_after", [WorkerSpec()] * 2, True, True))
        for label, specs, taper, balance in runs:
            cfg = bind_dataset(load_config(None, {**base, "data.taper": taper}), ds)
            session = ClusterSession(cfg, ds, worker_specs=specs, dashboard=False)
            try:
                problem = PassProblem(RayEvaluator(cfg, ds, session.workers, balance=balance), cfg)
                theta = initial_theta(cfg, None)
                problem.evaluate(theta)  # warm-up; measures the workers' rates
                tails, walls = [], []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    ev = problem.evaluate(theta)
                    walls.append(time.perf_counter() - t0)
                    tails.append(ev.stats["tail_s"])
                out[label] = {"units": len(problem.units), "evaluation_s": statistics.median(walls),
                              "tail_s": statistics.median(tails), "unit_counts": problem.evaluator.last_counts}
            finally:
                session.close()
        cfg = bind_dataset(load_config(None, {**base, "optim.method": "gd"}), ds)
        session = ClusterSession(cfg, ds, dashboard=False)
        try:
            stepper = session.stepper(initial_theta(cfg, None))  # one server: a session keeps one
            stepper.step()
            shown = lambda kind, rows: bar(rows, kind, file=io.StringIO(), disable=False)  # noqa: E731
            times: dict[str, list[float]] = {"no_bars": [], "bars": []}
            for _ in range(4 * repeats):  # interleaved, so load changes hit both alike
                for name, bars in (("no_bars", None), ("bars", shown)):
                    stepper.bars = bars
                    times[name].append(stepper.step()["step_s"])
            t0 = time.perf_counter()
            for _ in range(50):
                runtime.get(session.server.progress.remote(), "progress")
            out["progress"] = {
                "step_s_no_bars": statistics.median(times["no_bars"]),
                "step_s_bars": statistics.median(times["bars"]),
                "bars_over_no_bars": statistics.median(times["bars"]) / statistics.median(times["no_bars"]),
                "progress_call_s": (time.perf_counter() - t0) / 50,
            }
        finally:
            session.close()
    finally:
        runtime.stop_local()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the JSON here (default: stdout)")
    parser.add_argument("--skip-ray", action="store_true", help="only the simulation")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    result: dict = {"simulated": simulated()}
    if not args.skip_ray:
        with tempfile.TemporaryDirectory(prefix="dsae-pools-") as tmp:
            result["ray"] = ray_measured(Path(tmp), args.repeats)
    emit_report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
