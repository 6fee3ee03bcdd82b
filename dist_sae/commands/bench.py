"""bench: the performance suite (scripts/bench.py) from the CLI: JSON + markdown table of ratios."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from ..errors import ConfigError

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench.py"


def _suite():
    """scripts/bench.py as a module (it lives beside the package in a source checkout)."""
    if not SCRIPT.is_file():
        raise ConfigError(f"the benchmark suite {SCRIPT} is not here: `dist-sae bench` runs from a source checkout of dist_sae")
    spec = importlib.util.spec_from_file_location("dist_sae_bench_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
