"""Benchmark of parallel dataset builds (JSON out): see dist_sae/bench/build.py.

    python scripts/bench_build.py --images 20000 --workers 2 --out bench_build.json
"""

from __future__ import annotations

import sys

from dist_sae.bench.build import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
