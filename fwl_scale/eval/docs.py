"""The documents an evaluation reads, always with the checkpoint's own tokenizer, never writing under the
training data root: the checkpoint's validation split (its shards, read only), or any files given with
`--docs` (text, JSONL optionally .xz/.gz/.bz2, parquet with pyarrow), tokenized once into a cache beside
the results. Also the training token counts behind the frequency breakdown.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from fwl_scale.atomic import atomic_write_bytes
from fwl_scale.config import Config
from fwl_scale.data import DataPaths, Manifest, Tokenizer, eval_documents
from fwl_scale.data.common import DataError, fingerprint, read_json
from fwl_scale.data.shards import MANIFEST, read_shard
from fwl_scale.data.sources import Corpus, ReadStats

DOCS_FORMAT = "fwl_scale.eval_docs/1"


def checkpoint_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer the checkpoint's model was trained with: data.tokenizer, or the one under data.root,
    whose checksum must match its record and the training shards' manifest (the data the checkpoint saw)."""
    root = Path(cfg.data.root)
    if cfg.data.tokenizer:
        tok = Tokenizer.load(cfg.data.tokenizer)
    else:
        model_path, meta_path = root / "tokenizer" / "spm.model", root / "tokenizer" / "tokenizer.json"
        if not model_path.is_file():
            raise DataError(f"{model_path}: no tokenizer; the checkpoint's data.root ({root}) was never prepared, "
                            f"or set data.tokenizer to the model file it was trained with")
        tok = Tokenizer.load(model_path)
        if meta_path.is_file():
            recorded = read_json(meta_path, "tokenizer record").get("checksum")
            if recorded != tok.checksum:
                raise DataError(f"{model_path}: checksum {tok.checksum[:16]} differs from {meta_path} "
                                f"({str(recorded)[:16]}); the tokenizer was changed after training")
    train_manifest = root / "train" / MANIFEST
    if train_manifest.is_file():
        m = Manifest.load(train_manifest)
        if m.tokenizer_checksum != tok.checksum:
            raise DataError(f"{tok.path}: tokenizer checksum {tok.checksum[:16]} differs from the one the "
                            f"training data was made with ({m.tokenizer_checksum[:16]}, {train_manifest}): "
                            f"not the checkpoint's tokenizer")
    if tok.vocab_size > cfg.model.vocab_size:
        raise DataError(f"{tok.path}: {tok.vocab_size} pieces, more than the model's vocabulary "
                        f"(model.vocab_size = {cfg.model.vocab_size}): not the checkpoint's tokenizer")
    return tok


def validation_documents(cfg: Config, tok: Tokenizer) -> Iterator[torch.Tensor]:
    """The checkpoint's validation documents (its prepared shards, read only), in manifest order."""
    root = Path(cfg.data.root)
    valid = root / "valid" / MANIFEST
    if not valid.is_file():
        raise DataError(f"{valid}: no validation shards under the checkpoint's data.root; evaluate files with "
                        f"--docs FILE, or prepare the data first (fwl data shards)")
    paths = DataPaths(root=root, tokenizer=Path(tok.path), tokenizer_checksum=tok.checksum,
                      vocab_size=tok.vocab_size, eos_id=tok.eos_id, train_manifest=root / "train" / MANIFEST,
                      valid_manifest=valid)
    return eval_documents(cfg, paths)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_documents(files: list[str], tok: Tokenizer, cache_dir: Path, text_field: str = "text",
                   log=print) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Every document of `files`, tokenized with `tok` and ended with the document-end token as in the
    training shards. Tokenized once into `cache_dir` (keyed by the files' identity and the tokenizer's
    checksum); a file of unknown type, unreadable, without documents or with empty documents is an error
    naming it, raised before anything is written."""
    if not files:
        raise DataError("--docs: no files given")
    for f in files:
        if "=" in Path(f).name and not Path(f).exists():
            raise DataError(f"--docs: no such file {f!r}; put key=value overrides before --docs")
    corpora = [Corpus([f], "--docs", text_field, cache_dir, log) for f in files]
    identity = [c.identity()[0] for c in corpora]
    key = fingerprint({"format": DOCS_FORMAT, "inputs": identity, "tokenizer": tok.checksum,
                       "text_field": text_field})
    cache = cache_dir / f"docs-{key[:20]}.npz"
    info = {"files": [str(Path(f).resolve()) for f in files], "tokenizer_checksum": tok.checksum, "cache": str(cache)}
    if cache.is_file():
        with np.load(cache) as z:
            tokens, offsets, names = z["tokens"], z["offsets"], json.loads(str(z["names"]))
        docs = [torch.from_numpy(tokens[a:b].astype(np.int64)) for a, b in zip(offsets[:-1], offsets[1:])]
        return docs, {**info, "names": names}
    docs, names = [], []
    for corpus, f in zip(corpora, files):
        stats = ReadStats()
        texts = list(corpus.documents(stats))
        if stats.empty:
            raise DataError(f"--docs: {f}: {sum(stats.empty.values())} empty documents (no text but whitespace); "
                            f"remove them")
        for doc in texts:
            ids = tok.encode(doc.text) + [tok.eos_id]
            docs.append(np.asarray(ids, dtype=np.int64))
            names.append(doc.key)
    offsets = np.cumsum([0] + [len(d) for d in docs])
    cache_dir.mkdir(parents=True, exist_ok=True)
    _save_npz(cache, tokens=np.concatenate(docs), offsets=offsets, names=np.asarray(json.dumps(names)))
    return [torch.from_numpy(d) for d in docs], {**info, "names": names}


def training_token_counts(cfg: Config, cache_dir: Path, log=print) -> tuple[np.ndarray, str] | None:
    """How often each token id occurs in the checkpoint's training data, and where the counts came from:
    the training manifest's `token_counts` if it has them, else counted over the training shards once and
    kept in `cache_dir`. None when the training shards are not there."""
    path = Path(cfg.data.root) / "train" / MANIFEST
    if not path.is_file():
        return None
    raw = read_json(path, "shard manifest")
    V = cfg.model.vocab_size
    if isinstance(raw, dict) and isinstance(raw.get("token_counts"), list):
        counts = np.zeros(V, dtype=np.int64)
        given = np.asarray(raw["token_counts"], dtype=np.int64)[:V]
        counts[:given.size] = given
        return counts, f"{path} (token_counts)"
    m = Manifest.load(path)
    key = fingerprint([s.sha256 for s in m.shards] + [V])
    cache = cache_dir / f"train-token-counts-{key[:20]}.npy"
    if cache.is_file():
        return np.load(cache), f"counted over {path}'s {len(m.shards)} shards (cached {cache})"
    log(f"counting the training tokens of {path} ({m.tokens:,} tokens) for the frequency breakdown")
    counts = np.zeros(V, dtype=np.int64)
    for entry in m.shards:
        for doc in read_shard(m, entry, V):
            counts += np.bincount(doc.tokens.astype(np.int64), minlength=V)[:V]
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cache, _npy_bytes(counts))
    return counts, f"counted over {path}'s {len(m.shards)} shards"


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()
