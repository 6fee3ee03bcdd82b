"""The performance suite (issue #8): dist_sae against its ceilings and its peer, side by side, in one run.

    dist-sae bench [--quick | --size full|quick|tiny] [--out bench_out] [--reps 5] [--skip ray,...] [--float32]
    python scripts/bench.py ...    (the same, from a source checkout)

Writes OUT/bench.json (a `ratios` object, the targets, every measurement behind them) and OUT/bench.md
(the table). Every figure is the median of --reps timed repetitions after a warm-up; the things a
ratio compares run in the same process (or the same run), interleaved round by round in rotating
order, so load from other processes falls on both sides alike.

    stream_vs_memory        examples/s of the engine streaming HDF5 (data.cache_mb=0) / a plain PyTorch
                            loop over the same rows held in one in-memory tensor (the ceiling here)
    twopass_vs_pass2        exact two-pass evaluation / pass 2 alone (ρ̂ given)
    onepass_vs_pass2        one-pass evaluation (sparsity.passes=1) / pass 2 alone
    ray2_vs_local           examples/s of Ray with 2 workers / the single-process engine, >= 1e6 rows
    exercise_*_vs_peer      wall time of `dist-sae train` on the notes' exercise (private local Ray,
                            --address to a running head, --local, --local in float32) / the NumPy +
                            SciPy L-BFGS-B peer with 1 BLAS thread (dist_sae.bench.exercise)
    demo_wall_s             `dist-sae demo`'s wall seconds, report included
    gemm_fraction_784*      FLOP/s of the streaming 784-1024-784 float32 evaluation (two-pass, one-pass)
                            / torch's float32 GEMM rate at the same shapes (dist_sae.bench.gemm)
    rss_16x_vs_1x           peak RSS of the largest process (a Ray worker) of `dist-sae evaluate` on a local
                            Ray, streaming, at 16x the rows / 1x, sampled from /proc outside the process tree
    rss_64x_vs_1x           the same at 64x the rows
    rss_tree_16x_vs_1x      the whole process tree (driver, raylet, GCS, workers) at 16x / 1x (and _64x_)
    minibatch_*, build_*, sources_*, storage_*, pools_*, reduce_*, safety_*, encode_*
                            the benchmark modules run as child processes (dist_sae.bench.parts)

The compute ratios are given for the notes' 64-25-64 model and for 784-1024-784. --quick uses small
sizes and few repetitions; its numbers are for checking the suite, not for quoting. --size tiny only
checks that every part runs (a few minutes). Figures without a target are shown for reference.
--skip takes any of PARTS; the child-process parts take their sizes from dist_sae.bench.parts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dist_sae.bench.compute import bench_compute, bench_threads
from dist_sae.bench.exercise import bench_exercise
from dist_sae.bench.flags import PARTS, SIZES, add_arguments
from dist_sae.bench.gemm import bench_gemm_fraction
from dist_sae.bench.parts import PARTS as CHILD_PARTS
from dist_sae.bench.parts import run_part
from dist_sae.bench.rss import bench_rss
from dist_sae.bench.synthetic import write_synthetic
from dist_sae.bench.table import markdown, targets
from dist_sae.bench.timing import log
from dist_sae.errors import ConfigError

TARGETS = {  # key: (comparison, bound); "|<=|": the absolute value
    "stream_vs_memory": (">=", 0.85),
    "twopass_vs_pass2": ("<=", 1.25),
    "onepass_vs_pass2": ("<=", 1.05),
    "ray2_vs_local": (">=", 0.9),
    "exercise_ray_vs_peer": ("<=", 1.3),
    "exercise_attached_vs_peer": ("<=", 0.9),
    "exercise_local_vs_peer": ("<=", 0.8),
    "exercise_local32_vs_peer": ("<=", 0.6),
    "exercise_J_vs_peer": ("<=", 0.01),  # the largest |J - J_peer| / J_peer of the four runs above
    "demo_wall_s": ("<=", 15.0),
    "gemm_fraction_784": (">=", 0.8),
    "gemm_fraction_784_onepass": (">=", 0.8),
    "rss_16x_vs_1x": ("<=", 1.1),
    "rss_64x_vs_1x": ("<=", 1.15),
    "rss_tree_16x_vs_1x": ("<=", 1.1),
    "rss_tree_64x_vs_1x": ("<=", 1.1),
    "minibatch_exact_vs_batch_512": (">=", 0.8),
    "minibatch_exact_J_vs_best_512": ("|<=|", 0.005),
    "minibatch_exact_mean_activation_vs_rho_512": ("|<=|", 0.2),
    "build_images_single_over_pillow": (">=", 0.8),
    "build_images_ray_over_single": (">=", 1.7),
    "build_patches_single_over_decode": (">=", 0.8),
    "build_patches_ray_over_single": (">=", 1.7),
    "build_same_fingerprint": ("==", 1.0),
    "sources_webdataset_ray_per_core_over_pillow": (">=", 0.8),
    "sources_parquet_ray_per_core_over_pillow": (">=", 0.8),
    "sources_webdataset_ray_over_ray_data": (">=", 1.0),
    "sources_parquet_ray_over_ray_data": (">=", 1.0),
    "sources_same_fingerprint": ("==", 1.0),
    "sources_webdataset_rss_8x_over_1x": ("<=", 1.15),
    "sources_parquet_rss_8x_over_1x": ("<=", 1.15),
    "sources_webdataset_ray_worker_rss_8x_over_1x": ("<=", 1.15),
    "sources_parquet_ray_worker_rss_8x_over_1x": ("<=", 1.15),
    "storage_warm_over_local": (">=", 0.95),
    "reduce_all_bit_identical": ("==", 1.0),
    "reduce_tree_bytes_within_2_p_vectors": ("==", 1.0),
    "reduce_tree_over_server_busy": ("<=", 0.125),  # at W = 32 (the full run)
    "encode_ray_over_local": (">=", 1.6),
    "encode_driver_rss_16x_vs_1x": ("<=", 1.1),
}

MODELS = {"64-25": (64, 25), "784-1024": (784, 1024)}
COMPUTE_RATIOS = ("stream_vs_memory", "twopass_vs_pass2", "onepass_vs_pass2")


def run_suite(out_dir: Path, size: str = "full", reps: int | None = None, skip: set[str] | None = None, float32: bool = False) -> dict:
    """Run every benchmark, write out_dir/bench.json and bench.md, return the report."""
    sz = dict(SIZES[size])
    reps = reps or sz["reps"]
    skip = skip or set()
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    report: dict = {
        "command": command_line(), "size": size, "reps": reps,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.is_available(),
                    "loadavg_start": os.getloadavg()},
        "settings": {"compute_dtype": "float64", "block_rows": 16384, "cache_mb_default": 512,
                     "workers": "Ray: 1 CPU and 1 torch thread per worker; single process: torch's default threads"},
    }
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="dsae-bench-") as tmp_name:
        tmp = Path(tmp_name)
        data = {}
        log(f"writing data ({size})")
        data["64"] = write_synthetic(tmp / "d64", sz["rows_64"], 64, seed=1).path
        data["784"] = write_synthetic(tmp / "d784", sz["rows_784"], 784, seed=2).path
        if "compute" not in skip:
            report["compute"] = {}
            for name, (dim, hidden) in MODELS.items():
                log(f"compute {name}")
                report["compute"][name] = bench_compute(data["64" if dim == 64 else "784"], hidden, reps)
            log("threads")
            report["threads"] = bench_threads(data["64"], 25, reps)
            ratios.update({k: report["compute"]["64-25"]["ratios"][k] for k in COMPUTE_RATIOS})
        if not {"ray", "scaling"} <= skip:
            _ray_parts(report, ratios, data, tmp, sz, reps, skip)
        if "exercise" not in skip:
            log(f"exercise: {sz['steps']} iterations x {sz['exercise_reps']}")
            report["exercise"] = bench_exercise(tmp, sz["steps"], sz["exercise_reps"], float32, twopass=size == "full",
                                            demo_patches=sz.get("demo_patches"))
            ratios.update(report["exercise"]["ratios"])
        if "gemm" not in skip:
            log("gemm: streaming 784-1024 float32 vs torch's GEMM rate")
            report["gemm"] = bench_gemm_fraction(data["784"], 1024, reps)
            ratios.update(report["gemm"]["ratios"])
        if "rss" not in skip:
            log("rss: `dist-sae evaluate` on a local Ray at 1x, 16x, 64x rows, /proc sampled from outside")
            report["rss"] = bench_rss(sz["rss_rows"], (1, 16, 64), reps=3 if size == "full" else 1)
            ratios.update({k: v for k, v in report["rss"]["suite_ratios"].items() if k in TARGETS})
        report["parts"] = {}
        for name, spec in CHILD_PARTS.items():
            report["parts"][name] = part = run_part(name, spec, size, tmp) if name not in skip else {"skipped": "--skip"}
            ratios.update(part.get("figures", {}))
    report["ratios"] = ratios
    if "compute" in report:
        report["ratios_784_1024"] = {k: report["compute"]["784-1024"]["ratios"][k] for k in COMPUTE_RATIOS}
    report["targets"] = targets(ratios, TARGETS)
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["seconds"] = time.perf_counter() - t_start
    report["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    (out_dir / "bench.md").write_text(markdown(report))
    return report


def _ray_parts(report: dict, ratios: dict, data: dict, tmp: Path, sz: dict, reps: int, skip: set[str]) -> None:
    """The Ray benchmark and the scaling one, on one local Ray started here (bound to 127.0.0.1)."""
    # Imported here: Ray takes seconds to import, and every `dist-sae` command imports this module.
    from dist_sae.bench.ray_bench import bench_ray
    from dist_sae.cluster import runtime

    runtime.start_local(num_cpus=8, dashboard=False)
    try:
        if "ray" not in skip:
            log(f"ray: {sz['rows_ray']} rows")
            data["ray"] = write_synthetic(tmp / "dray", sz["rows_ray"], 64, seed=3).path
            report["ray"] = bench_ray(data["ray"], 25, reps, [2])
            ratios["ray2_vs_local"] = report["ray"]["ray_2_vs_local"]
        if "scaling" not in skip:
            log("scaling: 784-1024 at W = " + ",".join(map(str, sz["scale_workers"])))
            data["scale"] = write_synthetic(tmp / "dscale", sz["scale_rows"], 784, seed=4).path
            report["scaling"] = bench_ray(data["scale"], 1024, reps, sz["scale_workers"],
                                          block_rows=max(64, sz["scale_rows"] // 8), components=True)
    finally:
        runtime.stop_local()


def command_line() -> str:
    """How this process was started, for the report: `dist-sae bench ...`, `python scripts/bench.py ...`."""
    prog = Path(sys.argv[0])
    if prog.name == "__main__.py":
        head = f"python -m {prog.parent.name}"
    elif prog.suffix == ".py":
        head = f"python {sys.argv[0]}"
    else:
        head = prog.name
    return " ".join([head, *sys.argv[1:]])


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    return add_arguments(parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))


def run_from_args(args: argparse.Namespace) -> dict:
    """run_suite as the flags of add_arguments ask."""
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(PARTS):
        raise ConfigError(f"--skip: unknown part(s) {', '.join(sorted(skip - set(PARTS)))}; the parts are {', '.join(PARTS)}")
    size = args.size or ("quick" if args.quick else "full")
    return run_suite(Path(args.out), size, args.reps, skip, args.float32)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = run_from_args(args)
    print(json.dumps(report["ratios"], indent=2))
    print(f"wrote {Path(args.out) / 'bench.json'} and {Path(args.out) / 'bench.md'} in {report['seconds']:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
