"""compare: train several configs on the same data and seed, side by side."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("compare", help="train several configs on the same data and seed; table + figure")
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML/JSON config files (two or more)")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--out", required=True, help="folder for the runs, compare.md, compare.json, compare.png")
    p.add_argument("--names", help="comma-separated run names (default: config file stems)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every config (repeatable), e.g. --set optim.steps=100")
    p.add_argument("--local", action="store_true", help="train in this process without Ray")
    p.add_argument("--overwrite", action="store_true", help="replace runs already in --out")
    p.set_defaults(handler=cmd_compare)


def cmd_compare(args) -> int:
    from dist_sae.apps import compare as compare_mod

    overrides = list(args.overrides) + (["workers.engine=local"] if args.local else []) + ["run.quiet=true"]
    result = compare_mod.compare(
        args.configs, args.data, args.out, overrides, args.names.split(",") if args.names else None, args.overwrite
    )
    print(open(result["table"]).read(), end="")
    print(f"figure: {result['figure']}")
    return 0
