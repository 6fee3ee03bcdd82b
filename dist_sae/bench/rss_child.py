"""One exact evaluation (J, ∇J) in a fresh process, and that process's peak RSS.

    python -m dist_sae.bench.rss_child DATASET CACHE_MB

The 64-25-64 model at its seeded initialisation, single-process engine, 1 torch thread,
data.block_rows=16384, data.cache_mb=CACHE_MB. Prints one JSON line: rows, J, seconds,
peak_rss_mb (VmHWM) and ru_maxrss_mb.
"""

from __future__ import annotations

import resource
import sys
import time

from dist_sae.api import evaluate_at_init
from dist_sae.bench.child import print_json


def peak_rss_mb() -> float:
    """VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child would report its
    parent's peak (the benchmark driver's) whenever that is the larger."""
    with open("/proc/self/status") as status:
        hwm_kb = int(next(line for line in status if line.startswith("VmHWM:")).split()[1])
    return hwm_kb / 1024


def main(argv: list[str] | None = None) -> int:
    data, cache_mb = argv or sys.argv[1:]
    t0 = time.perf_counter()
    ev = evaluate_at_init(data, ["model.hidden=[25]", "workers.engine=local", "compute.threads=1", "data.block_rows=16384",
                                 f"data.cache_mb={int(cache_mb)}"])
    print_json({"rows": ev.rows, "J": ev.loss, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
                "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
