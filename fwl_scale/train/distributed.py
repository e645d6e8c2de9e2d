"""The DeepSpeed engine: process-group set-up, our config translated into DeepSpeed's, optimizer
parameter groups, the learning-rate schedule.

One trainer for every scale (docs/design.md §3.1): even a single CPU process goes through `deepspeed.initialize`,
so there is one training loop and one checkpoint format. DeepSpeed owns the optimizer (AdamW through
its optimizer config with `torch_adam`, so no C++ op is compiled for it), ZeRO, bf16, clipping and
gradient accumulation.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fwl_scale.config import Config, ConfigError, check_layout
from fwl_scale.device import resolve_device
from fwl_scale.model.gpt import GPT

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    dp: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_layout_implemented(cfg: Config) -> None:
    """Refuses, before any work, the combinations of the layout this trainer does not run (yet)."""
    p = cfg.parallel
    # pp × cp and pp × carried state (also with tp) run and are tested against one process
    # (tests/test_engine_parallel.py, tests/test_pipeline_cp.py); pp × cp × tp needs 8 ranks to test, so it
    # is refused rather than served unchecked.
    if p.pp > 1 and p.cp > 1 and p.tp > 1:
        raise ConfigError(f"parallel.tp: pipeline × context × tensor parallelism (pp={p.pp}, cp={p.cp}, tp={p.tp}) "
                          "is not supported yet (pp × cp and pp × tp are); drop one of the three")
    if p.pp > 1 and cfg.train.bf16 and p.zero_stage == 0:
        raise ConfigError("parallel.zero_stage: pipeline parallelism with train.bf16 needs zero_stage 1: without "
                          "ZeRO, DeepSpeed's bf16 optimizer cannot load the checkpoints it writes under the pipeline "
                          "engine (DeepSpeed 0.19: its optimizer state is saved per data-parallel rank but loaded "
                          "as one), so the run could not be resumed")
    if p.pp > 1 and cfg.model.positions == "learned":
        raise ConfigError("model.positions: learned position embeddings are not in the pipeline's first stage "
                          "(train/pipeline.py EmbedStage) yet; use parallel.pp: 1")


def check_compile(cfg: Config, device: torch.device) -> None:
    """Refuses, before any work, train.compile where it is not supported: the compiled modules are tested
    in one process and under plain data parallelism with ZeRO 0-2 (tests/test_compile.py). Tensor and
    context parallelism run collectives inside the blocks and the FWL, the pipeline engine builds its own
    stage modules, and ZeRO-3 gathers parameters in hooks of every submodule, inside what would be traced."""
    if not cfg.train.compile:
        return
    p = cfg.parallel
    for fld, value, why in (("parallel.tp", p.tp, "tensor parallelism"), ("parallel.cp", p.cp, "context parallelism"),
                            ("parallel.pp", p.pp, "pipeline parallelism")):
        if value > 1:
            raise ConfigError(f"train.compile: not supported with {why} ({fld}={value}) yet; "
                              "use train.compile=false or a layout without it")
    if p.zero_stage == 3:
        raise ConfigError("train.compile: not supported with parallel.zero_stage=3 (its parameter-gathering hooks "
                          "would run inside the compiled modules); use zero_stage 0-2 or train.compile=false")
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        raise ConfigError("train.compile: torch.compile's Inductor backend needs a C++ compiler on CPU and none was "
                          "found (set CXX or install g++); or use train.compile=false")


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


def free_port() -> int:
    """A TCP port free on this machine now (for a rendezvous of processes started here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def quiet_deepspeed() -> None:
    """DeepSpeed's INFO lines drown our progress output; FWL_DEBUG=1 keeps them."""
    if os.environ.get("FWL_DEBUG"):
        return
    # Not at module level: DeepSpeed picks its accelerator on import (see init_distributed).
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment: {name}={raw!r} is not an integer") from None


def prepare_environment(device: torch.device) -> tuple[int, int, int]:
    """Fills in what torch.distributed's env:// rendezvous needs for a single process, and checks what a
    launcher (torchrun, our Slurm scripts exporting SLURM_* as RANK etc.) provides. Without RANK and
    WORLD_SIZE DeepSpeed would try MPI discovery and fail (docs/design.md §3.1). Returns (rank, world, local_rank)."""
    world = _env_int("WORLD_SIZE")
    rank = _env_int("RANK")
    if world is None and rank is None:
        world, rank = 1, 0
        os.environ["WORLD_SIZE"], os.environ["RANK"] = "1", "0"
    elif world is None or rank is None:
        missing = "WORLD_SIZE" if world is None else "RANK"
        raise ConfigError(f"environment: RANK and WORLD_SIZE go together, {missing} is missing")
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"environment: RANK={rank} is outside WORLD_SIZE={world}")
    local_rank = _env_int("LOCAL_RANK")
    if local_rank is None:
        n_local = torch.cuda.device_count() if device.type == "cuda" else 1
        local_rank = rank % max(1, n_local) if world > 1 else 0
        os.environ["LOCAL_RANK"] = str(local_rank)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if not os.environ.get("MASTER_PORT"):
        if world > 1:
            raise ConfigError(f"environment: MASTER_PORT must be set when WORLD_SIZE={world} > 1 "
                              "(every rank has to meet at the same address and port)")
        os.environ["MASTER_PORT"] = str(free_port())
    # DeepSpeed compiles its CPU shared-memory communication op on first use; keep the build inside the
    # repository's ignored .cache/ unless the user chose a place.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))
    # DeepSpeed picks its accelerator once, at first use; on a machine without CUDA say CPU explicitly.
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return rank, world, local_rank


def init_distributed(cfg: Config) -> DistInfo:
    """Starts (or joins an already started) process group: gloo on CPU, nccl on CUDA."""
    check_layout_implemented(cfg)
    device = resolve_device(cfg)
    check_compile(cfg, device)
    rank, world, local_rank = prepare_environment(device)
    dp = check_layout(cfg, world)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    import deepspeed  # after the environment is set: the accelerator is chosen on first use

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    else:
        # Already up (several trainings in one process, e.g. tests): DeepSpeed only wraps it.
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   dist_init_required=False)
        if torch.distributed.get_world_size() != world:
            raise ConfigError(f"environment: WORLD_SIZE={world} but the running process group has "
                              f"{torch.distributed.get_world_size()} ranks")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, dp=dp, device=device, backend=backend)


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
