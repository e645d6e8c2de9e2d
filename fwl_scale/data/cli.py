"""`fwl data ...` subcommands.

    fwl data tokenizer [CONFIG] [key=value ...]                 train (or check) the tokenizer of a config
    fwl data tokenizer [CONFIG] [key=value ...] --input F... --out M.model   a standalone tokenizer
    fwl data shards    [CONFIG] [key=value ...]                 tokenizer + train/valid shards (prepare_data)
    fwl data verify    [CONFIG] [key=value ...]                 re-check every shard (sha256, ids, tokenizer) and index.npz

data.train / data.valid may name a prebuilt split's manifest by URL (`https://.../train/manifest.json`,
`"pipe:aws s3 cp s3://bucket/train/manifest.json -"`, see fwl_scale/data/remote.py): `shards` then checks
and summarises it (nothing is built; data.tokenizer names its tokenizer), `verify` reads it all.

CONFIG defaults to the built-in `tiny` settings; overrides use the dotted form of `fwl train`, e.g.
`fwl data shards configs/tiny.yaml data.root=data/mine data.train=[corpus/*.jsonl] model.vocab_size=8192`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fwl_scale.atomic import atomic_write_json
from fwl_scale.config import load_config
from fwl_scale.data.common import DataError
from fwl_scale.data.prepare import ensure_tokenizer, prepare_data
from fwl_scale.data.manifest import MANIFEST, Manifest
from fwl_scale.data.remote import is_url
from fwl_scale.data.shard_index import verify_index
from fwl_scale.data.shards import verify_manifest
from fwl_scale.data.sources import Corpus, ReadStats
from fwl_scale.data.tokenizer import Tokenizer, train_tokenizer


def _config(args: argparse.Namespace):
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).is_file():
        config, overrides = None, [config] + overrides  # `fwl data shards key=value` without a file
    return load_config(config, overrides)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in tiny settings)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=data/x model.vocab_size=8192")


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.input:
        if not args.out:
            raise DataError("fwl data tokenizer: --input needs --out PATH.model")
        out = Path(args.out)
        if out.exists():
            raise DataError(f"--out: {out} already exists; not overwriting it (choose another path)")
        corpus = Corpus(args.input, "--input", cfg.data.text_field, Path(cfg.data.root) / "cache")
        stats = ReadStats()
        texts = (d.text for d in corpus.documents(stats))
        tok = train_tokenizer(texts, out, cfg.model.vocab_size, cfg.data.tokenizer_type,
                              num_threads=cfg.data.workers)
        for file, n in stats.replaced.items():
            print(f"warning: {file}: {n} invalid UTF-8 byte sequences replaced by U+FFFD")
        atomic_write_json(out.with_suffix(".json"), {
            "format": "fwl_scale.tokenizer/1", "checksum": tok.checksum, "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id, "type": cfg.data.tokenizer_type, "inputs": corpus.identity()})
    else:
        if args.out:
            raise DataError("fwl data tokenizer: --out is for --input; without it the tokenizer goes to "
                            "<data.root>/tokenizer (or set data.root)")
        tok = ensure_tokenizer(cfg)
    padded = -(-tok.vocab_size // cfg.model.vocab_multiple) * cfg.model.vocab_multiple
    print(f"tokenizer {tok.path}: {cfg.data.tokenizer_type if args.input or not cfg.data.tokenizer else 'given'}, "
          f"{tok.vocab_size} pieces (model embedding padded to {padded}), document-end id {tok.eos_id}, "
          f"sha256 {tok.checksum}")
    return 0


def _cmd_shards(args: argparse.Namespace) -> int:
    cfg = _config(args)
    paths = prepare_data(cfg)
    print(f"tokenizer {paths.tokenizer} (vocabulary {paths.vocab_size}, sha256 {paths.tokenizer_checksum[:16]})")
    for name, mpath in (("train", paths.train_manifest), ("valid", paths.valid_manifest)):
        if mpath is None:
            print(f"{name}: none (data.valid empty and data.valid_fraction 0)")
            continue
        m = Manifest.load(mpath)
        extra = ""
        if m.replaced_invalid_utf8:
            extra = "; replaced invalid UTF-8: " + ", ".join(f"{f} ({n})" for f, n in m.replaced_invalid_utf8.items())
        print(f"{name}: {len(m.shards)} shards, {m.documents} documents, {m.tokens:,} tokens ({m.dtype}) "
              f"-> {mpath}{extra}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    cfg = _config(args)
    root = Path(cfg.data.root)
    tok_path = Path(cfg.data.tokenizer) if cfg.data.tokenizer else root / "tokenizer" / "spm.model"
    tok = Tokenizer.load(tok_path)
    if any(is_url(x) for x in cfg.data.train + cfg.data.valid):  # prebuilt remote splits
        manifests = [x for x in (cfg.data.train[:1] + cfg.data.valid[:1]) if is_url(x)]
    else:
        manifests = [root / split / MANIFEST for split in ("train", "valid") if (root / split / MANIFEST).is_file()]
    if not manifests:
        raise DataError(f"{root}: no shard manifests (run `fwl data shards` first)")
    for mpath in manifests:
        manifest = Manifest.load(mpath)
        verify_manifest(manifest, tok, cfg.model.vocab_size)
        print(verify_index(manifest))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="tokenizer and shard preparation",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = data.add_subparsers(dest="data_command", required=True)

    p = dsub.add_parser("tokenizer", help="train a sentencepiece tokenizer (BPE/unigram, byte fallback, "
                                          "document-end token)")
    _add_config_args(p)
    p.add_argument("--input", nargs="+", help="text/JSONL/parquet files or globs to train a standalone tokenizer on")
    p.add_argument("--out", help="where the standalone tokenizer model goes (with --input)")
    p.set_defaults(func=_cmd_tokenizer)

    p = dsub.add_parser("shards", help="tokenize the config's corpus into webdataset shards (train + valid)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_shards)

    p = dsub.add_parser("verify", help="check every shard of data.root against its manifest and tokenizer")
    _add_config_args(p)
    p.set_defaults(func=_cmd_verify)
