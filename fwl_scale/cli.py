"""`fwl <command>`: the one console entry point."""
from __future__ import annotations

import argparse
import sys

from fwl_scale.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fwl", description="Fast Weight Layer language models at scale")
    sub = parser.add_subparsers(dest="command", required=True)
    # Each area registers its own subcommands; heavy imports happen inside the command functions.
    from fwl_scale.data import cli as data_cli
    from fwl_scale.eval import cli as eval_cli
    from fwl_scale.hf import cli as hf_cli
    from fwl_scale.plan import cli as plan_cli
    from fwl_scale.study import cli as study_cli
    from fwl_scale.train import checkpoint_cli
    from fwl_scale.train import cli as train_cli

    train_cli.register(sub)
    eval_cli.register(sub)
    plan_cli.register_params(sub)
    checkpoint_cli.register(sub)
    hf_cli.register(sub)
    data_cli.register(sub)
    study_cli.register(sub)
    plan_cli.register(sub)
    plan_cli.register_layout(sub)
    plan_cli.register_scaling(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"fwl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
