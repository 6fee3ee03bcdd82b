"""train, evaluate, gradcheck, config."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import importlib

from dist_sae.config import Config, config_from_args
from dist_sae.errors import ConfigError
from dist_sae.commands import add_overrides, config_help

# The command modules import only what parsing needs: the API (torch) is imported by the handler
# that runs, so `train` can start Ray while torch is being imported (see _ray_while_importing).


def register(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("train", help="train a sparse autoencoder", epilog=config_help(), formatter_class=fmt)
    p.add_argument("--config", help="YAML/JSON config file")
    p.add_argument("--data", help="dataset folder (data.path)")
    p.add_argument("--out", help="run directory (run.out)")
    p.add_argument("--init", help="start from these weights (.safetensors with W1, b1, ...)")
    p.add_argument(
        "--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
        help="continue the run in RUN_DIR (or --out) from its newest valid checkpoint; the data and settings come from "
        "its saved config.json unless --config, --data or KEY=VALUE change them",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--allow-change", action="store_true", help="let --resume change the config or the dataset")
    p.add_argument("--address", help="Ray address to join ('auto', HOST:PORT); default: start a local Ray")
    p.add_argument("--local", action="store_true", help="run in this process without Ray (workers.engine=local)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_overrides(p)
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("evaluate", help="exact J, its terms and ∇J of a model over a dataset", epilog=config_help(), formatter_class=fmt)
    p.add_argument("--model", required=True, help="run directory or model.safetensors")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--grad-out", help="write ∇J to this .safetensors file with the model's tensor names")
    p.add_argument("--local", action="store_true", help="run in this process without Ray")
    add_overrides(p)
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser("gradcheck", help="compare ∇J with central differences (float64)", epilog=config_help(), formatter_class=fmt)
    p.add_argument("--config", help="YAML/JSON config file")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--epsilon", type=float, default=1e-4, help="central-difference step (default 1e-4)")
    p.add_argument("--coords", type=int, default=100, help="check this many coordinates, drawn with run.seed (default 100)")
    p.add_argument("--all", action="store_true", help="check every coordinate of θ (two exact evaluations each: minutes on large data)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--init", help="weights to check at (default: the seeded initialisation)")
    add_overrides(p)
    p.set_defaults(handler=cmd_gradcheck)

    p = sub.add_parser("config", help="print the resolved config (defaults + file + overrides)", epilog=config_help(), formatter_class=fmt)
    p.add_argument("--config", help="YAML/JSON config file")
    add_overrides(p)
    p.set_defaults(handler=cmd_config)


def _resume_target(args) -> tuple[str, list[str]]:
    """(run dir, overrides) of `--resume [RUN_DIR]`; `--resume key=value ...` meant a bare --resume."""
    value, overrides = args.resume, list(args.overrides)
    if value and "=" in value and not Path(value).exists():
        overrides.insert(0, value)
        value = ""
    if value and args.out and Path(value) != Path(args.out):
        raise ConfigError(f"--resume {value} and --out {args.out} name different run directories; give one of them")
    run_dir = value or args.out
    if not run_dir:
        raise ConfigError("--resume needs the run directory: --resume RUN_DIR (or --out RUN_DIR)")
    return run_dir, overrides


def _ray_while_importing(cfg: Config, module: str, overwrite: bool) -> bool:
    """For a Ray run: connect to Ray (start a private one) while `module` (torch) is imported on a
    thread (runtime.connect_while). The session then finds this process connected and leaves Ray
    to the caller, who ends it (True) once the command is done.

    Not when api.train is going to refuse the run anyway (no data folder, a run already in --out
    without --overwrite): its one-line error then comes at once, not after Ray has started.
    """
    if cfg.workers.engine != "ray" or not (cfg.data.path and cfg.run.out):  # nothing to run: api.train says why
        return False
    out = Path(cfg.run.out)
    if ("://" not in cfg.data.path and not Path(cfg.data.path).is_dir()) or (
            not overwrite and out.is_dir() and any(out.iterdir())):
        return False
    from dist_sae.cluster import runtime

    state, _ = runtime.connect_while(cfg.workers, lambda: importlib.import_module(module))
    return state in ("started", "joined")


def cmd_train(args) -> int:
    flags = {
        "data.path": args.data,
        "workers.address": args.address,
        "workers.engine": "local" if args.local else None,
        "run.quiet": True if args.quiet else None,
    }
    resume = args.resume is not None
    if resume:
        from dist_sae.train.rundir import resume_config

        run_dir, overrides = _resume_target(args)
        cfg = resume_config(run_dir, args.config, overrides, **flags)
    else:
        cfg = config_from_args(args.config, args.overrides, **flags, **{"run.out": args.out})
    connected = False if resume else _ray_while_importing(cfg, "dist_sae.api", args.overwrite)
    try:
        from dist_sae import api

        result = api.train(cfg, init=args.init, resume=resume, overwrite=args.overwrite, allow_change=args.allow_change,
                           fast_stop=True)  # the process ends right after
    finally:
        if connected:
            from dist_sae.cluster import runtime

            runtime.stop_local(wait=False)
    from dist_sae.sae.model import MODEL_FILE
    from dist_sae.train.rundir import SUMMARY_FILE
    if result.finished:
        print(f"{result.run_dir} is finished at step {result.steps} ({result.finished}); nothing was changed. "
              f"To train further, raise optim.steps: `dist-sae train --resume {result.run_dir} optim.steps=N` with N > {result.steps}")
        return 0
    final = result.final
    if resume:
        resumed = json.loads((result.run_dir / SUMMARY_FILE).read_text()).get("resumed_from", {})
        print(f"resumed from step {resumed.get('step')} (checkpoint written by dist_sae {resumed.get('version')})")
    if "J" not in final:  # a resumed run already at optim.steps (or converged): no step was taken
        print(f"no step to take: the run is at step {result.steps} (raise optim.steps to train further)")
    else:
        print(f"trained {result.steps} steps in {result.seconds:.1f}s (step loop): J={final['J']:.6g}")
    print(f"model: {result.run_dir / MODEL_FILE}")
    return 0


def cmd_evaluate(args) -> int:
    from dist_sae import api

    overrides = list(args.overrides) + (["workers.engine=local"] if args.local else [])
    ev, cfg = api.evaluate(args.model, args.data, overrides)
    result = {
        "J": ev.loss,
        **ev.terms,
        "rho_hat_mean": [float(m.mean()) for m in ev.layer_means],
        "fvu": ev.stats.get("fvu"),
        "examples": ev.rows,
    }
    if args.grad_out:
        from safetensors.torch import save_file
        import torch

        from dist_sae.sae.model import SparseAutoencoder

        layout = SparseAutoencoder.from_config(cfg)
        grads = layout.split(torch.from_numpy(ev.grad))
        save_file({k: v.contiguous() for k, v in grads.items()}, args.grad_out)
        result["grad_out"] = args.grad_out
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"J = {ev.loss:.10g}  (reconstruction {ev.terms['reconstruction']:.6g}, "
              f"weight decay {ev.terms['weight_decay']:.6g}, sparsity {ev.terms['sparsity']:.6g})")
        print(f"mean activation per layer: {', '.join(f'{v:.4g}' for v in result['rho_hat_mean'])}")
        print(f"examples: {ev.rows}")
    return 0


def cmd_gradcheck(args) -> int:
    from dist_sae import api

    cfg = config_from_args(args.config, args.overrides, **{"data.path": args.data})
    result = api.gradcheck(cfg, epsilon=args.epsilon, coords=0 if args.all else max(args.coords, 1), init=args.init, quiet=args.quiet)
    print(f"‖num−ana‖/‖num+ana‖ = {result['relative_error']:.3e} over {result['coords']} of {result['params']} parameters")
    return 0 if result["relative_error"] < 1e-9 else 1


def cmd_config(args) -> int:
    cfg = config_from_args(args.config, args.overrides)
    print(json.dumps(cfg.model_dump(), indent=2))
    return 0
