#!/usr/bin/env python
"""Peak memory of one exact evaluation (J and ∇J) on a dataset K× larger than a base one.

Each evaluation runs in a fresh subprocess (dist_sae.bench.rss_child) so its peak RSS (VmHWM) is
its own. Streaming (data.cache_mb=0), memory is bounded by the block size and read-ahead depth, not
by the data size: the ratio should be ~1. With the block cache (default 512 MB per worker) memory
grows with the data up to data.cache_mb, then stays there; both are measured.

    python scripts/bench_memory.py --rows 250000 --factor 8 --out bench_out/memory.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from dist_sae.bench.rss import measure_rss
from dist_sae.bench.timing import emit_report


def build(path: Path, rows: int, dim: int, seed: int) -> None:
    from dist_sae.data.writer import DatasetWriter

    rng = np.random.default_rng(seed)
    with DatasetWriter(path, dim, shard_rows=200_000, dtype="float32", chunk_rows=1024) as writer:
        for start in range(0, rows, 50_000):
            writer.write(rng.uniform(0.1, 0.9, size=(min(50_000, rows - start), dim)).astype(np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=250_000, help="rows of the base dataset")
    parser.add_argument("--factor", type=int, default=8, help="size of the large dataset relative to the base")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--cache-mb", type=int, default=512, help="data.cache_mb of the second measurement (the default config's)")
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args()
    big = f"{args.factor}x"
    with tempfile.TemporaryDirectory(prefix="dist_sae_bench_") as tmp:
        results: dict = {}
        for name, rows in (("1x", args.rows), (big, args.rows * args.factor)):
            path = Path(tmp) / name
            t0 = time.perf_counter()
            build(path, rows, args.dim, seed=1)
            build_s = time.perf_counter() - t0
            for cache_mb in (0, args.cache_mb):  # streaming only, then with the block cache
                results[f"{name}_cache{cache_mb}"] = {**measure_rss(path, cache_mb), "build_s": build_s, "data_mb": rows * args.dim * 4 / 2**20}
    report = {
        "benchmark": "peak RSS of one exact evaluation vs data size",
        "dim": args.dim,
        "results": results,
        # Streaming is bounded by block size and read-ahead; the block cache adds up to data.cache_mb.
        "ratios": {
            f"rss_{big}_vs_1x_streaming": results[f"{big}_cache0"]["peak_rss_mb"] / results["1x_cache0"]["peak_rss_mb"],
            f"rss_{big}_vs_1x_cache{args.cache_mb}": results[f"{big}_cache{args.cache_mb}"]["peak_rss_mb"]
            / results[f"1x_cache{args.cache_mb}"]["peak_rss_mb"],
        },
    }
    emit_report(report, args.out)


if __name__ == "__main__":
    main()
