"""A training step and validation through DeepSpeed's pipeline engine (the stages: train/pipeline.py).

A training step (`PipelineStep`) runs DeepSpeed's own 1F1B TrainSchedule in two parts: every forward and
backward first, then — only if no micro-batch on any rank had a non-finite loss — the tied-gradient and
data-parallel reductions and the optimizer step. The pipeline engine allows ZeRO 0/1 only, under which
DeepSpeed keeps the gradients local until those reduction instructions, so deciding after the backward
passes and before any reduction is deciding before anything is applied; a skipped step zeroes the local
gradients on every rank. (The alternative, a forward-only pass to test the loss first, costs a third of a
step.) With ZeRO 0 in fp32 the gradient norm for clipping is ours: DeepSpeed's torch-optimizer path counts
a replicated parameter only on model-parallel rank 0 of the whole pipe × tp group (so stages > 0 would
drop theirs) and counts the tied embedding twice; ZeRO-1 and the bf16 optimizer get it right themselves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from fwl_scale.parallel.layout import ParallelState
from fwl_scale.parallel.shards import is_sharded


def _schedules():
    from deepspeed.runtime.pipe import schedule as ds_schedule  # DeepSpeed picks its accelerator on import: imported once the environment is set

    STEP_CMDS = (ds_schedule.ReduceTiedGrads, ds_schedule.ReduceGrads, ds_schedule.OptimizerStep)

    class ForwardBackwardSchedule(ds_schedule.TrainSchedule):
        """DeepSpeed's 1F1B schedule without its final reductions and optimizer step."""

        def steps(self):
            for cmds in super().steps():
                yield [c for c in cmds if not isinstance(c, STEP_CMDS)]

    class InstructionSchedule(ds_schedule.PipeSchedule):
        """A fixed list of instructions as one step (the end of a TrainSchedule)."""

        def __init__(self, instructions, *args):
            super().__init__(*args)
            self.instructions = instructions

        def steps(self):
            yield list(self.instructions)

        def num_pipe_buffers(self):
            return 1

    return ForwardBackwardSchedule, InstructionSchedule, ds_schedule


@dataclass
class PipelineStepResult:
    loss: float  # mean over micro-batches and data-parallel ranks (nan when skipped)
    skipped: bool
    grad_norm: float | None


def global_grad_norm(params: list[nn.Parameter], ps: ParallelState) -> Tensor:
    """The gradient norm of the whole model from this rank's (already data-parallel-reduced) gradients:
    a replicated parameter counts on tensor-parallel rank 0 only, a tied copy (DeepSpeed's
    `ds_pipe_replicated`) not at all, and the squares are summed over the tp × pp group."""
    dev = params[0].device if params else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for p in params:
        if p.grad is None or getattr(p, "ds_pipe_replicated", False):
            continue
        if is_sharded(p) or ps.tp_rank == 0:
            total += p.grad.detach().double().pow(2).sum()
    if ps.layout.tp * ps.layout.pp > 1:
        torch.distributed.all_reduce(total, group=ps.groups["tp_pp"])
    return total.sqrt()


class PipelineStep:
    """One optimizer step of the pipeline engine over its grad_accum micro-batches (see the module
    docstring for the non-finite decision)."""

    def __init__(self, engine, ps: ParallelState, grad_clip: float, own_clipping: bool):
        self.engine = engine
        self.ps = ps
        self.grad_clip = grad_clip
        self.own_clipping = own_clipping  # ZeRO 0 fp32: our norm (DeepSpeed's clipping is off)
        self.fb_schedule, self.instr_schedule, self.ds = _schedules()

    def _instructions(self, *instructions) -> None:
        e = self.engine
        e._exec_schedule(self.instr_schedule(instructions, e.micro_batches, e.num_stages, e.stage_id))

    def run(self, micro_batches: list[dict[str, Tensor]],
            before_step: Callable[[], None] | None = None) -> PipelineStepResult:
        """`before_step()`: called on every rank once the gradients are reduced, before clipping and the
        optimizer step (tests read the gradients there)."""
        e, ds = self.engine, self.ds
        if len(micro_batches) != e.micro_batches:
            raise ValueError(f"pipeline step needs {e.micro_batches} micro-batches, got {len(micro_batches)}")
        data = iter([((b["input_ids"], b["labels"], b["doc_ids"]), b["labels"]) for b in micro_batches])
        # What PipelineEngine.train_batch does, with its schedule cut before the reductions.
        e.module.train()
        e.total_loss = None
        e.total_additional_losses = None
        e._compute_loss = True
        e.set_dataiterator(data)
        e._exec_schedule(self.fb_schedule(micro_batches=e.micro_batches, stages=e.num_stages, stage_id=e.stage_id))
        bad = torch.zeros(1, dtype=torch.float32, device=e.device)
        if e.is_last_stage():
            for loss in e.fwd_outputs:
                if not torch.isfinite(loss).all():
                    bad += 1
        torch.distributed.all_reduce(bad)
        skipped = bool(bad.item() > 0)
        grad_norm = None
        if skipped:
            e.optimizer.zero_grad(set_to_none=True)
            e.zero_grad()
        else:
            self._instructions(ds.ReduceTiedGrads(), ds.ReduceGrads())
            if before_step is not None:
                before_step()
            if self.own_clipping:
                params = [p for p in e.module.parameters() if p.requires_grad]
                norm = global_grad_norm(params, self.ps)
                grad_norm = float(norm)
                if self.grad_clip > 0:
                    coef = self.grad_clip / (grad_norm + 1e-6)  # DeepSpeed's (and torch's) formula
                    if coef < 1:
                        for p in params:
                            if p.grad is not None:
                                p.grad.mul_(coef)
            self._instructions(ds.OptimizerStep())
            reported = e.get_global_grad_norm()
            if reported is not None and not self.own_clipping:
                grad_norm = float(reported)
        with torch.no_grad():
            loss = float(e._aggregate_total_loss())  # collective: every stage gets the last stage's mean
        return PipelineStepResult(loss=float("nan") if skipped else loss, skipped=skipped, grad_norm=grad_norm)


def pipeline_token_losses(engine, batches: list[dict[str, Tensor]]) -> list[Tensor] | None:
    """Per-token losses [B, T] of every validation batch through the pipeline (None on the stages
    other than the last). Every rank of a pipeline must pass the same number of batches."""
    if not batches:
        return [] if engine.is_last_stage() else None
    data = iter([((b["input_ids"], b["labels"], b["doc_ids"]), b["labels"]) for b in batches])
    # The stages exchange the activation shapes again (validation batches need not have the training
    # micro-batch's shape), before and after.
    engine.reset_activation_shape()
    engine.total_loss = None  # the engine sums every output into it; ours are per-token losses
    try:
        out = engine.eval_batch(data, compute_loss=False, reduce_output=None, bcast_loss=False,
                                num_micro_batches=len(batches))
    finally:
        engine.reset_activation_shape()
        engine.total_loss = None
    return list(out) if engine.is_last_stage() else None
