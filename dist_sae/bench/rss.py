"""Memory for the suite: peak RSS from outside the process tree (rss_tree's /proc sampler) of
`dist-sae evaluate` on a local Ray with streaming (data.cache_mb=0), at 1x, 16x and 64x the rows.

    rss_16x_vs_1x        the largest process (a Ray worker) at 16x the rows / at 1x
    rss_64x_vs_1x        the same at 64x (when 64 is among the factors)
    rss_tree_16x_vs_1x   the whole process tree (driver, raylet, GCS, workers) at 16x / 1x
    rss_tree_64x_vs_1x   the same at 64x

Not ru_maxrss and not one process's VmHWM: Ray's processes are the evaluate command's descendants,
and the one that grows with the data is a worker, not the driver.
"""

from __future__ import annotations

from dist_sae.bench.rss_tree import measure


def bench_rss(rows: int, factors: tuple[int, ...] = (1, 16, 64), reps: int = 1, workers: int = 2) -> dict:
    """rss_tree.measure at `rows` x each factor (the first is the base), with the suite's ratios under "suite_ratios".

    Blocks of data.block_rows (16384) unless the base is smaller than 4 of them: then a quarter of
    the base, so that every factor streams blocks of one size (see rss_tree.measure).
    """
    report = measure(rows, factors, workers=workers, reps=reps, block_rows=min(16384, max(64, rows // 4)))
    ratios: dict[str, float] = {}
    for factor in factors[1:]:
        r = report["ratios"][f"{factor}x_vs_{factors[0]}x"]
        ratios[f"rss_{factor}x_vs_{factors[0]}x"] = r["largest"]
        ratios[f"rss_tree_{factor}x_vs_{factors[0]}x"] = r["tree"]
    return {**report, "suite_ratios": ratios}
