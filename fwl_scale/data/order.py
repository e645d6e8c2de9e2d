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
from typing import Any

import numpy as np

from fwl_scale import IGNORE_INDEX
from fwl_scale.data.manifest import Manifest
from fwl_scale.data.shard_index import BlockReader

PAD_DOC_ID = -1  # doc id of padding positions in the last validation batch (their labels are ignored)


class Order:
    """Where every document of a split stands in the global order. shuffle=False: manifest order, one
    pass (positions past its end are None)."""

    def __init__(self, manifest: Manifest, doc_tokens: np.ndarray, seed: int, shuffle: bool):
        self.seed, self.shuffle = seed, shuffle
        self.counts = np.array([s.documents for s in manifest.shards], dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.doc_tokens = doc_tokens
        self.total_docs = int(self.counts.sum())
        self.epoch_tokens = int(doc_tokens.sum())
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(documents in stream order, token offset where each starts (+ the end), the stream position
        of each shard-permutation entry's first document (+ the end))."""
        if e not in self._epochs:
            n = len(self.counts)
            shards = (np.random.default_rng([self.seed, e, 0]).permutation(n) if self.shuffle else np.arange(n))
            docs = np.concatenate([
                self.first[s] + (np.random.default_rng([self.seed, e, 1, int(s)]).permutation(int(self.counts[s]))
                                 if self.shuffle else np.arange(self.counts[s])) for s in shards])
            starts = np.concatenate([[0], np.cumsum(self.doc_tokens[docs])])
            shard_before = np.concatenate([[0], np.cumsum(self.counts[shards])])
            self._epochs[e] = (docs, starts, shard_before)
            if len(self._epochs) > 4:  # a position and a resume point may lie epochs apart; keep a few
                self._epochs.popitem(last=False)
        else:
            self._epochs.move_to_end(e)
        return self._epochs[e]

    def locate(self, p: int) -> tuple[int, int, int] | None:
        """(epoch, position of the document in the epoch, token offset in it) of stream token p."""
        e, q = divmod(p, self.epoch_tokens)
        if e > 0 and not self.shuffle:
            return None
        starts = self.epoch(e)[1]
        i = int(np.searchsorted(starts, q, side="right")) - 1
        return e, i, q - int(starts[i])

    def doc_id(self, e: int, i: int) -> int:
        """A number unique to this visit of the document in the stream."""
        return e * self.total_docs + i

    def doc(self, e: int, i: int) -> int:
        return int(self.epoch(e)[0][i])

    def to_loc(self, e: int, i: int) -> list[int]:
        """[epoch, shard position, document position]: the saved form of a place in the order."""
        sb = self.epoch(e)[2]
        sp = int(np.searchsorted(sb, i, side="right")) - 1
        return [e, sp, i - int(sb[sp])]

    def from_loc(self, loc: list[int]) -> tuple[int, int]:
        e, sp, dpos = (int(x) for x in loc)
        return e, int(self.epoch(e)[2][sp]) + dpos

    def cursor(self, p: int) -> list[int]:
        """The packed stream's saved position: [epoch, shard position, document position, token offset]."""
        e, i, off = self.locate(p)  # type: ignore[misc]
        return self.to_loc(e, i) + [off]

    def position(self, cursor: list[int]) -> int:
        e, i = self.from_loc(cursor[:3])
        return e * self.epoch_tokens + int(self.epoch(e)[1][i]) + int(cursor[3])


def fill_piece(reader: BlockReader, doc: int, length: int, offset: int, n: int, ids: np.ndarray,
               labels: np.ndarray, pos: int) -> None:
    """Copies tokens [offset, offset + n) of a document to ids[pos:pos+n] with next-token labels from
    the same document; the label after its last token is IGNORE_INDEX."""
    toks = reader.tokens(doc, offset, min(offset + n + 1, length))
    ids[pos:pos + n] = toks[:n]
    nxt = toks[1:]
    labels[pos:pos + len(nxt)] = nxt
    labels[pos + len(nxt):pos + n] = IGNORE_INDEX


def packed_row(order: Order, reader: BlockReader, p: int, ids: np.ndarray, labels: np.ndarray,
               doc_ids: np.ndarray) -> None:
    """Fills the row of stream tokens [p, p + T); past the end of a finite split the rest is padding."""
    T, pos = len(ids), 0
    while pos < T:
        where = order.locate(p + pos)
        if where is None:
            ids[pos:] = 0
            labels[pos:] = IGNORE_INDEX
            doc_ids[pos:] = PAD_DOC_ID
            return
        e, i, off = where
        doc = order.doc(e, i)
        length = int(order.doc_tokens[doc])
        n = min(T - pos, length - off)
        fill_piece(reader, doc, length, off, n, ids, labels, pos)
        doc_ids[pos:pos + n] = order.doc_id(e, i)
        pos += n


class ContiguousStreams:
    """One document stream per global slot; every call advances every slot by T tokens. A slot that
    finishes a document takes the next one from the global order (slots served in slot order). Other
    ranks' slots are followed by length alone."""

    def __init__(self, order: Order, reader: BlockReader, seq_len: int, keep: range, queue: list[int],
                 slots: list[list[int] | None]):
        self.order, self.reader, self.T, self.keep = order, reader, seq_len, keep
        self.queue = order.from_loc(queue)  # (epoch, position) of the next document to hand out
        # per slot: [epoch, position, offset] or None (takes the next document)
        self.slots: list[list[int] | None] = [
            None if s is None else [*order.from_loc(s[:3]), int(s[3])] for s in slots]

    def carry(self) -> dict[str, Any]:
        return {"queue": self.order.to_loc(*self.queue),
                "slots": [None if s is None else self.order.to_loc(s[0], s[1]) + [s[2]] for s in self.slots]}

    def step(self, build: bool, ids: Any, labels: Any, doc_ids: Any) -> None:
        order = self.order
        for k, s in enumerate(self.slots):
            fill = build and k in self.keep
            pos = 0
            while pos < self.T:
                if s is None:
                    e, i = self.queue
                    s = self.slots[k] = [e, i, 0]
                    self.queue = (e, i + 1) if i + 1 < order.total_docs else (e + 1, 0)
                doc = order.doc(s[0], s[1])
                length = int(order.doc_tokens[doc])
                n = min(self.T - pos, length - s[2])
                if fill:
                    row = k - self.keep.start
                    fill_piece(self.reader, doc, length, s[2], n, ids[row], labels[row], pos)
                    doc_ids[row, pos:pos + n] = order.doc_id(s[0], s[1])
                pos += n
                s[2] += n
                if s[2] == length:
                    s = self.slots[k] = None
