"""bench: the performance suite (dist_sae.bench) from the CLI: JSON + markdown table of ratios."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dist_sae.bench import flags


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure dist_sae against its ceilings and a NumPy/SciPy peer; JSON + table")
    flags.add_arguments(p)  # --quick, --size full|quick|tiny, --out, --reps, --skip, --float32
    p.set_defaults(handler=cmd_bench)


def cmd_bench(args) -> int:
    from dist_sae.bench import suite

    report = suite.run_from_args(args)
    print(Path(args.out, "bench.md").read_text(), end="")
    print(json.dumps(report["ratios"], indent=2))
    print(f"wrote {Path(args.out) / 'bench.json'} in {report['seconds']:.0f}s", file=sys.stderr)
    return 0
