"""Benchmark: building from WebDataset tars and Parquet, in one process and on Ray (JSON out).

    python -m dist_sae.bench.sources --images 20000 --size 256 256 --workers 2 --json docs/sources_bench.json

The same N JPEGs (dist_sae.bench.build.make_image_folder) are packed as WebDataset tars (1,000
records of key.jpg + key.cls each) and as Parquet files (1,000 rows each in row groups of 100, the
Hugging Face Image layout: a struct column `image` of {bytes, path}), then built to 32×32 gray:
  (a) `pillow_per_core`: Pillow alone (open, decode, gray, resize, to NumPy) in one process per core,
      --workers processes at once, images/s / workers; `pillow`: the same in one process alone;
  `single` / `ray`: dist_sae's build in one process / as Ray tasks on --workers workers (warm Ray),
      shards written and hashed; both must give the same fingerprint;
  (b) `ray_data`: the Ray Data peer (read_webdataset / read_parquet + map_batches decoding and
      resizing the same way), rows consumed, nothing written (dist_sae.cluster.build).
Targets on 2 cores: ray / workers >= 0.8 x (a), ray >= 1.0 x (b); single >= 0.8 x `pillow`. Also: the tar reader (tarfile
against the webdataset package, members/s, no decoding), `--decode draft` against the exact decode on
1024×1024 JPEGs (rates and pixel difference), and a build process's peak RSS sampled from outside
(/proc) at 1× and 8× the records per tar / Parquet file.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from dist_sae.bench.build import make_image_folder, pillow_rate, timed_build
from dist_sae.bench.rss_tree import run_sampled
from dist_sae.bench.safety import emit
from dist_sae.data.images import decode_image, list_images
from dist_sae.data.parquet import ParquetSource
from dist_sae.data.wds import WebDatasetSource

log = logging.getLogger(__name__)

PER_FILE = 1000  # records per tar and rows per Parquet file
ROW_GROUP = 100  # rows per Parquet row group (the Hugging Face writer's size for image sets)


def pack(files: list[Path], out: Path, per_file: int = PER_FILE, row_group: int = ROW_GROUP) -> tuple[list[str], list[str]]:
    """The files as WebDataset tars (tarfile: key.cls then key.jpg, as TarWriter orders them) and as Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out / "wds").mkdir(parents=True)
    (out / "parquet").mkdir(parents=True)
    tars, parquets = [], []
    for k, start in enumerate(range(0, len(files), per_file)):
        chunk = files[start:start + per_file]
        blobs = [f.read_bytes() for f in chunk]
        tar = out / "wds" / f"train-{k:06d}.tar"
        with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i, data in enumerate(blobs):
                for ext, payload in (("cls", str((start + i) % 10).encode()), ("jpg", data)):
                    info = tarfile.TarInfo(f"{start + i:07d}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
        tars.append(str(tar))
        image = pa.StructArray.from_arrays([pa.array(blobs, pa.binary()), pa.array([None] * len(blobs), pa.string())], ["bytes", "path"])
        path = out / "parquet" / f"train-{k:05d}.parquet"
        pq.write_table(pa.table({"image": image, "label": [(start + i) % 10 for i in range(len(blobs))]}), path, row_group_size=row_group)
        parquets.append(str(path))
    return tars, parquets


def shards_main(argv: list[str] | None = None) -> int:
    """scripts/make_image_shards.py: N seeded JPEGs as WebDataset tars (and Parquet), to a folder or s3://."""
    from dist_sae.data.storage import is_url, join, put_file

    p = argparse.ArgumentParser(prog="make_image_shards.py", description="write N seeded JPEGs as WebDataset tars train-NNNNNN.tar (1,000 records each)")
    p.add_argument("out", help="folder or object-store prefix (s3://bucket/prefix) for the tars")
    p.add_argument("--count", type=int, required=True, help="how many JPEGs")
    p.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"), help="image height and width (default 256 256)")
    p.add_argument("--parquet", action="store_true", help="also write the same images as Parquet (Hugging Face layout) beside them")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dsae-shards-") as tmp:
        files = list_images(make_image_folder(Path(tmp) / "images", args.count, tuple(args.size), args.seed))
        tars, parquets = pack(files, Path(tmp) / "packed")
        written = tars + (parquets if args.parquet else [])
        for path in written:
            sub = "" if path in tars else "parquet/"
            dest = join(args.out, sub + Path(path).name) if is_url(args.out) else Path(args.out) / sub / Path(path).name
            if is_url(args.out):
                put_file(Path(path), str(dest))
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
    print(f"wrote {args.count} JPEGs of {args.size[0]}x{args.size[1]} as {len(tars)} tars{' and Parquet' if args.parquet else ''} to {args.out} in {time.perf_counter() - t:.1f} s")
    return 0


def tar_reader_rates(tars: list[str], repeat: int = 3) -> dict:
    """Members/s of reading every member's bytes, no decoding: dist_sae's reader (dist_sae.data.wds),
    the standard library's tarfile in stream mode, and the webdataset package's iterator (which
    uses tarfile); `repeat` interleaved rounds, the best of each kept."""
    from dist_sae.data.wds import tar_members

    def own(path):
        with open(path, "rb") as fh:
            return [len(read()) for _, _, read in tar_members(fh)]

    def stdlib(path):
        with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tf:
            out = []
            for info in tf:
                tf.members = []  # as webdataset does: tarfile keeps every header otherwise
                if info.isfile():
                    out.append(len(tf.extractfile(info).read()))
            return out

    readers = {"dist_sae": own, "tarfile": stdlib}
    try:
        from webdataset.tariterators import tar_file_iterator

        def package(path):
            with open(path, "rb") as fh:
                return [len(sample["data"]) for sample in tar_file_iterator(fh)]
        readers["webdataset"] = package
    except ImportError as exc:
        log.info("webdataset not measured: %s", exc)
    best: dict[str, float] = {}
    for _ in range(repeat):
        for name, reader in readers.items():
            t = time.perf_counter()
            sizes = [n for path in tars for n in reader(path)]
            best[name] = max(best.get(name, 0.0), len(sizes) / (time.perf_counter() - t))
            nbytes = sum(sizes)
    out = {f"{name}_members_per_s": round(rate, 1) for name, rate in best.items()}
    out["members"], out["mb"] = len(sizes), round(nbytes / 1e6, 1)
    for name in best:
        if name != "dist_sae":
            out[f"dist_sae_over_{name}"] = round(best["dist_sae"] / best[name], 3)
    return out


def _pillow_share(paths: list[str], to: tuple[int, int]) -> int:
    pillow_rate([Path(f) for f in paths], to)
    return len(paths)


def pillow_per_core_rate(files: list[Path], to: tuple[int, int], workers: int, pool) -> float:
    """(a) per core: Pillow alone in `workers` processes at once (one per core, each a contiguous
    share of the files), images/s of the whole divided by `workers`: the ceiling a build on those
    cores compares with, under the same load from the machine's other processes."""
    shares = [[str(f) for f in files[k::workers]] for k in range(workers)]
    t = time.perf_counter()
    done = sum(pool.map(_pillow_share, shares, [to] * workers))
    return done / (time.perf_counter() - t) / workers


def draft_case(folder: Path, count: int, to: tuple[int, int]) -> dict:
    """`--decode draft` against the exact decode on `count` 1024×1024 JPEGs: images/s of each, pixel difference."""
    if not folder.is_dir() or len(list_images(folder)) < count:
        make_image_folder(folder, count, (1024, 1024), seed=7)
    blobs = [f.read_bytes() for f in list_images(folder)]
    rates, rows = {}, {}
    for name, draft in (("exact", False), ("draft", True), ("exact_again", False), ("draft_again", True)):
        t = time.perf_counter()
        rows[name.split("_")[0]] = np.stack([decode_image(b, "gray", to, draft=draft) for b in blobs])
        rates[name] = len(blobs) / (time.perf_counter() - t)
    exact, draft = max(rates["exact"], rates["exact_again"]), max(rates["draft"], rates["draft_again"])
    diff = np.abs(rows["exact"] - rows["draft"])
    return {"images": len(blobs), "size": [1024, 1024], "to": list(to), "exact_per_s": round(exact, 1), "draft_per_s": round(draft, 1),
            "draft_over_exact": round(draft / exact, 3), "max_abs_diff": round(float(diff.max()), 4), "mean_abs_diff": round(float(diff.mean()), 5),
            "rmse": round(float(np.sqrt((diff ** 2).mean())), 5), "scale": "pixels in [0, 1]"}


def rss_case(files: list[Path], work: Path, records: int, to: tuple[int, int], engines: tuple[str, ...] = ("single", "ray")) -> dict:
    """Peak RSS (sampled from outside) of `dist-sae data build` on 1 tar / Parquet file of `records`
    records against 1 of 8x as many (the 8x input built from the same images, repeated): of the
    build in one process ("single"), and of the Ray worker that builds the shard with `--ray
    --workers 1` ("ray": a private Ray; the worker is the process titled ray::range_task)."""
    out: dict = {}
    for factor in (1, 8):
        chosen = [files[i % len(files)] for i in range(records * factor)]
        tars, parquets = pack(chosen, work / f"rss{factor}", per_file=len(chosen))
        for kind, path in (("webdataset", tars[0]), ("parquet", parquets[0])):
            cmd = [sys.executable, "-m", "dist_sae", "data", "build", "--from", kind, path, "--size", *map(str, to),
                   "--block-rows", "256", "--out", str(work / f"rss-{kind}-{factor}"), "-q"]  # both sizes many blocks
            got = {"records": len(chosen), "input_mb": round(os.path.getsize(path) / 1e6, 1)}
            if "single" in engines:
                run = run_sampled(cmd, 0.02)
                got.update(peak_rss_mb=round(run["largest_peak_mb"], 1), seconds=round(run["seconds"], 2))
            if "ray" in engines:
                cmd[cmd.index("--out") + 1] += "-ray"
                run = run_sampled([*cmd, "--ray", "--workers", "1"], 0.02, workers=r"ray::range_task")
                got.update(ray_worker_peak_rss_mb=round(run["worker_peak_mb"], 1), ray_seconds=round(run["seconds"], 2))
            out.setdefault(kind, {})[f"{factor}x"] = got
    for kind in ("webdataset", "parquet"):
        for key, name in (("peak_rss_mb", "8x_over_1x"), ("ray_worker_peak_rss_mb", "ray_worker_8x_over_1x")):
            if key in out[kind]["1x"]:
                out[kind][name] = round(out[kind]["8x"][key] / out[kind]["1x"][key], 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="bench_sources", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=20000, help="JPEGs (default 20000)")
    p.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"), help="their size (default 256 256)")
    p.add_argument("--to", type=int, nargs=2, default=[32, 32], metavar=("H", "W"), help="built to this size, gray (default 32 32)")
    p.add_argument("--workers", type=int, default=2, help="Ray workers (default 2)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of every measurement; the best rate of each is kept")
    p.add_argument("--draft-images", type=int, default=200, help="1024x1024 JPEGs for the draft case")
    p.add_argument("--rss-records", type=int, default=1000, help="records per tar / Parquet file at 1x in the RSS case (0: skip)")
    p.add_argument("--rss-engines", default="single,ray", help="the RSS case's builds: single (one process), ray (a Ray worker)")
    p.add_argument("--rss-only", action="store_true", help="only the RSS case (single process and a Ray worker)")
    p.add_argument("--dir", help="work folder (kept: the inputs are made once and reused; default a temporary one, removed)")
    p.add_argument("--json", help="write the JSON here too")
    args = p.parse_args(argv)

    from dist_sae.cluster.build import ray_data_records_rate, ray_runner
    from dist_sae.cluster.runtime import connect, stop_local
    from dist_sae.config import WorkersConfig

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="dsae-bench-sources-"))
    size, to = tuple(args.size), tuple(args.to)
    folder = work / f"images-{args.images}-{size[0]}x{size[1]}"
    packed = work / f"packed-{args.images}-{size[0]}x{size[1]}"
    t = time.perf_counter()
    if not folder.is_dir() or len(list_images(folder)) < args.images:
        shutil.rmtree(folder, ignore_errors=True)
        make_image_folder(folder, args.images, size)
    files = list_images(folder)[: args.images]
    if args.rss_only:
        scratch = Path(tempfile.mkdtemp(prefix="dsae-bench-sources-out-"))
        try:
            rss = rss_case(files, scratch, args.rss_records, to, tuple(args.rss_engines.split(",")))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            if not args.dir:
                shutil.rmtree(work, ignore_errors=True)
        return emit({"images": len(files), "size": list(size), "to": list(to), "rss": rss}, args.json)
    if not packed.is_dir():
        pack(files, packed)
    tars = sorted(str(p) for p in (packed / "wds").glob("*.tar"))
    parquets = sorted(str(p) for p in (packed / "parquet").glob("*.parquet"))
    result: dict = {"images": len(files), "size": list(size), "to": list(to), "workers": args.workers, "cpus": os.cpu_count(),
                    "tars": len(tars), "parquet_files": len(parquets), "row_group": ROW_GROUP, "inputs_s": round(time.perf_counter() - t, 1),
                    "input_mb": {"webdataset": round(sum(map(os.path.getsize, tars)) / 1e6, 1), "parquet": round(sum(map(os.path.getsize, parquets)) / 1e6, 1)},
                    "loadavg_start": os.getloadavg()}
    started = None
    scratch = Path(tempfile.mkdtemp(prefix="dsae-bench-sources-out-"))
    try:
        os.environ.setdefault("RAY_worker_niceness", "0")  # as dist_sae.bench.build: equal priority with the single process
        started = connect(WorkersConfig(), dashboard=False, num_cpus=args.workers)
        runner = ray_runner(workers=args.workers)
        timed_build(WebDatasetSource(tars[0], size=to), scratch / "warm", runner)  # workers' imports, as a session has them
        timed_build(ParquetSource(parquets[0], size=to), scratch / "warm-parquet", runner)
        sources = {"webdataset": (lambda: WebDatasetSource(str(packed / "wds"), size=to), tars),
                   "parquet": (lambda: ParquetSource(str(packed / "parquet"), size=to), parquets)}
        n = len(files)

        def round_():
            """One round: Pillow, then each kind's single, Ray and Ray Data runs, back to back, so
            that load from other processes falls on all of them alike."""
            rates, same = {"pillow": pillow_rate(files, to), "pillow_per_core": pillow_per_core_rate(files, to, args.workers, pool)}, {}
            for kind, (make, paths) in sources.items():
                single_s, single_cpu, single_fp = timed_build(make(), scratch / f"{kind}-single")
                ray_s, ray_cpu, ray_fp = timed_build(make(), scratch / f"{kind}-ray", runner)
                peer = ray_data_records_rate(kind, paths, to, args.workers)
                rates.update({f"{kind}_single": n / single_s, f"{kind}_ray": n / ray_s, f"{kind}_single_per_cpu_s": n / single_cpu,
                              f"{kind}_ray_per_cpu_s": n / ray_cpu})  # per CPU second of the process tree, Ray's idle processes included
                if isinstance(peer, float):
                    rates[f"{kind}_ray_data"] = peer
                else:
                    result[f"{kind}_ray_data_note"] = peer
                same[kind] = single_fp == ray_fp
            return rates, same

        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: this process holds a Ray connection
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_pillow_share, [[str(files[0])]] * args.workers, [to] * args.workers))  # start and import first
            runs = [round_() for _ in range(args.repeat)]
        best = {k: max(r[0][k] for r in runs) for k in runs[0][0]}  # the least disturbed run of each
        result["runs"] = [{k: round(v, 1) for k, v in r[0].items()} for r in runs]
        for kind in sources:
            got = {"pillow": best["pillow"], "pillow_per_core": best["pillow_per_core"], **{k[len(kind) + 1:]: v for k, v in best.items() if k.startswith(kind + "_")}}
            got = {k: round(v, 1) for k, v in got.items()}
            got.update(single_over_pillow=round(got["single"] / got["pillow"], 3), ray_over_single=round(got["ray"] / got["single"], 3),
                       ray_per_core_over_pillow=round(got["ray"] / args.workers / got["pillow_per_core"], 3),
                       ray_cpu_efficiency=round(got["ray_per_cpu_s"] / got["single_per_cpu_s"], 3),
                       same_fingerprint=all(r[1][kind] for r in runs))
            if "ray_data" in got:
                got["ray_over_ray_data"] = round(got["ray"] / got["ray_data"], 3)
            result[kind] = got
        result["tar_reader"] = tar_reader_rates(tars)
        result["draft"] = draft_case(work / f"draft-{args.draft_images}", args.draft_images, to)
        if args.rss_records:
            result["rss"] = rss_case(files, scratch, args.rss_records, to, tuple(args.rss_engines.split(",")))
    finally:
        if started == "started":
            stop_local()
        shutil.rmtree(scratch, ignore_errors=True)
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    result["loadavg_end"] = os.getloadavg()
    return emit(result, args.json)


if __name__ == "__main__":
    main()
