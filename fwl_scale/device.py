"""The device a command runs on (train.device: auto | cpu | cuda), shared by training and evaluation."""
from __future__ import annotations

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
