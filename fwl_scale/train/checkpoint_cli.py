"""`fwl ckpt`: a checkpoint of any layout converted into the layout-free one, or its weights consolidated.

    fwl ckpt convert CKPT OUT_RUN_DIR          (layout-free; resume it in any layout with --resume-from)
    fwl ckpt consolidate CKPT OUT.safetensors [--dtype float32|bfloat16]

Both rebuild the training engine that wrote the checkpoint, so the command lives beside the work,
train/checkpoint_convert.py, on the training floor (checkpoint/ itself never imports train/).
"""
from __future__ import annotations

import argparse

# The commands import torch and DeepSpeed inside their functions: `fwl` builds every parser at start, and
# `fwl --help` (or `fwl train`, before its stop handler) should not load them.


def cmd_ckpt_convert(ns: argparse.Namespace) -> int:
    from fwl_scale.train.checkpoint_convert import convert_checkpoint  # heavy: see the note above

    ref = convert_checkpoint(ns.checkpoint, ns.out_dir)
    print(f"converted {ns.checkpoint} (step {ref.step}) into the layout-free checkpoint {ref.path}; "
          f"resume it in any layout with: fwl train CONFIG --resume-from {ns.out_dir}")
    return 0


def cmd_ckpt_consolidate(ns: argparse.Namespace) -> int:
    from fwl_scale.train.checkpoint_convert import consolidate  # heavy: see the note above

    path = consolidate(ns.checkpoint, ns.out_file, dtype=ns.dtype)
    print(f"wrote {path}: the model's weights ({ns.dtype}) under the single-process parameter names")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("ckpt", help="convert a checkpoint to another layout, or consolidate its weights")
    csub = c.add_subparsers(dest="ckpt_command", required=True)
    cv = csub.add_parser("convert", help="a layout-free checkpoint any layout (tp, pp, dp, ZeRO, bf16) resumes from",
                         description="Reads a checkpoint of any layout (starting as many local CPU processes as "
                                     "it was written by, unless run by a launcher with that many) and writes a "
                                     "layout-free checkpoint into a new run directory: full weights and optimizer "
                                     "state, schedule, data position. Resume with fwl train --resume-from OUT_DIR.")
    cv.add_argument("checkpoint", help="a run dir, its checkpoints/ dir or a step_* dir")
    cv.add_argument("out_dir", help="a new run directory for the converted checkpoint")
    cv.set_defaults(func=cmd_ckpt_convert)
    cs = csub.add_parser("consolidate", help="one unsharded safetensors file of the model's weights")
    cs.add_argument("checkpoint", help="a run dir, its checkpoints/ dir or a step_* dir")
    cs.add_argument("out_file", help="the .safetensors file to write")
    cs.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    cs.set_defaults(func=cmd_ckpt_consolidate)
