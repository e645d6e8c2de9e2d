"""DeepSpeed's side of the engine: our config translated into DeepSpeed's, the optimizer's parameter
groups, the learning-rate schedule, torch.compile, and `deepspeed.initialize` with the fixes made right
after it.

One trainer for every scale (docs/design.md §3.1): even a single CPU process goes through `deepspeed.initialize`,
so there is one training loop and one checkpoint format. DeepSpeed owns the optimizer (AdamW through
its optimizer config with `torch_adam`, so no C++ op is compiled for it), ZeRO, bf16, clipping and
gradient accumulation.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fwl_scale.config import Config
from fwl_scale.model.gpt import GPT
from fwl_scale.train.distributed import DistInfo


def compile_model(model: GPT, backend: str = "inductor") -> GPT:
    """train.compile: the transformer blocks and the FWL through torch.compile (`backend`: Inductor; the
    benchmarks' smoke run passes aot_eager, tracing without code generation), in place.

    In place (nn.Module.compile) so that parameter names, the state dict and therefore checkpoints are
    those of the eager model: a run can resume compiled from an eager checkpoint and back. Block by block
    rather than the whole GPT: every block runs the same code on the same shapes with its parameters as
    graph inputs, so one graph serves them all and compile time does not grow with depth; the FWL is one
    graph without breaks (its chunk loop unrolled, the per-chunk work fused). The embedding and the
    vocabulary loss stay eager: their token chunks are recomputed in backward by torch.utils.checkpoint
    and they are memory-bound lookups and one matmul each. Before deepspeed.initialize, which then wraps
    the compiled modules like any other."""
    for block in model.blocks:
        block.compile(backend=backend)
    if model.fwl is not None:
        model.fwl.compile(backend=backend)
    return model


def deepspeed_config(cfg: Config, dp: int) -> dict[str, Any]:
    """Our config in DeepSpeed's terms."""
    t, p = cfg.train, cfg.parallel
    return {
        "train_micro_batch_size_per_gpu": p.micro_batch,
        "gradient_accumulation_steps": p.grad_accum,
        "train_batch_size": p.micro_batch * p.grad_accum * dp,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.adam_eps,
                       "weight_decay": t.weight_decay, "torch_adam": True},
        },
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": p.zero_stage},
        "bf16": {"enabled": t.bf16},
        # Our own progress bar and metrics replace DeepSpeed's periodic prints.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def param_groups(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, the FWL step sizes and decay factors: every parameter with
    fewer than two dimensions; everything else (matrices, embeddings) decays. The FWL's parameters and
    its step sizes may run at their own multiple of train.lr (train.fwl_lr_mult, train.step_size_lr_mult);
    groups that would be empty are left out."""
    t = cfg.train

    def lr_mult(name: str) -> float:
        if name.endswith("step_sizes"):
            return t.step_size_lr_mult
        return t.fwl_lr_mult if ".fwl." in f".{name}" else 1.0

    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((p.ndim >= 2, lr_mult(name)), []).append(p)
    out = []
    for (decays, mult), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1] != 1.0, kv[0][1])):
        group = {"params": params, "weight_decay": t.weight_decay if decays else 0.0,
                 "name": ("decay" if decays else "no_decay") + (f"_lr_x{mult:g}" if mult != 1.0 else "")}
        if mult != 1.0:
            group["lr"] = t.lr * mult
        out.append(group)
    return out


def lr_factor(update: int, cfg: Config) -> float:
    """Multiplier of train.lr for optimizer update number `update` (0-based): linear warmup over
    train.warmup_steps, then cosine from 1 down to train.min_lr_ratio at train.steps."""
    t = cfg.train
    if t.warmup_steps > 0 and update < t.warmup_steps:
        return (update + 1) / t.warmup_steps
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (update - t.warmup_steps) / span)
    return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(cfg: Config):
    """The factory DeepSpeed calls with its optimizer: warmup + cosine (lr_factor) as a LambdaLR."""
    def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: lr_factor(u, cfg))

    return schedule


def build_engine(cfg: Config, model: GPT, dist: DistInfo, mpu=None):
    """`deepspeed.initialize` with our config (pp = 1; `mpu`: the ParallelState, whose groups tell
    DeepSpeed the tensor-parallel split and the data-parallel group dp × cp); returns (engine,
    lr_scheduler). The scheduler steps once per applied optimizer update (DeepSpeed does not step it on a
    skipped update) and is saved in DeepSpeed's checkpoints."""
    import deepspeed  # after init_distributed set the environment: the accelerator is chosen on first use

    if cfg.train.compile:
        compile_model(model)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg), mpu=mpu,
        # DeepSpeed's data-parallel group is dp × cp (context-parallel peers hold the same parameters and
        # share one batch, but DeepSpeed counts every member's micro-batch in train_batch_size).
        config=deepspeed_config(cfg, dist.dp * cfg.parallel.cp), lr_scheduler=lr_schedule(cfg),
        dist_init_required=False)
    register_zero3_externals(engine, model)
    undo_initial_optimizer_step(engine)
    return engine, scheduler


def register_zero3_externals(engine, model: GPT) -> None:
    """Under ZeRO-3, tells DeepSpeed which modules use parameters they do not own (the tied unembedding,
    the FWL's output bias: GPT.zero3_external_parameters), so that it gathers them for those modules'
    forward and for the backward's recomputation. Once per engine, here, before any forward."""
    if engine.zero_optimization_stage() != 3:
        return
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter  # deepspeed loads lazily

    for module, param in model.zero3_external_parameters():
        register_external_parameter(module, param)


def undo_initial_optimizer_step(engine) -> None:
    """DeepSpeed's FP16_UnfusedOptimizer (bf16 with ZeRO 0) builds Adam's state by running one AdamW
    step with zero gradients: the step count starts at 1 (the first updates are 0.735×, 0.86×, ... of
    Adam's through bias correction) and the fp32 masters take one weight decay before training. Drop
    that state and copy the model's weights back into the masters, so bf16 trains like one process."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer  # deepspeed loads lazily here

    opt = engine.optimizer
    if not isinstance(opt, FP16_UnfusedOptimizer):
        return
    opt.optimizer.state.clear()
    with torch.no_grad():
        for fp32_group, model_group in zip(opt.fp32_groups, opt.fp16_groups):
            for master, p in zip(fp32_group, model_group):
                master.copy_(p.float())


def zero_stage_discards_nonfinite(engine) -> bool:
    """Whether DeepSpeed's own optimizer wrapper throws away a step whose gradients are not finite
    (ZeRO 1-3, and the bf16 optimizer). The plain torch optimizer of ZeRO 0 in fp32 does not."""
    return bool(engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled())
