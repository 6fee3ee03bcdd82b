"""The suite's parts that run as their own benchmark module, each in a fresh child process.

    minibatch       python -m dist_sae.bench.minibatch       ρ̂ modes vs a Ray Train + Ray Data peer
    build           python -m dist_sae.bench.build           building from an image folder: one process, Ray
    sources         python -m dist_sae.bench.sources         building from WebDataset tars and Parquet: Pillow, Ray Data peer
    storage         python -m dist_sae.bench.storage         warm/cold shard cache from a local S3 server vs local disk
    pools           python -m dist_sae.bench.pools           the pass tail before/after unit sizing; the pass bars' cost
    reduce_scaling  python -m dist_sae.bench.reduce_scaling  the server's share of a pass against W, per reduction
    safety          python -m dist_sae.bench.safety          the SIGTERM checkpoint: write and verified load
    encode          python -m dist_sae.bench.encode          encode rows/s, --local vs Ray; driver and worker RSS at 1x and 16x

Each writes its JSON report to a file; run_part reads it back and picks the figures the suite's
table shows (`pick`). A part whose optional extra is missing is skipped with the reason, and a part
that fails is reported with its error: neither stops the suite.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dist_sae.bench.child import run_module
from dist_sae.bench.timing import log


def _minibatch(r: dict) -> dict[str, float]:
    return {f"minibatch_{k}_{batch}": v for batch, ratios in r["ratios"].items() for k, v in ratios.items()}


def _build(r: dict) -> dict[str, float]:
    i, p = r["images_per_s"], r["patches_per_s"]
    return {"build_images_single_over_pillow": i["single_over_pillow"], "build_images_ray_over_single": i["ray_over_single"],
            "build_patches_single_over_decode": p["single_over_decode_whiten_sample"],
            "build_patches_ray_over_single": p["ray_over_single"], "build_same_fingerprint": float(i["same_fingerprint"] and p["same_fingerprint"])}


def _sources(r: dict) -> dict[str, float]:
    out = {"sources_same_fingerprint": float(r["webdataset"]["same_fingerprint"] and r["parquet"]["same_fingerprint"]),
           "sources_draft_over_exact": r["draft"]["draft_over_exact"], "sources_draft_max_abs_diff": r["draft"]["max_abs_diff"]}
    for kind in ("webdataset", "parquet"):
        out[f"sources_{kind}_ray_per_core_over_pillow"] = r[kind]["ray_per_core_over_pillow"]
        if "ray_over_ray_data" in r[kind]:
            out[f"sources_{kind}_ray_over_ray_data"] = r[kind]["ray_over_ray_data"]
        if "rss" in r:
            for name, figure in (("8x_over_1x", "rss_8x_over_1x"), ("ray_worker_8x_over_1x", "ray_worker_rss_8x_over_1x")):
                if name in r["rss"][kind]:  # the Ray worker's only where --rss-engines ran it
                    out[f"sources_{kind}_{figure}"] = r["rss"][kind][name]
    return out


def _storage(r: dict) -> dict[str, float]:
    return {"storage_warm_over_local": r["s3_warm_over_local"], "storage_cold_over_local": r["s3_cold_read_ahead_0_over_local"],
            "storage_warm_hash_over_local": r["s3_warm_hash_over_local"]}


def _pools(r: dict) -> dict[str, float]:
    sim = r["simulated"]["1_gpu_50x_16_cpu"]
    out = {"pools_sim_gpu50_wall_over_ideal_before": sim["before"]["wall_over_ideal"],
           "pools_sim_gpu50_wall_over_ideal_after": sim["after"]["wall_over_ideal"]}
    if "ray" in r:
        ray = r["ray"]
        out["pools_ray_tail_after_over_before"] = ray["after"]["tail_s"] / ray["before"]["tail_s"] if ray["before"]["tail_s"] else float("nan")
        out["pools_bars_over_no_bars"] = ray["progress"]["bars_over_no_bars"]
    return out


def _reduce(r: dict) -> dict[str, float]:
    s = r["summary"]
    out = {"reduce_all_bit_identical": float(s["all_bit_identical"])}
    if "tree_bytes_within_2_p_vectors" in s:
        out["reduce_tree_bytes_within_2_p_vectors"] = float(s["tree_bytes_within_2_p_vectors"] and s["tree_bytes_constant_in_w"])
    for mode in ("grouped", "tree"):  # at the largest W measured (32 in the full run)
        key = next((k for k in s if k.startswith(f"{mode}_over_server_busy_at_w")), None)
        if key:
            out[f"reduce_{mode}_over_server_busy"] = s[key]
    return out


def _safety(r: dict) -> dict[str, float]:
    return {f"safety_{key}_history_{run['history']}": run[key] for run in r["runs"] for key in ("write_s", "load_s")}


def _encode(r: dict) -> dict[str, float]:
    return {f"encode_{k}": v for k, v in r["ratios"].items()}


def _without_peer(args: list[str]) -> list[str]:
    """minibatch's arguments with its Ray Train peer systems left out."""
    if "--systems" not in args:
        return [*args, "--systems", "batch,batch-onepass,ema,exact"]
    i = args.index("--systems") + 1
    return [*args[:i], ",".join(s for s in args[i].split(",") if not s.startswith("peer")), *args[i + 1:]]


@dataclass(frozen=True)
class Part:
    module: str
    sizes: dict[str, list[str]]  # --size -> the module's arguments
    pick: Callable[[dict], dict[str, float]]  # the report's figures for the suite's table
    out_flag: str = "--out"
    needs: tuple[str, ...] = ()  # modules of an optional extra: without them the part is skipped
    optional: dict[str, tuple[tuple[str, ...], Callable[[list[str]], list[str]]]] | None = None  # piece: (needs, args without it)


PARTS: dict[str, Part] = {
    "minibatch": Part("dist_sae.bench.minibatch", {
        "full": [], "quick": ["--quick"],
        "tiny": ["--rows", "16384", "--batches", "512", "--reps", "1", "--systems", "batch,exact"]},  # the peer's start: a minute
        _minibatch, optional={"peer": (("pandas", "pyarrow", "ray.train"), _without_peer)}),
    "build": Part("dist_sae.bench.build", {
        "full": ["--images", "20000", "--patch-images", "2000", "--repeat", "3"],
        "quick": ["--images", "1000", "--size", "128", "128", "--repeat", "1"],
        "tiny": ["--images", "100", "--size", "64", "64", "--repeat", "1", "--per-image", "4"]}, _build, out_flag="--json"),
    "sources": Part("dist_sae.bench.sources", {
        "full": ["--images", "20000"], "quick": ["--images", "2000", "--size", "128", "128", "--repeat", "1", "--draft-images", "50"],
        "tiny": ["--images", "200", "--size", "64", "64", "--repeat", "1", "--draft-images", "5", "--rss-records", "200",
                 "--rss-engines", "single"]},  # the Ray worker's RSS (4 private Rays more): quick and full
        _sources, out_flag="--json", needs=("pyarrow",)),
    "storage": Part("dist_sae.bench.storage", {
        "full": ["--gb", "2"], "quick": ["--gb", "0.25", "--shard-mb", "32", "--repeat", "2", "--cold-repeat", "1"],
        "tiny": ["--gb", "0.01", "--shard-mb", "4", "--repeat", "1", "--cold-repeat", "1"]},
        _storage, needs=("moto", "flask", "obstore", "boto3")),
    "pools": Part("dist_sae.bench.pools", {"full": ["--repeats", "5"], "quick": ["--repeats", "2"], "tiny": ["--skip-ray"]}, _pools),
    "reduce_scaling": Part("dist_sae.bench.reduce_scaling", {
        "full": [], "quick": ["--workers", "1,2,4,8", "--units", "8", "--nodes", "2", "--reps", "1"],
        "tiny": ["--workers", "1,2", "--units", "4", "--unit-rows", "32", "--hidden", "64", "--nodes", "2", "--reps", "1",
                 "--store-mb", "100"]}, _reduce),
    "safety": Part("dist_sae.bench.safety", {
        "full": [], "quick": ["--history", "10", "--reps", "1"], "tiny": ["--sizes", "64,25,64", "--history", "10", "--reps", "1"]}, _safety),
    "encode": Part("dist_sae.bench.encode", {
        "full": ["--reps", "3"], "quick": ["--rows", "200000", "--factors", "1,4", "--reps", "1"],
        "tiny": ["--rows", "20000", "--factors", "1,2", "--reps", "1"]}, _encode),
}


def missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m.split(".")[0]) is None or importlib.util.find_spec(m) is None]


def run_part(name: str, part: Part, size: str, tmp: Path) -> dict:
    """One part in a child process: {"figures": {...}, "seconds", "args", "report"}, or {"skipped": reason} / {"error": ...}."""
    absent = missing(part.needs)
    if absent:
        return {"skipped": f"needs {', '.join(absent)} (not installed)"}
    args, notes = list(part.sizes[size]), []
    for piece, (needs, replacement) in (part.optional or {}).items():
        absent = missing(needs)
        if absent:
            args, notes = replacement(args), notes + [f"{piece} skipped: needs {', '.join(absent)} (not installed)"]
    out = tmp / f"{name}.json"
    log(f"{name}: python -m {part.module} {' '.join(args)}")
    try:
        _, seconds = run_module(part.module, *args, part.out_flag, out)
        report = json.loads(out.read_text())
        return {"args": args, "seconds": seconds, "figures": part.pick(report), "notes": notes, "report": report}
    except Exception as exc:  # a failed part is reported; the other parts still run
        log(f"{name} failed: {exc}")
        return {"args": args, "error": str(exc)[-3000:], "notes": notes}
