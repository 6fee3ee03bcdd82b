"""Peak memory of `dist-sae data build` at two data sizes: it should not grow with the data.

Each build runs in a fresh child process, started from a fresh measuring process, which reads the
child's peak RSS with resource.getrusage(RUSAGE_CHILDREN) (so no two measurements share a counter).
Prints one JSON document. Sizes are bytes of stored float32 rows.

    python scripts/bench_build_memory.py --sizes 200MB 2GB --dir /tmp/dsae-bench
    python scripts/bench_build_memory.py --sizes 20MB 200MB --cases synthetic   # quick

Check `df -h` for the --dir first: the npy case needs the input and the dataset on disk at once
(about 2x the largest size); everything is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

DIM = 256  # features per row: 1 KiB rows in float32


def child(case: str, rows: int, work: Path) -> None:
    """Run one build in this process (invoked as a subprocess)."""
    from dist_sae.data import build as prep
    from dist_sae.data.transforms import StepSpec

    options = prep.WriterOptions(shard_bytes="256MB", quiet=True)
    out = work / f"{case}-{rows}"
    if case == "baseline":  # imports only: what the interpreter and libraries cost
        import h5py  # noqa: F401
        return
    if case == "synthetic":
        prep.build_synthetic(out, rows, options, dim=DIM, seed=0)
    elif case == "synthetic+zca":
        prep.build_synthetic(out, rows, options, dim=DIM, seed=0, preprocessing=[StepSpec("zca", 0.1)])
    elif case == "npy":
        prep.build_from_npy(work / f"input-{rows}.npy", out, options)
    else:
        raise SystemExit(f"unknown case {case}")


def make_npy(rows: int, path: Path) -> None:
    """Write a float32 .npy of rows x DIM through a memmap, block by block (not measured)."""
    import numpy as np

    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, DIM))
    rng = np.random.default_rng(0)
    for start in range(0, rows, 65536):
        stop = min(start + 65536, rows)
        x[start:stop] = rng.random((stop - start, DIM), dtype=np.float32)
    x.flush()
    del x


def measure(case: str, rows: int, work: Path) -> None:
    """In a fresh process: run the child build and print its peak RSS and wall time as JSON."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", case, str(rows), str(work)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    print(json.dumps({"rc": proc.returncode, "peak_rss_mib": round(peak_kib / 1024, 1), "wall_s": round(wall, 2), "stderr": proc.stderr[-2000:]}))


def parse_size(text: str) -> int:
    from dist_sae.data.build import parse_size as ps

    return ps(text)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        measure(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["200MB", "2GB"], help="data sizes to build (bytes of float32 rows)")
    ap.add_argument("--cases", nargs="+", default=["synthetic", "npy", "synthetic+zca"], help="synthetic, npy, synthetic+zca")
    ap.add_argument("--dir", default="/tmp/dsae-bench", help="scratch folder (deleted afterwards unless --keep)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        base = json.loads(subprocess.run([sys.executable, __file__, "--measure", "baseline", "0", str(work)], capture_output=True, text=True, check=True).stdout)
        for case in args.cases:
            for size in args.sizes:
                rows = parse_size(size) // (DIM * 4)
                if case == "npy":
                    make_npy(rows, work / f"input-{rows}.npy")
                r = json.loads(subprocess.run([sys.executable, __file__, "--measure", case, str(rows), str(work)], capture_output=True, text=True, check=True).stdout)
                out = work / f"{case}-{rows}"
                disk = sum(p.stat().st_size for p in out.iterdir()) if out.is_dir() else 0
                results.append({"case": case, "size": size, "rows": rows, "dim": DIM, "dataset_bytes": disk, **{k: v for k, v in r.items() if k != "stderr" or r["rc"]}})
                print(json.dumps(results[-1]), file=sys.stderr)
                shutil.rmtree(out, ignore_errors=True)
                (work / f"input-{rows}.npy").unlink(missing_ok=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"host": platform.node(), "python": platform.python_version(), "baseline_import_rss_mib": base["peak_rss_mib"], "results": results}, indent=2))


if __name__ == "__main__":
    main()
