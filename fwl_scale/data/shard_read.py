"""Reading whole shards, verified: size and sha256 against the manifest, one well-formed sample per
document in index order, every token id inside the vocabulary. Also where each sample's token ids lie
in the tar (`ids_layout`), which the document index (shard_index.py) records for byte-range reads."""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from fwl_scale.data.common import DataError, sha256_bytes
from fwl_scale.data.manifest import IDS_EXT, NP_DTYPE, Manifest, ShardEntry
from fwl_scale.data.remote import fetch

TAR_BLOCK = 512


@dataclass
class ShardDoc:
    index: int  # the document's index within its split
    key: str
    tokens: np.ndarray  # 1-D uint16/uint32, the document-end token last


class _NotPlainTar(Exception):
    """A member the fast reader does not handle (PAX/GNU headers, links): use webdataset's reader."""


def _plain_tar_members(data: bytes) -> Iterator[tuple[str, int, int]]:
    """(name, offset of the body, size) of each member of a tar made of plain ustar members.

    Why not only webdataset or tarfile here: they go through Python's tarfile, measured at ~100 us per
    member on this machine, ~25x this parser; with short documents (two members each) that, not I/O,
    would bound reading. Anything but plain file members raises _NotPlainTar."""
    pos, end = 0, len(data)
    while pos + TAR_BLOCK <= end:
        hdr = data[pos:pos + TAR_BLOCK]
        if hdr[0] == 0:  # end-of-archive blocks
            return
        if hdr[156] not in (0x30, 0):  # '0' or NUL: a regular file; anything else: not plain
            raise _NotPlainTar(f"member type {chr(hdr[156])!r} at byte {pos}")
        name = hdr[:100].split(b"\0", 1)[0].decode()
        if hdr[257:262] == b"ustar" and hdr[345] != 0:
            name = hdr[345:500].split(b"\0", 1)[0].decode() + "/" + name
        try:
            size = int(hdr[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            raise _NotPlainTar(f"size field at byte {pos}") from None
        body = pos + TAR_BLOCK
        if body + size > end:
            raise ValueError(f"member {name!r} runs past the end of the file (truncated tar)")
        yield name, body, size
        pos = body + (size + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK
    if pos < end:
        raise ValueError("tar ends inside a header (truncated)")


def _tarfile_members(data: bytes) -> Iterator[tuple[str, int, int]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for info in tf:
            if info.isfile():
                yield info.name, info.offset_data, info.size


def _grouped(members: Iterator[tuple[str, int, int]]) -> Iterator[dict[str, Any]]:
    """Members grouped into samples like webdataset's `group_by_keys` (key = name up to the first dot of
    the base name, extension = the rest); each extension maps to (offset, size)."""
    cur: dict[str, Any] | None = None
    for name, off, size in members:
        base = name.rsplit("/", 1)[-1]
        if "." not in base:
            raise _NotPlainTar(f"member name {name!r}")
        dot = len(name) - len(base) + base.index(".")
        key, ext = name[:dot], name[dot + 1:].lower()
        if cur is None or cur["__key__"] != key:
            if cur is not None:
                yield cur
            cur = {"__key__": key}
        if ext in cur:
            raise ValueError(f"duplicate member {name!r}")
        cur[ext] = (off, size)
    if cur is not None:
        yield cur


def _plain_tar_samples(data: bytes) -> Iterator[dict[str, Any]]:
    mv = memoryview(data)
    for s in _grouped(_plain_tar_members(data)):
        yield {k: (v if k == "__key__" else mv[v[0]:v[0] + v[1]]) for k, v in s.items()}


def _webdataset_samples(path: Path | str, data: bytes) -> Iterator[dict[str, Any]]:
    import webdataset as wds  # the import is heavy; only readers need it

    files = wds.tariterators.tar_file_expander([{"url": str(path), "stream": io.BytesIO(data)}])
    return wds.tariterators.group_by_keys(files)


def shard_bytes(manifest: Manifest, entry: ShardEntry, verify_checksum: bool = True) -> bytes:
    """The whole shard, its size (and sha256) checked against the manifest."""
    path = manifest.shard_path(entry)
    data = fetch(path, f"shard {path}")
    if len(data) != entry.bytes:
        raise DataError(f"shard {path}: {len(data)} bytes but {manifest.path} records {entry.bytes}: "
                        f"truncated or replaced since it was written")
    if verify_checksum:
        digest = sha256_bytes(data)
        if digest != entry.sha256:
            raise DataError(f"shard {path}: corrupt: sha256 {digest[:16]}... differs from {entry.sha256[:16]}... "
                            f"recorded in {manifest.path} (changed since the manifest was written)")
    return data


def read_shard(manifest: Manifest, entry: ShardEntry, vocab_size: int, verify_checksum: bool = True,
               reader: str = "fast", data: bytes | None = None) -> list[ShardDoc]:
    """Reads and checks one whole shard (see the module docstring). reader="webdataset" iterates the tar
    with webdataset's own reader; "fast" parses plain ustar headers directly (same samples; it falls
    back to webdataset for any tar it does not handle). `data`: the shard's bytes, already checked."""
    path = manifest.shard_path(entry)
    if data is None:
        data = shard_bytes(manifest, entry, verify_checksum)
    if reader == "fast":
        try:
            return _check_samples(manifest, entry, path, _plain_tar_samples(data), vocab_size)
        except _NotPlainTar:
            pass
    return _check_samples(manifest, entry, path, _webdataset_samples(path, data), vocab_size)


def ids_layout(manifest: Manifest, entry: ShardEntry, data: bytes) -> list[tuple[int, int]]:
    """(byte offset, byte size) of each document's token ids inside the shard, in sample order."""
    ids_ext = IDS_EXT[manifest.dtype]
    try:
        try:
            samples = list(_grouped(_plain_tar_members(data)))
        except _NotPlainTar:
            samples = list(_grouped(_tarfile_members(data)))
        return [s[ids_ext] for s in samples]
    except (KeyError, ValueError, tarfile.TarError, _NotPlainTar) as e:
        raise DataError(f"shard {manifest.shard_path(entry)}: corrupt tar ({type(e).__name__}: {e})") from None


def _check_samples(manifest: Manifest, entry: ShardEntry, path: Path | str, samples: Iterator[dict[str, Any]],
                   vocab_size: int) -> list[ShardDoc]:
    ids_ext = IDS_EXT[manifest.dtype]
    dtype = NP_DTYPE[manifest.dtype]
    docs: list[ShardDoc] = []
    try:
        for sample in samples:
            key = sample["__key__"]
            if ids_ext not in sample or "json" not in sample:
                raise DataError(f"shard {path}: sample {key!r} lacks {ids_ext} or json "
                                f"(has {', '.join(k for k in sample if not k.startswith('__'))})")
            meta = json.loads(bytes(sample["json"]))
            raw = sample[ids_ext]
            if len(raw) % dtype.itemsize:
                raise DataError(f"shard {path}: sample {key!r}: {len(raw)} bytes is not a whole number of {manifest.dtype}")
            ids = np.frombuffer(raw, dtype=dtype)
            want_index = entry.first_doc + len(docs)
            if meta.get("doc") != want_index or meta.get("tokens") != len(ids):
                raise DataError(f"shard {path}: sample {key!r} is document {meta.get('doc')} with "
                                f"{len(ids)} tokens (metadata says {meta.get('tokens')}); expected document {want_index}")
            if len(ids) == 0:
                raise DataError(f"shard {path}: document {meta.get('id')!r} has no tokens")
            top = int(ids.max())
            if top >= vocab_size:
                raise DataError(f"shard {path}: document {meta.get('id')!r} (sample {key}) has token id {top} "
                                f">= vocabulary size {vocab_size}")
            docs.append(ShardDoc(want_index, str(meta.get("id")), ids))
    except (DataError, _NotPlainTar):
        raise
    except Exception as e:  # tarfile.ReadError, ValueError from webdataset, JSON errors
        raise DataError(f"shard {path}: corrupt tar or sample ({type(e).__name__}: {e.args[0] if e.args else e})") from None
    if len(docs) != entry.documents:
        raise DataError(f"shard {path}: holds {len(docs)} documents, {manifest.path} records {entry.documents}")
    return docs
