"""Tokenized webdataset shards: writing (parallel tokenization, resumable) and the full check of a split.

Layout of one split directory (e.g. `<data.root>/train/`):

    shard-000000.tar    webdataset tar: one sample per document, key = the document's index in the split,
                        `ids.u16` (or `ids.u32`: little-endian token ids, the document-end token last)
                        and `json` ({"doc", "id", "source", "tokens"})
    shard-000000.json   sidecar, written after the tar is complete (sha256, sizes, what it was built from)
    manifest.json       written last: every shard with its documents, tokens, bytes, sha256 and the
                        tokenizer checksum (manifest.py); the loader reads nothing it does not list
    index.npz           where each document lies, and block checksums (shard_index.py; by prepare_data)

A shard is written under a temporary name, fsynced and renamed; its sidecar follows. An interrupted run
therefore leaves at most a `.tmp` file (removed on the next run) or a tar without sidecar (rewritten):
nothing that looks complete. A re-run keeps every shard whose sidecar and checksum agree and tokenizes
only the documents after them. A build that finds a finished manifest made from other inputs stops with
an error instead of overwriting it.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from fwl_scale.atomic import atomic_write_json, commit, temp_path
from fwl_scale.data.common import DataError, read_json, sha256_file
from fwl_scale.data.manifest import IDS_EXT, MANIFEST, NP_DTYPE, SHARD_FORMAT, Manifest, ShardEntry
from fwl_scale.data.shard_read import TAR_BLOCK, read_shard
from fwl_scale.data.sources import Document, ReadStats
from fwl_scale.data.tokenizer import Tokenizer, token_dtype
from fwl_scale.signal_points import signal_point

Log = Callable[[str], None]


_WORKER_TOKENIZER: Tokenizer | None = None


def _worker_init(model_path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer.load(model_path)


def _encode_job(texts: list[str]) -> list[bytes]:
    tok = _WORKER_TOKENIZER
    assert tok is not None
    dtype = NP_DTYPE[token_dtype(tok.vocab_size)]
    out = []
    for ids in tok.encode_batch(texts):
        arr = np.empty(len(ids) + 1, dtype=dtype)
        arr[:-1] = ids
        arr[-1] = tok.eos_id
        out.append(arr.tobytes())
    return out


def _tar_member_bytes(n: int) -> int:
    return TAR_BLOCK + (n + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK


class _HashingFile:
    """A write-only file wrapper that hashes and counts what passes through (tarfile stream mode only
    calls write)."""

    def __init__(self, path: Path):
        self.f = open(path, "wb")
        self.h = hashlib.sha256()
        self.n = 0

    def write(self, b: bytes) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)

    def close_synced(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def _sidecar(out_dir: Path, i: int) -> Path:
    return out_dir / f"shard-{i:06d}.json"


def _finished_prefix(out_dir: Path, request: dict[str, Any], log: Log) -> list[ShardEntry]:
    """The shards an earlier (interrupted) run of the same build completed: a sidecar that matches the
    request and a tar whose size and sha256 match it, counted from shard 0 until the first gap."""
    done: list[ShardEntry] = []
    next_doc = 0
    while True:
        side = _sidecar(out_dir, len(done))
        if not side.is_file():
            break
        d = read_json(side, "shard sidecar")
        if d.get("request") != request:
            raise DataError(f"{side}: belongs to a shard build from other inputs or settings; refusing to mix "
                            f"them. Use another data.root or remove {out_dir}")
        entry = ShardEntry(**d["shard"])
        tar = out_dir / entry.name
        if (entry.first_doc != next_doc or not tar.is_file() or tar.stat().st_size != entry.bytes
                or sha256_file(tar) != entry.sha256):
            log(f"{tar}: incomplete or damaged, rewriting it and the shards after it")
            break
        done.append(entry)
        next_doc += entry.documents
    return done


def build_shards(docs: Iterable[Document], out_dir: str | Path, split: str, tokenizer: Tokenizer,
                 shard_bytes: int, workers: int, request: dict[str, Any], stats: ReadStats | None = None,
                 log: Log = print) -> Manifest:
    """Tokenizes `docs` (in order) into webdataset shards under `out_dir` and writes the manifest.

    `request` describes what the build is made from (inputs, tokenizer, settings); it is stored in every
    sidecar and the manifest, and decides whether existing files may be reused. Idempotent: a finished
    build with the same request returns at once; an interrupted one continues after its last complete
    shard. The order of documents, and so every shard, does not depend on `workers`."""
    out_dir = Path(out_dir)
    request = {**request, "tokenizer_checksum": tokenizer.checksum, "shard_bytes": shard_bytes,
               "format": SHARD_FORMAT}
    manifest_path = out_dir / MANIFEST
    if manifest_path.is_file():
        m = Manifest.load(manifest_path)
        if m.request != request:
            differ = sorted(k for k in set(m.request) | set(request) if m.request.get(k) != request.get(k))
            raise DataError(f"{manifest_path}: already holds shards built from other inputs or settings "
                            f"(differs in: {', '.join(differ)}); nothing was changed. Use another data.root "
                            f"or remove {out_dir}")
        m.check_files()
        return m
    out_dir.mkdir(parents=True, exist_ok=True)
    for tmp in out_dir.glob("*shard-*.tar.tmp*"):  # left by an interrupted run of ours
        tmp.unlink()
    done = _finished_prefix(out_dir, request, log)
    skip_docs = sum(e.documents for e in done)
    if done:
        log(f"{split}: keeping {len(done)} finished shards ({skip_docs} documents) from an earlier run")

    dtype_name = token_dtype(tokenizer.vocab_size)
    ids_ext = IDS_EXT[dtype_name]
    entries = list(done)
    writer = None
    cur: dict[str, Any] = {}
    t0 = time.time()

    def open_shard() -> None:
        nonlocal writer
        import webdataset as wds  # heavy: only writers and readers need it
        i = len(entries)
        tmp = temp_path(out_dir / shard_name(i))
        hf = _HashingFile(tmp)
        # An integer mtime keeps the members plain ustar (a float one adds a PAX header to each).
        writer = wds.TarWriter(hf, encoder=False, mtime=0, user="fwl", group="fwl")
        cur.update(i=i, tmp=tmp, hf=hf, docs=0, tokens=0, est=2 * TAR_BLOCK, first=None)

    def close_shard() -> None:
        nonlocal writer
        assert writer is not None
        writer.close()
        hf: _HashingFile = cur["hf"]
        hf.close_synced()
        entry = ShardEntry(name=shard_name(cur["i"]), documents=cur["docs"], first_doc=cur["first"],
                           tokens=cur["tokens"], bytes=hf.n, sha256=hf.h.hexdigest(),
                           tokenizer_checksum=tokenizer.checksum)
        commit(cur["tmp"], out_dir / entry.name)
        signal_point("shard_tar")
        # The sidecar is what marks the shard complete; it is written only after the tar is in place.
        atomic_write_json(_sidecar(out_dir, cur["i"]), {"format": SHARD_FORMAT, "request": request,
                                                         "shard": asdict(entry)})
        entries.append(entry)
        writer = None
        log(f"{split}: {entry.name}: {entry.documents} documents, {entry.tokens:,} tokens, "
            f"{entry.bytes / 2**20:.1f} MiB ({time.time() - t0:.0f}s)")

    def add(doc_index: int, doc: Document, ids_bytes: bytes) -> None:
        n_tokens = len(ids_bytes) // NP_DTYPE[dtype_name].itemsize
        meta = json.dumps({"doc": doc_index, "id": doc.key, "source": doc.source, "tokens": n_tokens}).encode()
        size = _tar_member_bytes(len(ids_bytes)) + _tar_member_bytes(len(meta))
        if writer is not None and cur["docs"] > 0 and cur["est"] + size > shard_bytes:
            close_shard()
        if writer is None:
            open_shard()
        writer.write({"__key__": f"{doc_index:010d}", ids_ext: ids_bytes, "json": meta})
        if cur["first"] is None:
            cur["first"] = doc_index
        cur["docs"] += 1
        cur["tokens"] += n_tokens
        cur["est"] += size

    def jobs() -> Iterator[list[tuple[int, Document]]]:
        """Batches of documents for the tokenizer workers (about 1 MB of text each), skipping the
        documents already in finished shards."""
        batch: list[tuple[int, Document]] = []
        chars = 0
        for i, doc in enumerate(docs):
            if i < skip_docs:
                continue
            batch.append((i, doc))
            chars += len(doc.text)
            if chars >= 1 << 20 or len(batch) >= 256:
                yield batch
                batch, chars = [], 0
        if batch:
            yield batch

    n_seen = skip_docs
    if workers <= 1 or tokenizer.path is None:
        global _WORKER_TOKENIZER
        _WORKER_TOKENIZER = tokenizer
        for batch in jobs():
            for (i, doc), ids in zip(batch, _encode_job([d.text for _, d in batch])):
                add(i, doc, ids)
                n_seen = i + 1
    else:
        # Ordered results with a bounded number of batches in flight: memory stays flat however large
        # the corpus is, and the output is the same as with one worker.
        ctx = mp.get_context("spawn")  # no fork of a process that may hold threads (torch, tokenizers)
        with ctx.Pool(workers, initializer=_worker_init, initargs=(str(tokenizer.path),)) as pool:
            pending: deque = deque()
            for batch in jobs():
                pending.append((batch, pool.apply_async(_encode_job, ([d.text for _, d in batch],))))
                while len(pending) > 2 * workers:
                    b, res = pending.popleft()
                    for (i, doc), ids in zip(b, res.get()):
                        add(i, doc, ids)
                        n_seen = i + 1
            while pending:
                b, res = pending.popleft()
                for (i, doc), ids in zip(b, res.get()):
                    add(i, doc, ids)
                    n_seen = i + 1
    if writer is not None:
        close_shard()
    if not entries:
        raise DataError(f"{split}: no documents to write")
    if n_seen < skip_docs:
        raise DataError(f"{out_dir}: the inputs now hold {n_seen} documents, fewer than the {skip_docs} "
                        f"in finished shards of an earlier run; remove {out_dir} to rebuild")
    m = Manifest(path=manifest_path, split=split, dtype=dtype_name, vocab_size=tokenizer.vocab_size,
                 tokenizer_checksum=tokenizer.checksum, documents=sum(e.documents for e in entries),
                 tokens=sum(e.tokens for e in entries), shards=entries, request=request,
                 replaced_invalid_utf8=dict(stats.replaced) if stats else {},
                 empty_documents_skipped=dict(stats.empty) if stats else {})
    atomic_write_json(manifest_path, m.to_json())
    return m


def verify_manifest(manifest: Manifest, tokenizer: Tokenizer | None, vocab_size: int, log: Log = print) -> None:
    """Full check of a split: every shard's size, sha256, samples, token range and tokenizer checksum."""
    manifest.check_files()
    if tokenizer is not None:
        manifest.check_tokenizer(tokenizer.checksum, str(tokenizer.path), vocab_size)
    docs = tokens = 0
    for entry in manifest.shards:
        shard_docs = read_shard(manifest, entry, vocab_size, reader="webdataset")
        n = sum(len(d.tokens) for d in shard_docs)
        if n != entry.tokens:
            raise DataError(f"shard {manifest.shard_path(entry)}: {n} tokens, manifest records {entry.tokens}")
        docs += len(shard_docs)
        tokens += n
    if docs != manifest.documents or tokens != manifest.tokens:
        raise DataError(f"{manifest.path}: totals {manifest.documents} documents / {manifest.tokens} tokens "
                        f"but the shards hold {docs} / {tokens}")
    log(f"{manifest.path}: OK, {len(manifest.shards)} shards, {docs} documents, {tokens:,} tokens")
