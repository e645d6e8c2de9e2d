"""Where a method's loss goes: by document position (far past the training length), by how frequent the
predicted token is in the training data, and by whether it already occurred earlier in the document —
the three axes on which an FWL (and dynamic evaluation) should gain most (late, rare, repeated).

Every per-token loss is added to one bucket of each axis; sums and counts are float64 tensors of fixed
size so that data-parallel ranks add them with one all-reduce.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from fwl_scale.parallel.world import all_reduce_sum

N_POSITION = 40  # 3 buckets inside the first window, then one per doubling: past 2^36 windows is enough
REPETITION_NAMES = ("first occurrence in the document", "occurred earlier in the document")


def position_edges(window: int) -> list[tuple[int, int]]:
    """[start, end) document positions of the position buckets: quarters and the half of the first window
    (positions 0..T/4, T/4..T/2, T/2..T), then [T, 2T), [2T, 4T), ... doubling."""
    q, h = max(1, window // 4), max(1, window // 2)
    edges = [(0, q), (q, max(q + 1, h)), (max(q + 1, h), window)]
    edges += [(window << k, window << (k + 1)) for k in range(N_POSITION - 3)]
    return edges


def position_bucket(pos: Tensor, window: int) -> Tensor:
    edges = position_edges(window)
    bounds = torch.tensor([b for _, b in edges[:3]], dtype=torch.int64)
    inside = torch.bucketize(pos, bounds, right=True)
    past = 3 + torch.floor(torch.log2(pos.clamp(min=window).to(torch.float64) / window)).to(torch.int64)
    return torch.where(pos < window, inside, past).clamp(max=N_POSITION - 1)


def frequency_edges(vocab_size: int) -> list[tuple[int, int]]:
    """Frequency-rank ranges: the top 1k, 1k-10k and the rest for a large vocabulary; for a small one
    the same shape scaled down (top V/16, to V/4, the rest) so that no bucket is empty by construction."""
    a = max(1, min(1000, vocab_size // 16))
    b = max(a + 1, min(10000, vocab_size // 4))
    return [(0, a), (a, b), (b, vocab_size)]


def frequency_ranks(counts: np.ndarray) -> Tensor:
    """rank[token]: 0 for the most frequent training token; ties broken by token id."""
    order = np.lexsort((np.arange(counts.size), -counts.astype(np.int64)))
    ranks = np.empty(counts.size, dtype=np.int64)
    ranks[order] = np.arange(counts.size)
    return torch.from_numpy(ranks)


def seen_before(doc: Tensor, n: int) -> Tensor:
    """For the labels doc[1..n]: whether the same token occurs at an earlier index of the document."""
    _, inverse = torch.unique(doc, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), doc.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(doc.numel()), reduce="amin")
    idx = torch.arange(1, n + 1)
    return first[inverse[idx]] < idx


class Breakdown:
    """Loss sums and token counts of one method over documents, on the three axes."""

    def __init__(self, window: int, vocab_size: int, ranks: Tensor | None):
        self.window = window
        self.ranks = ranks
        self.freq_edges = frequency_edges(vocab_size)
        self.sums = torch.zeros(3, N_POSITION, dtype=torch.float64)  # rows: position, frequency, repetition
        self.counts = torch.zeros(3, N_POSITION, dtype=torch.float64)
        self.documents = 0

    def add(self, doc: Tensor, losses: Tensor) -> None:
        """`losses[j]`: the loss of predicting doc[j + 1] from doc[..j] (the first len(losses) of them)."""
        n = losses.numel()
        losses = losses.to(torch.float64).cpu()
        doc = doc.cpu()
        self.documents += 1
        rows = [(0, position_bucket(torch.arange(n), self.window)), (2, seen_before(doc, n).to(torch.int64))]
        if self.ranks is not None:
            rank = self.ranks[doc[1:n + 1]]
            bounds = torch.tensor([b for _, b in self.freq_edges[:-1]], dtype=torch.int64)
            rows.append((1, torch.bucketize(rank, bounds, right=True)))
        for row, bucket in rows:
            self.sums[row].index_add_(0, bucket, losses)
            self.counts[row].index_add_(0, bucket, torch.ones_like(losses))

    def all_reduce(self, reduce: Callable[[torch.Tensor], torch.Tensor] = all_reduce_sum) -> None:
        """Adds every rank's sums (`reduce`: over the data-parallel ranks, by default the whole world)."""
        flat = reduce(torch.cat([self.sums.flatten(), self.counts.flatten(),
                                         torch.tensor([float(self.documents)], dtype=torch.float64)]))
        k = self.sums.numel()
        self.sums = flat[:k].view_as(self.sums).clone()
        self.counts = flat[k:2 * k].view_as(self.counts).clone()
        self.documents = int(flat[-1])

    @property
    def tokens(self) -> int:
        return int(self.counts[0].sum())

    @property
    def loss(self) -> float:
        return float(self.sums[0].sum()) / max(1, self.tokens)

    def as_dict(self) -> dict[str, object]:
        def cell(row: int, i: int) -> tuple[float, int]:
            c = float(self.counts[row, i])
            return (float(self.sums[row, i]) / c if c else math.nan), int(c)

        last = int(torch.nonzero(self.counts[0]).max()) + 1 if self.tokens else 0
        position = [{"start": a, "end": b, "loss": cell(0, i)[0], "tokens": cell(0, i)[1]}
                    for i, (a, b) in enumerate(position_edges(self.window)[:last])]
        frequency = ([{"ranks": [a, b], "loss": cell(1, i)[0], "tokens": cell(1, i)[1]}
                      for i, (a, b) in enumerate(self.freq_edges)] if self.ranks is not None else [])
        repetition = [{"name": name, "loss": cell(2, i)[0], "tokens": cell(2, i)[1]}
                      for i, name in enumerate(REPETITION_NAMES)]
        return {"loss": self.loss, "tokens": self.tokens, "documents": self.documents, "by_position": position,
                "by_frequency": frequency, "by_repetition": repetition}
