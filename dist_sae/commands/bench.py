"""bench: the performance suite (dist_sae.bench.suite) from the CLI: JSON + markdown table of ratios."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from dist_sae.errors import ConfigError


def _suite():
    """dist_sae.bench.suite: part of the package, so `dist-sae bench` works from an installed wheel."""
    try:
        return importlib.import_module("dist_sae.bench.suite")
    except ModuleNotFoundError as exc:
        if exc.name not in ("dist_sae.bench", "dist_sae.bench.suite"):
            raise
        raise ConfigError("this dist_sae has no benchmark suite (dist_sae.bench.suite is missing); reinstall dist_sae") from None


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure dist_sae against its ceilings and a NumPy/SciPy peer; JSON + table")
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions (under 2 minutes)")
    p.add_argument("--size", choices=["full", "quick", "tiny"], help="size preset (default: full, or quick with --quick)")
    p.add_argument("--out", default="bench_out", help="folder for bench.json and bench.md (default bench_out)")
    p.add_argument("--reps", type=int, help="timed repetitions per figure (default: 5 full, 3 quick)")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: compute,ray,scaling,exercise,rss")
    p.add_argument("--float32", action="store_true", help="also train the exercise with compute.dtype=float32")
    p.set_defaults(handler=cmd_bench)


def cmd_bench(args) -> int:
    suite = _suite()
    size = args.size or ("quick" if args.quick else "full")
    report = suite.run_suite(Path(args.out), size, args.reps, {s for s in args.skip.split(",") if s}, args.float32)
    print(Path(args.out, "bench.md").read_text(), end="")
    print(json.dumps(report["ratios"], indent=2))
    print(f"wrote {Path(args.out) / 'bench.json'} in {report['seconds']:.0f}s", file=sys.stderr)
    return 0
