"""Streaming a long token stream through the model piece by piece (generation: one token at a time), the
FWL state and the body's key/value cache carried (see StreamingSession)."""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from fwl_scale import IGNORE_INDEX
from fwl_scale.model.fwl import FWLState
from fwl_scale.model.blocks import KVCache
from fwl_scale.model.gpt import GPT


class StreamingSession:
    """One long token stream per batch row, fed piece by piece (generation: one token at a time).

    The body's window: the stream is cut into aligned windows of `window` tokens (positions restart at
    each window, as when training on consecutive segments of seq_len); a piece inside a window attends to
    the window's earlier tokens through a key/value cache per layer, emptied at each window start
    (GPT.body_cached): exactly the whole pass (tests/test_streaming.py), at O(window) attention work and
    O(1) other body work per token.

    The FWL's running sums carry over everything before (FWLState, across pieces and windows); the
    last fed token's label is the next fed token, so its gradient stays pending until then. Nothing is
    detached: run under torch.no_grad() unless gradients through the stream are wanted."""

    def __init__(self, model: GPT, window: int):
        if window < 1:
            raise ValueError(f"streaming window must be >= 1, got {window}")
        if model.cp is not None or model.sequence_parallel:
            raise ValueError("streaming runs without context or sequence parallelism")
        if model.pos_embed is not None and window > model.cfg.position_rows:
            raise ValueError(f"streaming window {window} is longer than the learned position table "
                             f"(model.max_positions = {model.cfg.position_rows})")
        self.model = model
        self.window = window
        self.state: FWLState | None = None
        self.window_docs: Tensor | None = None  # document ids of the current window's tokens so far
        self.kv: list[KVCache] = []
        self.position = 0  # tokens fed so far

    def feed(self, ids: Tensor, doc_ids: Tensor | None = None) -> Tensor:
        """Feeds `ids` [B, n]; returns the logits [B, n, V] predicting the token after each of them."""
        if doc_ids is None:
            doc_ids = torch.zeros_like(ids)
        outs = []
        a = 0
        while a < ids.shape[1]:
            room = self.window - self.position % self.window
            b = min(ids.shape[1], a + room)
            outs.append(self._run(ids[:, a:b], doc_ids[:, a:b]))
            a = b
        return torch.cat(outs, dim=1)

    def _run(self, ids: Tensor, docs: Tensor) -> Tensor:
        if self.position % self.window == 0:
            self.window_docs = docs[:, :0]
            self.kv = [KVCache() for _ in self.model.blocks]
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, :-1] = torch.where(docs[:, 1:] == docs[:, :-1], ids[:, 1:], IGNORE_INDEX)
        h = self.model.body_cached(ids, docs, self.window_docs, self.kv)
        out = self.model.head(h, ids, labels, docs, fwl_state=self.state, last_label_pending=True, return_logits=True,
                              return_state=self.model.fwl is not None)
        self.state = out.fwl_state
        self.window_docs = torch.cat([self.window_docs, docs], dim=1)
        self.position += ids.shape[1]
        return out.logits

    def select_rows(self, index: Tensor) -> None:
        """Keeps (and repeats) the batch rows `index` [B'] of everything carried: the streams continue
        as those rows' (beam search reorders its hypotheses this way)."""
        if self.state is not None:
            self.state = FWLState(**{f.name: _rows(getattr(self.state, f.name), index)
                                     for f in dataclasses.fields(self.state)})
        for cache in self.kv:
            cache.k, cache.v = _rows(cache.k, index), _rows(cache.v, index)
        self.window_docs = _rows(self.window_docs, index)


def _rows(t, index: Tensor):
    # Every tensor the session carries is batch-first (a fast unembedding's sums are a dict of them).
    if isinstance(t, dict):
        return {k: _rows(v, index) for k, v in t.items()}
    return t.index_select(0, index.to(t.device)) if isinstance(t, Tensor) else t
