"""Ray start-up alone: a fresh process imports dist_sae, starts a local Ray with its workers, shuts down.

    python -m dist_sae.bench.ray_startup DATASET

The 64-25-64 model's default workers on DATASET. Prints one JSON line: import_s, startup_s (until
every worker is ready), shutdown_s and workers.
"""

from __future__ import annotations

import sys
import time


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    from dist_sae.bench.child import print_json
    from dist_sae.cluster.ray_session import ClusterSession
    from dist_sae.config import load_config
    from dist_sae.data.dataset import Dataset
    from dist_sae.train.inputs import bind_dataset

    (data,) = argv or sys.argv[1:]
    t1 = time.perf_counter()
    ds = Dataset.open(data)
    cfg = bind_dataset(load_config(None, ["model.hidden=[25]", "run.quiet=true"]), ds)
    session = ClusterSession(cfg, ds)
    t2 = time.perf_counter()
    session.close()
    t3 = time.perf_counter()
    print_json({"import_s": t1 - t0, "startup_s": t2 - t1, "shutdown_s": t3 - t2, "workers": len(session.worker_info)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
