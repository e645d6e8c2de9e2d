"""`fwl hf`: a checkpoint exported to a Hugging Face model directory, and a run started from one.

    fwl hf export CHECKPOINT OUT_DIR [--tokenizer spm.model] [--manifest manifest.json]
                                     [--dtype float32|bfloat16] [--max-shard-mb N]
    fwl hf import HF_DIR [CONFIG] [key.sub=value ...]

`export` takes a checkpoint of any layout (native or universal); see fwl_scale/hf/convert.py for what
OUT_DIR holds. `import` starts a run from an exported model, or from a saved transformers GPT-NeoX, GPT-2 or
Llama body with the FWL added on top (fwl_scale/hf/body_import.py; the config must describe that body: a
config that does not is refused with the overrides it needs): a step-0 checkpoint in the config's
train.out_dir with its weights, which `fwl train CONFIG [same overrides]` then continues.
tools/convert_to_hf.py is the same two commands for users who know that entry. Exit status 2 on bad input
(the message names it).
"""
from __future__ import annotations

import argparse

from fwl_scale.cli_support import split_config_args
from fwl_scale.config import load_config

# The commands import torch, safetensors and transformers inside their functions: `fwl` builds every parser
# at start, and `fwl --help` (or `fwl train`, before its stop handler) should not load them.


def cmd_export(ns: argparse.Namespace) -> int:
    from fwl_scale.hf.convert import export_checkpoint  # heavy: see the note above

    shard = {} if ns.max_shard_mb is None else {"max_shard_mb": ns.max_shard_mb}
    out = export_checkpoint(ns.checkpoint, ns.out_dir, tokenizer=ns.tokenizer, manifest=ns.manifest,
                            dtype=ns.dtype, **shard)
    print(f"wrote {out}: load it with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0


def cmd_import(ns: argparse.Namespace) -> int:
    from fwl_scale.hf.convert import import_hf  # heavy: see the note above

    config, overrides = split_config_args(ns.args, need_config=False)
    path = import_hf(ns.hf_dir, load_config(config, overrides))
    print(f"wrote {path}: continue with fwl train {' '.join(ns.args)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    h = sub.add_parser("hf", help="export a checkpoint to a Hugging Face model directory, or start a run from one",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hsub = h.add_subparsers(dest="hf_command", required=True)
    e = hsub.add_parser("export", help="a Hugging Face model directory (AutoModelForCausalLM, trust_remote_code)")
    e.add_argument("checkpoint", help="a run dir, its checkpoints/ dir or a step_* dir (native or universal)")
    e.add_argument("out_dir", help="the model directory to create (must not exist)")
    e.add_argument("--tokenizer", default=None, help="the sentencepiece model (default: from the checkpoint's config)")
    e.add_argument("--manifest", default=None, help="the training shards' manifest.json (default: <data.root>/train)")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    e.add_argument("--max-shard-mb", type=float, default=None,
                   help="weights above this size are split into several files with an index (default: "
                        "DEFAULT_MAX_SHARD_MB of fwl_scale/hf/convert.py)")
    e.set_defaults(func=cmd_export)
    i = hsub.add_parser("import", help="a step-0 checkpoint from an exported model or a transformers body")
    i.add_argument("hf_dir", help="an exported model, or a saved transformers GPT-NeoX, GPT-2 or Llama")
    i.add_argument("args", nargs="*", metavar="CONFIG_OR_OVERRIDE",
                   help="the run's YAML config (default: the built-in tiny config), then key.sub=value overrides")
    i.set_defaults(func=cmd_import)
