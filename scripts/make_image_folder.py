"""Write a folder of N JPEGs (random crops, flips and rotations of scikit-image's photographs).

    python scripts/make_image_folder.py OUT --count 20000 --size 256 256

Seeded per image (file i from default_rng([seed, i])), so the same command writes the same files.
"""

from __future__ import annotations

import sys

from dist_sae.bench.build import image_folder_main

if __name__ == "__main__":
    sys.exit(image_folder_main(sys.argv[1:]))
