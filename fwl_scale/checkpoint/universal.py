"""The layout-free ("universal") checkpoint format: writing it from an engine of any layout, reading it,
and loading it into an engine of any layout (every rank takes its slices).

Directory (RUN_DIR/checkpoints/step_XXXXXXXX/):
    model-stageNN.safetensors   fp32 master weights under the single-process model's parameter names
    optim-stageNN.safetensors   exp_avg.<name>, exp_avg_sq.<name> (one pair of files per source stage)
    universal.json              Adam step, scheduler state, DeepSpeed's step counters, the source
    client_state.pt             the trainer's state: step, data position, RNG, wandb run id, config
    fwl_state_*.pt              the carried FWL state (contiguous mode), copied as they are
    COMPLETE.json               the marker, with "universal": true (written last, as for every checkpoint)

Weights and optimizer state go through the optimizer adapters (checkpoint/optimizer.py), so a load gives
every rank exactly the values the source held, bit for bit (tests/test_ckpt_convert.py), and training
continues with the same schedule, data position and step count.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from fwl_scale.atomic import atomic_write, atomic_write_json
from fwl_scale.checkpoint.native import CheckpointError, CheckpointRef
from fwl_scale.checkpoint.optimizer import STATE_KEYS, optimizer_adapter
from fwl_scale.parallel.shards import full_shape, is_sharded, merge_shards, shard_of

UNIVERSAL_FORMAT = "fwl_scale.universal/1"
INDEX = "universal.json"
CLIENT = "client_state.pt"


def _gather_tp(t: Tensor, p: nn.Parameter, ps) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(ps.tp_size)]
    dist.all_gather(parts, t.contiguous(), group=ps.groups["tp"])
    return merge_shards(parts, p.partition_dim, p.partition_stride)


def gather_full_state(te) -> tuple[dict[str, dict[str, Tensor]], int]:
    """Every parameter this rank's stage holds, in full (tp shards merged, dp partitions gathered), fp32,
    on the rank that writes for the stage (tp rank 0, data-parallel rank 0); ({} on the others, Adam
    step). Collective over the stage's tp and data-parallel groups."""
    ps = te.ps
    acc = optimizer_adapter(te.engine)
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


def save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
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
        save_safetensors(model, tag_dir / f"model-stage{ps.pp_rank:02d}.safetensors", {"format": UNIVERSAL_FORMAT})
        save_safetensors(optim, tag_dir / f"optim-stage{ps.pp_rank:02d}.safetensors", {"format": UNIVERSAL_FORMAT})
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


class UniversalReader:
    """The tensors of a universal checkpoint by parameter name (files opened lazily)."""

    def __init__(self, tag_dir: Path):
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
    reader = UniversalReader(ref.path)
    acc = optimizer_adapter(te.engine)
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
