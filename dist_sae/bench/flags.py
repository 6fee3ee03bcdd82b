"""The suite's sizes, parts and flags: what `dist-sae bench` parses, without importing the suite (torch)."""

from __future__ import annotations

import argparse

from dist_sae.bench.parts import PARTS as CHILD_PARTS

SIZES = {
    # rows of the streamed/in-memory comparison per model, rows for Ray (>= 1e6 in the full run),
    # exercise iterations, RSS base rows (x16 and x64), Ray scaling rows (784-1024); the
    # demo samples its default 10,000 patches unless demo_patches says otherwise
    "full": {"rows_64": 200_000, "rows_784": 8192, "rows_ray": 1_000_000, "steps": 400, "rss_rows": 50_000,
             "scale_rows": 8192, "scale_workers": [1, 2, 4], "reps": 5, "exercise_reps": 3},
    "quick": {"rows_64": 20_000, "rows_784": 1024, "rows_ray": 100_000, "steps": 40, "rss_rows": 4096,
              "scale_rows": 2048, "scale_workers": [1, 2], "reps": 3, "exercise_reps": 1},
    "tiny": {"rows_64": 2048, "rows_784": 256, "rows_ray": 4096, "steps": 3, "rss_rows": 1024,
             "scale_rows": 2048, "scale_workers": [1, 2], "reps": 1, "exercise_reps": 1, "demo_patches": 2000},
}
PARTS = ("compute", "gemm", "ray", "scaling", "exercise", "rss", *CHILD_PARTS)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The suite's flags, on `parser` (`dist-sae bench` adds them to its subcommand)."""
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions: checks the suite, not for quoting")
    parser.add_argument("--size", choices=sorted(SIZES), help="size preset (default: full, or quick with --quick)")
    parser.add_argument("--out", default="bench_out", help="folder for bench.json and bench.md (default bench_out)")
    parser.add_argument("--reps", type=int, help="timed repetitions per figure (default: 5 full, 3 quick)")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: " + ",".join(PARTS))
    parser.add_argument("--float32", action="store_true", help="also train the exercise on Ray with compute.dtype=float32 (--local float32 always runs)")
    return parser
