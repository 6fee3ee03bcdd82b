"""Object storage: examples/s of a 64-25 evaluation from a local S3 server (cold and warm shard cache)
against the same shards on local disk, and the sequential read rates of the S3 client libraries.

A moto S3 server is started on 127.0.0.1 (its own process); the dataset is written locally, uploaded,
then evaluated (exact J and ∇J at the seeded initialisation: pass 1 and pass 2 over every row) from
the local folder, from s3:// with an empty cache (cold: the shards download while the first pass
runs), and from s3:// again with the filled cache (warm, in a new session as a later run would be;
verify=stamp, and verify=hash, which re-hashes every shard once). The server's own read rate
(whole shard objects, sequential GETs) is reported beside the cold figure.

    python -m dist_sae.bench.storage --gb 2 --out bench_out/storage.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dist_sae.api import evaluate_at_init
from dist_sae.data import storage
from dist_sae.data.writer import DatasetWriter

log = logging.getLogger(__name__)
DIM = 64
BUCKET = "dsae-bench"


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """moto's standalone S3 server on a free loopback port (the caller terminates it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=open(folder / "moto.log", "w"))
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the moto server did not start")


def write_shards(out: Path, gb: float, shard_mb: int, seed: int = 0) -> int:
    """≈gb GB of float32 rows in [0.1, 0.9] (64 features) in shards of shard_mb MB; returns the row count."""
    rows = int(gb * 1e9) // (4 * DIM)
    rng = np.random.default_rng(seed)
    with DatasetWriter(out, DIM, shard_rows=shard_mb * 2**20 // (4 * DIM), dtype="float32", chunk_rows=16384) as w:
        for start in range(0, rows, 1 << 20):
            w.write(rng.uniform(0.1, 0.9, size=(min(1 << 20, rows - start), DIM)).astype(np.float32))
    return rows


def evaluate(data: str, cache: Path, verify: str = "stamp", threads: int = 1, read_ahead: int = 1) -> dict:
    """One exact 64-25 evaluation (pass 1 + pass 2), streamed (no block cache): seconds and examples/s."""
    t0 = time.perf_counter()
    ev = evaluate_at_init(data, ["model.hidden=[25]", "workers.engine=local", f"compute.threads={threads}", "data.cache_mb=0",
                                 "data.block_rows=16384", f"data.local_cache={cache}", f"data.local_cache_verify={verify}",
                                 f"data.read_ahead_shards={read_ahead}"])
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 3), "examples_per_s": round(ev.rows / seconds), "J": ev.loss}


def read_rates(url: str, names: list[str], endpoint: str, only: tuple[str, ...] | None = None) -> dict:
    """MB/s of sequential whole-object reads of `names` under `url`, per installed client library (or `only` these)."""
    sizes = storage.listing(url)
    total = sum(sizes[n] for n in names) / 1e6
    _, bucket, prefix = storage.split_url(url)
    readers = {}
    import obstore

    store, _ = storage._store(url)
    readers["obstore"] = lambda n: len(obstore.get(store, f"{prefix}/{n}").bytes())
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        readers["boto3"] = lambda n: len(client.get_object(Bucket=bucket, Key=f"{prefix}/{n}")["Body"].read())
    except ImportError:
        pass
    try:
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=endpoint)

        def s3fs_read(n: str) -> int:
            done = 0
            with fs.open(f"{bucket}/{prefix}/{n}", "rb", block_size=8 * 2**20) as f:
                while chunk := f.read(8 * 2**20):
                    done += len(chunk)
            return done
        readers["s3fs"] = s3fs_read
    except ImportError:
        pass
    try:
        import pyarrow.fs as pafs

        pa = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))

        def pyarrow_read(n: str) -> int:
            with pa.open_input_stream(f"{bucket}/{prefix}/{n}") as f:
                return len(f.read())
        readers["pyarrow.fs"] = pyarrow_read
    except ImportError:
        pass
    rates = {}
    for name, read in readers.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        got = sum(read(n) for n in names)
        assert got == total * 1e6
        rates[name] = round(total / (time.perf_counter() - t0), 1)
    return rates


def compare(local: str, url: str, work: Path, threads: int, repeat: int, cold_repeat: int) -> dict:
    """Cold (read-ahead 0 and 1 shard, alternated `cold_repeat` times, best), then local disk and warm
    cache alternated `repeat` times (best and median)."""
    out: dict = {}
    cold: dict[int, list[dict]] = {0: [], 1: []}
    for r in range(cold_repeat):  # each from an empty cache, alternated
        for ahead in (0, 1):
            shutil.rmtree(work / "cache", ignore_errors=True)
            cold[ahead].append(evaluate(url, work / "cache", threads=threads, read_ahead=ahead))
    for ahead, values in cold.items():
        rates = sorted(v["examples_per_s"] for v in values)
        out[f"s3_cold_read_ahead_{ahead}"] = {"examples_per_s": rates[-1], "runs": values}
    runs: dict[str, list[dict]] = {"local_disk": [], "s3_warm": []}
    for _ in range(repeat):  # alternated: the load of a shared machine drifts
        runs["local_disk"].append(evaluate(local, work / "unused", threads=threads))
        runs["s3_warm"].append(evaluate(url, work / "cache", threads=threads))
    out["s3_warm_hash"] = evaluate(url, work / "cache", "hash", threads=threads)
    for key, values in runs.items():
        rates = sorted(v["examples_per_s"] for v in values)
        out[key] = {"examples_per_s_best": rates[-1], "examples_per_s_median": rates[len(rates) // 2], "runs": values}
    base = out["local_disk"]["examples_per_s_best"]
    out["s3_warm_over_local"] = round(out["s3_warm"]["examples_per_s_best"] / base, 3)
    out["s3_warm_over_local_median"] = round(out["s3_warm"]["examples_per_s_median"] / out["local_disk"]["examples_per_s_median"], 3)
    for key in ("s3_cold_read_ahead_0", "s3_cold_read_ahead_1", "s3_warm_hash"):
        out[f"{key}_over_local"] = round(out[key]["examples_per_s"] / base, 3)
    out["target_warm_over_local"] = 0.95
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=2.0, help="dataset size in GB (the issue asks for >= 2)")
    p.add_argument("--shard-mb", type=int, default=128, help="shard size in MiB")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the evaluation")
    p.add_argument("--repeat", type=int, default=3, help="local-disk and warm-cache evaluations, alternated")
    p.add_argument("--cold-repeat", type=int, default=2, help="cold-cache evaluations per read-ahead setting, alternated")
    p.add_argument("--libs-only", action="store_true", help="only the client libraries' read rates (obstore, boto3, s3fs, pyarrow.fs: those installed), on 4 shards")
    p.add_argument("--out", default=None, help="write the JSON here too")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dsae-bench-storage-"))
    proc, endpoint = start_server(work)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        url = f"s3://{BUCKET}/data"
        local = work / "local"
        t0 = time.perf_counter()
        rows = write_shards(local, args.gb if not args.libs_only else 4 * args.shard_mb * 2**20 / 1e9, args.shard_mb)
        build_s = time.perf_counter() - t0
        nbytes = sum(f.stat().st_size for f in local.glob("*.h5"))
        t0 = time.perf_counter()
        storage.upload_folder(local, url, last="dataset.json")
        upload_s = time.perf_counter() - t0
        shards = sorted(f.name for f in local.glob("*.h5"))
        result: dict = {"bench": "storage", "server": "moto (Python) on 127.0.0.1, same machine", "rows": rows, "dim": DIM,
                        "dtype": "float32", "bytes": nbytes, "shards": len(shards), "shard_mb": args.shard_mb,
                        "write_s": round(build_s, 2), "upload_MBps": round(nbytes / 1e6 / upload_s, 1)}
        if args.libs_only:
            result["read_MBps"] = read_rates(url, shards[:4], endpoint)
        else:  # the server's own rate: every shard, sequential whole-object GETs, by the client the cache uses
            result["server_read_MBps"] = read_rates(url, shards, endpoint, only=("obstore",))["obstore"]
            result.update(compare(str(local), url, work, args.threads, args.repeat, args.cold_repeat))
    finally:
        proc.terminate()
        proc.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
