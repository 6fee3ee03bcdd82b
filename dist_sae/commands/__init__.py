"""CLI command groups; each module has `register(subparsers)`."""

import argparse

from dist_sae.config import describe_keys


def add_overrides(parser: argparse.ArgumentParser) -> None:
    """The trailing `key=value` config overrides every config-taking command accepts."""
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. sparsity.beta=3 model.hidden=[25]")


def config_help() -> str:
    """An epilog listing every config key with its default and docstring."""
    lines = ["config keys (set in --config YAML or as KEY=VALUE):"]
    for key, default, doc in describe_keys():
        lines.append(f"  {key} = {default}\n      {doc}")
    return "\n".join(lines)
