"""Dynamic evaluation (Krause et al. 2018, "Dynamic Evaluation of Neural Sequence Models"; 2019, "Dynamic
Evaluation of Transformer Language Models"): the baseline an FWL has to beat, since both adapt to the
document being read, one by gradient steps on real weights, the other by its fast weights.

Every document starts from the trained weights θ0 (a per-document copy: nothing of one document reaches
the next). The document is read in consecutive segments of `segment` tokens; each segment is first scored,
then the model takes one step on that segment's mean loss, so a token's score never depends on itself or
on later tokens. The body sees aligned windows of `window` tokens (model.seq_len, as in the windowed
evaluation of the other methods). A segment as long as the window is scored on its own. Shorter segments
(Krause et al. update every 20–100 tokens) see the window's earlier tokens through a key/value cache per
layer, and an FWL's state carried within the window, both computed by the weights of their own segment
and held fixed (the gradient stops there), as in Krause et al. 2019's Transformer-XL memory: every token
goes through the body once.

    sgd:  θ ← θ − η g + λ (θ0 − θ)
    rms:  θ ← θ − η g / (√MS + ε·mean_t(√MS)) + min(λ · RMS_norm, 1) ⊙ (θ0 − θ),   RMS_norm = √MS / mean(√MS)

MS is the mean squared gradient over segments of training (or validation) text, a global prior: each
parameter moves in proportion to how much it moves in training, and decays back to θ0 at a rate that grows
with it. ε is relative to the mean √MS of the parameter's own tensor (mean_t; the one departure from the
paper, whose MS came from the whole training set): an embedding row of a token missing from the
statistics' segments has MS = 0 and would otherwise take a step of η g / ε and blow the model up.
η and λ are chosen on validation documents by a small grid (`tune`) and then frozen. Only the parameters
of the chosen subset (`PARAM_SUBSETS`) change; the others do not even get gradients.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from fwl_scale.eval.stages import loss_gradients, sum_over_model, whole_model
from fwl_scale.model.blocks import KVCache
from fwl_scale.model.fwl import FWLState
from fwl_scale.parallel.shards import is_sharded
from fwl_scale.parallel.world import all_reduce_sum

VARIANTS = ("sgd", "rms")
PARAM_SUBSETS = ("all", "head", "last")  # everything; what follows the body; the last block and the head
RULE_PARAMETERS = ("step_sizes", "decay_logits", "step_gate_weight", "step_gate_bias", "unembed_log_step_sizes",
                   "unembed_decay_logits")  # the FWL's own update rule: never changed (select_parameters)


@dataclass(frozen=True)
class DynamicSettings:
    variant: str = "rms"
    lr: float = 1e-4
    decay: float = 0.0
    segment: int = 256
    params: str = "all"
    eps: float = 0.1  # relative to the mean √MS of each tensor
    window: int | None = None  # the body's window (None: the segment)

    def __post_init__(self) -> None:
        if self.window is not None and not 1 <= self.segment <= self.window:
            raise ValueError(f"dynamic evaluation: the segment ({self.segment}) must be 1 to the body's window "
                             f"({self.window}) tokens")
        if self.variant not in VARIANTS:
            raise ValueError(f"dynamic evaluation variant {self.variant!r}: use one of {', '.join(VARIANTS)}")
        if self.params not in PARAM_SUBSETS:
            raise ValueError(f"dynamic evaluation parameters {self.params!r}: use one of {', '.join(PARAM_SUBSETS)}")
        if self.segment < 1 or self.lr < 0 or self.decay < 0:
            raise ValueError(f"dynamic evaluation: segment ({self.segment}) must be >= 1, lr ({self.lr}) and "
                             f"decay ({self.decay}) >= 0")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def select_parameters(model: torch.nn.Module, subset: str) -> list[tuple[str, torch.nn.Parameter]]:
    """The named parameters dynamic evaluation updates (never the FWL's step sizes and forgetting factors).
    `head`: the final norm, the FWL, the unembedding
    (with tied embeddings that is the embedding matrix, so the input embedding moves too); `last`: the last
    transformer block as well."""
    if subset not in PARAM_SUBSETS:
        raise ValueError(f"dynamic evaluation parameters {subset!r}: use one of {', '.join(PARAM_SUBSETS)}")
    # The FWL's step sizes and forgetting factors are the fast-weight rule itself, not weights of the
    # model it adapts: a few scalars whose gradients on a long document dwarf their training statistics,
    # so RMS steps send them negative (the fast update then ascends the loss) within a few segments.
    named = [(n, p) for n, p in model.named_parameters() if not n.endswith(RULE_PARAMETERS)]
    if subset == "all":
        return named
    prefixes = ["norm_f.", "fwl.", "lm_head."]
    if getattr(model, "lm_head", None) is None:
        prefixes.append("embed.")
    if subset == "last":
        prefixes.append(f"blocks.{len(model.blocks) - 1}.")
    return [(n, p) for n, p in named if n.startswith(tuple(prefixes))]


def windows(doc: Tensor, segment: int, max_tokens: int | None = None) -> Iterable[tuple[Tensor, Tensor]]:
    """(input ids [1, n], labels [1, n]) of consecutive segments of a 1-D document; the last may be shorter.
    `max_tokens`: only the first that many predicted tokens."""
    inputs, labels = doc[:-1], doc[1:]
    n = inputs.numel() if max_tokens is None else min(inputs.numel(), max_tokens)
    for a in range(0, n, segment):
        b = min(a + segment, n)
        yield inputs[a:b][None], labels[a:b][None]


def _rms_means(model: torch.nn.Module, params: list[Tensor], rms: list[Tensor]) -> tuple[list[float], float]:
    """The mean √MS of each whole tensor and of all of them. Under tensor parallelism a rank holds shards
    of some tensors: their sums and sizes are added over the tp group (one all-reduce), so every rank
    uses the whole tensor's mean, as one process does; a pipeline stage adds the other stages' tensors to
    the mean of all."""
    stats = torch.tensor([[float(r.sum()), float(r.numel())] for r in rms], dtype=torch.float64).reshape(-1, 2)
    tp = getattr(model, "tp", None)
    if tp is not None:
        sharded = torch.tensor([is_sharded(p) for p in params])[:, None]
        parts = stats * sharded
        dist.all_reduce(parts, op=dist.ReduceOp.SUM, group=tp.group)
        stats = torch.where(sharded, parts, stats)
    total = sum_over_model(model, stats, params)
    return (stats[:, 0] / stats[:, 1]).tolist(), float(total[0] / total[1])


class WindowContext:
    """What a segment sees of its window's earlier segments: their keys and values per layer and their
    document ids (GPT.body_cached), and the FWL state after them; all detached, as their own segment's
    weights computed them."""

    def __init__(self, n_layers: int, device: torch.device):
        self.kv = [KVCache() for _ in range(n_layers)]
        self.docs = torch.zeros(1, 0, dtype=torch.int64, device=device)
        self.state: FWLState | None = None

    def advance(self, docs: Tensor, state: FWLState | None) -> None:
        for c in self.kv:
            if c.k is not None:  # (a pipeline stage fills only its own blocks' caches)
                c.k, c.v = c.k.detach(), c.v.detach()
        self.docs = torch.cat([self.docs, docs], dim=1)
        self.state = state.detach() if state is not None else None


class DynamicEvaluator:
    """Scores documents with dynamic evaluation. `ms`: parameter name → mean squared gradient (rms only;
    see `mean_squared_gradients`). The model's own weights are θ0 again after every document."""

    def __init__(self, model: torch.nn.Module, settings: DynamicSettings, ms: dict[str, Tensor] | None = None):
        self.model, self.settings = model, settings
        self.named = select_parameters(model, settings.params)  # (a pipeline stage's own: maybe none)
        if not select_parameters(whole_model(model), settings.params):
            raise ValueError(f"dynamic evaluation: the model has no parameters in subset {settings.params!r}")
        self.theta0 = [p.detach().clone() for _, p in self.named]
        self.scale: list[Tensor] | None = None  # 1/(√MS + ε)
        self.decay: list[Tensor | float] = [settings.decay] * len(self.named)
        if settings.variant == "rms":
            if ms is None:
                raise ValueError("dynamic evaluation rms: needs the mean squared gradients (ms)")
            missing = [n for n, _ in self.named if n not in ms]
            if missing:
                raise ValueError(f"dynamic evaluation rms: no mean squared gradient for {missing[:3]}")
            rms = [ms[n].to(p.device, torch.float64).sqrt() for n, p in self.named]
            tensor_mean, mean_rms = _rms_means(model, [p for _, p in self.named], rms)
            self.scale = [(1.0 / (r + settings.eps * max(m, 1e-30))).to(p.dtype)
                          for r, m, (_, p) in zip(rms, tensor_mean, self.named)]
            self.decay = [(settings.decay * r / max(mean_rms, 1e-30)).clamp(max=1.0).to(p.dtype)
                          for r, (_, p) in zip(rms, self.named)]

    def _restore(self) -> None:
        with torch.no_grad():
            for (_, p), p0 in zip(self.named, self.theta0):
                p.copy_(p0)

    def step(self, ids: Tensor, labels: Tensor, context: "WindowContext | None" = None) -> Tensor:
        """Scores one segment with the current weights and then updates them on it; returns the token
        losses [n] (float64) of the scoring. `context`: the window's earlier segments (keys and values,
        FWL state), extended by this one; None: the segment is a window of its own."""
        params = [p for _, p in self.named]
        docs = torch.zeros_like(ids)
        with torch.enable_grad():
            if context is None:
                out = self.model(ids, labels, docs)
            else:
                h = self.model.body_cached(ids, docs, context.docs, context.kv)
                out = self.model.head(h, ids, labels, docs, fwl_state=context.state,
                                      return_state=self.model.fwl is not None)
            grads = loss_gradients(self.model, out, params)
        if context is not None:
            context.advance(docs, out.fwl_state)
        self._update(params, grads)
        return out.token_loss.detach().to(torch.float64).flatten()

    def _update(self, params: list[Tensor], grads: Sequence[Tensor | None]) -> None:
        s = self.settings
        with torch.no_grad():
            for i, (p, g, p0) in enumerate(zip(params, grads, self.theta0)):
                pull = (p0 - p) * self.decay[i]  # from θ before this step, as in Krause et al.
                if g is not None:
                    p.sub_(g * self.scale[i] if self.scale is not None else g, alpha=s.lr)
                p.add_(pull)

    def document(self, doc: Tensor, max_tokens: int | None = None) -> Tensor:
        """Token losses of one 1-D document, starting from θ0 and leaving θ0 behind."""
        flags = [p.requires_grad for p in self.model.parameters()]
        chosen = {id(p) for _, p in self.named}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in chosen)  # no gradients for parameters that are not updated
        try:
            self._restore()
            s = self.settings
            if s.window is None or s.segment == s.window:
                losses = [self.step(ids, lab) for ids, lab in windows(doc, s.segment, max_tokens)]
            else:
                losses = []
                for w_ids, w_lab in windows(doc, s.window, max_tokens):
                    context = WindowContext(len(self.model.blocks), w_ids.device)
                    for a in range(0, w_ids.shape[1], s.segment):
                        losses.append(self.step(w_ids[:, a:a + s.segment], w_lab[:, a:a + s.segment], context))
        finally:
            self._restore()
            for p, f in zip(self.model.parameters(), flags):
                p.requires_grad_(f)
        return torch.cat(losses) if losses else torch.zeros(0, dtype=torch.float64)


def mean_squared_gradients(model: torch.nn.Module, subset: str, segments: Iterable[tuple[Tensor, Tensor]],
                           reduce: Callable[[Tensor], Tensor] = all_reduce_sum) -> dict[str, Tensor]:
    """MS of Krause et al.: the mean over `segments` ((input ids, labels) as `windows` gives them, this
    rank's share under data parallelism: sums and count are added over the data-parallel ranks by
    `reduce`, by default the whole world) of the squared gradient of the segment's mean loss."""
    named = select_parameters(model, subset)
    sums = [torch.zeros_like(p, dtype=torch.float64) for _, p in named]
    n = 0
    for ids, lab in segments:
        with torch.enable_grad():
            out = model(ids, lab, torch.zeros_like(ids))
            grads = loss_gradients(model, out, [p for _, p in named])
        for s, g in zip(sums, grads):
            if g is not None:
                s.add_(g.detach().to(torch.float64) ** 2)
        n += 1
    # On the CPU: evaluation's process group is gloo whatever the device (fwl_scale/eval/docrun.py).
    flat = reduce(torch.cat([s.flatten().cpu() for s in sums] + [torch.tensor([float(n)], dtype=torch.float64)]))
    total = float(flat[-1])
    if total == 0:
        raise ValueError("dynamic evaluation rms: no segments to compute the mean squared gradients from")
    out, i = {}, 0
    for (name, p), s in zip(named, sums):
        out[name] = (flat[i:i + s.numel()].view_as(s) / total)
        i += s.numel()
    return out


@dataclass
class TuneResult:
    settings: DynamicSettings
    grid: list[dict[str, float]]  # {"lr", "decay", "loss", "tokens"} for every point tried


def tune(model: torch.nn.Module, base: DynamicSettings, lrs: Sequence[float], decays: Sequence[float],
         documents: Sequence[Tensor], ms: dict[str, Tensor] | None, max_tokens: int | None = None,
         log: Callable[[str], None] = lambda s: None,
         reduce: Callable[[Tensor], Tensor] = all_reduce_sum) -> TuneResult:
    """Chooses (lr, decay) with the lowest token-weighted loss on `documents` (this rank's share; the
    losses are summed over the data-parallel ranks by `reduce`, so every rank makes the same choice).
    Ties go to the earlier point."""
    if not lrs or not decays:
        raise ValueError("dynamic evaluation: the lr and decay grids must not be empty")
    grid = []
    best: tuple[float, DynamicSettings] | None = None
    for lr in lrs:
        for decay in decays:
            s = replace(base, lr=lr, decay=decay)
            ev = DynamicEvaluator(model, s, ms)
            tot = torch.zeros(2, dtype=torch.float64)
            for doc in documents:
                losses = ev.document(doc, max_tokens)
                tot += torch.tensor([float(losses.sum()), losses.numel()], dtype=torch.float64)
            tot = reduce(tot)
            if tot[1] == 0:
                raise ValueError("dynamic evaluation: no tokens in the tuning documents")
            loss = float(tot[0] / tot[1])
            grid.append({"lr": lr, "decay": decay, "loss": loss, "tokens": int(tot[1])})
            log(f"dynamic evaluation tuning ({s.variant}, {s.params}): lr {lr:g} decay {decay:g} -> loss {loss:.4f}")
            if not math.isfinite(loss):
                loss = math.inf  # diverged: never chosen over a finite point
            if best is None or loss < best[0]:
                best = (loss, s)
    assert best is not None
    return TuneResult(settings=best[1], grid=grid)
