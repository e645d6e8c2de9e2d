"""The document index of a split (`index.npz` beside the manifest) and verified byte-range reads.

Why: a data-parallel rank needs a small part of every global batch. With each document's length and the
place of its token ids in its shard, the global order is arithmetic (order.py) and a rank reads only the
bytes of its own rows, whatever the number of ranks.

The index holds, per document (split order): `doc_tokens` and `doc_offset` (byte offset of its ids in
its shard); the largest token id of the split (`max_token`, checked against the model's vocabulary when
the index is loaded, so that a read need not look at its tokens); per shard: the hash of every BLOCK-byte block (blake2b, 8 bytes). It is made from shards
whose sha256 matched the manifest and names the manifest's dataset id, so a block hash stands for the
manifest's checksum: a block that no longer matches it (the shard changed since it was written) is a
DataError naming the shard. `fwl data shards` writes it; a missing or stale one is built in memory.
"""
from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fwl_scale.atomic import atomic_write
from fwl_scale.data.common import DataError
from fwl_scale.data.manifest import NP_DTYPE, Manifest
from fwl_scale.data.remote import MissingFile, fetch, sibling
from fwl_scale.data.shard_read import ids_layout, read_shard, shard_bytes

INDEX = "index.npz"
INDEX_FORMAT = "fwl_scale.index/1"
BLOCK = 4096  # bytes per checksummed block: the unit of a read (small: documents lie scattered)
CACHE_BLOCKS = 8192  # verified blocks kept per process (32 MiB)


def _block_hashes(data: bytes) -> np.ndarray:
    mv = memoryview(data)
    return np.array([int.from_bytes(hashlib.blake2b(mv[i:i + BLOCK], digest_size=8).digest(), "little")
                     for i in range(0, len(data), BLOCK)], dtype=np.uint64)


@dataclass
class ShardIndex:
    dataset_id: str
    max_token: int
    doc_tokens: np.ndarray  # int64 [documents]
    doc_offset: np.ndarray  # int64 [documents]
    block_start: np.ndarray  # int64 [shards + 1]: shard s's hashes are block_hash[block_start[s]:block_start[s+1]]
    block_hash: np.ndarray  # uint64

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, format=np.array(INDEX_FORMAT), dataset_id=np.array(self.dataset_id), block=np.array(BLOCK),
                 max_token=np.array(self.max_token),
                 doc_tokens=self.doc_tokens, doc_offset=self.doc_offset, block_start=self.block_start,
                 block_hash=self.block_hash)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, raw: bytes, where: str) -> "ShardIndex":
        try:
            z = np.load(io.BytesIO(raw), allow_pickle=False)
            if str(z["format"]) != INDEX_FORMAT or int(z["block"]) != BLOCK:
                raise DataError(f"{where}: not a {INDEX_FORMAT} index with {BLOCK}-byte blocks")
            return cls(str(z["dataset_id"]), int(z["max_token"]), z["doc_tokens"].astype(np.int64), z["doc_offset"].astype(np.int64),
                       z["block_start"].astype(np.int64), z["block_hash"].astype(np.uint64))
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"{where}: unreadable document index ({type(e).__name__}: {e})") from None


def build_index(manifest: Manifest) -> ShardIndex:
    """Reads every shard once, fully checked (read_shard, against the shards' own vocabulary), and
    records where its documents lie."""
    tokens, offsets, hashes, starts, top = [], [], [], [0], 0
    itemsize = NP_DTYPE[manifest.dtype].itemsize
    for entry in manifest.shards:
        data = shard_bytes(manifest, entry)
        docs = read_shard(manifest, entry, manifest.vocab_size, data=data)
        layout = ids_layout(manifest, entry, data)
        if [size // itemsize for _, size in layout] != [len(d.tokens) for d in docs]:
            raise DataError(f"shard {manifest.shard_path(entry)}: its tar members do not line up with its documents")
        tokens += [len(d.tokens) for d in docs]
        top = max([top] + [int(d.tokens.max()) for d in docs])
        offsets += [off for off, _ in layout]
        h = _block_hashes(data)
        hashes.append(h)
        starts.append(starts[-1] + len(h))
    return ShardIndex(manifest.dataset_id, top, np.array(tokens, dtype=np.int64), np.array(offsets, dtype=np.int64),
                      np.array(starts, dtype=np.int64), np.concatenate(hashes))


def write_index(manifest: Manifest) -> ShardIndex:
    """Builds the index of a local split and writes it beside its manifest (atomically)."""
    index = build_index(manifest)
    raw = index.to_bytes()
    atomic_write(Path(sibling(manifest.path, INDEX)), lambda p: p.write_bytes(raw))
    return index


def load_index(manifest: Manifest, vocab_size: int, build: bool = True) -> ShardIndex | None:
    """The split's index if one for exactly these shards is beside the manifest; else one built in
    memory (build=True; it reads every shard once) or None."""
    where = sibling(manifest.path, INDEX)
    index = None
    if manifest.remote or Path(where).is_file():
        try:
            raw = fetch(where, f"document index {where}")
        except MissingFile:
            raw = None  # not published beside the remote shards: built below
        if raw is not None:
            try:
                index = ShardIndex.from_bytes(raw, str(where))
            except DataError:
                index = None  # a derived file of another format: made again
    if index is not None and index.dataset_id == manifest.dataset_id:
        if len(index.doc_tokens) != manifest.documents or len(index.block_start) != len(manifest.shards) + 1:
            raise DataError(f"{where}: does not fit {manifest.path} ({len(index.doc_tokens)} documents)")
        if index.max_token >= vocab_size:
            raise DataError(f"{manifest.path}: holds token id {index.max_token} >= vocabulary size {vocab_size} "
                            f"(recorded in {where})")
        return index
    if not build:
        return None
    index = build_index(manifest)
    if index.max_token >= vocab_size:
        raise DataError(f"{manifest.path}: holds token id {index.max_token} >= vocabulary size {vocab_size}")
    return index


def verify_index(manifest: Manifest) -> str:
    """Checks the index beside a split (if one is there) against one built from its shards now: a
    DataError naming the index and its first wrong field; else a line saying what was checked."""
    where = sibling(manifest.path, INDEX)
    try:
        raw = fetch(where, f"document index {where}")
    except MissingFile:
        return f"{where}: none (it is built in memory when the data is read)"
    stored, built = ShardIndex.from_bytes(raw, str(where)), build_index(manifest)
    if stored.dataset_id != built.dataset_id:
        raise DataError(f"{where}: indexes dataset {stored.dataset_id}, the manifest is {built.dataset_id} "
                        f"(stale: rebuild with `fwl data shards`)")
    for field in ("max_token", "doc_tokens", "doc_offset", "block_start", "block_hash"):
        if not np.array_equal(getattr(stored, field), getattr(built, field)):
            raise DataError(f"{where}: {field} does not match the shards (damaged or stale: delete it, and "
                            f"`fwl data shards` writes it again)")
    return f"{where}: OK, {len(built.doc_tokens)} documents, {len(built.block_hash)} block hashes"


class BlockReader:
    """Token ranges of documents, read in checksummed blocks; a per-process cache of verified blocks.
    Picklable (loader workers): the cache stays behind."""

    def __init__(self, manifest: Manifest, index: ShardIndex):
        self.manifest, self.index = manifest, index
        self.dtype = NP_DTYPE[manifest.dtype]
        counts = np.array([s.documents for s in manifest.shards], dtype=np.int64)
        self.doc_shard = np.repeat(np.arange(len(counts)), counts)
        self._paths = [manifest.shard_path(e) for e in manifest.shards]
        self.whole = manifest.remote and str(manifest.path).startswith("pipe:")  # a command cannot seek
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._shard_cache: OrderedDict[int, bytes] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": OrderedDict(), "_shard_cache": OrderedDict()}

    def _fetch(self, s: int, start: int, end: int) -> bytes:
        entry = self.manifest.shards[s]
        if not self.whole:
            path = self._paths[s]
            data = fetch(path, f"shard {path}", start, end)
            if len(data) != end - start:
                raise DataError(f"shard {path}: ends at byte {start + len(data)}, {self.manifest.path} records "
                                f"{entry.bytes} bytes: truncated or replaced since it was written")
            return data
        if s not in self._shard_cache:
            self._shard_cache[s] = shard_bytes(self.manifest, entry)
            while len(self._shard_cache) > 2:
                self._shard_cache.popitem(last=False)
        return self._shard_cache[s][start:end]

    def _blocks(self, s: int, b0: int, b1: int) -> bytes:
        """Blocks [b0, b1) of shard s, each checked against its hash."""
        cache = self._cache
        got = {b: cache[(s, b)] for b in range(b0, b1) if (s, b) in cache}
        if len(got) < b1 - b0:
            lo = next(b for b in range(b0, b1) if b not in got)
            hi = next(b for b in range(b1 - 1, b0 - 1, -1) if b not in got) + 1
            data = self._fetch(s, lo * BLOCK, min(hi * BLOCK, self.manifest.shards[s].bytes))
            want = self.index.block_hash[self.index.block_start[s] + lo:self.index.block_start[s] + hi]
            hashes = _block_hashes(data)
            if not np.array_equal(hashes, want):
                bad = lo + int(np.flatnonzero(hashes != want)[0])
                raise DataError(f"shard {self._paths[s]}: corrupt: sha256 of the shard no longer matches "
                                f"{self.manifest.path} (bytes {bad * BLOCK}.. differ from the checksum recorded "
                                f"when it was indexed): changed since it was written")
            for b in range(lo, hi):  # copies: a view would keep its whole read alive in the cache
                got[b] = cache[(s, b)] = data[(b - lo) * BLOCK:(b - lo + 1) * BLOCK]
            while len(cache) > CACHE_BLOCKS:
                cache.popitem(last=False)
        for b in range(b0, b1):
            if (s, b) in cache:
                cache.move_to_end((s, b))
        return got[b0] if b1 == b0 + 1 else b"".join(got[b] for b in range(b0, b1))

    def tokens(self, doc: int, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of document `doc` (its index in the split)."""
        s = int(self.doc_shard[doc])
        w = self.dtype.itemsize
        start = int(self.index.doc_offset[doc]) + a * w
        end = start + (b - a) * w
        b0, b1 = start // BLOCK, -(-end // BLOCK)
        raw = self._blocks(s, b0, b1)
        # Token ids need no range check: the blocks match the index, whose max_token was checked.
        return np.frombuffer(raw, dtype=self.dtype, count=b - a, offset=start - b0 * BLOCK)
