"""`fwl data ...` subcommands (tokenizer, shards)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="tokenizer and shard preparation")
    data.add_subparsers(dest="data_command", required=True)
