"""Encode throughput and memory (issue #29): `dist-sae encode` of ROWS x 64 rows through a 64-256 model,
float32 out, --local against Ray with 2 workers, and the driver's and largest worker's peak RSS
(sampled from /proc outside the process tree) at 1x and 16x the rows.

    python -m dist_sae.bench.encode [--rows 1000000] [--factors 1,16] [--workers 2] [--out bench_out/encode.json]

Rows/s are over the encode itself: from the workers' start (a private Ray's included) to the last
shard stored, as the command prints it; publishing (fsync of the whole output, once, then the rename)
and the whole command are reported beside it, and over the whole command for reference. --local and Ray
run in alternating order. `limits` times the pieces of one shard in this process (read, compute,
write with the row hash, the file's SHA-256) to say where an encode's time goes. Targets on the
2-core machine: Ray 2 workers >= 1.6x --local; the driver's peak RSS at 16x <= 1.10x its peak at 1x.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dist_sae.bench.rss_tree import run_sampled
from dist_sae.bench.synthetic import write_synthetic
from dist_sae.bench.timing import emit_report


def encode_cmd(model: Path, data: Path, out: Path, workers: int | None) -> list[str]:
    engine = ["--local", "compute.threads=0"] if workers is None else [f"workers.num={workers}", "compute.threads=1"]
    return [sys.executable, "-m", "dist_sae", "encode", "--quiet", "--model", str(model), "--data", str(data), "--out", str(out),
            "--dtype", "float32", "--overwrite", *engine, "compute.dtype=float32"]


def timed_encode(model: Path, data: Path, out: Path, workers: int | None, rows: int, interval: float) -> dict:
    # The worker actors: not the raylet, the GCS, the agents or idle workers.
    run = run_sampled(encode_cmd(model, data, out, workers), interval, workers=r"ray::(dist_sae\.worker-\d+:)?Worker")
    run["largest_worker_peak_mb"], run["wall_s"] = run.pop("worker_peak_mb"), run.pop("seconds")
    m = re.search(r"\((\d+\.\d+)s(?:: (\d+\.\d+)s starting the workers, (\d+\.\d+)s encoding)?", run.pop("stdout"))
    seconds, start = float(m.group(1)), float(m.group(2) or 0.0)
    encoding = float(m.group(3)) if m.group(3) else seconds
    return {**run, "seconds": seconds, "start_s": start, "encode_s": encoding, "publish_s": seconds - start - encoding,
            "rows_per_s": rows / encoding, "rows_per_s_whole_command": rows / run["wall_s"]}


def limits(model: Path, data: Path, tmp: Path, rows: int = 250_000) -> dict:
    """Seconds per million rows of each piece of an encode, one shard in this process (1 torch thread)."""
    import torch

    from dist_sae.data.reader import BlockReader
    from dist_sae.data.storage import file_sha256
    from dist_sae.data.workunit import WorkUnit
    from dist_sae.data.writer import ShardWriter
    from dist_sae.sae.model import load_model

    torch.set_num_threads(1)
    net, _ = load_model(model)
    net = net.float()
    from dist_sae.data.dataset import Dataset

    ds = Dataset.open(data)
    units = [u for u in ds.units(16384) if u.spans[0].shard == 0][: -(-rows // 16384)]
    t = {"read": 0.0, "compute": 0.0, "write_and_row_hash": 0.0}
    writer = ShardWriter(tmp / "limits.h5", 256, "float32")
    with BlockReader(ds) as reader, torch.no_grad():
        for unit in units:
            t0 = time.perf_counter()
            block = reader.read(unit)
            t1 = time.perf_counter()
            codes = net.encode_layers(torch.from_numpy(block), upto=1)[-1].numpy()
            t2 = time.perf_counter()
            writer.write(codes)
            t3 = time.perf_counter()
            t["read"] += t1 - t0
            t["compute"] += t2 - t1
            t["write_and_row_hash"] += t3 - t2
    writer._file.close()
    t0 = time.perf_counter()
    file_sha256(tmp / "limits.h5")
    t["file_sha256"] = time.perf_counter() - t0
    done = sum(u.rows for u in units)
    return {"rows": done, "seconds_per_million_rows": {k: v * 1e6 / done for k, v in t.items()},
            "output_mb_per_million_rows": 256 * 4, "note": "one process, one torch thread, float32; page cache warm"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows at 1x")
    parser.add_argument("--factors", default="1,16", help="row multiples for the RSS comparison (Ray)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=1, help="--local / Ray pairs at 1x (medians)")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between /proc samples")
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args(argv)
    factors = [int(f) for f in args.factors.split(",")]
    with tempfile.TemporaryDirectory(prefix="dist_sae_encode_bench_") as tmp_name:
        tmp = Path(tmp_name)
        from dist_sae.config import load_config
        from dist_sae.sae.model import SparseAutoencoder, save_model

        cfg = load_config(None, {"model.visible": 64, "model.hidden": [256]})
        net = SparseAutoencoder.from_config(cfg)
        net.reset_parameters(0)
        save_model(net, tmp / "model", cfg)
        base = tmp / "1x"
        write_synthetic(base, args.rows, 64, seed=1, shard_rows=250_000)
        pairs = []
        for r in range(args.reps):  # alternating order: load from elsewhere falls on both alike
            order = [None, args.workers] if r % 2 == 0 else [args.workers, None]
            got = {w: timed_encode(tmp / "model", base, tmp / "codes", w, args.rows, args.interval) for w in order}
            pairs.append({"local": got[None], "ray": got[args.workers]})
        med = lambda side, key: float(np.median([p[side][key] for p in pairs]))  # noqa: E731
        rss = {"1x": {k: med("ray", k) for k in ("driver_peak_mb", "largest_worker_peak_mb", "seconds", "rows_per_s")}}
        for factor in factors[1:]:
            data = tmp / f"{factor}x"
            write_synthetic(data, args.rows * factor, 64, seed=factor, shard_rows=250_000)
            run = timed_encode(tmp / "model", data, tmp / "codes", args.workers, args.rows * factor, args.interval)
            rss[f"{factor}x"] = {k: run[k] for k in ("driver_peak_mb", "largest_worker_peak_mb", "seconds", "rows_per_s")}
            shutil.rmtree(data)
        report = {
            "benchmark": "dist-sae encode: 64-256 model, float32 out, --local vs Ray; peak RSS from outside",
            "settings": {"rows": args.rows, "dim": 64, "hidden": 256, "workers": args.workers, "reps": args.reps,
                         "compute.dtype": "float32", "cpus": os.cpu_count()},
            "runs": pairs,
            "rows_per_s": {"local": med("local", "rows_per_s"), "ray": med("ray", "rows_per_s")},
            "rss": rss,
            "ratios": {"ray_over_local": med("ray", "rows_per_s") / med("local", "rows_per_s"),
                       "ray_over_local_whole_command": med("ray", "rows_per_s_whole_command") / med("local", "rows_per_s_whole_command"),
                       **{f"driver_rss_{f}_vs_1x": rss[f]["driver_peak_mb"] / rss["1x"]["driver_peak_mb"] for f in rss if f != "1x"},
                       **{f"worker_rss_{f}_vs_1x": rss[f]["largest_worker_peak_mb"] / rss["1x"]["largest_worker_peak_mb"] for f in rss if f != "1x"}},
            "targets": {"ray_over_local": ">= 1.6", "driver_rss_16x_vs_1x": "<= 1.10"},
            "limits": limits(tmp / "model", base, tmp),
            "loadavg_end": os.getloadavg(),
        }
    emit_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
