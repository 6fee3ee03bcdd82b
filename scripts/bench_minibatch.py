#!/usr/bin/env python
"""Minibatch training at scale (issue #21): dist_sae's ρ̂ modes against a Ray Train + Ray Data peer.

    python scripts/bench_minibatch.py [--quick] [--rows 1000000] [--batches 512,4096] [--reps 3] [--out bench_out/minibatch.json]

The benchmark lives in the package: see dist_sae/bench/minibatch.py.
"""

from dist_sae.bench.minibatch import main

raise SystemExit(main())
