"""Memory: peak RSS of one worker evaluating 16x the data / 1x, each in a fresh process.

    rss_16x_vs_1x   VmHWM of `python -m dist_sae.bench.rss_child` on 16x the rows / on 1x
"""

from __future__ import annotations

from pathlib import Path

from dist_sae.bench.child import run_json
from dist_sae.bench.timing import med
from dist_sae.data.dataset import Dataset


def measure_rss(path: Path, cache_mb: int) -> dict:
    """One exact evaluation of `path` in a fresh process: rows, J, seconds, peak_rss_mb (see rss_child)."""
    return run_json("dist_sae.bench.rss_child", path, cache_mb)


def bench_rss(small: Path, large: Path, reps: int) -> dict:
    """Peak RSS of a fresh process evaluating J, ∇J once, at 1x and 16x rows, with and without the cache."""
    out: dict = {}
    for cache_mb in (0, 512):
        runs: dict[str, list[float]] = {"1x": [], "16x": []}
        for r in range(reps):
            for name, path in (("1x", small), ("16x", large))[:: 1 if r % 2 == 0 else -1]:
                runs[name].append(measure_rss(path, cache_mb)["peak_rss_mb"])
        out[f"cache_mb_{cache_mb}"] = {"peak_rss_mb": {k: med(v) for k, v in runs.items()},
                                       "ratio": med(runs["16x"]) / med(runs["1x"])}
    out["rows"] = {"1x": Dataset.open(small).rows, "16x": Dataset.open(large).rows}
    out["data_mb_as_float64"] = {k: v * 64 * 8 / 2**20 for k, v in out["rows"].items()}
    return out
