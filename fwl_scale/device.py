"""The device a command runs on (train.device: auto | cpu | cuda), shared by training and evaluation."""
from __future__ import annotations

import torch

from fwl_scale.config import Config, ConfigError


def resolve_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but torch sees no CUDA device "
                          f"(torch {torch.__version__}); use train.device=cpu or auto")
    return torch.device(want)
