"""The global order of documents, as arithmetic on the document index, and the rows built from it.

The order. Epoch e visits the train shards in a permutation seeded by (seed, e), and the documents of
each shard in a permutation seeded by (seed, e, shard). Concatenated, the documents form one infinite
token stream, each document ending with the document-end token. Without shuffling (validation): the
manifest's order, one pass.

Because every document's length is in the index, a place in the stream is a number: token p lies in
epoch p // E (E tokens per epoch), at the document found by a binary search over the epoch's cumulative
lengths. A data-parallel rank therefore locates its own rows directly and reads only their tokens
(BlockReader); what other ranks get costs it nothing.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator

import numpy as np

from fwl_scale import IGNORE_INDEX
from fwl_scale.data.manifest import Manifest
from fwl_scale.data.shard_index import BlockReader

PAD_DOC_ID = -1  # doc id of padding positions in the last validation batch (their labels are ignored)


class Order:
    """Where every document of a split stands in the global order. shuffle=False: manifest order, one
    pass (positions past its end are None).

    Two levels, so that a rank pays only for the shards it touches: an epoch's shard permutation with
    each entry's first document and first token (cheap: one entry per shard), and, computed when a shard
    is reached, the permutation of that shard's documents with their token offsets."""

    def __init__(self, manifest: Manifest, doc_tokens: np.ndarray, seed: int, shuffle: bool):
        self.seed, self.shuffle = seed, shuffle
        self.counts = np.array([s.documents for s in manifest.shards], dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.shard_tokens = np.add.reduceat(doc_tokens, self.first)
        self.doc_tokens = doc_tokens
        self.total_docs = int(self.counts.sum())
        self.epoch_tokens = int(doc_tokens.sum())
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._shards: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(the shard permutation, the position of each entry's first document (+ the end), the stream
        token where each entry starts within the epoch (+ the end))."""
        if e not in self._epochs:
            n = len(self.counts)
            shards = np.random.default_rng([self.seed, e, 0]).permutation(n) if self.shuffle else np.arange(n)
            self._epochs[e] = (shards, np.concatenate([[0], np.cumsum(self.counts[shards])]),
                               np.concatenate([[0], np.cumsum(self.shard_tokens[shards])]))
            if len(self._epochs) > 64:  # saved slot positions may span many epochs of a small split
                self._epochs.popitem(last=False)
        return self._epochs[e]

    def shard(self, e: int, sp: int) -> tuple[np.ndarray, np.ndarray]:
        """The documents of entry sp of epoch e's shard permutation, in stream order, and the token
        where each starts within the shard (+ the end)."""
        key = (e, sp)
        if key not in self._shards:
            s = int(self.epoch(e)[0][sp])
            n = int(self.counts[s])
            perm = np.random.default_rng([self.seed, e, 1, s]).permutation(n) if self.shuffle else np.arange(n)
            docs = self.first[s] + perm
            self._shards[key] = (docs, np.concatenate([[0], np.cumsum(self.doc_tokens[docs])]))
            if len(self._shards) > 256:
                self._shards.popitem(last=False)
        else:
            self._shards.move_to_end(key)
        return self._shards[key]

    def locate(self, p: int) -> tuple[int, int, int] | None:
        """(epoch, position of the document in the epoch, token offset in it) of stream token p."""
        e, q = divmod(p, self.epoch_tokens)
        if e > 0 and not self.shuffle:
            return None
        _, doc_before, tok_before = self.epoch(e)
        sp = int(np.searchsorted(tok_before, q, side="right")) - 1
        starts = self.shard(e, sp)[1]
        q -= int(tok_before[sp])
        j = int(np.searchsorted(starts, q, side="right")) - 1
        return e, int(doc_before[sp]) + j, q - int(starts[j])

    def doc_id(self, e: int, i: int) -> int:
        """A number unique to this visit of the document in the stream."""
        return e * self.total_docs + i

    def to_loc(self, e: int, i: int) -> list[int]:
        """[epoch, shard position, document position]: the saved form of a place in the order."""
        sb = self.epoch(e)[1]
        sp = int(np.searchsorted(sb, i, side="right")) - 1
        return [e, sp, i - int(sb[sp])]

    def from_loc(self, loc: list[int]) -> tuple[int, int]:
        e, sp, dpos = (int(x) for x in loc)
        return e, int(self.epoch(e)[1][sp]) + dpos

    def doc(self, e: int, i: int) -> int:
        _, sp, dpos = self.to_loc(e, i)
        return int(self.shard(e, sp)[0][dpos])

    def cursor(self, p: int) -> list[int]:
        """The packed stream's saved position: [epoch, shard position, document position, token offset]."""
        e, i, off = self.locate(p)  # type: ignore[misc]
        return self.to_loc(e, i) + [off]

    def position(self, cursor: list[int]) -> int:
        e, sp, dpos, off = (int(x) for x in cursor)
        return e * self.epoch_tokens + int(self.epoch(e)[2][sp]) + int(self.shard(e, sp)[1][dpos]) + off


def fill_piece(reader: BlockReader, doc: int, length: int, offset: int, n: int, ids: np.ndarray,
               labels: np.ndarray, pos: int) -> None:
    """Copies tokens [offset, offset + n) of a document to ids[pos:pos+n] with next-token labels from
    the same document; the label after its last token is IGNORE_INDEX."""
    toks = reader.tokens(doc, offset, min(offset + n + 1, length))
    ids[pos:pos + n] = toks[:n]
    nxt = toks[1:]
    labels[pos:pos + len(nxt)] = nxt
    labels[pos + len(nxt):pos + n] = IGNORE_INDEX


def packed_rows(order: Order, reader: BlockReader, p: int, ids: np.ndarray, labels: np.ndarray,
                doc_ids: np.ndarray) -> None:
    """Fills rows [n, T] with stream tokens [p, p + n * T): consecutive rows are consecutive tokens, so
    they are filled as one span, a piece per document. Past the end of a finite split: padding."""
    # Views of the rows: reshape would copy a non-contiguous array and the writes would be lost.
    assert ids.flags.c_contiguous and labels.flags.c_contiguous and doc_ids.flags.c_contiguous
    ids, labels, doc_ids = ids.reshape(-1), labels.reshape(-1), doc_ids.reshape(-1)
    span, pos = len(ids), 0
    while pos < span:
        where = order.locate(p + pos)
        if where is None:
            ids[pos:] = 0
            labels[pos:] = IGNORE_INDEX
            doc_ids[pos:] = PAD_DOC_ID
            return
        e, i, off = where
        doc = order.doc(e, i)
        length = int(order.doc_tokens[doc])
        n = min(span - pos, length - off)
        fill_piece(reader, doc, length, off, n, ids, labels, pos)
        doc_ids[pos:pos + n] = order.doc_id(e, i)
        pos += n


class ContiguousStreams:
    """One document stream per global slot; every call advances every slot by T tokens. A slot that
    finishes a document takes the next one from the global order (slots served in slot order). Other
    ranks' slots are followed by length alone, as arrays: only the slots that need a new document in a
    call are visited one by one (in slot order, which is the order they are served in)."""

    def __init__(self, order: Order, reader: BlockReader, seq_len: int, keep: range, carry: dict[str, Any]):
        """carry: the saved form ("queue", "slots") or the raw one of `carry()`."""
        self.order, self.reader, self.T, self.keep = order, reader, seq_len, keep
        if "raw_slots" not in carry:
            carry = raw_carry(order, carry)
        self.queue = tuple(int(x) for x in carry["raw_queue"])  # (epoch, position) of the next document to hand out
        # per slot: epoch, position in it, token offset, document, its length; doc -1: takes the next one
        # np.array: a copy, and an ndarray again when a loader worker's transfer made it a tensor
        self.e, self.i, self.off = np.array(carry["raw_slots"], dtype=np.int64)
        self.doc = np.full(len(self.e), -1, dtype=np.int64)
        for k in np.flatnonzero(self.e >= 0).tolist():
            self.doc[k] = order.doc(int(self.e[k]), int(self.i[k]))
        self.len = np.where(self.doc >= 0, order.doc_tokens[np.maximum(self.doc, 0)], 0)

    def _queue_docs(self) -> Iterator[tuple[int, int, int, int]]:
        """(epoch, position, document, length) from the queue on, a shard's documents at a time: every
        rank hands out the documents of all slots, so this is the contiguous mode's cost per call."""
        order = self.order
        e, i = self.queue
        while True:
            _, sp, dpos = order.to_loc(e, i)
            docs = order.shard(e, sp)[0][dpos:]
            for d, length in zip(docs.tolist(), order.doc_tokens[docs].tolist()):
                yield e, i, d, length
                i += 1
            if i == order.total_docs:
                e, i = e + 1, 0

    def carry(self) -> dict[str, Any]:
        """The position in its raw form (arrays; taken after every call, and there are micro_batch * dp
        slots); `saved_carry` turns it into the saved one when a checkpoint asks for it."""
        return {"raw_slots": np.stack([np.where(self.doc >= 0, self.e, -1), self.i, self.off]),
                "raw_queue": list(self.queue)}

    def _fill(self, k: int, pos: int, n: int, ids: Any, labels: Any, doc_ids: Any) -> None:
        row = k - self.keep.start
        fill_piece(self.reader, int(self.doc[k]), int(self.len[k]), int(self.off[k]), n, ids[row], labels[row], pos)
        doc_ids[row, pos:pos + n] = self.order.doc_id(int(self.e[k]), int(self.i[k]))

    def step(self, build: bool, ids: Any, labels: Any, doc_ids: Any) -> None:
        T = self.T
        rem = np.where(self.doc >= 0, self.len - self.off, 0)
        if build:
            for k in self.keep:
                if rem[k] >= T:
                    self._fill(k, 0, T, ids, labels, doc_ids)
        stay = rem >= T  # these slots' documents last the whole call
        self.off[stay] += T
        self.doc[stay & (self.off == self.len)] = -1
        queue = self._queue_docs()
        total = self.order.total_docs
        for k in np.flatnonzero(~stay).tolist():
            fill = build and k in self.keep
            pos = int(rem[k])
            if fill and pos:
                self._fill(k, 0, pos, ids, labels, doc_ids)
            while pos < T:
                e, i, doc, length = next(queue)
                self.queue = (e, i + 1) if i + 1 < total else (e + 1, 0)
                self.e[k], self.i[k], self.doc[k], self.len[k], self.off[k] = e, i, doc, length, 0
                n = min(T - pos, length)
                if fill:
                    self._fill(k, pos, n, ids, labels, doc_ids)
                self.off[k] = n
                pos += n
            if self.off[k] == self.len[k]:
                self.doc[k] = -1

def saved_carry(order: Order, raw: dict[str, Any]) -> dict[str, Any]:
    """{"queue": [epoch, shard position, document position], "slots": [[..., token offset] or None]}."""
    e, i, off = np.asarray(raw["raw_slots"], dtype=np.int64)
    loc = np.zeros((len(e), 4), dtype=np.int64)
    for ep in np.unique(e[e >= 0]).tolist():
        ks = np.flatnonzero(e == ep)
        sb = order.epoch(ep)[1]
        sp = np.searchsorted(sb, i[ks], side="right") - 1
        loc[ks] = np.stack([e[ks], sp, i[ks] - sb[sp], off[ks]], axis=1)
    slots: list[list[int] | None] = loc.tolist()
    for k in np.flatnonzero(e < 0).tolist():
        slots[k] = None
    return {"queue": order.to_loc(*(int(x) for x in raw["raw_queue"])), "slots": slots}


def raw_carry(order: Order, saved: dict[str, Any]) -> dict[str, Any]:
    """The inverse of saved_carry."""
    raw = np.full((3, len(saved["slots"])), -1, dtype=np.int64)
    for k, sl in enumerate(saved["slots"]):
        if sl is not None:
            e, i = order.from_loc(sl[:3])
            raw[:, k] = (e, i, int(sl[3]))
    return {"raw_slots": raw, "raw_queue": list(order.from_loc(saved["queue"]))}
