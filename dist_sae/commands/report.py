"""report, demo."""

from __future__ import annotations

from dist_sae.apps import demo as demo_mod


def register(sub) -> None:
    p = sub.add_parser("report", help="write the pictures and report.html of a trained run")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (model.safetensors, config.json, metrics.jsonl)")
    p.add_argument("--data", help="dataset for reconstructions and ρ̂ (default: the run's data.path)")
    p.add_argument("--samples", type=int, default=20, help="rows shown in the reconstruction picture (default 20)")
    p.add_argument("--no-pass", action="store_true", help="no pass over the data: ρ̂ from the last metrics line, no histogram")
    p.add_argument("--local", action="store_true", help="run the ρ̂ pass in this process without Ray")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser("demo", help="the notes' result: edge detectors from natural-image patches (data, training, report)")
    p.add_argument("--out", default=demo_mod.DEFAULT_OUT, help=f"demo folder (default ./{demo_mod.DEFAULT_OUT}; a previous demo there is replaced)")
    p.add_argument("--digits", action="store_true", help="scikit-learn's 8×8 digits instead of natural-image patches")
    p.add_argument("--patches", type=int, default=10000, help="patches to sample (default 10000)")
    p.add_argument("--steps", type=int, default=400, help="L-BFGS iterations (default 400)")
    p.add_argument("--local", action="store_true", help="train in this process without Ray")
    p.add_argument("--address", help="Ray address to join ('auto', HOST:PORT); default: start a local Ray")
    p.add_argument("--workers", type=int, default=0, help="Ray workers (default: one per CPU)")
    p.add_argument("--seed", type=int, default=0, help="sampling and initialisation seed")
    p.add_argument("--overwrite", action="store_true", help="use a non-empty --out that holds no previous demo")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_demo)


def cmd_report(args) -> int:
    from dist_sae.report.report import write_report

    rep = write_report(args.run_dir, data=args.data, local=args.local, samples=args.samples, exact_rho=not args.no_pass)
    for note in rep.notes:
        print(f"note: {note}")
    print(f"report: {rep.page}")
    if "weights" in rep.images:
        print(f"weights: {rep.images['weights']}")
    return 0


def cmd_demo(args) -> int:
    result = demo_mod.run_demo(
        out=args.out, digits=args.digits, patches=args.patches, steps=args.steps, local=args.local,
        address=args.address, workers=args.workers, overwrite=args.overwrite, quiet=args.quiet, seed=args.seed,
        fast_stop=True,  # the process ends right after
    )
    first, final = result.first, result.final
    s = result.seconds
    print(f"data: {result.data_dir} ({s['data']:.1f}s{'' if args.local else ', Ray starting meanwhile'})")
    setup = "starting the workers, " if not args.local else ""
    print(f"trained {final.get('step')} L-BFGS steps in {s['steps']:.1f}s (step loop; {s['train']:.1f}s with {setup}the report): "
          f"J {first.get('J', float('nan')):.5g} -> {final.get('J', float('nan')):.5g}")
    print(f"mean activation {final.get('rho_hat1_mean', float('nan')):.4g} (target ρ = 0.01), dead units {final.get('dead1')}")
    print(f"report: {result.page}")
    print(f"total {s['total']:.1f}s")
    print(f"weights: {result.weights}")
    return 0
