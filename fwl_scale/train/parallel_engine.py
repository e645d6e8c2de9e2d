"""The model and the DeepSpeed engine for any layout (tp × cp × dp × pp), as the trainer, the checkpoint
converter and the tests build them.

    pp = 1   build_model(tp_group=ParallelState) -> deepspeed.initialize(mpu=ParallelState): the plain
             engine (ZeRO 0-3); the mpu tells DeepSpeed the tensor-parallel split (clipping, ZeRO-3) and
             the data-parallel group dp × cp.
    pp > 1   this rank's stage as a PipelineModule (train/pipeline.py) -> the pipeline engine (ZeRO 0-1),
             mpu None, its groups checked equal to ours.

`names` maps the engine's parameter names to the single-process model's (identical for pp = 1), which is
what checkpoint conversion and the tests index by.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fwl_scale.config import Config
from fwl_scale.model.gpt import GPT, build_model
from fwl_scale.parallel.state import ParallelState
from fwl_scale.train.engine import DistInfo, build_engine, deepspeed_config, lr_schedule, param_groups
from fwl_scale.train.pipeline import PipelineModel, PipelineStep, build_pipeline_engine, global_grad_norm


@dataclass
class TrainingEngine:
    engine: Any  # DeepSpeedEngine or PipelineEngine
    scheduler: Any
    model: GPT  # the whole model (pp = 1), or this stage's skeleton (pp > 1: other stages' parameters on meta)
    ps: ParallelState
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


def build_training_engine(cfg: Config, ps: ParallelState, dist: DistInfo) -> TrainingEngine:
    """Seed the global generator identically on every rank first: every layout then starts from the
    single-process model's weights."""
    if ps.pp_size > 1:
        engine, scheduler, pm, step = build_pipeline_engine(
            cfg, ps, deepspeed_config(cfg, ps.dp_size * ps.cp_size), param_groups, lr_schedule(cfg))
        return TrainingEngine(engine=engine, scheduler=scheduler, model=pm.gpt, ps=ps, names=dict(pm.gpt_names),
                              pipeline=pm, pipeline_step=step)
    model = build_model(cfg.model, tp_group=ps, cp_exchange=cfg.parallel.cp_exchange)
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    engine, scheduler = build_engine(cfg, model, dist, mpu=ps)
    names = {n: n for n, _ in engine.module.named_parameters()}
    return TrainingEngine(engine=engine, scheduler=scheduler, model=model, ps=ps, names=names)


def to_device_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "labels", "doc_ids")}
