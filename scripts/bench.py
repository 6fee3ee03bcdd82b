#!/usr/bin/env python
"""The performance suite (issue #8), from a source checkout: the same as `dist-sae bench`.

    python scripts/bench.py [--quick | --size full|quick|tiny] [--out bench_out] [--reps 5] [--skip ...] [--float32]

The suite lives in the package (dist_sae/bench/); see dist_sae/bench/suite.py for what it measures.
"""

from dist_sae.bench.suite import main

raise SystemExit(main())
