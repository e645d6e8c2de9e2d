"""The model and the DeepSpeed engine for any layout (tp × cp × dp × pp), as the trainer, the checkpoint
converter and the tests build them, behind one interface the training loop calls.

    pp = 1   PlainEngine: build_model(parallel=ParallelState) -> deepspeed.initialize(mpu=ParallelState),
             the plain engine (ZeRO 0-3); the mpu tells DeepSpeed the tensor-parallel split (clipping,
             ZeRO-3) and the data-parallel group dp × cp.
    pp > 1   PipelineEngine: this rank's stage as a PipelineModule (train/pipeline.py) -> DeepSpeed's
             pipeline engine (ZeRO 0-1), mpu None, its groups checked equal to ours.

    stats = te.train_step(next_batch, carried, stop_requested)   # one optimizer step -> StepStats
    forward = te.eval_forward(batches)                          # what evaluate_batches calls per batch

`names` maps the engine's parameter names to the single-process model's (identical for pp = 1), which is
what checkpoint conversion and the tests index by.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn

from fwl_scale.config import Config
from fwl_scale.model.gpt import GPT, build_model
from fwl_scale.parallel.context_parallel import gather_along_sequence
from fwl_scale.parallel.layout import ParallelState
from fwl_scale.parallel.world import all_reduce_min, all_reduce_sum
from fwl_scale.train.carried import CarriedState
from fwl_scale.train.deepspeed_setup import (build_engine, deepspeed_config, lr_schedule, param_groups,
                                             zero_stage_discards_nonfinite)
from fwl_scale.train.distributed import DistInfo
from fwl_scale.train.pipeline import PipelineModel, build_pipeline_engine
from fwl_scale.train.pipeline_step import PipelineStep, global_grad_norm, pipeline_token_losses

Batch = dict[str, torch.Tensor]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says why and what to do."""


@dataclass
class StepStats:
    loss: float  # mean over micro-batches and data-parallel ranks; nan when skipped
    skipped: bool
    grad_norm: float | None
    lr: float
    stop: bool  # some rank was asked to stop (all-reduced)


@dataclass
class TrainingEngine:
    engine: Any  # DeepSpeedEngine or PipelineEngine
    scheduler: Any
    model: GPT  # the whole model (pp = 1), or this stage's skeleton (pp > 1: other stages' parameters on meta)
    ps: ParallelState
    dist: DistInfo
    grad_accum: int
    names: dict[str, str] = field(default_factory=dict)  # engine parameter name -> model parameter name
    pipeline: PipelineModel | None = None
    pipeline_step: PipelineStep | None = None

    @property
    def is_pipeline(self) -> bool:
        return self.pipeline is not None

    @property
    def is_last_stage(self) -> bool:
        return self.pipeline is None or self.pipeline.is_last_stage

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(model name, parameter) of every parameter this rank holds (a tied copy on the last stage
        included), in the engine's order — the same order on every rank of a stage."""
        return [(self.names[n], p) for n, p in self.engine.module.named_parameters()]

    def grad_norm(self) -> float:
        """The whole model's gradient norm from the (data-parallel-reduced) .grad of this rank's
        parameters — for ZeRO 0 in fp32, where DeepSpeed reports none."""
        params = [p for p in self.engine.module.parameters() if p.requires_grad]
        return float(global_grad_norm(params, self.ps))

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def train_step(self, next_batch: Callable[[], Batch], carried: CarriedState,
                   stop_requested: Callable[[], bool]) -> StepStats:
        """One optimizer step over grad_accum micro-batches taken from `next_batch` (all of them, also
        when the step is skipped, so the data order stays that of an uninterrupted run). A non-finite
        loss on any rank skips the step on every rank. `stop_requested()`: this rank's stop request,
        all-reduced into StepStats.stop at the step boundary."""
        raise NotImplementedError

    def eval_forward(self, batches: list[Batch]) -> Callable[..., Any]:
        """What evaluate_batches calls per batch, (ids, labels, docs) -> an object with the whole
        sequence's per-token losses in .token_loss (None on ranks that hold none)."""
        raise NotImplementedError


class PlainEngine(TrainingEngine):
    """pp = 1: DeepSpeed's plain engine, micro-batch by micro-batch."""

    def train_step(self, next_batch, carried, stop_requested):
        """The non-finite decision is taken with an all-reduced flag before each micro-batch's backward;
        the gradients already accumulated are then thrown away (_discard_step)."""
        gas, engine = self.grad_accum, self.engine
        device = self.dist.device
        lr = self.lr()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        bad_at: int | None = None
        for i in range(gas):
            batch = next_batch()
            if bad_at is not None:
                continue
            engine.set_gradient_accumulation_boundary(i == gas - 1)
            ids, labels, docs = (batch[k].to(device, non_blocking=True) for k in ("input_ids", "labels", "doc_ids"))
            out = engine(ids, labels, docs, **carried.forward_kwargs())
            loss = out.loss
            nonfinite = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
            if float(all_reduce_sum(nonfinite).item()) > 0:
                bad_at = i
                carried.reset()  # the state may be non-finite too: the slots start afresh
                self._discard_step(i, loss)
                continue
            carried.advance(out)
            engine.backward(loss)
            loss_sum += loss.detach().double()
        grad_norm = None
        if bad_at is None:
            if not zero_stage_discards_nonfinite(engine):
                grad_norm = self.grad_norm()
            engine.step()
            reported = engine.get_global_grad_norm()
            if reported is not None:
                grad_norm = float(reported)
        # One all-reduce carries the step's loss and everyone's stop request to the step boundary.
        stop_local = 1.0 if stop_requested() else 0.0
        packed = all_reduce_sum(torch.tensor([float(loss_sum), stop_local], dtype=torch.float64, device=device))
        loss_mean = float(packed[0]) / (gas * self.dist.world_size) if bad_at is None else float("nan")
        return StepStats(loss=loss_mean, skipped=bad_at is not None, grad_norm=grad_norm, lr=lr,
                         stop=bool(packed[1] > 0))

    def _discard_step(self, micro: int, bad_loss: torch.Tensor) -> None:
        """Throws away the gradients of a step in which micro-batch `micro` had a non-finite loss (on
        some rank). Before any backward there is nothing to discard. Later, ZeRO and the bf16 optimizer
        already hold (partly reduced) gradients in their own buffers: we end the step with a backward of
        loss·NaN, which makes every gradient NaN on every rank, and DeepSpeed's overflow check discards
        the step as a whole. ZeRO 0 in fp32 keeps gradients in .grad only; they are cleared."""
        if micro == 0:
            return
        engine = self.engine
        if not zero_stage_discards_nonfinite(engine):
            engine.zero_grad()
            return
        engine.set_gradient_accumulation_boundary(True)
        engine.backward(bad_loss * float("nan"))
        engine.step()
        if engine.was_step_applied():
            raise TrainingError("DeepSpeed applied an optimizer step with non-finite gradients; refusing to go on")

    def eval_forward(self, batches):
        """Under context parallelism each rank computes its chunk's losses; they are gathered."""
        def forward(ids, labels, docs):
            out = self.engine(ids, labels, docs)
            if self.ps.cp_size > 1:
                out.token_loss = gather_along_sequence(out.token_loss, self.ps.groups["cp"])
            return out

        return forward


class PipelineEngine(TrainingEngine):
    """pp > 1: DeepSpeed's 1F1B schedule over all micro-batches of a step at once."""

    def train_step(self, next_batch, carried, stop_requested):
        """The non-finite decision is taken after the backward passes and before any gradient reduction
        (train/pipeline_step.py). Every stage reads the same batches, so the loader position is the same on
        every rank. A carried state lives where the FWL does, on the last stage (HeadStage.carried); a
        skipped step drops it there, as the plain engine does."""
        lr = self.lr()
        batches = [next_batch() for _ in range(self.grad_accum)]
        head = self.pipeline.head
        if head is not None:
            head.carried = carried if carried.enabled else None
        result = self.pipeline_step.run(batches)
        if result.skipped:
            carried.reset()
        flag = torch.tensor([1.0 if stop_requested() else 0.0], dtype=torch.float64, device=self.dist.device)
        stop = bool(all_reduce_sum(flag).item() > 0)
        return StepStats(loss=result.loss, skipped=result.skipped, grad_norm=result.grad_norm, lr=lr, stop=stop)

    def eval_forward(self, batches):
        """Runs the pipeline over the batches every rank has (the smallest count) now; the forward then
        hands out the last stage's losses in order."""
        n = all_reduce_min(len(batches), self.dist.device)
        losses = pipeline_token_losses(self.engine, batches[:n])
        if losses is not None and self.ps.cp_size > 1:  # each last-stage rank holds its chunk of the sequence
            losses = [gather_along_sequence(x, self.ps.groups["cp"]) for x in losses]
        it = iter(losses or [])

        def forward(ids, labels, docs):
            return SimpleNamespace(token_loss=next(it)) if losses is not None else None

        return forward


def build_training_engine(cfg: Config, ps: ParallelState, dist: DistInfo) -> TrainingEngine:
    """Seed the global generator identically on every rank first: every layout then starts from the
    single-process model's weights."""
    gas = cfg.parallel.grad_accum
    if ps.pp_size > 1:
        engine, scheduler, pm, step = build_pipeline_engine(
            cfg, ps, deepspeed_config(cfg, ps.dp_size * ps.cp_size), param_groups, lr_schedule(cfg))
        return PipelineEngine(engine=engine, scheduler=scheduler, model=pm.gpt, ps=ps, dist=dist, grad_accum=gas,
                              names=dict(pm.gpt_names), pipeline=pm, pipeline_step=step)
    model = build_model(cfg.model, parallel=ps, cp_exchange=cfg.parallel.cp_exchange)
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    engine, scheduler = build_engine(cfg, model, dist, mpu=ps)
    names = {n: n for n, _ in engine.module.named_parameters()}
    return PlainEngine(engine=engine, scheduler=scheduler, model=model, ps=ps, dist=dist, grad_accum=gas, names=names)
