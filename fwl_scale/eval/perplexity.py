"""Validation loss, perplexity and loss by position bucket; whole long documents in consecutive windows.

Loss by position is what shows an FWL working: its loss falls with the position inside the window
(more earlier tokens to adapt to) while a baseline's stays flat (docs/design.md §1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor

from fwl_scale import IGNORE_INDEX
from fwl_scale.parallel.world import all_reduce_min, all_reduce_sum

Forward = Callable[..., object]  # model(input_ids, labels, doc_ids) -> object with .token_loss


def bucket_edges(seq_len: int, n_buckets: int) -> list[tuple[int, int]]:
    """[start, end) position ranges of `n_buckets` near-equal buckets over 0..seq_len-1."""
    n = max(1, min(n_buckets, seq_len))
    return [(b * seq_len // n, (b + 1) * seq_len // n) for b in range(n)]


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    tokens: int
    bucket_edges: list[tuple[int, int]] = field(default_factory=list)
    bucket_loss: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens,
                "bucket_edges": [list(e) for e in self.bucket_edges], "bucket_loss": self.bucket_loss}


def perplexity_of(loss: float) -> float:
    """exp(mean loss); inf where exp would overflow (a diverged model's loss)."""
    return math.exp(loss) if loss < 700 else math.inf


@torch.no_grad()
def evaluate_batches(forward: Forward, batches: list[dict[str, Tensor]], n_buckets: int,
                     device: torch.device, contributes: bool = True) -> EvalResult:
    """Token-weighted mean loss over all valid labels of `batches` (all ranks together), and the mean
    loss in each of `n_buckets` buckets of positions inside the window. Every rank evaluates the same
    number of batches (the smallest count over ranks) so that collectives inside the model line up.

    Model-parallel peers compute the same per-token losses (or, on a pipeline's earlier stages, none:
    `forward` returns None there); only one rank of each data-parallel replica adds them
    (`contributes`), so the token count is that of the data."""
    n = all_reduce_min(len(batches), device)
    if n == 0:
        raise ValueError("no validation batches")
    T = batches[0]["input_ids"].shape[1]
    edges = bucket_edges(T, n_buckets)
    bucket_of_pos = torch.empty(T, dtype=torch.int64)
    for i, (a, b) in enumerate(edges):
        bucket_of_pos[a:b] = i
    bucket_of_pos = bucket_of_pos.to(device)
    sums = torch.zeros(len(edges), dtype=torch.float64, device=device)
    counts = torch.zeros(len(edges), dtype=torch.float64, device=device)
    for batch in batches[:n]:
        ids, labels, docs = (batch[k].to(device) for k in ("input_ids", "labels", "doc_ids"))
        out = forward(ids, labels, docs)
        if out is None or not contributes:
            continue
        valid = (labels != IGNORE_INDEX).to(torch.float64)
        token_loss = out.token_loss.to(torch.float64) * valid
        sums.index_add_(0, bucket_of_pos, token_loss.sum(0))
        counts.index_add_(0, bucket_of_pos, valid.sum(0))
    totals = all_reduce_sum(torch.cat([sums, counts]))
    sums, counts = totals[: len(edges)], totals[len(edges):]
    total = float(counts.sum())
    loss = float(sums.sum()) / max(total, 1.0)
    bucket_loss = [float(s) / float(c) if c > 0 else float("nan") for s, c in zip(sums.tolist(), counts.tolist())]
    return EvalResult(loss=loss, perplexity=perplexity_of(loss), tokens=int(total), bucket_edges=edges,
                      bucket_loss=bucket_loss)


@dataclass
class LongDocResult:
    window: int
    carry_state: bool
    documents: int
    window_loss: list[float]  # mean loss of the w-th window of every document (document positions w*T..)
    window_tokens: list[int]
    loss: float

    @property
    def perplexity(self) -> float:
        return perplexity_of(self.loss)


@torch.no_grad()
def document_windows(model: torch.nn.Module, doc: Tensor, window: int, carry_state: bool = False,
                     max_tokens: int | None = None, return_hidden: bool = False) -> Iterator[tuple[Tensor, object]]:
    """(labels [n], the model's output) of each consecutive window of `window` tokens of one 1-D document
    (all its predicted tokens or the first `max_tokens`). The body sees only its window. With `carry_state`
    the FWL's running sums are carried from window to window (docs/design.md §1.4), so its fast weights
    keep adapting over the whole document; without, every window starts afresh. `return_hidden`: the
    outputs hold the unembedding's input too (ModelOutput.hidden)."""
    inputs, labels = doc[:-1], doc[1:]
    n = inputs.numel() if max_tokens is None else min(inputs.numel(), max_tokens)
    state = None
    for a in range(0, n, window):
        ids = inputs[a:min(a + window, n)][None]
        lab = labels[a:min(a + window, n)][None]
        kwargs = {"fwl_state": state, "return_state": True} if carry_state else {}
        if return_hidden:
            kwargs["return_hidden"] = True
        out = model(ids, lab, torch.zeros_like(ids), **kwargs)
        if carry_state:
            state = out.fwl_state
        yield lab[0], out


@torch.no_grad()
def document_token_losses(model: torch.nn.Module, doc: Tensor, window: int, carry_state: bool = False,
                          max_tokens: int | None = None) -> Tensor:
    """The loss of every predicted token of one 1-D document (float64, [len - 1] or the first `max_tokens`),
    read in consecutive windows of `window` tokens (`document_windows`)."""
    out_losses = [out.token_loss.to(torch.float64).flatten()
                  for _, out in document_windows(model, doc, window, carry_state, max_tokens)]
    return torch.cat(out_losses) if out_losses else torch.zeros(0, dtype=torch.float64)


@torch.no_grad()
def evaluate_documents(model: torch.nn.Module, documents: Iterable[Tensor], window: int, device: torch.device,
                       carry_state: bool = False, max_windows: int | None = None) -> LongDocResult:
    """Whole documents in consecutive windows of `window` tokens (see `document_token_losses`). Reports
    the loss per window index, i.e. by document position in steps of `window` — the measure of what
    happens past the training length."""
    sums: list[float] = []
    counts: list[int] = []
    n_docs = 0
    for doc in documents:
        doc = doc.to(device=device, dtype=torch.int64).flatten()
        if doc.numel() < 2:
            continue
        n_docs += 1
        losses = document_token_losses(model, doc, window, carry_state,
                                       None if max_windows is None else max_windows * window)
        for w, part in enumerate(losses.split(window)):
            if w >= len(sums):
                sums.append(0.0)
                counts.append(0)
            sums[w] += float(part.sum())
            counts[w] += part.numel()
    if n_docs == 0:
        raise ValueError("no documents with at least two tokens to evaluate")
    window_loss = [s / c for s, c in zip(sums, counts)]
    loss = sum(sums) / max(1, sum(counts))
    return LongDocResult(window=window, carry_state=carry_state, documents=n_docs, window_loss=window_loss,
                         window_tokens=counts, loss=loss)


def format_eval(result: EvalResult, title: str = "validation") -> str:
    lines = [f"{title}: loss {result.loss:.4f}  perplexity {result.perplexity:.3f}  ({result.tokens} tokens)",
             "loss by position in the window:"]
    for (a, b), loss in zip(result.bucket_edges, result.bucket_loss):
        lines.append(f"  positions {a:>6}-{b - 1:<6} loss {loss:.4f}  ppl {perplexity_of(loss):.3f}")
    return "\n".join(lines)


def format_long_docs(results: list[LongDocResult]) -> str:
    lines = []
    for r in results:
        mode = "FWL state carried across windows" if r.carry_state else "each window on its own"
        lines.append(f"whole documents ({r.documents}) in windows of {r.window}, {mode}: "
                     f"loss {r.loss:.4f}  perplexity {r.perplexity:.3f}")
        for w, (loss, n) in enumerate(zip(r.window_loss, r.window_tokens)):
            lines.append(f"  document positions {w * r.window:>7}-{(w + 1) * r.window - 1:<7} "
                         f"loss {loss:.4f}  ppl {perplexity_of(loss):.3f}  ({n} tokens)")
    return "\n".join(lines)
