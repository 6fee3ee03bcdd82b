#!/usr/bin/env python
"""Object storage benchmark (JSON): see dist_sae/bench/storage.py.

    python scripts/bench_storage.py --gb 2 --out bench_out/storage.json
"""

import sys

from dist_sae.bench.storage import main

if __name__ == "__main__":
    main(sys.argv[1:])
