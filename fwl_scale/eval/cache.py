"""Cache models on top of a language model's distribution: the rulers an FWL's adaptation to the document
is measured against besides dynamic evaluation (issue 22).

    unigram_cache     p = (1 − w)·p_model + w·p_cache,  p_cache(v) = c_i(v) / Σ_v c_i(v),
                      c_i = δ·c_{i−1} + onehot(y_{i−1}): the counts of the document's earlier labels, decayed
                      by δ per token (Kuhn & De Mori 1990's cache, with exponential decay)
    continuous_cache  p = (1 − w)·p_model + w·p_cache,  p_cache(v) ∝ Σ_{j<i, i−j≤L, y_j=v} exp(θ·h_j·h_i)
                      (Grave, Joulin & Usunier 2017, "Improving Neural Language Models with a Continuous
                      Cache"), h the unembedding's input: the final-normed body output of a baseline, the
                      fast-pass output u' of an FWL

p_model is the model's distribution read in windows of model.seq_len, as the `plain` method (a baseline) or
`fwl_carried` (an FWL, its state carried over the document) read it; the cache is kept over the whole
document, across windows, and starts empty with every document. While it is empty (the first label)
p_model is used alone. Only the label's probability is computed: p_model(y_i) = exp(−CE_i) from the model's
token loss, and the cache's probability of y_i alone, never a distribution over the vocabulary.

w and δ (unigram) or w and θ (continuous) are chosen on tuning documents by a small grid (`tune_cache`), as
dynamic evaluation's lr and decay are, and then frozen; L (the continuous cache's length) is fixed.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import torch
from torch import Tensor

from fwl_scale.eval.names import CACHE_METHODS
from fwl_scale.eval.perplexity import document_windows
from fwl_scale.parallel.world import all_reduce_sum

ROWS = 512  # query positions per block: the pairwise work of a window is held ROWS × (cache + window) at a time


@dataclass(frozen=True)
class CacheSettings:
    method: str  # one of CACHE_METHODS
    weight: float = 0.1  # w: the cache's share of the mixture
    decay: float = 1.0  # δ (unigram): the counts' decay per token
    theta: float = 0.3  # θ (continuous): the flatness of the softmax over the cached positions
    length: int = 2048  # L (continuous): the positions it holds

    def __post_init__(self) -> None:
        if self.method not in CACHE_METHODS:
            raise ValueError(f"cache method {self.method!r}: use one of {', '.join(CACHE_METHODS)}")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"{self.method}: the weight w must be in [0, 1], got {self.weight}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"{self.method}: the decay δ must be in (0, 1], got {self.decay}")
        if not (math.isfinite(self.theta) and self.theta >= 0.0):
            raise ValueError(f"{self.method}: θ must be finite and >= 0, got {self.theta}")
        if self.length < 1:
            raise ValueError(f"{self.method}: the cache length L must be >= 1, got {self.length}")

    def as_dict(self) -> dict[str, object]:
        """The method's parameters only (those of the other cache mean nothing to it)."""
        d = asdict(self)
        drop = ("theta", "length") if self.method == "unigram_cache" else ("decay",)
        return {k: v for k, v in d.items() if k not in drop}


def mix(ce: Tensor, log_cache: Tensor, nonempty: Tensor, weight: float) -> Tensor:
    """−log((1 − w)·exp(−ce) + w·exp(log_cache)) where the cache holds something, else `ce` (float64)."""
    log_w = math.log(weight) if weight > 0 else -math.inf
    mixed = -torch.logaddexp(math.log1p(-weight) - ce, log_w + log_cache) if weight < 1 else -log_cache
    return torch.where(nonempty, mixed, ce)


class UnigramCache:
    """The decayed counts of one document's labels so far: [V] float64 and their total, carried across windows."""

    def __init__(self, settings: CacheSettings, vocab_size: int, device: torch.device):
        self.s = settings
        self.log_decay = math.log(settings.decay)
        self.counts = torch.zeros(vocab_size, dtype=torch.float64, device=device)
        self.total = torch.zeros((), dtype=torch.float64, device=device)

    def window(self, labels: Tensor, ce: Tensor, hidden: Tensor | None = None) -> Tensor:
        """The losses of the mixture for one window's `labels` [n] given the model's `ce` [n] (float64).
        At window position t, with the counts C and total S carried in:
            c_t(y) = δ^t·C(y) + Σ_{j<t, y_j=y} δ^{t−1−j},   Σ_v c_t(v) = δ^t·S + Σ_{j<t} δ^{t−1−j}."""
        n = labels.numel()
        pos = torch.arange(n, dtype=torch.float64, device=labels.device)
        carried = torch.exp(pos * self.log_decay)  # δ^t
        count = carried * self.counts[labels]
        total = carried * self.total
        for a in range(0, n, ROWS):
            b = min(a + ROWS, n)
            lag = pos[a:b, None] - 1 - pos[None, :b]  # t − 1 − j
            weights = torch.where(lag >= 0, torch.exp(lag.clamp(min=0) * self.log_decay), 0.0)
            same = labels[a:b, None] == labels[None, :b]
            count[a:b] += (weights * same).sum(1)
            total[a:b] += weights.sum(1)
        nonempty = total > 0
        log_cache = torch.log(count) - torch.log(torch.where(nonempty, total, 1.0))
        # Carried out: δ^n·C + Σ_j δ^{n−1−j}·onehot(y_j).
        tail = torch.exp((n - 1 - pos) * self.log_decay)
        self.counts.mul_(math.exp(n * self.log_decay)).index_add_(0, labels, tail)
        self.total = self.total * math.exp(n * self.log_decay) + tail.sum()
        return mix(ce, log_cache, nonempty, self.s.weight)


class ContinuousCache:
    """The last L (hidden state, label) pairs of one document, carried across windows."""

    def __init__(self, settings: CacheSettings, vocab_size: int, device: torch.device):
        self.s = settings
        self.keys: Tensor | None = None  # [M, s], M <= L
        self.labels = torch.zeros(0, dtype=torch.int64, device=device)

    def window(self, labels: Tensor, ce: Tensor, hidden: Tensor | None = None) -> Tensor:
        """The losses of the mixture for one window (`hidden` [n, s]: the unembedding's input at each
        position). Position t of the window is key M + t among the cached and the window's positions; it
        attends to the keys k with k < M + t and M + t − k <= L."""
        if hidden is None:
            raise ValueError("continuous_cache: needs the model's hidden states")
        n = labels.numel()
        h = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
        keys = h if self.keys is None else torch.cat([self.keys, h])
        key_labels = torch.cat([self.labels, labels])
        M = key_labels.numel() - n
        log_cache = torch.empty(n, dtype=torch.float64, device=labels.device)
        nonempty = torch.empty(n, dtype=torch.bool, device=labels.device)
        for a in range(0, n, ROWS):
            b = min(a + ROWS, n)
            query = torch.arange(M + a, M + b, device=labels.device)[:, None]
            k = torch.arange(M + b, device=labels.device)[None, :]
            valid = (k < query) & (query - k <= self.s.length)
            scores = self.s.theta * (h[a:b] @ keys[:M + b].T)
            scores = scores.masked_fill(~valid, -math.inf)
            same = valid & (key_labels[None, :M + b] == labels[a:b, None])
            lse_all = torch.logsumexp(scores, 1)
            lse_same = torch.logsumexp(scores.masked_fill(~same, -math.inf), 1)
            nonempty[a:b] = valid.any(1)
            log_cache[a:b] = (lse_same - torch.where(nonempty[a:b], lse_all, 0.0)).to(torch.float64)
        keep = self.s.length
        self.keys, self.labels = keys[-keep:], key_labels[-keep:]
        return mix(ce, log_cache, nonempty, self.s.weight)


def new_cache(settings: CacheSettings, vocab_size: int, device: torch.device) -> UnigramCache | ContinuousCache:
    kind = UnigramCache if settings.method == "unigram_cache" else ContinuousCache
    return kind(settings, vocab_size, device)


def cache_flops_per_token(settings: CacheSettings, hidden_width: int) -> float:
    """The cache's own work per token on top of the model's forward. Unigram: the count update and the
    mixture, O(1) (a handful: the decay, the increment, the division, the mixture); continuous: a full
    cache's dot products with the L cached states (2·L·s), their softmax and the label's share of it (~4 per
    cached position). Both as the algorithm costs; the vectorised code spends O(window) comparisons per
    token on the unigram's counts, negligible next to the forward."""
    if settings.method == "unigram_cache":
        return 8.0
    return 2.0 * settings.length * hidden_width + 4.0 * settings.length


class CacheEvaluator:
    """One cache method on top of the model read window by window (its state carried for an FWL)."""

    def __init__(self, model: torch.nn.Module, settings: CacheSettings, window: int, vocab_size: int,
                 carry_state: bool):
        self.model, self.settings, self.window = model, settings, window
        self.vocab_size, self.carry_state = vocab_size, carry_state

    def model_windows(self, doc: Tensor, max_tokens: int | None = None) -> list[tuple[Tensor, Tensor, Tensor | None]]:
        """(labels, the model's token losses (float64), hidden states or None) of every window of `doc`."""
        hidden = self.settings.method == "continuous_cache"
        return [(lab, out.token_loss.to(torch.float64).flatten(), out.hidden[0] if hidden else None)
                for lab, out in document_windows(self.model, doc, self.window, self.carry_state, max_tokens, hidden)]

    def score(self, windows: list[tuple[Tensor, Tensor, Tensor | None]],
              settings: CacheSettings | None = None) -> Tensor:
        """The mixture's losses over a document's `model_windows`, the cache starting empty."""
        s = settings or self.settings
        if not windows:
            return torch.zeros(0, dtype=torch.float64)
        cache = new_cache(s, self.vocab_size, windows[0][0].device)
        return torch.cat([cache.window(lab, ce, h) for lab, ce, h in windows])

    @torch.no_grad()
    def document(self, doc: Tensor, max_tokens: int | None = None) -> Tensor:
        return self.score(self.model_windows(doc, max_tokens))


@dataclass
class CacheTuneResult:
    settings: CacheSettings
    grid: list[dict[str, float]]


def grid_points(base: CacheSettings, weights: Sequence[float], second: Sequence[float]) -> list[CacheSettings]:
    """The settings of every (w, δ) (unigram) or (w, θ) (continuous) of the grids, `second` being δ's or
    θ's; each checked (CacheSettings), so a bad value is refused before any work."""
    if not weights or not second:
        raise ValueError(f"{base.method}: the tuning grids must not be empty")
    name = "decay" if base.method == "unigram_cache" else "theta"
    return [replace(base, weight=w, **{name: x}) for w in weights for x in second]


@torch.no_grad()
def tune_cache(evaluator: CacheEvaluator, weights: Sequence[float], second: Sequence[float],
               documents: Sequence[Tensor], max_tokens: int | None = None, log: Callable[[str], None] = lambda s: None,
               reduce: Callable[[Tensor], Tensor] = all_reduce_sum) -> CacheTuneResult:
    """Chooses w and δ (unigram) or w and θ (continuous), `second` being δ's or θ's grid, with the lowest
    token-weighted loss on `documents` (this rank's share; the sums are added over the data-parallel ranks
    by `reduce`, so every rank makes the same choice). The model reads each document once; every grid point
    runs its cache over the same outputs. Ties go to the earlier point."""
    points = grid_points(evaluator.settings, weights, second)
    name = "decay" if evaluator.settings.method == "unigram_cache" else "theta"
    sums = torch.zeros(len(points), 2, dtype=torch.float64)
    for doc in documents:
        windows = evaluator.model_windows(doc, max_tokens)
        for i, p in enumerate(points):
            losses = evaluator.score(windows, p)
            sums[i] += torch.tensor([float(losses.sum()), losses.numel()], dtype=torch.float64)
    sums = reduce(sums)
    grid = []
    best: tuple[float, CacheSettings] | None = None
    for p, (total, count) in zip(points, sums.tolist()):
        if count == 0:
            raise ValueError(f"{p.method}: no tokens in the tuning documents")
        loss = total / count
        grid.append({"weight": p.weight, name: getattr(p, name), "loss": loss, "tokens": int(count)})
        log(f"{p.method} tuning: w {p.weight:g} {name} {getattr(p, name):g} -> loss {loss:.4f}")
        score = loss if math.isfinite(loss) else math.inf
        if best is None or score < best[0]:
            best = (score, p)
    assert best is not None
    return CacheTuneResult(settings=best[1], grid=grid)
