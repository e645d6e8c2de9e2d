"""Process-group start-up: the layout and compile checks made before any work, the environment a launcher
(or a single process) gives torch.distributed, and the group itself (gloo on CPU, nccl on CUDA) through
DeepSpeed. The engine built on it is train/deepspeed_setup.py (DeepSpeed's side) and train/engine.py (ours).
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from fwl_scale.config import Config, ConfigError, check_layout
from fwl_scale.device import resolve_device, select_cuda_device

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


def check_compile_toolchain(cfg: Config, device: torch.device) -> None:
    """train.compile on this machine: Inductor needs a C++ compiler on CPU. (Which layouts compile runs
    in is a rule of the config, config.check_layout.)"""
    if not cfg.train.compile:
        return
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        raise ConfigError("train.compile: torch.compile's Inductor backend needs a C++ compiler on CPU and none was "
                          "found (set CXX or install g++); or use train.compile=false")


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
    else:
        # NCCL says why a collective failed or hangs (which rank, which transport) only at WARN or above,
        # and WARN is quiet on a healthy run. launchers/common.sh sets the same; the user's value wins.
        os.environ.setdefault("NCCL_DEBUG", "WARN")
    return rank, world, local_rank


def init_distributed(cfg: Config) -> DistInfo:
    """Starts (or joins an already started) process group: gloo on CPU, nccl on CUDA."""
    check_layout(cfg)
    device = resolve_device(cfg)
    check_compile_toolchain(cfg, device)
    rank, world, local_rank = prepare_environment(device)
    dp = check_layout(cfg, world)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        device = select_cuda_device(local_rank)  # local_rank % GPUs seen: one GPU bound per task works too
    import deepspeed  # after the environment is set: the accelerator is chosen on first use

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    else:
        # Already up (several trainings in one process, e.g. tests): DeepSpeed only wraps it.
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   dist_init_required=False)
        if torch.distributed.get_world_size() != world:
            raise ConfigError(f"environment: WORLD_SIZE={world} but the running process group has "
                              f"{torch.distributed.get_world_size()} ranks")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, dp=dp, device=device, backend=backend)
