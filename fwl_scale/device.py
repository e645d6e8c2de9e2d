"""The device a command runs on (train.device: auto | cpu | cuda), shared by training and evaluation."""
from __future__ import annotations

import os

import torch

from fwl_scale.config import Config, ConfigError


def resolve_device(cfg: Config) -> torch.device:
    """The device of `cfg`, with the process's fp32 matmul precision set for it (train.tf32)."""
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but torch sees no CUDA device "
                          f"(torch {torch.__version__}); use train.device=cpu or auto")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want)
    precision = matmul_precision(cfg, device)
    if precision is not None:
        torch.set_float32_matmul_precision(precision)
    return device


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """The index, among the GPUs this process sees, of the one node-local rank `local_rank` trains on.

    Where every rank of a node sees all of its GPUs (`--gpus-per-node`), that is GPU `local_rank`. Where the
    site binds one GPU per task (`--gpus-per-task=1`, `--gpu-bind=single:1`, a prolog setting
    CUDA_VISIBLE_DEVICES), local rank 3 sees one GPU, index 0. `local_rank % device_count` is right in both
    cases; a node with more ranks than visible GPUs would put two ranks on one GPU, which NCCL refuses at
    start-up ("Duplicate GPU detected")."""
    if device_count < 1:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(f"local rank {local_rank} is to train on a GPU but sees none "
                          f"(CUDA_VISIBLE_DEVICES={visible!r}); give each task a GPU (--gpus-per-node or "
                          "--gpus-per-task) or use train.device=cpu")
    if local_rank < 0:
        raise ConfigError(f"environment: LOCAL_RANK={local_rank} is negative")
    return local_rank % device_count


def select_cuda_device(local_rank: int) -> torch.device:
    """Makes this rank's GPU (cuda_device_index) the current device, and LOCAL_RANK its index: DeepSpeed
    takes LOCAL_RANK as a device ordinal (its engine's set_device, ZeRO-3's Init, PipelineModule), so with
    one GPU bound per task an untouched LOCAL_RANK=3 would name a GPU this process cannot see."""
    index = cuda_device_index(local_rank, torch.cuda.device_count())
    os.environ["LOCAL_RANK"] = str(index)
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def matmul_precision(cfg: Config, device: torch.device) -> str | None:
    """torch's float32 matmul precision for `device`: "high" (TF32) or "highest" on CUDA; None elsewhere,
    where torch's default stays."""
    if device.type != "cuda":
        return None
    return "high" if cfg.train.tf32 else "highest"


def eval_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The parameters' dtype for evaluation: bf16 where training ran in bf16 on this kind of device."""
    return torch.bfloat16 if device.type == "cuda" and cfg.train.bf16 else None


def cast_parameters(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Casts the floating-point parameters only, as DeepSpeed's bf16 engine does: buffers (the rotary
    frequencies) stay fp32, so an evaluation sees the positions training's validation saw."""
    for p in module.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
