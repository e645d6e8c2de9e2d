"""Export a fwl_scale checkpoint (any layout) to a Hugging Face model directory, or start a run from one.

    python tools/convert_to_hf.py CHECKPOINT OUT_DIR [--tokenizer spm.model] [--manifest manifest.json]
                                  [--dtype float32|bfloat16] [--max-shard-mb N]
    python tools/convert_to_hf.py import HF_DIR [CONFIG] [key.sub=value ...]

The entry users know for `fwl hf export` and `fwl hf import` (fwl_scale/hf/cli.py, which documents both);
the arguments and the exit status are theirs.
"""
from __future__ import annotations

import sys

from fwl_scale.cli import main as fwl_main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = ["import", *argv[1:]] if argv[:1] == ["import"] else ["export", *argv]
    return fwl_main(["hf", *command])


if __name__ == "__main__":
    sys.exit(main())
