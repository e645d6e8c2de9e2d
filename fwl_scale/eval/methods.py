"""The evaluation methods side by side on the same documents, each with its breakdowns and its cost.

    plain        a baseline window by window (windows of model.seq_len, nothing carried between them)
    slow_head    an FWL checkpoint with its fast weights switched off (model.fwl.step_scale = 0)
    fwl_reset    an FWL checkpoint window by window, its state starting afresh in every window
    fwl_carried  an FWL checkpoint with its state carried from window to window over the whole document
    dynamic      dynamic evaluation (fwl_scale/eval/dynamic.py) of either, on windows of the same length
    unigram_cache     a decayed unigram cache of the document's labels mixed into `plain`'s distribution (a
                      baseline) or `fwl_carried`'s (an FWL) (fwl_scale/eval/cache.py)
    continuous_cache  Grave et al.'s (2017) continuous cache over the last L hidden states, likewise

The caches are not among the default methods (a run without --methods gives the methods above them); name
them with --methods.

Documents are split over data-parallel ranks (document i on rank i mod dp; the model over tp ranks as
trained: fwl_scale/eval/ranks.py); the sums are added over the data-parallel ranks, so the result is that of
one process up to the order of float64 additions (and, split over tp, of the float32 sums inside the model).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from fwl_scale.config import ModelConfig
from fwl_scale.eval.breakdown import Breakdown
from fwl_scale.eval.cache import CacheEvaluator, cache_flops_per_token
from fwl_scale.eval.dynamic import DynamicEvaluator, DynamicSettings, select_parameters
from fwl_scale.eval.names import CACHE_METHODS, available_method_names, default_method_names
from fwl_scale.eval.perplexity import document_token_losses
from fwl_scale.eval.ranks import SINGLE, EvalRanks
from fwl_scale.eval.stages import whole_model
from fwl_scale.parallel.shards import full_shape
from fwl_scale.model.flops import fwl_fwd_per_token, train_flops_per_token


def default_methods(cfg: ModelConfig) -> tuple[str, ...]:
    return default_method_names(cfg.fwl.enabled)


def available_methods(cfg: ModelConfig) -> tuple[str, ...]:
    """The defaults and the caches, which run on either kind of checkpoint."""
    return available_method_names(cfg.fwl.enabled)


def check_methods(methods: Sequence[str], cfg: ModelConfig) -> None:
    allowed = available_methods(cfg)
    bad = [m for m in methods if m not in allowed]
    if bad:
        kind = "an FWL" if cfg.fwl.enabled else "a baseline (no FWL)"
        raise ValueError(f"--methods: {', '.join(bad)} not available for {kind} checkpoint; use {', '.join(allowed)}")


def forward_flops_per_token(cfg: ModelConfig) -> float:
    """The model's forward FLOPs per token at model.seq_len: a third of training's (fwl_scale/model/flops.py)."""
    return train_flops_per_token(cfg).total / 3.0


def dynamic_flops_per_token(cfg: ModelConfig, model: torch.nn.Module, settings: DynamicSettings) -> float:
    """Forward, the backward as far down as the updated parameters (twice the forward of the part it goes
    through), and the update itself (about 6 FLOPs per updated parameter, sgd 4, once per segment)."""
    d, T = cfg.d_model, cfg.seq_len
    head_fwd = fwl_fwd_per_token(cfg) if cfg.fwl.enabled else 2.0 * d * cfg.vocab_size
    layer_fwd = 2.0 * (4 + 2 * cfg.mlp_mult) * d * d + 4.0 * T * d
    through = {"all": forward_flops_per_token(cfg), "head": head_fwd, "last": head_fwd + layer_fwd}[settings.params]
    # Whole tensors: those of every tp rank and pipeline stage.
    n_updated = sum(full_shape(p).numel() for _, p in select_parameters(whole_model(model), settings.params))
    per_param = 6.0 if settings.variant == "rms" else 4.0
    return forward_flops_per_token(cfg) + 2.0 * through + per_param * n_updated / settings.segment


@dataclass
class MethodResult:
    name: str
    breakdown: Breakdown
    wall_s: float  # the slowest rank's
    flops_per_token: float
    extra: dict[str, object]

    def as_dict(self) -> dict[str, object]:
        tokens = self.breakdown.tokens
        return {"method": self.name, **self.breakdown.as_dict(), "wall_s": self.wall_s,
                "tokens_per_s": tokens / self.wall_s if self.wall_s > 0 else None,
                "flops_per_token": self.flops_per_token, **self.extra}


class Progress:
    """One line per document on stderr (rank 0, its own share): documents and tokens done."""

    def __init__(self, method: str, total_docs: int, enabled: bool, data_ranks: int = 1):
        self.method, self.total, self.enabled = method, total_docs, enabled
        self.docs = self.tokens = 0
        self.t0 = time.perf_counter()
        self.world = data_ranks

    def update(self, tokens: int) -> None:
        self.docs += 1
        self.tokens += tokens
        if self.enabled:
            rate = self.tokens / max(1e-9, time.perf_counter() - self.t0)
            share = f" (rank 0 of {self.world})" if self.world > 1 else ""
            print(f"{self.method}: {self.docs}/{self.total} documents{share}, {self.tokens:,} tokens, "
                  f"{rate:,.0f} tokens/s", file=sys.stderr, flush=True)


def scorer_for(method: str, model: torch.nn.Module, window: int, dynamic: DynamicEvaluator | None,
               caches: dict[str, CacheEvaluator] | None = None) -> Callable[[Tensor, int | None], Tensor]:
    if method in ("plain", "fwl_reset", "slow_head"):
        return lambda doc, m: document_token_losses(model, doc, window, False, m)
    if method == "fwl_carried":
        return lambda doc, m: document_token_losses(model, doc, window, True, m)
    if method == "dynamic":
        if dynamic is None:
            raise ValueError("the dynamic method needs a DynamicEvaluator")
        return dynamic.document
    if method in CACHE_METHODS:
        if caches is None or method not in caches:
            raise ValueError(f"the {method} method needs a CacheEvaluator")
        return caches[method].document
    raise ValueError(f"unknown evaluation method {method!r}")


def run_method(method: str, model: torch.nn.Module, cfg: ModelConfig, documents: Sequence[Tensor],
               ranks: Tensor | None, max_tokens: int | None = None, dynamic: DynamicEvaluator | None = None,
               progress: bool = True, where: EvalRanks = SINGLE,
               caches: dict[str, CacheEvaluator] | None = None) -> MethodResult:
    """`documents`: all of them (every rank gets the same list and takes its share). `ranks`: training
    frequency rank of every token (the breakdown's); `where`: the evaluation's layout; `caches`: the cache
    methods' evaluators, by method."""
    mine = where.share(list(documents))
    window = cfg.seq_len
    score = scorer_for(method, model, window, dynamic, caches)
    bd = Breakdown(window, cfg.vocab_size, ranks)
    prog = Progress(method, len(mine), progress and where.leader, where.size)
    fwl = getattr(model, "fwl", None)
    saved = fwl.step_scale if fwl is not None else None
    if method == "slow_head":
        fwl.step_scale = 0.0
    try:
        t0 = time.perf_counter()
        for doc in mine:
            losses = score(doc, max_tokens)
            bd.add(doc, losses)
            prog.update(losses.numel())
        wall = time.perf_counter() - t0
    finally:
        if fwl is not None:
            fwl.step_scale = saved
    bd.all_reduce(where.sum)
    wall = where.max(wall)
    if method == "dynamic":
        flops = dynamic_flops_per_token(cfg, model, dynamic.settings)
        extra: dict[str, object] = {"dynamic": dynamic.settings.as_dict()}
    elif method in CACHE_METHODS:
        settings = caches[method].settings
        width = cfg.fwl_width if cfg.fwl.enabled else cfg.d_model
        flops = forward_flops_per_token(cfg) + cache_flops_per_token(settings, width)
        extra = {"cache": settings.as_dict()}
    else:
        flops, extra = forward_flops_per_token(cfg), {}
    return MethodResult(method, bd, wall, flops, extra)
