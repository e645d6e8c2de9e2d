"""Layout-free ("universal") checkpoints: conversion between layouts (tp, pp, dp, ZeRO stage, precision)
and consolidation into one unsharded file.

    fwl ckpt convert SRC OUT_RUN_DIR            # then: fwl train ... --resume-from OUT_RUN_DIR, any layout
    fwl ckpt consolidate SRC OUT.safetensors [--dtype float32|bfloat16]

A native checkpoint holds DeepSpeed's shards of one layout. `convert` rebuilds the engine that wrote it
(same layout, same number of processes: it starts them itself on this machine's CPUs, or runs inside a
launcher that started that many), lets DeepSpeed load its own files, and reads every parameter's fp32
master weight and Adam moments out of it in full — through DeepSpeed's tensor-fragment API under ZeRO
1/2/3 and the bf16 optimizer, directly from the torch optimizer or the flat fp16-optimizer buffers
without ZeRO — merging tensor-parallel shards and collecting pipeline stages. DeepSpeed's own universal
checkpoint cannot do this for ZeRO-3 with tensor parallelism (DESIGN §3); this path has no such hole.

The trainer loads a universal checkpoint into whatever layout it runs (`load_universal`): each rank
takes its slices and writes them into its optimizer the same way, so weights and optimizer state are
identical to the source's, bit for bit (tests/test_ckpt_convert.py), and training continues with the
same schedule, data position and step count.

Universal checkpoint directory (OUT_RUN_DIR/checkpoints/step_XXXXXXXX/):
    model-stageNN.safetensors   fp32 master weights under the single-process model's parameter names
    optim-stageNN.safetensors   exp_avg.<name>, exp_avg_sq.<name> (one pair of files per source stage)
    universal.json              Adam step, scheduler state, DeepSpeed's step counters, the source
    client_state.pt             the trainer's state: step, data position, RNG, wandb run id, config
    fwl_state_*.pt              the carried FWL state (contiguous mode), copied as they are
    COMPLETE.json               the marker, with "universal": true (written last, as for every checkpoint)
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
from torch import Tensor, nn

from fwl_scale import __version__
from fwl_scale.atomic import atomic_write, atomic_write_json, atomic_write_text
from fwl_scale.config import Config, ConfigError, config_from_dict, config_to_nested
from fwl_scale.parallel.layers import is_sharded, merge_shards, shard_of
from fwl_scale.train.checkpoint import (CHECKPOINT_DIR, FORMAT, MARKER, POINTER, CheckpointError, CheckpointRef,
                                        find_latest, resolve_checkpoint, tag_for)

UNIVERSAL_FORMAT = "fwl_scale.universal/1"
STATE_KEYS = ("exp_avg", "exp_avg_sq")
INDEX = "universal.json"
CLIENT = "client_state.pt"


# ------------------------------------------------------------------------- optimizer access
class OptimizerAccess:
    """Reads and writes one parameter's fp32 master weight and Adam moments, in full over the data-
    parallel group (tensor-parallel-local), whatever DeepSpeed wrapper holds them:

    torch     ZeRO 0, fp32: the torch AdamW on the parameters themselves
    fp16unfused  ZeRO 0, bf16 (plain engine, torch Adam): an fp32 copy of each parameter with its Adam state
    fp16opt   the same with a fused Adam: flat fp32 copies of each group, Adam state on the flat tensor
    hp        ZeRO 1/2, and the bf16 optimizer (pipeline): flat fp32 partitions linked to each parameter
              by DeepSpeed's tensor fragments (safe_get/set_full_*)
    zero3     ZeRO 3: every parameter partitioned over dp (safe_get_full_* gathers; set: this rank's
              padded partition through safe_set_local_*)

    The `get` of hp and zero3 is collective over the data-parallel group: call it for the same
    parameters in the same order on every rank of the group."""

    def __init__(self, engine):
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        self.engine = engine
        opt = engine.optimizer
        self.opt = opt
        if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
            self.kind = "zero3"
        elif isinstance(opt, (DeepSpeedZeroOptimizer, BF16_Optimizer)):
            self.kind = "hp"
        elif isinstance(opt, FP16_Optimizer):
            self.kind = "fp16opt"
        elif isinstance(opt, FP16_UnfusedOptimizer):
            self.kind = "fp16unfused"
        elif isinstance(opt, torch.optim.Optimizer):
            self.kind = "torch"
        else:
            raise CheckpointError(f"unsupported optimizer wrapper {type(opt).__name__} for checkpoint conversion")
        self.base: torch.optim.Optimizer = opt if self.kind == "torch" else opt.optimizer
        self._flat_at: dict[int, tuple[int, int]] = {}
        self._master: dict[int, Tensor] = {}
        if self.kind == "fp16unfused":
            for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups):
                for lp, hp in zip(lp_group, hp_group):
                    self._master[id(lp)] = hp
        if self.kind == "fp16opt":
            for i, group in enumerate(opt.fp16_groups):
                offset = 0
                for p in group:
                    self._flat_at[id(p)] = (i, offset)
                    offset += p.numel()

    def _stepped_tensors(self) -> list[Tensor]:
        """The tensors Adam's state is kept for (ZeRO-3 empties its optimizer's groups between steps)."""
        if self.kind == "zero3":
            return list(self.opt.fp32_partitioned_groups_flat)
        return [t for g in self.base.param_groups for t in g["params"]]

    def ensure_states(self) -> None:
        """Adam's state exists only after a first step; create it (zeros, step 0) where it is missing,
        and link it to the parameters' fragments (ZeRO 1/2, bf16 optimizer)."""
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        for t in self._stepped_tensors():
            st = self.base.state[t]
            if "exp_avg" not in st:
                st["step"] = torch.tensor(0.0, dtype=scalar)
                st["exp_avg"] = torch.zeros_like(t, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(t, memory_format=torch.preserve_format)
        if self.kind == "hp":
            from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

            lp_groups = getattr(self.opt, "bit16_groups", None) or self.opt.bf16_groups
            flat = getattr(self.opt, "single_partition_of_fp32_groups", None) or self.opt.fp32_groups_flat_partition
            for lp, hp in zip(lp_groups, flat):
                lazy_init_hp_params_optimizer_state(lp, hp, self.base.state)

    def optimizer_step(self) -> int:
        steps = {int(float(st["step"])) for st in self.base.state.values() if "step" in st}
        if len(steps) > 1:
            raise CheckpointError(f"the optimizer's parameters disagree on Adam's step count: {sorted(steps)}")
        return steps.pop() if steps else 0

    def set_optimizer_step(self, step: int) -> None:
        for t in self._stepped_tensors():
            st = self.base.state[t]
            st["step"] = torch.full_like(st["step"], float(step)) if torch.is_tensor(st.get("step")) else step

    def get(self, p: nn.Parameter) -> dict[str, Tensor]:
        if self.kind == "fp16unfused":
            master = self._master[id(p)]
            st = self.base.state.get(master, {})
            out = {"param": master.detach().float().clone()}
            for k in STATE_KEYS:
                out[k] = st[k].detach().float().clone() if k in st else torch.zeros_like(out["param"])
            return out
        if self.kind == "torch":
            st = self.base.state.get(p, {})
            out = {"param": p.detach().float().clone()}
            for k in STATE_KEYS:
                out[k] = st[k].detach().float().clone() if k in st else torch.zeros_like(out["param"])
            return out
        if self.kind == "fp16opt":
            i, off = self._flat_at[id(p)]
            flat = self.opt.fp32_groups_flat[i]
            st = self.base.state[flat]
            n = p.numel()
            out = {"param": flat.detach()[off:off + n].view(p.shape).float().clone()}
            for k in STATE_KEYS:
                out[k] = st[k].detach()[off:off + n].view(p.shape).float().clone()
            return out
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        out = {"param": safe_get_full_fp32_param(p).detach().float().clone()}
        for k in STATE_KEYS:
            out[k] = safe_get_full_optimizer_state(p, k).detach().float().clone()
        return out

    def set(self, p: nn.Parameter, values: dict[str, Tensor]) -> None:
        """`values`: this rank's tensor-parallel-local full tensors (param, exp_avg, exp_avg_sq), fp32.
        Call ensure_states() first."""
        if self.kind == "fp16unfused":
            master = self._master[id(p)]
            master.data.copy_(values["param"])
            st = self.base.state[master]
            for k in STATE_KEYS:
                st[k].copy_(values[k].to(st[k].dtype))
            p.data.copy_(values["param"].to(p.dtype))
            return
        if self.kind == "torch":
            p.data.copy_(values["param"].to(p.dtype))
            st = self.base.state[p]
            for k in STATE_KEYS:
                st[k].copy_(values[k].to(st[k].dtype))
            return
        if self.kind == "fp16opt":
            i, off = self._flat_at[id(p)]
            flat = self.opt.fp32_groups_flat[i]
            n = p.numel()
            flat.data[off:off + n].copy_(values["param"].flatten())
            st = self.base.state[flat]
            for k in STATE_KEYS:
                st[k][off:off + n].copy_(values[k].flatten())
            p.data.copy_(values["param"].to(p.dtype))
            return
        if self.kind == "hp":
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

            safe_set_full_fp32_param(p, values["param"])
            for k in STATE_KEYS:
                safe_set_full_optimizer_state(p, values[k], k)
            p.data.copy_(values["param"].to(p.dtype))
            return
        # ZeRO-3: this rank's partition of the flattened tensor, padded to partition size × group size.
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        part = p.ds_tensor.numel()
        group = p.ds_process_group
        rank, size = dist.get_rank(group=group), dist.get_world_size(group=group)

        def mine(t: Tensor) -> Tensor:
            padded = torch.zeros(part * size, dtype=torch.float32, device=t.device)
            padded[: t.numel()] = t.flatten()
            return padded[rank * part:(rank + 1) * part]

        safe_set_local_fp32_param(p, mine(values["param"]))
        for k in STATE_KEYS:
            safe_set_local_optimizer_state(p, mine(values[k]), k)
        p.ds_tensor.data.copy_(mine(values["param"]).to(p.ds_tensor.dtype))


# --------------------------------------------------------------------------------- gathering
def _gather_tp(t: Tensor, p: nn.Parameter, ps) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(ps.tp_size)]
    dist.all_gather(parts, t.contiguous(), group=ps.groups["tp"])
    return merge_shards(parts, p.partition_dim, p.partition_stride)


def gather_full_state(te) -> tuple[dict[str, dict[str, Tensor]], int]:
    """Every parameter this rank's stage holds, in full (tp shards merged, dp partitions gathered), fp32,
    on the rank that writes for the stage (tp rank 0, data-parallel rank 0); ({} on the others, Adam
    step). Collective over the stage's tp and data-parallel groups."""
    ps = te.ps
    acc = OptimizerAccess(te.engine)
    acc.ensure_states()
    writer = ps.tp_rank == 0 and ps.get_data_parallel_rank() == 0
    out: dict[str, dict[str, Tensor]] = {}
    for name, p in te.named_parameters():
        values = acc.get(p)
        if is_sharded(p) and ps.tp_size > 1:
            values = {k: _gather_tp(v, p, ps) for k, v in values.items()}
        if getattr(p, "ds_pipe_replicated", False):
            continue  # the tied embedding's copy on the last stage: the first stage writes it
        if writer:
            out[name] = {k: v.cpu() for k, v in values.items()}
    return out, acc.optimizer_step()


def _save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                             metadata=metadata))


def write_universal(te, tag_dir: Path, step: int, client_state: dict[str, Any], source: dict[str, Any]) -> None:
    """Collective: every rank of the engine calls it; the stage writers write their files, rank 0 the
    index and client state. The caller marks the checkpoint complete afterwards."""
    ps = te.ps
    full, adam_step = gather_full_state(te)
    steps = [None] * dist.get_world_size() if dist.is_initialized() else [adam_step]
    if dist.is_initialized():
        dist.all_gather_object(steps, adam_step)
    if len(set(steps)) != 1:
        raise CheckpointError(f"ranks disagree on Adam's step count: {steps}")
    if full:
        model = {n: v["param"] for n, v in full.items()}
        optim = {f"{k}.{n}": v[k] for n, v in full.items() for k in STATE_KEYS}
        _save_safetensors(model, tag_dir / f"model-stage{ps.pp_rank:02d}.safetensors", {"format": UNIVERSAL_FORMAT})
        _save_safetensors(optim, tag_dir / f"optim-stage{ps.pp_rank:02d}.safetensors", {"format": UNIVERSAL_FORMAT})
    if ps.rank == 0:
        e = te.engine
        index = {
            "format": UNIVERSAL_FORMAT,
            "step": step,
            "adam_step": adam_step,
            "stages": ps.pp_size,
            "scheduler": te.scheduler.state_dict() if te.scheduler is not None else None,
            "engine": {"global_steps": int(e.global_steps), "global_samples": int(e.global_samples),
                       "skipped_steps": int(e.skipped_steps)},
            "source": source,
        }
        atomic_write_json(tag_dir / INDEX, index)
        atomic_write(tag_dir / CLIENT, lambda tmp: torch.save(client_state, tmp))
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------- loading
class UniversalReader:
    """The tensors of a universal checkpoint by parameter name (files opened lazily)."""

    def __init__(self, tag_dir: Path):
        from safetensors import safe_open

        self.tag_dir = tag_dir
        index_path = tag_dir / INDEX
        try:
            self.index = json.loads(index_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"universal checkpoint {tag_dir}: {INDEX} unreadable ({e})") from None
        if self.index.get("format") != UNIVERSAL_FORMAT:
            raise CheckpointError(f"universal checkpoint {tag_dir}: {INDEX} is not {UNIVERSAL_FORMAT}")
        self.where: dict[str, Any] = {}
        self.files = []
        for stage in range(int(self.index["stages"])):
            for kind in ("model", "optim"):
                path = tag_dir / f"{kind}-stage{stage:02d}.safetensors"
                if not path.is_file():
                    raise CheckpointError(f"universal checkpoint {tag_dir}: {path.name} is missing")
                try:
                    f = safe_open(str(path), framework="pt", device="cpu")
                except Exception as e:  # safetensors raises its own error types
                    raise CheckpointError(f"universal checkpoint {tag_dir}: {path.name} is corrupt ({e})") from None
                self.files.append(f)
                for key in f.keys():
                    self.where[key] = f

    def names(self) -> list[str]:
        return sorted(k for k in self.where if not k.startswith(tuple(f"{s}." for s in STATE_KEYS)))

    def get(self, key: str) -> Tensor:
        f = self.where.get(key)
        if f is None:
            raise CheckpointError(f"universal checkpoint {self.tag_dir}: no tensor {key!r} (another model?)")
        return f.get_tensor(key)

    def values(self, name: str) -> dict[str, Tensor]:
        return {"param": self.get(name), **{k: self.get(f"{k}.{name}") for k in STATE_KEYS}}


def load_universal(te, ref: CheckpointRef) -> dict[str, Any]:
    """Loads a universal checkpoint into the engine of any layout (every rank; each takes its slices);
    returns the trainer's client state."""
    from fwl_scale.parallel.layers import full_shape

    reader = UniversalReader(ref.path)
    acc = OptimizerAccess(te.engine)
    acc.ensure_states()
    for name, p in te.named_parameters():
        values = reader.values(name)
        shape = tuple(values["param"].shape)
        want = tuple(full_shape(p)) if not hasattr(p, "ds_shape") else _full_ds_shape(p)
        if shape != want:
            raise CheckpointError(f"universal checkpoint {ref.path}: {name} has shape {shape}, this model needs "
                                  f"{want}")
        acc.set(p, {k: shard_of(p, v).to(torch.float32) for k, v in values.items()})
    acc.set_optimizer_step(int(reader.index["adam_step"]))
    sched = reader.index.get("scheduler")
    if sched and te.scheduler is not None:
        te.scheduler.load_state_dict(sched)
        for group, lr in zip(te.engine.basic_optimizer.param_groups, te.scheduler.get_last_lr()):
            group["lr"] = lr
    counters = reader.index.get("engine") or {}
    for k in ("global_steps", "global_samples", "skipped_steps"):
        if k in counters:
            setattr(te.engine, k, int(counters[k]))
    try:
        client = torch.load(ref.path / CLIENT, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"universal checkpoint {ref.path}: {CLIENT} unreadable ({e})") from None
    if dist.is_initialized():
        dist.barrier()
    return client


def _full_ds_shape(p: nn.Parameter) -> tuple[int, ...]:
    """ZeRO-3 keeps the local (tensor-parallel) shape in ds_shape; the whole tensor's shape from it."""
    shape = list(p.ds_shape)
    if is_sharded(p):
        shape[p.partition_dim] *= p.tp_size
    return tuple(shape)


# -------------------------------------------------------------------------------- conversion
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
    from fwl_scale.parallel import init_parallel_state
    from fwl_scale.train.checkpoint import CheckpointManager, read_marker
    from fwl_scale.train.engine import init_distributed, quiet_deepspeed
    from fwl_scale.train.parallel_engine import build_training_engine

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
        atomic_write_json(tag_dir / MARKER, _marker(ref, cfg, ref.step))
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


def convert_checkpoint(src: str | Path, dst: str | Path) -> CheckpointRef:
    """Converts checkpoint `src` (any layout) into a universal checkpoint in run directory `dst`. Starts
    as many local CPU processes as the source had ranks, unless it already runs as one rank of a launch of
    that size."""
    ref = resolve_checkpoint(src)
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
        import torch.multiprocessing as mp

        from fwl_scale.train.engine import free_port

        mp.start_processes(_spawned, args=(world, free_port(), str(ref.root), ref.tag, str(dst)), nprocs=world,
                           start_method="spawn")
    out = find_latest(dst / CHECKPOINT_DIR)
    if out is None:
        raise CheckpointError(f"conversion of {ref.path} into {dst} did not complete")
    return out


def consolidate(src: str | Path, out_file: str | Path, dtype: str = "float32") -> Path:
    """One unsharded safetensors file of the model's weights (single-process parameter names, the config
    in its metadata) from any checkpoint."""
    out_file = Path(out_file)
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    ref = resolve_checkpoint(src)
    tmp_run = None
    if not ref.meta.get("universal"):
        tmp_run = out_file.parent / f".{out_file.name}.convert{os.getpid()}"
        if tmp_run.exists():
            shutil.rmtree(tmp_run)
        try:
            ref = convert_checkpoint(ref.path, tmp_run)
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
        _save_safetensors(weights, out_file, meta)
    finally:
        if tmp_run is not None:
            shutil.rmtree(tmp_run, ignore_errors=True)
    return out_file


def read_consolidated(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(weights, config dict) of a consolidated file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        weights = {k: f.get_tensor(k) for k in f.keys()}
    return weights, json.loads(meta.get("config", "{}"))
