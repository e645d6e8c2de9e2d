"""Conversion of a checkpoint of any layout (tp, pp, dp, ZeRO stage, precision) into the universal format,
and consolidation into one unsharded file.

    fwl ckpt convert SRC OUT_RUN_DIR            # then: fwl train ... --resume-from OUT_RUN_DIR, any layout
    fwl ckpt consolidate SRC OUT.safetensors [--dtype float32|bfloat16]

A native checkpoint holds DeepSpeed's shards of one layout. `convert` rebuilds the engine that wrote it
(same layout, same number of processes: it starts them itself on this machine's CPUs, or runs inside a
launcher that started that many), lets DeepSpeed load its own files, and reads every parameter's fp32
master weight and Adam moments out of it in full (checkpoint/optimizer.py) — merging tensor-parallel
shards and collecting pipeline stages — into the universal format (checkpoint/universal.py). DeepSpeed's
own universal checkpoint cannot do this for ZeRO-3 with tensor parallelism (docs/design.md §3.1); this path has no
such hole. The trainer loads the result into whatever layout it runs (`load_universal`).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fwl_scale import __version__
from fwl_scale.atomic import atomic_write_json, atomic_write_text
from fwl_scale.checkpoint.native import (CHECKPOINT_DIR, FORMAT, MARKER, POINTER, CheckpointError, CheckpointManager,
                                         CheckpointRef, checkpoint_files, find_latest, hash_files, read_marker,
                                         resolve_checkpoint, tag_for)
from fwl_scale.checkpoint.universal import UniversalReader, save_safetensors, write_universal
from fwl_scale.parallel.spawned import exit_spawned_rank
from fwl_scale.config import Config, ConfigError, config_from_dict, config_to_nested
from fwl_scale.parallel import init_parallel_state
from fwl_scale.train.distributed import free_port, init_distributed, quiet_deepspeed
from fwl_scale.train.engine import build_training_engine


def _source_config(ref: CheckpointRef) -> Config:
    data = ref.meta.get("config")
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {ref.path}: its {MARKER} has no config (written by an older fwl_scale); "
                              "it cannot be converted")
    cfg = config_from_dict(data, f"checkpoint {ref.path}")
    cfg.train.device = "cpu"  # conversion runs on CPUs, whatever the source ran on
    cfg.train.wandb.enabled = False
    return cfg


def _marker(ref: CheckpointRef, cfg: Config, step: int) -> dict[str, Any]:
    return {"format": FORMAT, "step": step, "tag": tag_for(step), "time": time.time(), "fwl_scale": __version__,
            "universal": True, "source": str(ref.path), "source_layout": ref.meta.get("layout"),
            "world_size": None, "dp": None, "zero_stage": None, "bf16": None, "config_name": cfg.name,
            "model": config_to_nested(cfg)["model"], "config": config_to_nested(cfg)}


def _prepare_destination(dst: Path, tag: str) -> Path:
    root = dst / CHECKPOINT_DIR
    existing = find_latest(root) if root.is_dir() else None
    if existing is not None:
        raise CheckpointError(f"{dst} already holds checkpoints (latest {existing.path}); convert into a new "
                              "run directory")
    tag_dir = root / tag
    if tag_dir.exists():  # an interrupted conversion
        shutil.rmtree(tag_dir)
    tag_dir.mkdir(parents=True)
    return tag_dir


def convert_worker(src_root: str, tag: str, dst: str) -> None:
    """One rank of a conversion (torch.distributed set up for the source's world)."""
    ref = CheckpointRef(Path(src_root), tag, read_marker(Path(src_root) / tag) or {})
    cfg = _source_config(ref)
    info = init_distributed(cfg)
    quiet_deepspeed()
    ps = init_parallel_state(cfg)
    torch.manual_seed(cfg.train.seed)
    te = build_training_engine(cfg, ps, info)
    client = CheckpointManager(Path(dst), 1, info.rank).load(te.engine, ref)
    tag_dir = Path(dst) / CHECKPOINT_DIR / tag
    source = {"path": str(ref.path), "layout": ref.meta.get("layout"), "zero_stage": cfg.parallel.zero_stage,
              "bf16": cfg.train.bf16, "world_size": info.world_size}
    write_universal(te, tag_dir, ref.step, client, source)
    if info.rank == 0:
        for f in sorted(ref.path.glob("fwl_state_*.pt")):  # the carried FWL state (train/carried.py)
            shutil.copy2(f, tag_dir / f.name)
        # Every rank's files are written (write_universal ends with a barrier): the checksums of all of
        # them go into the marker, as a training save records them (checkpoint/native.py).
        marker = _marker(ref, cfg, ref.step)
        marker["files"] = hash_files(tag_dir, checkpoint_files(tag_dir))
        atomic_write_json(tag_dir / MARKER, marker)
        atomic_write_text(tag_dir.parent / POINTER, tag + "\n")
    dist.barrier()


def _spawned(rank: int, world: int, port: int, src_root: str, tag: str, dst: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        convert_worker(src_root, tag, dst)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    exit_spawned_rank()


def convert_checkpoint(src: str | Path, dst: str | Path, verify: bool = True) -> CheckpointRef:
    """Converts checkpoint `src` (any layout) into a universal checkpoint in run directory `dst`. Starts
    as many local CPU processes as the source had ranks, unless it already runs as one rank of a launch of
    that size. `verify`: check the source against its checksums first (False: the caller just did)."""
    ref = resolve_checkpoint(src, verify=verify)
    dst = Path(dst)
    if ref.meta.get("universal"):
        tag_dir = _prepare_destination(dst, ref.tag)
        shutil.copytree(ref.path, tag_dir, dirs_exist_ok=True)
        atomic_write_text(tag_dir.parent / POINTER, ref.tag + "\n")
        return CheckpointRef(tag_dir.parent, ref.tag, ref.meta)
    world = int(ref.meta.get("world_size") or 1)
    _source_config(ref)  # refuse a checkpoint without its config before starting anything
    launched = os.environ.get("WORLD_SIZE")
    if launched is not None and int(launched) > 1:
        if int(launched) != world:
            raise ConfigError(f"checkpoint {ref.path} was written by {world} ranks; this launch has {launched}. "
                              f"Run `fwl ckpt convert` with {world} ranks, or as one process (it starts them)")
        if int(os.environ.get("RANK", "0")) == 0:
            # Before this rank joins the process group, so before any rank can write.
            _prepare_destination(dst, ref.tag)
        convert_worker(str(ref.root), ref.tag, str(dst))
    else:
        _prepare_destination(dst, ref.tag)
        mp.start_processes(_spawned, args=(world, free_port(), str(ref.root), ref.tag, str(dst)), nprocs=world,
                           start_method="spawn")
    out = find_latest(dst / CHECKPOINT_DIR)
    if out is None:
        raise CheckpointError(f"conversion of {ref.path} into {dst} did not complete")
    return out


def consolidate(src: str | Path, out_file: str | Path, dtype: str = "float32", verify: bool = True) -> Path:
    """One unsharded safetensors file of the model's weights (single-process parameter names, the config
    in its metadata) from any checkpoint. `verify`: check the source against its checksums first (False:
    the caller just did)."""
    out_file = Path(out_file)
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    ref = resolve_checkpoint(src, verify=verify)
    tmp_run = None
    if not ref.meta.get("universal"):
        tmp_run = out_file.parent / f".{out_file.name}.convert{os.getpid()}"
        if tmp_run.exists():
            shutil.rmtree(tmp_run)
        try:
            ref = convert_checkpoint(ref.path, tmp_run, verify=False)  # verified just above
        except BaseException:
            shutil.rmtree(tmp_run, ignore_errors=True)
            raise
    try:
        reader = UniversalReader(ref.path)
        want = torch.float32 if dtype == "float32" else torch.bfloat16
        weights = {n: reader.get(n).to(want) for n in reader.names()}
        meta = {"format": "fwl_scale.weights/1", "step": str(ref.step),
                "config": json.dumps(ref.meta.get("config") or {"model": ref.meta.get("model")})}
        out_file.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(weights, out_file, meta)
    finally:
        if tmp_run is not None:
            shutil.rmtree(tmp_run, ignore_errors=True)
    return out_file
