"""A GPT-style decoder whose head is either a Fast Weight Layer or a plain unembedding (the baseline).

Pre-norm blocks, rotary positions, causal attention through scaled_dot_product_attention (flash on CUDA
when no document mask is needed), optional document-masked attention with positions restarting at each
document: SDPA with a dense mask, or FlexAttention with a block mask (model.attention; the dense mask
where the block mask does not apply, model/blocks.py use_flex_attention). The body and its initialisation
are the same for both heads, so FWL vs baseline is fair.

Tensor parallelism (Megatron's, docs/design.md §3.2; `build_model(cfg, parallel=ParallelState)`): attention split
by heads (q|k|v column-parallel, output projection row-parallel), the MLP column/row-parallel, the tied
embedding/unembedding vocabulary-parallel over the padded vocabulary (padding masked in every softmax),
the FWL block by its own rules (parallel/regions.py). With sequence parallelism the residual stream and
the norms hold this rank's chunk of the sequence. Every rank is given the whole batch (input ids, labels, document ids);
the loss and the returned token losses and logits are replicated. At tp = 1 every layer runs the ops of
its torch.nn counterpart under the same parameter names.

Context parallelism (cp ranks, orthogonal to tp; `build_model(cfg, parallel=ParallelState)` with cp > 1):
every rank is given the whole batch and keeps its contiguous chunk of the sequence, [r·T/cp, (r+1)·T/cp).
Rotary positions and document masks come from the whole sequence's document ids, so they are global.
Attention all-gathers the keys and values of every rank of the group (one all-gather per layer; the
backward reduce-scatters their gradients): exact, simple, and for moderate cp cheaper in latency than a
ring, at the price of holding the whole sequence's keys and values of one layer at a time (a ring would
hold two chunks; worth it when T·d per layer stops fitting). The FWL exchanges its state between ranks
(model/fwl/sums.py, model/fwl/context_parallel.py). The token losses and logits are this rank's chunk; the loss is this rank's
share, scaled so that averaging over the cp group — what DeepSpeed's gradient averaging over dp × cp
does — gives the unsplit model's loss and gradients.

Body window (streaming): the body attends within the tokens it is given; `context_ids` prepends tokens the
body attends to but the FWL does not process again (they are in its carried state), so a long document can
be fed in pieces of any size while the body recomputes its current window. `body_cached` gives the same
with the window's keys and values cached per layer (StreamingSession in model/streaming.py; generation:
one token at a time at O(window) attention work).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fwl_scale import IGNORE_INDEX
from fwl_scale.config import ModelConfig
from fwl_scale.model.blocks import (Block, BlockMask, KVCache, LearnedPositions, document_block_mask,
                                    document_positions, norm_layer, use_flex_attention)
# Kept until 0.2: Hugging Face exports written before blocks.py existed import Rotary from here (their modeling_fwl.py).
from fwl_scale.model.blocks import Rotary  # noqa: F401
from fwl_scale.model.fwl import FastWeightLayer, FWLState
from fwl_scale.model.vocab import VocabLoss
from fwl_scale.parallel.context_parallel import CPContext
from fwl_scale.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from fwl_scale.parallel.layout import ParallelState, TPContext
from fwl_scale.parallel.mappings import copy_to_tp
from fwl_scale.parallel.regions import cp_context_of, enter_tp_region, tp_context_of
from fwl_scale.parallel.shards import full_shape, init_normal_, is_sharded, tp_size


@dataclass
class ModelOutput:
    # Mean cross-entropy over labels != IGNORE_INDEX (0 if there are none). Under context parallelism this
    # rank's share: cp · (its tokens' loss sum) / (valid labels of the whole sequence), whose average over
    # the cp group is the unsplit model's loss.
    loss: Tensor
    token_loss: Tensor  # [B, T], 0 at ignored positions (under cp: this rank's chunk, from seq_start)
    n_valid: Tensor  # number of labels used (the whole sequence's)
    logits: Tensor | None = None  # [B, T, V] only when asked for (under cp: this rank's chunk)
    fwl_state: FWLState | None = None
    seq_start: int = 0  # position of token_loss[:, 0] in the sequence (cp rank · T/cp)
    # [B, T, s] the unembedding's input (logits = U·hidden + c), only when asked for: the final-normed body
    # output of a baseline, the fast-pass output u' of an FWL (replicated under tp; under cp this rank's chunk)
    hidden: Tensor | None = None


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, tp: TPContext | None = None, cp: CPContext | None = None):
        super().__init__()
        self.cfg = cfg
        self.tp = tp if tp_size(tp) > 1 else None
        self.cp = cp if cp is not None and cp.size > 1 else None
        tp = self.tp
        V = cfg.padded_vocab_size
        self.embed = VocabParallelEmbedding(V, cfg.d_model, tp=tp, device=device)
        self.pos_embed = (LearnedPositions(cfg.position_rows, cfg.d_model, tp, device)
                          if cfg.positions == "learned" else None)
        self.blocks = nn.ModuleList([Block(cfg, device, tp) for _ in range(cfg.n_layers)])
        self.norm_f = norm_layer(cfg, device, tp)
        head_width = cfg.fwl_width if cfg.fwl.enabled else cfg.d_model
        self.lm_head = None if cfg.tie_embeddings else ColumnParallelLinear(head_width, V, bias=False, tp=tp,
                                                                            device=device)
        self.fwl = None
        if cfg.fwl.enabled:
            self.fwl = FastWeightLayer(cfg.fwl_resolved, cfg.d_model, cfg.vocab_size, V, tp, self.cp, device)
        self.vocab_loss = VocabLoss(cfg.vocab_size, cfg.fwl.vocab_chunk, tp)
        self.activation_checkpointing = False
        if device is None or torch.device(device).type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Seeded by the global generator. Each matrix is drawn whole, in the same order at every tp, and
        this rank keeps its slice, so the model does not depend on the layout."""
        std = self.cfg.init_std
        # GPT-2 style: residual projections scaled by depth.
        proj_std = std / math.sqrt(2 * self.cfg.n_layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith("fwl."):
                    continue
                if p.ndim >= 2:
                    init_normal_(p, proj_std if name.endswith("proj.weight") else std)
                elif name.endswith(".weight"):  # norms
                    p.fill_(1.0)
                else:
                    p.zero_()
            if self.fwl is not None:
                self.fwl.reset_parameters()

    @property
    def unembedding(self) -> Tensor:
        """U [V_padded, s] (under tp: this rank's rows)."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    @property
    def sequence_parallel(self) -> bool:
        return self.tp is not None and self.tp.sequence_parallel

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.activation_checkpointing = enabled

    def param_counts(self, local: bool = False) -> dict[str, int]:
        """Parameters of the whole model (every shard counted once), or with `local` this rank's."""
        counts = {"body": 0, "fwl": 0, "embeddings": 0}
        for name, p in self.named_parameters():
            n = p.numel() if local or not is_sharded(p) else full_shape(p).numel()
            if name.startswith("fwl."):
                counts["fwl"] += n
            elif name.startswith(("embed.", "pos_embed.", "lm_head.")):
                counts["embeddings"] += n
            else:
                counts["body"] += n
        counts["total"] = sum(counts.values())
        return counts

    def zero3_external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """(module, parameter) pairs where a module uses a parameter it does not own: the tied
        unembedding in the FWL and in the loss, the FWL's output bias in the loss. The engine builder
        registers them under ZeRO-3 (train/deepspeed_setup.py, register_zero3_externals)."""
        pairs = [(self.vocab_loss, self.unembedding)]
        if self.fwl is not None:
            pairs += [(self.vocab_loss, self.fwl.out_bias), (self.fwl, self.unembedding)]
        return pairs

    def attention_inputs(self, input_ids: Tensor, doc_ids: Tensor | None) -> tuple[Tensor, Tensor | BlockMask | None,
                                                                                  int, int]:
        """What every block needs besides its input: (rotary positions [B, T_loc], attention mask, start,
        T_loc) for this rank's chunk [start, start + T_loc) of the sequence (the whole sequence without context
        parallelism). The mask: None for plain causal attention; with document masking a BlockMask where
        model.attention runs FlexAttention (use_flex_attention), else a boolean [B, 1, T_loc, start + T_loc].
        Pipeline stages recompute them from the document ids they are handed (train/pipeline.py).

        Context parallelism keeps the dense mask whatever model.attention says: its queries are this rank's
        chunk and its keys the all-gathered [0, start + T_loc) (Attention.forward), a block mask a query offset
        could express, but not built or tested across ranks yet."""
        B, T = input_ids.shape
        cp = self.cp
        n_cp = cp.size if cp is not None else 1
        if T % n_cp:
            raise ValueError(f"context parallelism over {n_cp} ranks needs a sequence length divisible by "
                             f"{n_cp}, got {T}")
        T_loc = T // n_cp
        start = cp.rank * T_loc if cp is not None else 0
        if self.sequence_parallel and T_loc % self.tp.size:
            raise ValueError(f"sequence parallelism over {self.tp.size} ranks needs a sequence length divisible "
                             f"by {self.tp.size}" + (f" × cp {n_cp}" if cp is not None else "") + f", got {T}")
        rows = torch.arange(start, start + T_loc, device=input_ids.device)
        # Keys up to this chunk's end only: later ranks' keys are all masked (causality), so each rank
        # computes scores against the keys it can see, [T_loc, start + T_loc].
        end = start + T_loc
        cols = torch.arange(end, device=input_ids.device)
        causal = cols[None, :] <= rows[:, None]  # [T_loc, end]
        mask = None
        if doc_ids is not None and self.cfg.document_mask:
            positions = document_positions(doc_ids)[:, start:end]
            if cp is None and use_flex_attention(self.cfg.attention, doc_ids.device, T):
                mask = document_block_mask(doc_ids)
            else:
                mask = (causal & (doc_ids[:, start:end, None] == doc_ids[:, None, :end]))[:, None]
        else:
            positions = rows.expand(B, T_loc)
            if cp is not None:
                mask = causal.expand(B, 1, T_loc, end)
        return positions, mask, start, T_loc

    def run_block(self, block: Block, x: Tensor, positions: Tensor, mask: Tensor | BlockMask | None) -> Tensor:
        """One block, recomputed in backward when activation checkpointing is on."""
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, positions, mask, self.cp, use_reentrant=False)
        return block(x, positions, mask, self.cp)

    def embed_tokens(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """The blocks' input: token embeddings, plus learned position embeddings with model.positions =
        learned (rotary positions act inside attention instead)."""
        x = self.embed(input_ids)
        # Positions stay below seq_len <= max_positions (Config.validate): every path runs windows of
        # at most seq_len tokens, so no check (a device sync) per forward.
        return x if self.pos_embed is None else self.pos_embed(x, positions)

    def body(self, input_ids: Tensor, doc_ids: Tensor | None) -> Tensor:
        """The final-normed body output [B, T, d] (under sequence parallelism this rank's chunk
        [B, T/tp, d]; under context parallelism `input_ids`/`doc_ids` are the whole sequence and the
        output is this rank's chunk [B, T/cp, d], or [B, T/(cp·tp), d] with sequence parallelism)."""
        positions, mask, start, T_loc = self.attention_inputs(input_ids, doc_ids)
        x = self.embed_tokens(input_ids[:, start:start + T_loc], positions)
        for block in self.blocks:
            x = self.run_block(block, x, positions, mask)
        return self.norm_f(x)

    def body_cached(self, input_ids: Tensor, doc_ids: Tensor, context_doc_ids: Tensor,
                    kv: list[KVCache]) -> Tensor:
        """The body output of `input_ids` [B, n] after the `context_doc_ids` [B, C] tokens whose keys and
        values are in `kv` (one KVCache per block; the new ones are appended): the same as `body` on the
        whole [C + n] tokens, restricted to the last n, at O(C + n) work per new token."""
        positions, mask = self.cached_attention_inputs(input_ids, doc_ids, context_doc_ids)
        x = self.embed_tokens(input_ids, positions)
        for block, cache in zip(self.blocks, kv):
            x = block(x, positions, mask, None, cache)
        return self.norm_f(x)

    def cached_attention_inputs(self, input_ids: Tensor, doc_ids: Tensor, context_doc_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(positions [B, n], mask [B, 1, n, C + n]) of `input_ids` [B, n] after C tokens in a key/value cache.
        Always the dense mask, whatever model.attention says: n queries (one per generated token) against C + n
        keys, a mask of n·(C + n) booleans that a block mask would rebuild at every step, for no gain."""
        if self.cp is not None or self.sequence_parallel:
            raise ValueError("a key/value cache is for one process or plain tensor parallelism")
        C, n = context_doc_ids.shape[1], input_ids.shape[1]
        docs = torch.cat([context_doc_ids, doc_ids], dim=1)
        rows = torch.arange(C, C + n, device=input_ids.device)
        cols = torch.arange(C + n, device=input_ids.device)
        mask = (cols[None, :] <= rows[:, None]).expand(input_ids.shape[0], 1, n, C + n)
        if self.cfg.document_mask:
            positions = document_positions(docs)[:, C:]
            mask = mask & (doc_ids[:, :, None] == docs[:, None, :])[:, None]
        else:
            positions = rows.expand(input_ids.shape[0], n)
        return positions, mask

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, doc_ids: Tensor | None = None,
                fwl_state: FWLState | None = None, last_label_pending: bool = False,
                return_logits: bool = False, return_state: bool = False, context_ids: Tensor | None = None,
                context_doc_ids: Tensor | None = None, return_hidden: bool = False) -> ModelOutput:
        """`labels` [B, T]: next-token ids, IGNORE_INDEX where no loss. The FWL needs labels (its fast
        weights adapt to every earlier labelled token); without them the model is only a language
        model when the FWL is disabled, or with `last_label_pending` for a one-position segment.
        Under tensor parallelism every rank passes the same whole batch and gets the same outputs (the
        FWL state is sharded like the FWL's weights). Under context parallelism every rank passes the
        same whole batch and gets its chunk's token losses (see ModelOutput).

        `context_ids` [B, C] (streaming): tokens just before `input_ids` in the body's window, already
        processed by the FWL (their sums are in `fwl_state`); the body attends to them, nothing else
        sees them. `context_doc_ids` are their document ids (default: all 0, like `doc_ids`).

        `return_hidden`: also the unembedding's input (ModelOutput.hidden; the evaluation's caches use it)."""
        if doc_ids is None and context_ids is not None:
            doc_ids = torch.zeros_like(input_ids)
        if context_ids is not None and context_ids.shape[1] > 0:
            if self.cp is not None or self.sequence_parallel:
                raise ValueError("context_ids (a body window longer than the tokens fed) is for streaming in one "
                                 "process or under plain tensor parallelism, not with context or sequence "
                                 "parallelism")
            if context_doc_ids is None:
                context_doc_ids = torch.zeros_like(context_ids)
            C = context_ids.shape[1]
            h = self.body(torch.cat([context_ids, input_ids], dim=1), torch.cat([context_doc_ids, doc_ids], dim=1))
            h = h[:, C:]
        else:
            h = self.body(input_ids, doc_ids)
        return self.head(h, input_ids, labels, doc_ids, fwl_state, last_label_pending, return_logits, return_state,
                         return_hidden)

    def head(self, h: Tensor, input_ids: Tensor, labels: Tensor | None, doc_ids: Tensor | None,
             fwl_state: FWLState | None = None, last_label_pending: bool = False, return_logits: bool = False,
             return_state: bool = False, return_hidden: bool = False) -> ModelOutput:
        """Everything after the body: the FWL (or nothing), the unembedding and the losses, from the body
        output `h` (as `body` returns it). The last pipeline stage runs it (train/pipeline.py)."""
        tp = self.tp
        T = input_ids.shape[1]
        if labels is None:
            labels = torch.full_like(input_ids, IGNORE_INDEX)
        n_cp = self.cp.size if self.cp is not None else 1
        T_loc = T // n_cp
        start = self.cp.rank * T_loc if self.cp is not None else 0
        local_labels = labels[:, start:start + T_loc]
        state = None
        bias = None
        pending_labels = input_ids[:, 0] if fwl_state is not None and fwl_state.pending_x is not None else None
        if self.fwl is not None and self.fwl.unembed_members:
            # A fast unembedding (model.fwl.fast_set): the logits are the FWL's own (model/fwl/unembedding.py).
            token_loss, logits, state, u = self.fwl.head(h, self.unembedding, labels, doc_ids, fwl_state,
                                                         pending_labels, last_label_pending, return_state,
                                                         return_logits)
        else:
            if self.fwl is not None:
                h, state = self.fwl(h, self.unembedding, labels, doc_ids, state=fwl_state,
                                    pending_labels_b=pending_labels, last_label_pending=last_label_pending,
                                    return_state=return_state)
                bias = self.fwl.out_bias
                h_tp = copy_to_tp(h, tp)  # replicated u' into the vocabulary-parallel unembedding
            else:
                h_tp = enter_tp_region(h, tp)
            u = h_tp if tp is not None else h  # the unembedding's input
            token_loss, logits = self.vocab_loss(u, self.unembedding, bias, local_labels, return_logits)
        n_valid = (labels != IGNORE_INDEX).sum()
        # Under cp: this rank's share, times cp, so that the cp group's average is the whole loss.
        loss = token_loss.sum() * n_cp / n_valid.clamp(min=1)
        return ModelOutput(loss=loss, token_loss=token_loss, n_valid=n_valid, logits=logits, fwl_state=state,
                           seq_start=start, hidden=u if return_hidden else None)


def build_model(cfg: ModelConfig, device: torch.device | str | None = None,
                parallel: ParallelState | TPContext | CPContext | object | None = None,
                cp_exchange: str = "auto") -> GPT:
    """The model for `cfg`; with `parallel` (a ParallelState from fwl_scale.parallel, or a TPContext)
    this rank's tensor-parallel part of it, and with a ParallelState of cp > 1 (or a CPContext) its
    context-parallel part, the FWL exchanging state across ranks by `cp_exchange` (auto | state | kv:
    the config's parallel.cp_exchange). Seed the global generator identically on every rank first:
    each rank draws the whole tensors and keeps its slices, so every layout gives the same model."""
    return GPT(cfg, device=device, tp=tp_context_of(parallel), cp=cp_context_of(parallel, cp_exchange))
