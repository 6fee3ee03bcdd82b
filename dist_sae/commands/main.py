"""`dist-sae`: a thin command-line shell over the Python API.

Each command group lives in `dist_sae/commands/<name>.py` with `register(subparsers)`; the
handlers parse flags, call the API, and print the command's own output.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from dist_sae.errors import DistSaeError, Terminated
from dist_sae.version import __version__

# Command modules, in the order `--help` lists them.
COMMAND_MODULES = ("train", "data", "report", "encode", "compare", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-sae", description="Distributed, out-of-core sparse autoencoders with the exact dataset-wide KL penalty.")
    parser.add_argument("--version", action="version", version=f"dist-sae {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"dist_sae.commands.{name}").register(sub)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse with KEY=VALUE overrides accepted anywhere, also after flags (`train --local optim.steps=3`).

    argparse fills a trailing `nargs="*"` positional at its first chance, so overrides after an
    option come back unrecognised; those that look like KEY=VALUE join the command's overrides,
    in command-line order. Anything else is the usual usage error.
    """
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None, fast_exit: bool | None = None) -> int:
    """Run one command; its exit status.

    Args:
        argv: the arguments (default: this process's command line).
        fast_exit: end the process with the command's status as soon as the command is done (its
            files closed, its output flushed) instead of returning: the interpreter's teardown of
            torch, torch._dynamo and Ray takes 0.6-0.8 s (measured on a 2-core machine, 7% of the
            notes' exercise), and after SIGTERM it would eat into the grace period before SIGKILL.
            Default: when argv is None (the `dist-sae` command itself).
    """
    code = _run(argv)
    if argv is None if fast_exit is None else fast_exit:
        if "ray" in sys.modules:  # a command that left a private Ray up (data build --ray): atexit would stop it
            from dist_sae.cluster.runtime import stop_local

            stop_local(wait=False)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # every command closes what it wrote (checkpoints are fsynced, sessions closed)
    return code


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except DistSaeError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Terminated as exc:  # SIGTERM: checkpointed; 128 + 15, as a shell reports a process ended by it
        print(str(exc), file=sys.stderr)
        return 143
    except KeyboardInterrupt as exc:  # errors.Interrupted says where it stopped and how to resume
        print(str(exc) or "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
