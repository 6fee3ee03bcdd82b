#!/usr/bin/env python
"""The SIGTERM checkpoint budget: `python -m dist_sae.bench.safety` (see its --help)."""

from dist_sae.bench.safety import main

if __name__ == "__main__":
    main()
