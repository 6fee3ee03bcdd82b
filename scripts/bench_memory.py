#!/usr/bin/env python
"""Peak RSS from outside the process tree at 1x/16x/64x rows: `python -m dist_sae.bench.rss_tree` (see --help)."""

from dist_sae.bench.rss_tree import main

if __name__ == "__main__":
    main()
