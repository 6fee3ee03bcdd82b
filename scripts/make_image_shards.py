"""Write N JPEGs (random crops, flips and rotations of scikit-image's photographs) as WebDataset tars.

    python scripts/make_image_shards.py OUT --count 20000 --size 256 256 [--parquet]

OUT is a folder or an object-store prefix (s3://bucket/prefix). Tars hold 1,000 records each
(key.cls, key.jpg); --parquet adds the same images as Parquet files under OUT/parquet/. Seeded per
image, so the same command writes the same files.
"""

from __future__ import annotations

import sys

from dist_sae.bench.sources import shards_main

if __name__ == "__main__":
    sys.exit(shards_main(sys.argv[1:]))
