"""Derives the parallel layout and global batch of a Slurm job from its allocation, and checks them: the
launchers' entry to `fwl layout` (fwl_scale/plan/allocation.py), runnable from a checkout without installing
fwl_scale.

Called by launchers/common.sh in the batch script, before any training process starts:

    python launchers/plan_layout.py --config configs/fwl_1b.yaml --nodes 4 --tasks-per-node 8 \
        --gpus-per-node 8 --global-batch 256 -- parallel.tp=2 train.steps=100

which is `fwl layout configs/fwl_1b.yaml parallel.tp=2 train.steps=100 --nodes 4 --tasks-per-node 8
--gpus-per-node 8 --global-batch 256`. It prints the overrides that pin the layout, one per line, on stdout
and a human-readable summary on stderr; a layout that cannot fit the allocation gets one clear message
naming the numbers and exit status 2. It never imports torch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The batch script runs from the repository root, but be explicit so the check works from anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fwl_scale.plan.cli import cmd_layout  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--tasks-per-node", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, default=0)
    ap.add_argument("--global-batch", type=int, default=None,
                    help="sequences per optimizer step; omitted: keep the config's grad_accum")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides, as given to `fwl train`")
    return cmd_layout(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
