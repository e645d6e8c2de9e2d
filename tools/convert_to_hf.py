"""Export a fwl_scale checkpoint (any layout) to a Hugging Face model directory.

    python tools/convert_to_hf.py CHECKPOINT OUT_DIR [--tokenizer spm.model] [--manifest manifest.json]
                                  [--dtype float32|bfloat16] [--max-shard-mb N]
    python tools/convert_to_hf.py import HF_DIR [CONFIG] [key.sub=value ...]

The second form starts a run from an exported model, or from a saved transformers GPT-NeoX, GPT-2 or Llama
body with the FWL added on top (fwl_scale/hf/body_import.py; the config must describe that body: a config
that does not is refused with the overrides it needs): a step-0 checkpoint in the config's train.out_dir with
its weights, which `fwl train CONFIG [same overrides]` then continues. See fwl_scale/hf/convert.py for what OUT_DIR holds. Exit status 2 on bad input (the message names it).
"""
from __future__ import annotations

import argparse
import sys

from fwl_scale.config import ConfigError
from fwl_scale.hf.convert import DEFAULT_MAX_SHARD_MB, export_checkpoint


def import_main(argv: list[str]) -> int:
    from fwl_scale.config import load_config
    from fwl_scale.hf.convert import import_hf

    if not argv:
        print("usage: convert_to_hf.py import HF_DIR [CONFIG] [key.sub=value ...]", file=sys.stderr)
        return 2
    hf_dir, rest = argv[0], argv[1:]
    config = rest[0] if rest and "=" not in rest[0] else None
    try:
        cfg = load_config(config, [a for a in rest if a != config])
        path = import_hf(hf_dir, cfg)
    except ConfigError as e:
        print(f"convert_to_hf: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}: continue with fwl train {config or ''} {' '.join(rest[1:] if config else rest)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["import"]:
        return import_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a run dir, its checkpoints/ dir or a step_* dir (native or universal)")
    p.add_argument("out_dir", help="the model directory to create (must not exist)")
    p.add_argument("--tokenizer", default=None, help="the sentencepiece model (default: from the checkpoint's config)")
    p.add_argument("--manifest", default=None, help="the training shards' manifest.json (default: <data.root>/train)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-shard-mb", type=float, default=DEFAULT_MAX_SHARD_MB,
                   help="weights above this size are split into several files with an index")
    ns = p.parse_args(argv)
    try:
        out = export_checkpoint(ns.checkpoint, ns.out_dir, tokenizer=ns.tokenizer, manifest=ns.manifest,
                                dtype=ns.dtype, max_shard_mb=ns.max_shard_mb)
    except ConfigError as e:
        print(f"convert_to_hf: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: load it with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
