"""Evaluation with the model split over pipeline stages as trained (parallel.pp > 1).

Each rank holds one stage (parallel/stages.py: the embedding and the first blocks, ..., the last blocks and
the head) of a GPT whose other parameters stay on the meta device, and `PipelineStage` answers the calls
the evaluation methods make of a whole model: forward, body_cached + head (dynamic evaluation's short
segments), named_parameters (this stage's, under their single-process names), and through
`loss_gradients` the gradient of the loss for dynamic evaluation.

Every stage of a pipeline reads the same documents and makes the same calls in the same order. A forward
runs stage after stage: stage s receives the activations [B, n, d] from stage s - 1, runs its blocks and
sends them on; the last stage runs the head and broadcasts the token losses (with `return_hidden` also
the unembedding's input, which the caches of eval/cache.py read) to the pipeline, so every stage returns
them (and the methods' breakdowns are the same on every stage). The FWL state lives on the
last stage only. A backward runs the other way: the last stage differentiates the loss, every stage
sends the gradient of its input to the stage before, as far down as a stage has parameters to update.
The tied embedding is held by the first and the last stage; its two gradients are summed between them,
as DeepSpeed's pipeline engine does in training.

Activations travel through the CPU (the evaluation's process group is gloo whatever the device) as
float32, which bfloat16 survives exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fwl_scale.config import ModelConfig
from fwl_scale.model.blocks import KVCache
from fwl_scale.model.fwl import FWLState
from fwl_scale.model.gpt import GPT, ModelOutput, build_model
from fwl_scale.parallel.layout import TPContext
from fwl_scale.parallel.stages import PipelineLayer, materialize, stage_layers


@dataclass
class StageContext:
    group: object  # the pipeline: this (dp, tp) coordinate's stages
    ranks: list[int]  # their global ranks, first stage first
    stage: int
    tie_group: object = None  # the first and the last stage (tied embeddings)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.size - 1


@dataclass
class StageOutput(ModelOutput):
    # This stage's input (received; None on the first stage) and output (what it sent on), for the backward.
    stage_input: Tensor | None = None
    stage_output: Tensor | None = None


class PipelineStage(nn.Module):
    """One pipeline stage of the GPT of `cfg` (its parameters uninitialised until loaded: `load_weights`)."""

    def __init__(self, cfg: ModelConfig, stage: StageContext, tp: TPContext | None, device: torch.device,
                 dtype: torch.dtype | None = None):
        super().__init__()
        gpt = build_model(cfg, device="meta", parallel=tp)
        tied = gpt.lm_head is None
        self.layers: list[PipelineLayer] = stage_layers(cfg.n_layers, tied, stage.size, stage.stage)
        for layer in self.layers:
            if layer.kind in ("embed", "tie"):
                materialize(gpt.embed, device, dtype)
                if layer.kind == "embed" and gpt.pos_embed is not None:
                    materialize(gpt.pos_embed, device, dtype)
            elif layer.kind == "block":
                materialize(gpt.blocks[layer.block], device, dtype)
            else:
                for part in (gpt.norm_f, gpt.fwl, gpt.lm_head):
                    if part is not None:
                        materialize(part, device, dtype)
        self.blocks_here = [layer.block for layer in self.layers if layer.kind == "block"]
        for i in self.blocks_here:
            gpt.blocks[i].to(device)  # the rotary frequencies (a buffer made on the CPU whatever the device)
        gpt.eval()
        object.__setattr__(self, "gpt", gpt)  # not a submodule: named_parameters gives this stage's only
        self.stage = stage
        self.device = device
        self.dtype = next(p for _, p in self.named_parameters()).dtype  # of the activations it receives
        self._pending: tuple[Tensor | None, Tensor] | None = None  # body_cached's (input, output) for head

    # --- what the evaluation methods read of a model
    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.gpt.named_parameters(prefix, recurse, remove_duplicate):
            if not p.is_meta:
                yield name, p

    @property
    def blocks(self) -> nn.ModuleList:
        return self.gpt.blocks

    @property
    def fwl(self):
        return self.gpt.fwl

    @property
    def lm_head(self):
        return self.gpt.lm_head

    @property
    def tp(self) -> TPContext | None:
        return self.gpt.tp

    @property
    def cfg(self) -> ModelConfig:
        return self.gpt.cfg

    @torch.no_grad()
    def load_weights(self, state: dict[str, Tensor]) -> None:
        """This stage's tensors of `state` (exactly its parameters' names and shapes: checked by the caller)."""
        for name, p in self.named_parameters():
            p.copy_(state[name])

    # --- forward
    def forward(self, input_ids: Tensor, labels: Tensor | None = None, doc_ids: Tensor | None = None,
                fwl_state: FWLState | None = None, last_label_pending: bool = False, return_logits: bool = False,
                return_state: bool = False, return_hidden: bool = False) -> StageOutput:
        if return_logits:
            raise ValueError("a pipeline stage gives token losses, not logits")
        positions, mask, _, _ = self.gpt.attention_inputs(input_ids, doc_ids)
        x_in, x = self._stage_input(input_ids, positions)
        for i in self.blocks_here:
            x = self.gpt.run_block(self.gpt.blocks[i], x, positions, mask)
        return self._finish(x_in, x, input_ids, labels, doc_ids, fwl_state, last_label_pending, return_state,
                            return_hidden)

    def body_cached(self, input_ids: Tensor, doc_ids: Tensor, context_doc_ids: Tensor,
                    kv: list[KVCache]) -> None:
        """GPT.body_cached for this stage's blocks (`kv` has a cache for every block of the model). `head`
        must follow: it takes this stage's output from here (its `h` is not used), and the last stage
        applies the final norm there."""
        positions, mask = self.gpt.cached_attention_inputs(input_ids, doc_ids, context_doc_ids)
        x_in, x = self._stage_input(input_ids, positions)
        for i in self.blocks_here:
            x = self.gpt.blocks[i](x, positions, mask, None, kv[i])
        self._pending = (x_in, x)

    def head(self, h: Tensor | None, input_ids: Tensor, labels: Tensor | None, doc_ids: Tensor | None,
             fwl_state: FWLState | None = None, last_label_pending: bool = False, return_logits: bool = False,
             return_state: bool = False) -> StageOutput:
        if self._pending is None or return_logits:
            raise ValueError("PipelineStage.head follows body_cached, and gives token losses, not logits")
        (x_in, x), self._pending = self._pending, None
        return self._finish(x_in, x, input_ids, labels, doc_ids, fwl_state, last_label_pending, return_state)

    def _finish(self, x_in: Tensor | None, x: Tensor, input_ids: Tensor, labels: Tensor | None,
                doc_ids: Tensor | None, fwl_state: FWLState | None, last_label_pending: bool,
                return_state: bool, return_hidden: bool = False) -> StageOutput:
        B, n = input_ids.shape
        cfg = self.gpt.cfg
        width = (cfg.fwl_width if cfg.fwl.enabled else cfg.d_model) if return_hidden else 0
        flat = torch.empty(B * n * (1 + width) + 2, dtype=torch.float32)  # token losses, hidden, loss, valid labels
        if self.stage.last:
            out = self.gpt.head(self.gpt.norm_f(x), input_ids, labels, doc_ids, fwl_state, last_label_pending,
                                return_state=return_state, return_hidden=return_hidden)
            flat[:B * n] = out.token_loss.detach().float().flatten().cpu()
            if return_hidden:
                flat[B * n:-2] = out.hidden.detach().float().flatten().cpu()
            flat[-2], flat[-1] = float(out.loss.detach()), float(out.n_valid)
        else:
            dist.send(x.detach().float().cpu().contiguous(), self.stage.ranks[self.stage.stage + 1])
        dist.broadcast(flat, src=self.stage.ranks[-1], group=self.stage.group)
        if self.stage.last:
            return StageOutput(loss=out.loss, token_loss=out.token_loss, n_valid=out.n_valid, fwl_state=out.fwl_state,
                               hidden=out.hidden, stage_input=x_in, stage_output=x)
        token_loss = flat[:B * n].view(B, n).to(self.device)
        hidden = flat[B * n:-2].view(B, n, width).to(self.device, self.dtype) if return_hidden else None
        return StageOutput(loss=flat[-2].to(self.device), token_loss=token_loss,
                           n_valid=flat[-1].to(torch.int64).to(self.device), hidden=hidden, stage_input=x_in,
                           stage_output=x)

    def _stage_input(self, input_ids: Tensor, positions: Tensor) -> tuple[Tensor | None, Tensor]:
        """(what was received or None, the first block's input): the embeddings on the first stage, the
        previous stage's output on the others."""
        if self.stage.first:
            return None, self.gpt.embed_tokens(input_ids, positions)
        buf = torch.empty(*input_ids.shape, self.gpt.cfg.d_model, dtype=torch.float32)
        dist.recv(buf, self.stage.ranks[self.stage.stage - 1])
        x = buf.to(self.device, self.dtype).requires_grad_(torch.is_grad_enabled())
        return x, x

    # --- backward
    def loss_gradients(self, out: StageOutput, params: Sequence[Tensor]) -> list[Tensor | None]:
        """d loss / d `params` (this stage's) for the output of the last forward, every stage together."""
        flags = torch.zeros(self.stage.size, dtype=torch.int64)
        flags[self.stage.stage] = int(len(params) > 0)
        dist.all_reduce(flags, group=self.stage.group)
        s = self.stage.stage
        send_back = s > 0 and bool(flags[:s].any())
        receive = not self.stage.last and bool(flags[:s + 1].any())
        inputs = list(params) + ([out.stage_input] if send_back else [])
        grads: list[Tensor | None] = [None] * len(inputs)
        if self.stage.last and inputs:
            grads = list(torch.autograd.grad(out.loss, inputs, allow_unused=True))
        elif receive:
            g = torch.empty(out.stage_output.shape, dtype=torch.float32)
            dist.recv(g, self.stage.ranks[s + 1])
            grads = list(torch.autograd.grad(out.stage_output, inputs, grad_outputs=g.to(out.stage_output),
                                             allow_unused=True))
        if send_back:
            gx = grads.pop()
            gx = torch.zeros_like(out.stage_input) if gx is None else gx
            dist.send(gx.detach().float().cpu().contiguous(), self.stage.ranks[s - 1])
        return self._sum_tied(params, grads)

    def _sum_tied(self, params: Sequence[Tensor], grads: list[Tensor | None]) -> list[Tensor | None]:
        """The tied embedding's gradient: its input use (first stage) plus its output use (last stage)."""
        if self.stage.tie_group is None or not (self.stage.first or self.stage.last):
            return grads
        i = next((i for i, p in enumerate(params) if p is self.gpt.embed.weight), None)
        if i is None:
            return grads
        g = grads[i] if grads[i] is not None else torch.zeros_like(params[i])
        total = g.detach().float().cpu()
        dist.all_reduce(total, group=self.stage.tie_group)
        grads[i] = total.to(g)
        return grads


def loss_gradients(model: nn.Module, out: ModelOutput, params: Sequence[Tensor]) -> list[Tensor | None]:
    """d out.loss / d `params` (None where a parameter does not reach the loss): of the whole model, or of
    a pipeline stage's own parameters, every stage calling it together."""
    if isinstance(model, PipelineStage):
        return model.loss_gradients(out, params)
    return list(torch.autograd.grad(out.loss, list(params), allow_unused=True))


def sum_over_model(model: nn.Module, per_tensor: Tensor, params: Sequence[Tensor]) -> Tensor:
    """The column sums of `per_tensor` [len(params), k] (a statistic of each of `params`) over the whole
    model: on a pipeline stage, with every other stage's (the tied embedding counted once), every stage
    calling it together."""
    if not isinstance(model, PipelineStage):
        return per_tensor.sum(0)
    keep = torch.tensor([not (model.stage.last and model.stage.tie_group is not None and p is model.gpt.embed.weight)
                         for p in params], dtype=torch.bool)
    total = per_tensor[keep].sum(0)
    dist.all_reduce(total, group=model.stage.group)
    return total


def whole_model(model: nn.Module) -> GPT:
    """The model whose parameters a stage holds part of (for counts: the others are on the meta device)."""
    return model.gpt if isinstance(model, PipelineStage) else model
