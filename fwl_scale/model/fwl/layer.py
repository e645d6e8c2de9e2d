"""The Fast Weight Layer block (docs/design.md §1.1), between the transformer body and the unembedding.

`FastWeightLayer.forward` reads in the order of the design: the slow pass with weights θ, the per-token
LM-loss gradient at θ written by hand as differentiable ops, the running sums of those gradients
(sums.py), then the fast pass where position i uses θ_i = θ - η ⊙ k_i Σ_{j<i} λ^(i-1-j) ∇_F CE_j. Because
each gradient of a dense layer is rank one, the fast dense layers are causal linear attention
(fast_weights.py); nothing is detached, so the outer loss reaches θ, the step sizes and the body through
both passes. naive.py builds θ_i literally with autograd: the reference the tests hold this to.

Past the training length (docs/design.md §1.3) two options keep the sums in range. `normalize="mean"`:
k_i = 1/n_i, n_i the (decayed) count of earlier positions of the document that carry a loss — the update
is their (weighted) mean; the count is a running sum like the others, carried in FWLState. Because the
update is linear in the sums, this is a per-query scale of each sum's output. `decay="learned"`: a
forgetting factor λ = sigmoid(decay_logits) per fast tensor (λ = 1 otherwise). With both, each fast
tensor's count is decayed with its own λ, so the update is the λ-weighted mean Σ λ^(i-1-j) ∇_j / Σ λ^(i-1-j)
w_j. The count needs no exchange between context-parallel ranks: labels and document ids are the whole
sequence on every rank, so each computes it for its positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fwl_scale import IGNORE_INDEX
from fwl_scale.config import FWLConfig
from fwl_scale.model.fwl.context_parallel import RankExchange, choose_exchange, replicate_last
from fwl_scale.model.fwl.fast_weights import ChunkLayout, masked_state
from fwl_scale.model.fwl.functional import fast_chunk, layer_norm_stats
from fwl_scale.model.fwl.sequential import pending_pass, sequential_forward
from fwl_scale.model.fwl.state import (COUNTED, DECAY, FAST_TENSORS, NORMALIZE, STEP_SIZES, FWLState,
                                       count_normalisers, inverse_count)
from fwl_scale.model.fwl.sums import FastSums
from fwl_scale.model.fwl.unembedding import FAST_SET, UNEMBED_TENSORS, FastUnembedding, pending_sums
from fwl_scale.model.vocab import unembedding_input_grad
from fwl_scale.parallel.context_parallel import CPContext
from fwl_scale.parallel.layout import TPContext
from fwl_scale.parallel.mappings import copy_to_tp, reduce_from_tp
from fwl_scale.parallel.regions import enter_tp_region, whole_sequence
from fwl_scale.parallel.shards import init_normal_, set_replicated, set_sharded, tp_rank, tp_size

# The ones whose sums (and fast updates) are sharded or partial under tensor parallelism.
_SHARDED_SUMS = 3


@dataclass
class Segment:
    """One forward's labels and document boundaries: the whole sequence, and this rank's positions."""
    labels: Tensor  # [B, T], the last one IGNORE_INDEX when its label is pending
    reset: Tensor  # [B, T], True where a document starts (also at 0 when the carried document ends)
    start: int  # this rank's first position (context parallelism), else 0
    local_labels: Tensor  # [B, T_loc]
    loss_weight: Tensor  # [B, T_loc], 1 where a label carries a loss


class FastWeightLayer(nn.Module):
    """The FWL block, built from its config section with every default resolved
    (`ModelConfig.fwl_resolved`). Under tensor, sequence and context parallelism it runs by the rules of
    docs/design.md §3.2; the state is sharded like the weights: w1 [B, d, 4s/tp], b1 [B, 4s/tp],
    w2 [B, 4s/tp, s]; b2, alpha, beta and pending_x replicated."""

    def __init__(self, cfg: FWLConfig, d_model: int, vocab_size: int, padded_vocab_size: int,
                 tp: TPContext | None = None, cp: CPContext | None = None, device: torch.device | str | None = None):
        super().__init__()
        unresolved = [name for name in ("width", "grad_scale", "init_std") if getattr(cfg, name) is None]
        if unresolved:
            raise ValueError(f"FWL config fields {unresolved} are unset: build the layer from "
                             f"ModelConfig.fwl_resolved, which fills in their defaults")
        width, hidden = cfg.width, cfg.hidden_mult * cfg.width
        n = tp_size(tp)
        if hidden % n or padded_vocab_size % n:
            raise ValueError(f"FWL hidden width {hidden} and padded vocabulary {padded_vocab_size} must be "
                             f"divisible by the tensor-parallel size {n}")
        if cfg.residual and width != d_model:
            raise ValueError(f"a residual FWL needs width == d_model, got {width} and {d_model}")
        if cfg.normalize not in NORMALIZE or cfg.decay not in DECAY:
            raise ValueError(f"FWL normalize must be one of {NORMALIZE} and decay one of {DECAY}, got "
                             f"{cfg.normalize!r} and {cfg.decay!r}")
        if cfg.step_size not in STEP_SIZES:
            raise ValueError(f"FWL step_size must be one of {STEP_SIZES}, got {cfg.step_size!r}")
        if cfg.update == "sequential" and (cfg.step_size != "tensor" or list(cfg.fast_set) != ["head"]):
            raise ValueError("FWL update='sequential' runs with step_size='tensor' and fast_set=['head'] only so far")
        if cfg.decay == "learned" and not 0.0 < cfg.decay_init < 1.0:
            raise ValueError(f"FWL decay_init must lie in (0, 1), got {cfg.decay_init}")
        if cfg.update not in ("parallel", "sequential") or cfg.inner_chunk < 1:
            raise ValueError(f"FWL update must be parallel or sequential and inner_chunk >= 1, got {cfg.update!r} "
                             f"and {cfg.inner_chunk}")
        if cfg.update == "sequential" and cp is not None and cp.size > 1:
            raise ValueError("FWL update=sequential does not run under context parallelism (config.check_layout)")
        self.cfg = cfg
        self.tp = tp if n > 1 else None
        self.cp = cp if cp is not None and cp.size > 1 else None
        self.vocab_size = vocab_size
        # Multiplies the learned step sizes; 0 switches the fast updates off (the slow head alone).
        self.step_scale = cfg.step_scale
        self.w1 = nn.Parameter(torch.empty(hidden // n, d_model, device=device))
        self.b1 = nn.Parameter(torch.empty(hidden // n, device=device))
        self.w2 = nn.Parameter(torch.empty(width, hidden // n, device=device))
        self.b2 = nn.Parameter(torch.empty(width, device=device))
        self.alpha = nn.Parameter(torch.empty(width, device=device))
        self.beta = nn.Parameter(torch.empty(width, device=device))
        # The unembedding's bias c (slow only); the unembedding matrix U is passed in (tied embedding).
        self.out_bias = nn.Parameter(torch.empty(padded_vocab_size // n, device=device))
        # One vector, not six scalars: 0-dim parameters break DeepSpeed's initial broadcast on CPU.
        self.step_sizes = nn.Parameter(torch.empty(len(FAST_TENSORS), device=device))
        # step_size="token": η_j = η ⊙ 2σ(G x_j + g) for token j's gradient (TTT's learned per-token step size),
        # one factor per fast tensor; 1 at init (G, g = 0), so the layer starts as with step_size="tensor".
        self.step_gate_weight = self.step_gate_bias = None
        if cfg.step_size == "token":
            self.step_gate_weight = nn.Parameter(torch.empty(len(FAST_TENSORS), d_model, device=device))
            self.step_gate_bias = nn.Parameter(torch.empty(len(FAST_TENSORS), device=device))
        # The fast unembedding (unembedding.py): c and/or U join the fast set, with step sizes η = exp(ρ) (their
        # useful size spans orders of magnitude: ~1/frequency for c, ~1 for U) and, with a decay, their own λ.
        bad = [m for m in cfg.fast_set if m not in FAST_SET]
        if bad or "head" not in cfg.fast_set:
            raise ValueError(f"FWL fast_set must hold 'head' and any of {UNEMBED_TENSORS}, got {cfg.fast_set}")
        self.unembed_members = tuple(m for m in UNEMBED_TENSORS if m in cfg.fast_set)
        self.unembed_log_step_sizes = self.unembed_decay_logits = None
        if self.unembed_members:
            if cfg.step_size != "tensor":
                raise ValueError("the FWL's fast unembedding needs step_size='tensor' (per-token factors of c and U "
                                 "are not built yet)")
            if n > 1 or self.cp is not None:
                raise ValueError("the FWL's fast unembedding runs in one process or data parallel only (no tensor "
                                 "or context parallelism yet)")
            self.unembed_log_step_sizes = nn.Parameter(torch.empty(len(UNEMBED_TENSORS), device=device))
            if cfg.decay == "learned":
                self.unembed_decay_logits = nn.Parameter(torch.empty(len(UNEMBED_TENSORS), device=device))
        # Forgetting factors λ = sigmoid(decay_logits), one per fast tensor (a vector, like the step sizes).
        self.decay_logits = (nn.Parameter(torch.empty(len(FAST_TENSORS), device=device))
                             if cfg.decay == "learned" else None)
        for p, dim in ((self.w1, 0), (self.b1, 0), (self.w2, 1), (self.out_bias, 0)):
            set_sharded(p, self.tp, dim)
        for p in (self.b2, self.alpha, self.beta, self.step_sizes, self.decay_logits, self.step_gate_weight,
                  self.step_gate_bias, self.unembed_log_step_sizes, self.unembed_decay_logits):
            if p is not None:
                set_replicated(p)
        for p in self.parameters():
            p.tp_rank = tp_rank(self.tp)
        if torch.device(device if device is not None else "cpu").type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            # Whole tensors drawn, this rank's slice kept: the same seed gives the same FWL at every tp.
            init_normal_(self.w1, self.cfg.init_std)
            init_normal_(self.w2, self.cfg.init_std)
            for p in (self.b1, self.b2, self.beta, self.out_bias):
                p.zero_()
            self.alpha.fill_(1.0)
            self.step_sizes.fill_(self.cfg.step_size_init)
            for p in (self.step_gate_weight, self.step_gate_bias):
                if p is not None:
                    p.zero_()
            if self.decay_logits is not None:
                self.decay_logits.fill_(math.log(self.cfg.decay_init / (1.0 - self.cfg.decay_init)))
            if self.unembed_log_step_sizes is not None:
                init = self.cfg.unembed_step_size_init
                self.unembed_log_step_sizes.copy_(torch.tensor([math.log(init), math.log(init / self.cfg.width)]))
            if self.unembed_decay_logits is not None:
                self.unembed_decay_logits.fill_(math.log(self.cfg.decay_init / (1.0 - self.cfg.decay_init)))

    def forward(self, x_btd: Tensor, unembed: Tensor, labels_bt: Tensor, doc_ids_bt: Tensor | None = None,
                state: FWLState | None = None, pending_labels_b: Tensor | None = None,
                last_label_pending: bool = False, return_state: bool = False) -> tuple[Tensor, FWLState | None]:
        """Returns the fast-pass output u' [B, T, s] (logits = U u' + c) and, if asked, the state after
        the last position.

        `labels_bt` are the next-token labels (IGNORE_INDEX where no loss). `state` carries the sums of
        the previous segment of the same documents; if it holds a pending position, `pending_labels_b`
        (the previous segment's missing labels, i.e. this segment's first tokens) must be given.
        `last_label_pending`: the label of the last position is not known yet; its gradient is held back
        as pending in the returned state.

        Under tensor, sequence and context parallelism (docs/design.md §3.2) labels and document ids are
        always the whole sequence [B, T] on every rank. With a fast unembedding the logits are no longer
        U u' + c: `head` gives the losses."""
        u_fast, fwl_state, _ = self._forward(x_btd, unembed, labels_bt, doc_ids_bt, state, pending_labels_b,
                                             last_label_pending, return_state)
        return u_fast, fwl_state

    def _forward(self, x_btd: Tensor, unembed: Tensor, labels_bt: Tensor, doc_ids_bt: Tensor | None,
                 state: FWLState | None, pending_labels_b: Tensor | None, last_label_pending: bool,
                 return_state: bool) -> tuple[Tensor, FWLState | None, dict[str, object]]:
        """`forward`, and what the fast unembedding reads of it: the slow pass, the segment, the
        normalisers and the carried sums of c and U."""
        x = enter_tp_region(x_btd, self.tp)  # once for its three uses: W1's input, key and query
        B, T_loc, _ = x.shape
        if doc_ids_bt is None:
            doc_ids_bt = torch.zeros_like(labels_bt, dtype=torch.long)
        seg = self._segment(labels_bt, doc_ids_bt, state, last_label_pending, B, T_loc, x.dtype)
        skip = whole_sequence(x_btd, self.tp) if self.cfg.residual else None
        if self.cfg.update == "sequential":
            # Inner chunks, each taking its gradients at the fast weights of its first position (§1.6): the
            # steps below, chunk by chunk (sequential.py).
            u_fast, fwl_state = sequential_forward(self, x_btd, x, skip, seg, doc_ids_bt, unembed, state,
                                                   pending_labels_b, last_label_pending, return_state)
            return u_fast, fwl_state, {}

        # The slow pass at θ and each token's gradient of its own loss there (§1.1).
        slow = self.slow_pass(x, skip)
        grads = self.slow_gradients(slow, unembed, seg.local_labels, seg.loss_weight)
        # The running sums Σ_{j<i} of those gradients: carried in from the previous segment and the earlier
        # ranks (§1.4), forgotten by λ and normalised by 1/n_i (§1.3).
        sums, count_out, carried_unembedding = self._running_sums(x, x_btd, slow, grads, seg, state, pending_labels_b,
                                                                  doc_ids_bt, unembed, return_state)

        # The fast pass: position i with θ_i = θ - η ⊙ (the sums at i) (§1.1).
        eta, eta_tp = self.scaled_step_sizes(x.dtype)
        h1_fast = slow["h1"] - eta_tp[0] * sums.attend("w1", x) - eta_tp[1] * sums.cumsum("b1")
        a_fast = F.relu(h1_fast).pow(2)
        h2_fast = self.w2_out(a_fast, eta_tp[2] * sums.attend("w2", a_fast), eta[3] * sums.cumsum("b2"))
        if skip is not None:
            h2_fast = h2_fast + skip
        xhat_fast, _ = layer_norm_stats(h2_fast, self.cfg.eps)
        u_fast = ((self.alpha - eta[4] * sums.cumsum("alpha")) * xhat_fast
                  + (self.beta - eta[5] * sums.cumsum("beta")))
        parts = {"u": slow["u"], "seg": seg, "scale": sums.scale, "carried": carried_unembedding}
        if not return_state:
            return u_fast, None, parts
        pending_x = whole_sequence(x_btd, self.tp)[:, -1] if last_label_pending else None
        final = sums.final()
        if self.cp is not None:
            final, pending_x = replicate_last(self.cp, final, pending_x)
        return u_fast, FWLState(**final, doc_id=doc_ids_bt[:, -1].clone(), pending_x=pending_x, count=count_out), parts

    def head(self, x_btd: Tensor, unembed: Tensor, labels_bt: Tensor, doc_ids_bt: Tensor | None = None,
             state: FWLState | None = None, pending_labels_b: Tensor | None = None, last_label_pending: bool = False,
             return_state: bool = False, return_logits: bool = False
             ) -> tuple[Tensor, Tensor | None, FWLState | None, Tensor]:
        """The FWL with a fast unembedding (model.fwl.fast_set): the token losses [B, T], the logits
        [B, T, V] if asked, the state if asked (its sums of c and U included), and the fast pass's output
        u'. `forward`'s arguments."""
        u_fast, fwl_state, parts = self._forward(x_btd, unembed, labels_bt, doc_ids_bt, state, pending_labels_b,
                                                 last_label_pending, return_state)
        seg, scale = parts["seg"], parts["scale"]
        fast = FastUnembedding(parts["u"], unembed, self.out_bias, seg.local_labels,
                               seg.loss_weight * self._unembed_grad_scale(), seg.reset,
                               self.step_scale * torch.exp(self.unembed_log_step_sizes), self.unembed_log_decay(),
                               scale[..., len(FAST_TENSORS):] if self._unembed_counted() else None,
                               parts["carried"], self.vocab_size, self.cfg.vocab_chunk, self.unembed_members)
        token_loss = fast.token_losses(u_fast)
        logits = fast.logits(u_fast) if return_logits else None
        if fwl_state is not None:
            fwl_state.unembedding_sums = fast.final()
        return token_loss, logits, fwl_state, u_fast

    def slow_pass(self, x: Tensor, skip: Tensor | None) -> dict[str, Tensor]:
        """`x` [B, T, d]: inside the tensor-parallel region (replicated values). `skip`: the same values
        outside it (added to W2's output by a residual FWL, else None)."""
        h1 = F.linear(x, self.w1, self.b1)
        r = F.relu(h1)
        a = r * r
        h2 = self.w2_out(a)
        if skip is not None:
            h2 = h2 + skip
        xhat, rstd = layer_norm_stats(h2, self.cfg.eps)
        return {"x": x, "r": r, "a": a, "xhat": xhat, "rstd": rstd, "h1": h1, "skip": skip,
                "u": self.alpha * xhat + self.beta}

    def slow_gradients(self, slow: dict[str, Tensor], unembed: Tensor, labels: Tensor,
                       loss_weight: Tensor) -> dict[str, Tensor]:
        """Per-token gradients of k·w_t·CE_t at θ (hand-written backward, differentiable ops).
        gu, gh2 are replicated; gh2_tp is gh2 entering the tensor-parallel region; gh1 is sharded."""
        gu = unembedding_input_grad(slow["u"], unembed, self.out_bias, labels, loss_weight * self._grad_scale(),
                                    self.vocab_size, self.cfg.vocab_chunk, self.tp)
        gxh = self.alpha * gu
        xhat = slow["xhat"]
        gh2 = (gxh - gxh.mean(-1, keepdim=True) - xhat * (gxh * xhat).mean(-1, keepdim=True)) * slow["rstd"]
        gh2_tp = copy_to_tp(gh2, self.tp)
        ga = gh2_tp @ self.w2
        gh1 = ga * 2 * slow["r"]
        return {"gu": gu, "gh2": gh2, "gh2_tp": gh2_tp, "gh1": gh1}

    def _grad_scale(self) -> float:
        # normalize="mean" | "sqrt" scales the sums' outputs by 1/n or 1/√n instead of a constant k.
        return self.cfg.grad_scale if self.cfg.normalize == "none" else 1.0

    def _unembed_counted(self) -> bool:
        """The fast unembedding's sums are divided by counts of their own (unembed_normalize="head" with a
        counted normaliser); otherwise they are plain decayed sums."""
        return bool(self.unembed_members) and self.cfg.unembed_normalize == "head" and self.cfg.normalize in COUNTED

    def _unembed_grad_scale(self) -> float:
        return self._grad_scale() if self.cfg.unembed_normalize == "head" else 1.0

    @staticmethod
    def keys_values(x: Tensor, slow: dict[str, Tensor], grads: dict[str, Tensor],
                    gates: Tensor | None = None) -> dict[str, tuple[Tensor | None, Tensor]]:
        """Keys and values of the six running sums (key None: a plain sum of the values); `gates`
        [B, T, 6] (step_size="token") scale each token's values per fast tensor."""
        kv = {"w1": (x, grads["gh1"]), "b1": (None, grads["gh1"]), "w2": (slow["a"], grads["gh2_tp"]),
              "b2": (None, grads["gh2"]), "alpha": (None, grads["gu"] * slow["xhat"]), "beta": (None, grads["gu"])}
        if gates is None:
            return kv
        return {name: (k, v * gates[..., f:f + 1]) for f, (name, (k, v)) in enumerate(kv.items())}

    def token_gates(self, x: Tensor, x_replicated: Tensor) -> Tensor | None:
        """[B, T, 6] the per-token factors 2σ(G x_j + g) of the step sizes (step_size="token"), else None.
        The factors of W1, b1 and W2 scale sharded or partial computations, so their gradient is a
        per-rank part: they are computed from `x` inside the tensor-parallel region (whose entry sums the
        parts) with G and g entering it too (like η_W1, η_b1, η_W2); the others from the same values
        outside it (`x_replicated`), whose gradient is whole on every rank."""
        if self.step_gate_weight is None:
            return None
        if self.tp is None:
            return 2.0 * torch.sigmoid(F.linear(x, self.step_gate_weight, self.step_gate_bias))
        replicated = 2.0 * torch.sigmoid(F.linear(x_replicated, self.step_gate_weight[_SHARDED_SUMS:],
                                                  self.step_gate_bias[_SHARDED_SUMS:]))
        sharded = 2.0 * torch.sigmoid(F.linear(x, copy_to_tp(self.step_gate_weight[:_SHARDED_SUMS], self.tp),
                                               copy_to_tp(self.step_gate_bias[:_SHARDED_SUMS], self.tp)))
        return torch.cat([sharded, replicated], dim=-1)

    def _running_sums(self, x: Tensor, x_btd: Tensor, slow: dict[str, Tensor], grads: dict[str, Tensor], seg: Segment,
                      state: FWLState | None, pending_labels_b: Tensor | None, doc_ids_bt: Tensor, unembed: Tensor,
                      need_state: bool
                      ) -> tuple[FastSums, Tensor | None, dict[str, Tensor] | None]:
        """The six sums of this forward (sums.py), with a counted normaliser the count after its last
        position, and the carried sums of a fast unembedding (None without)."""
        T_loc = x.shape[1]
        s_in, count_in = self._incoming_state(state, pending_labels_b, doc_ids_bt[:, 0], unembed, x.dtype)
        carried_unembedding = None
        if s_in is not None and self.unembed_members:
            carried_unembedding = {name: s_in.pop(name) for name in self.unembed_members}
        log_decay = self.log_decay()
        scale, count_out = None, None
        if self.cfg.normalize in COUNTED:
            # The whole sequence on every cp rank (its labels are known everywhere); this rank's slice. With a
            # fast unembedding normalised like the head two more counts (of c and U, their own λ) follow the six.
            n_counts = len(FAST_TENSORS) + (len(UNEMBED_TENSORS) if self._unembed_counted() else 0)
            count_decay = log_decay
            if log_decay is not None and self._unembed_counted():
                count_decay = torch.cat([log_decay, self.unembed_log_decay()])
            scale, count_out = count_normalisers(seg.labels, seg.reset, count_in, count_decay, self.cfg.chunk_size,
                                                 torch.promote_types(x.dtype, torch.float32), self.cfg.normalize,
                                                 n_counts)
            scale = scale[:, seg.start:seg.start + T_loc]
        mode = self.exchange_for(T_loc, x.dtype)
        exchange = None if mode is None else RankExchange(self.cp, self.tp, mode, seg.reset, seg.start)
        layout = ChunkLayout(seg.reset[:, seg.start:seg.start + T_loc], self.chunk_for(T_loc))
        gates = None
        if self.step_gate_weight is not None:
            gates = self.token_gates(x, whole_sequence(x_btd, self.tp) if self.tp is not None else x)
        sums = FastSums(self.keys_values(x, slow, grads, gates), s_in, layout, log_decay, scale, x.dtype, need_state,
                        exchange, slow, grads, gates)
        return sums, count_out, carried_unembedding

    def _segment(self, labels_bt: Tensor, doc_ids_bt: Tensor, state: FWLState | None, last_label_pending: bool,
                 B: int, T_loc: int, dtype: torch.dtype) -> Segment:
        T = T_loc * (self.cp.size if self.cp is not None else 1)
        if labels_bt.shape != (B, T) or doc_ids_bt.shape != (B, T):
            raise ValueError(f"FWL: labels {tuple(labels_bt.shape)} and document ids {tuple(doc_ids_bt.shape)} "
                             f"must be [B, T] = {(B, T)} (the whole sequence, also under sequence and context "
                             f"parallelism)")
        labels = labels_bt
        if last_label_pending:
            labels = labels.clone()
            labels[:, -1] = IGNORE_INDEX
        reset = torch.ones_like(doc_ids_bt, dtype=torch.bool)
        reset[:, 1:] = doc_ids_bt[:, 1:] != doc_ids_bt[:, :-1]
        if state is not None:
            reset[:, 0] = doc_ids_bt[:, 0] != state.doc_id
        start = self.cp.rank * T_loc if self.cp is not None else 0
        return Segment(labels, reset, start, labels[:, start:start + T_loc],
                       (labels[:, start:start + T_loc] != IGNORE_INDEX).to(dtype))

    def _incoming_state(self, state: FWLState | None, pending_labels_b: Tensor | None, first_doc_b: Tensor,
                        unembed: Tensor, dtype: torch.dtype) -> tuple[dict[str, Tensor] | None, Tensor | None]:
        """The carried sums (and with normalize="mean" the count) with a pending position folded in: its
        slow pass and gradient, now that its label (the first token of this segment, if the document
        goes on) is known. The state after a pending position is λ·S + 0, so folding its term in is a
        plain addition also with a decay."""
        if state is None:
            return None, None
        if self.cfg.normalize in COUNTED and state.count is None:
            raise ValueError(f"FWL normalize={self.cfg.normalize}: the carried state has no count (a state from "
                             f"a model with model.fwl.normalize=none cannot be continued)")
        sums = {name: getattr(state, name) for name in FAST_TENSORS}
        if self.unembed_members:
            carried = state.unembedding_sums or {}
            missing = [m for m in self.unembed_members if m not in carried]
            if missing:
                raise ValueError(f"FWL fast_set {list(self.cfg.fast_set)}: the carried state has no sums of {missing} "
                                 f"(a state from a model without them cannot be continued)")
            sums.update({name: carried[name] for name in self.unembed_members})
        count = state.count if self.cfg.normalize in COUNTED else None
        if state.pending_x is None:
            return sums, count
        if pending_labels_b is None:
            raise ValueError("FWL state holds a pending position: pending_labels_b must be given")
        same_doc = first_doc_b == state.doc_id
        label = torch.where(same_doc, pending_labels_b, torch.full_like(pending_labels_b, IGNORE_INDEX))[:, None]
        pending = state.pending_x.to(dtype).unsqueeze(1)  # [B, 1, d]
        x = copy_to_tp(pending, self.tp)
        skip = pending if self.cfg.residual else None
        weight = (label != IGNORE_INDEX).to(dtype)
        if self.cfg.update == "sequential":
            # Its gradient at the fast weights of its inner chunk's first position, carried in the state.
            slow, grads = pending_pass(self, x, skip, unembed, label, weight, state)
        else:
            slow = self.slow_pass(x, skip)
            grads = self.slow_gradients(slow, unembed, label, weight)
        kv = self.keys_values(x, slow, grads, self.token_gates(x, pending))
        ones = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if count is not None:
            count = count + weight.to(count.dtype)
        out = {name: sums[name] + masked_state(k, v, ones).to(sums[name].dtype) for name, (k, v) in kv.items()}
        if self.unembed_members:
            terms = pending_sums(slow["u"][:, 0], unembed, self.out_bias, label[:, 0],
                                 weight[:, 0] * self._unembed_grad_scale(), self.vocab_size, self.unembed_members)
            out.update({name: sums[name] + terms[name].to(sums[name].dtype) for name in self.unembed_members})
        return out, count

    def w2_out(self, a: Tensor, update: Tensor | None = None, bias_update: Tensor | None = None) -> Tensor:
        """W2 a + b2 (the fast pass: minus W2's and b2's updates). Under tp `a` is this rank's slice of
        4s: a_j·a'_i and W2 a are partial sums, so one all-reduce serves W2's product and its update
        together; b2 and its update are added once, after it."""
        if self.tp is None and update is None:
            return F.linear(a, self.w2, self.b2)
        if self.tp is None:
            return F.linear(a, self.w2, self.b2) - update - bias_update
        h2 = F.linear(a, self.w2) if update is None else F.linear(a, self.w2) - update
        h2 = reduce_from_tp(h2, self.tp) + self.b2
        return h2 if bias_update is None else h2 - bias_update

    def scaled_step_sizes(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """η times step_scale, twice: for the replicated computations (η_b2, η_alpha, η_beta are read from
        it) and for the sharded ones (η_W1, η_b1, η_W2; step_sizes_for_shards)."""
        return (self.step_scale * self.step_sizes.to(dtype),
                self.step_scale * self.step_sizes_for_shards().to(dtype))

    def step_sizes_for_shards(self) -> Tensor:
        """The step sizes as used by sharded computations (η_W1, η_b1 scale this rank's slice of 4s,
        η_W2 this rank's partial product): their gradient is a per-rank part, all-reduced here."""
        return copy_to_tp(self.step_sizes, self.tp)

    def log_decay(self) -> Tensor | None:
        """[6] log λ per fast tensor (None without decay). W1's, b1's and W2's enter sharded or partial
        computations under tensor parallelism (their gradient is all-reduced, like η_W1, η_b1, η_W2)."""
        if self.decay_logits is None:
            return None
        replicated = F.logsigmoid(self.decay_logits)
        if self.tp is None:
            return replicated
        sharded = F.logsigmoid(copy_to_tp(self.decay_logits, self.tp))
        return torch.cat([sharded[:_SHARDED_SUMS], replicated[_SHARDED_SUMS:]])

    def unembed_log_decay(self) -> Tensor | None:
        """[2] log λ of c and U (None without decay)."""
        return None if self.unembed_decay_logits is None else F.logsigmoid(self.unembed_decay_logits)

    def update_scale(self, state: FWLState) -> Tensor:
        """[B, 6]: what multiplies each carried sum in the fast update of the next position — 1 with a
        constant k (already in the sums), 1/count or 1/√count with normalize="mean" or "sqrt" (0 for an
        empty count)."""
        if self.cfg.normalize == "none":
            return torch.ones(state.doc_id.shape[0], len(FAST_TENSORS), dtype=state.b2.dtype,
                              device=state.b2.device)
        return inverse_count(state.count[:, :len(FAST_TENSORS)], self.cfg.normalize)

    def chunk_for(self, T: int) -> int:
        return fast_chunk(self.cfg, self.w1.shape[1], T)

    def exchange_for(self, tokens_per_rank: int, dtype: torch.dtype) -> str | None:
        """How the state crosses context-parallel rank boundaries (None without cp): `state` or `kv`,
        `auto` by the bytes each sends (context_parallel.py, choose_exchange)."""
        if self.cp is None:
            return None
        state_dtype = torch.promote_types(dtype, torch.float32)
        hidden = self.w1.shape[0] * tp_size(self.tp)
        return choose_exchange(self.cp.exchange, self.w1.shape[1], self.w2.shape[0], hidden, tokens_per_rank,
                               tp_size(self.tp), activation_bytes=torch.empty((), dtype=dtype).element_size(),
                               state_bytes=torch.empty((), dtype=state_dtype).element_size())

    def step_size_dict(self) -> dict[str, float]:
        return {name: float(v) for name, v in zip(FAST_TENSORS, self.step_sizes.detach().float().cpu())}

    def decays(self) -> dict[str, float]:
        """The forgetting factors λ by fast tensor (empty without decay)."""
        if self.decay_logits is None:
            return {}
        lam = torch.sigmoid(self.decay_logits.detach().double()).cpu()
        return {name: float(v) for name, v in zip(FAST_TENSORS, lam)}
