"""The shard manifest of one split: every shard with its documents, tokens, bytes, sha256 and the
tokenizer checksum. The loader reads nothing that the manifest does not list. A manifest is a local
file or a remote location (see remote.py); its shards are found beside it."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fwl_scale.data.common import DataError, fingerprint, read_json
from fwl_scale.data.remote import MANIFEST, fetch, is_url, sibling

SHARD_FORMAT = "fwl_scale.shards/1"
IDS_EXT = {"uint16": "ids.u16", "uint32": "ids.u32"}
NP_DTYPE = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}

__all__ = ["IDS_EXT", "MANIFEST", "NP_DTYPE", "SHARD_FORMAT", "Manifest", "ShardEntry"]


@dataclass
class ShardEntry:
    name: str
    documents: int
    first_doc: int  # index (within the split) of the shard's first document
    tokens: int
    bytes: int
    sha256: str
    tokenizer_checksum: str


@dataclass
class Manifest:
    path: Path | str  # a local path, or a URL form of remote.py
    split: str
    dtype: str
    vocab_size: int
    tokenizer_checksum: str
    documents: int
    tokens: int
    shards: list[ShardEntry]
    request: dict[str, Any] = field(default_factory=dict)
    replaced_invalid_utf8: dict[str, int] = field(default_factory=dict)
    empty_documents_skipped: dict[str, int] = field(default_factory=dict)

    @property
    def remote(self) -> bool:
        return is_url(self.path)

    def shard_path(self, entry: ShardEntry) -> Path | str:
        return sibling(self.path, entry.name)

    @property
    def dataset_id(self) -> str:
        """Identifies the exact token content (what a loader position refers to)."""
        return fingerprint([[s.name, s.sha256] for s in self.shards])

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        return {"format": SHARD_FORMAT, **d}

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        if is_url(path):
            sibling(path, "")  # the shards must be locatable from it: refused before any request
            raw = fetch(path, f"shard manifest {path}")
            try:
                d = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}: shard manifest is not valid JSON ({e})") from None
        else:
            path = Path(path)
            d = read_json(path, "shard manifest")
        if not isinstance(d, dict) or d.get("format") != SHARD_FORMAT:
            raise DataError(f"{path}: not a {SHARD_FORMAT} manifest (format {d.get('format') if isinstance(d, dict) else None!r})")
        try:
            shards = [ShardEntry(**s) for s in d["shards"]]
            m = cls(path=path, split=d["split"], dtype=d["dtype"], vocab_size=int(d["vocab_size"]),
                    tokenizer_checksum=d["tokenizer_checksum"], documents=int(d["documents"]),
                    tokens=int(d["tokens"]), shards=shards, request=d.get("request", {}),
                    replaced_invalid_utf8=d.get("replaced_invalid_utf8", {}),
                    empty_documents_skipped=d.get("empty_documents_skipped", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: malformed shard manifest ({type(e).__name__}: {e})") from None
        if m.dtype not in NP_DTYPE:
            raise DataError(f"{path}: unknown token dtype {m.dtype!r}")
        if not m.shards:
            raise DataError(f"{path}: lists no shards")
        return m

    def check_files(self) -> None:
        """Cheap check that every listed shard is there with its recorded size (catches truncation).
        Remote shards are not asked one by one (thousands of requests from every rank); a missing or
        changed one is named when it is read."""
        if self.remote:
            return
        for s in self.shards:
            p = Path(self.shard_path(s))
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                raise DataError(f"shard {p}: missing (listed in {self.path})") from None
            if size != s.bytes:
                raise DataError(f"shard {p}: {size} bytes but {self.path} records {s.bytes}: "
                                f"truncated or replaced since it was written")

    def check_tokenizer(self, tokenizer_checksum: str, tokenizer_name: str, vocab_size: int) -> None:
        for s in self.shards:
            if s.tokenizer_checksum != tokenizer_checksum:
                raise DataError(
                    f"shard {self.shard_path(s)}: tokenized with tokenizer {s.tokenizer_checksum[:16]}, but the "
                    f"model's tokenizer {tokenizer_name} is {tokenizer_checksum[:16]}; rebuild the shards "
                    f"(fwl data shards) or use the matching tokenizer")
        if self.vocab_size > vocab_size:
            raise DataError(f"{self.path}: shards use a vocabulary of {self.vocab_size}, larger than the "
                            f"model's model.vocab_size = {vocab_size}")
