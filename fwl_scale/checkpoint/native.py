"""The native checkpoint: DeepSpeed's tag directories with our marker and pointer; finding, checking and
saving/restoring them (keep-last-k, resume).

Layout under <out_dir>/checkpoints/:

    step_00000200/            one DeepSpeed tag directory (engine.save_checkpoint, all ranks)
        mp_rank_00_model_states.pt, [zero / bf16 optimizer shards], COMPLETE.json
    latest_complete           our pointer: the tag of the newest complete checkpoint

A save writes the tag directory, waits for every rank, then rank 0 writes COMPLETE.json (what was saved:
step, model config, layout) and only then replaces `latest_complete` atomically (fwl_scale/atomic.py).
A crash in the middle of a save therefore leaves a directory without COMPLETE.json, which is never
resumed from and is removed by the next successful save. DeepSpeed's own `latest` file is not written
(save_latest=False) and never trusted.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from fwl_scale import __version__
from fwl_scale.atomic import atomic_write_json, atomic_write_text
from fwl_scale.config import Config, ConfigError, config_to_nested
from fwl_scale.signal_points import signal_point

CHECKPOINT_DIR = "checkpoints"
POINTER = "latest_complete"
MARKER = "COMPLETE.json"
TAG_RE = re.compile(r"^step_(\d{8,})$")
FORMAT = 1


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (missing, incomplete, corrupt, or from another model); the
    message names it. A ConfigError so that `fwl` reports it cleanly with a non-zero exit."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass
class CheckpointRef:
    root: Path  # the checkpoints directory (DeepSpeed's save_dir)
    tag: str
    meta: dict[str, Any]  # COMPLETE.json

    @property
    def path(self) -> Path:
        return self.root / self.tag

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def read_marker(tag_dir: Path) -> dict[str, Any] | None:
    """COMPLETE.json of a tag directory, or None when it has none (an interrupted save)."""
    marker = tag_dir / MARKER
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {tag_dir}: {MARKER} is corrupt ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "step" not in meta or "model" not in meta:
        raise CheckpointError(f"checkpoint {tag_dir}: {MARKER} is not a fwl_scale checkpoint marker "
                              f"(format {FORMAT} expected)")
    return meta


def _complete_tags(root: Path) -> list[tuple[int, str]]:
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = TAG_RE.match(child.name)
            if m and child.is_dir() and (child / MARKER).is_file():
                found.append((int(m.group(1)), child.name))
    return sorted(found)


def find_latest(root: Path) -> CheckpointRef | None:
    """The newest complete checkpoint under `root` (a checkpoints directory), by our pointer; None if
    there is none. A pointer naming a missing or incomplete directory is an error (never silently
    train from scratch over a run that had checkpoints)."""
    pointer = root / POINTER
    if pointer.is_file():
        tag = pointer.read_text().strip()
        tag_dir = root / tag
        if not TAG_RE.match(tag) or not tag_dir.is_dir():
            raise CheckpointError(f"checkpoint pointer {pointer} names {tag!r}, but {tag_dir} does not exist; "
                                  "restore it or remove the pointer to choose another checkpoint")
        meta = read_marker(tag_dir)
        if meta is None:
            raise CheckpointError(f"checkpoint pointer {pointer} names {tag_dir}, which has no {MARKER} "
                                  "(an incomplete save)")
        # A crash between a marker and the pointer update leaves a newer complete checkpoint behind.
        newer = [t for s, t in _complete_tags(root) if s > int(meta["step"])]
        if newer:
            return CheckpointRef(root, newer[-1], read_marker(root / newer[-1]) or {})
        return CheckpointRef(root, tag, meta)
    # No pointer: a crash between the first marker and the first pointer write; complete directories
    # are still safe to use.
    tags = _complete_tags(root)
    if not tags:
        return None
    tag = tags[-1][1]
    return CheckpointRef(root, tag, read_marker(root / tag) or {})


def resolve_checkpoint(path: str | Path) -> CheckpointRef:
    """A user-given checkpoint: a run's out_dir, its checkpoints directory, or one tag directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p}: no such file or directory")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p}: not a directory (give a run directory, its "
                              f"{CHECKPOINT_DIR}/ directory or a step_* directory)")
    if (p / MARKER).exists() or TAG_RE.match(p.name):
        meta = read_marker(p)
        if meta is None:
            raise CheckpointError(f"checkpoint {p}: no {MARKER}; the save did not complete or this is not "
                                  "a fwl_scale checkpoint")
        return CheckpointRef(p.parent, p.name, meta)
    for root in (p / CHECKPOINT_DIR, p):
        if root.is_dir() and ((root / POINTER).exists() or _complete_tags(root)):
            ref = find_latest(root)
            if ref is not None:
                return ref
    raise CheckpointError(f"checkpoint {p}: no complete fwl_scale checkpoint found there")


def _diff(a: Any, b: Any, prefix: str, default: Any = None) -> list[str]:
    """Differences between a checkpoint's model config `a` and `b`. A field the checkpoint lacks (written
    before the field existed) is compared as its `default`: the behaviour the checkpoint was trained with."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        defaults = default if isinstance(default, dict) else {}
        for k in sorted(set(a) | set(b)):
            d = defaults.get(k, "<absent>")
            out += _diff(a.get(k, d), b.get(k, "<absent>"), f"{prefix}.{k}", d)
        return out
    return [] if a == b else [f"{prefix}: {a!r} in the checkpoint, {b!r} in the config"]


# Model fields that leave the parameters as they are: how the same function is computed, and fwl.step_scale,
# the multiplier of the learned step sizes that evaluates a trained FWL with its fast updates off (0).
_COMPUTE_ONLY = {"fwl.chunk_size", "fwl.form", "fwl.vocab_chunk", "fwl.step_scale"}


def check_compatible(ref: CheckpointRef, cfg: Config, dp: int | None = None) -> None:
    """Raises CheckpointError if the checkpoint was written for another model (shape or function) or
    a layout it cannot be loaded into."""
    saved = dict(ref.meta.get("model", {}))
    current = config_to_nested(cfg)["model"]
    diffs = [d for d in _diff(saved, current, "model", config_to_nested(Config())["model"])
             if d.split(":")[0].removeprefix("model.") not in _COMPUTE_ONLY]
    if diffs:
        raise CheckpointError(f"checkpoint {ref.path} belongs to another model: " + "; ".join(diffs[:6]))
    if ref.meta.get("universal"):
        return  # a layout-free checkpoint (fwl ckpt convert): any layout, ZeRO stage and precision
    if dp is not None:
        p = cfg.parallel
        layout = ref.meta.get("layout") or {}
        for axis, current_size in (("tp", p.tp), ("pp", p.pp)):
            saved_size = layout.get(axis, 1)
            if saved_size != current_size:
                raise CheckpointError(
                    f"checkpoint {ref.path} was saved with parallel.{axis}={saved_size}, the config has "
                    f"{current_size}: its shards do not fit this layout. Convert it first (with as many processes "
                    f"as it was saved by, which `fwl ckpt convert` starts itself): fwl ckpt convert {ref.path} "
                    f"NEW_RUN_DIR, then resume with --resume-from NEW_RUN_DIR")
        # ZeRO shards the optimizer over DeepSpeed's data-parallel group, dp × cp.
        saved_dp = ref.meta.get("dp") * layout.get("cp", 1) if ref.meta.get("dp") is not None else None
        dp = dp * p.cp
        saved_zero = ref.meta.get("zero_stage")
        if saved_zero is not None and saved_zero != cfg.parallel.zero_stage:
            raise CheckpointError(f"checkpoint {ref.path} was saved with parallel.zero_stage={saved_zero}, the "
                                  f"config has {cfg.parallel.zero_stage}; resume with the same ZeRO stage")
        if saved_zero and saved_dp != dp:
            raise CheckpointError(f"checkpoint {ref.path} holds ZeRO-{saved_zero} optimizer shards for {saved_dp} "
                                  f"data-parallel ranks (dp × cp); resuming with {dp} needs a conversion first: "
                                  f"fwl ckpt convert {ref.path} NEW_RUN_DIR, then resume with --resume-from "
                                  "NEW_RUN_DIR (or resume with the same data-parallel size)")
        if ref.meta.get("bf16") is not None and ref.meta["bf16"] != cfg.train.bf16:
            raise CheckpointError(f"checkpoint {ref.path} was saved with train.bf16={ref.meta['bf16']}, the "
                                  f"config has {cfg.train.bf16}; the optimizer state differs between the two")


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


class CheckpointManager:
    """Saves and restores training checkpoints of one run directory (all ranks call save/load)."""

    def __init__(self, out_dir: Path, keep_last: int, rank: int):
        self.root = Path(out_dir) / CHECKPOINT_DIR
        self.keep_last = keep_last
        self.rank = rank

    def latest(self) -> CheckpointRef | None:
        return find_latest(self.root)

    def save(self, engine, step: int, client_state: dict[str, Any], cfg: Config, dp: int,
             write_extra: Callable[[Path], None] | None = None) -> CheckpointRef:
        """`write_extra(tag_dir)`: per-rank files that belong to the checkpoint (the carried FWL state),
        written by every rank after DeepSpeed's files and before the checkpoint is marked complete."""
        tag = tag_for(step)
        tag_dir = self.root / tag
        existing = read_marker(tag_dir) if tag_dir.is_dir() else None
        if existing is not None:
            # Already saved at this step (never overwrite a complete checkpoint); make it the latest.
            _barrier()
            if self.rank == 0:
                atomic_write_text(self.root / POINTER, tag + "\n")
            _barrier()
            return CheckpointRef(self.root, tag, existing)
        _barrier()
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # left by an interrupted save of the same step
                shutil.rmtree(tag_dir)
        _barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        if write_extra is not None:
            write_extra(tag_dir)
        _barrier()  # every rank's shards are written
        signal_point("ckpt_data")
        meta = {
            "format": FORMAT,
            "step": step,
            "tag": tag,
            "time": time.time(),
            "fwl_scale": __version__,
            "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
            "dp": dp,
            "zero_stage": cfg.parallel.zero_stage,
            "bf16": cfg.train.bf16,
            "config_name": cfg.name,
            "model": config_to_nested(cfg)["model"],
            # What `fwl ckpt convert` needs to rebuild the engine that wrote this checkpoint.
            "layout": {"tp": cfg.parallel.tp, "cp": cfg.parallel.cp, "dp": dp, "pp": cfg.parallel.pp},
            "config": config_to_nested(cfg),
        }
        if self.rank == 0:
            atomic_write_json(tag_dir / MARKER, meta)
            signal_point("ckpt_marker")
            atomic_write_text(self.root / POINTER, tag + "\n")
            signal_point("ckpt_pointer")
            self._prune(tag)
        _barrier()
        return CheckpointRef(self.root, tag, meta)

    def _prune(self, newest: str) -> None:
        """Keeps the newest `keep_last` complete checkpoints; removes older ones and the leftovers of
        interrupted saves (directories without a marker)."""
        complete = [t for _, t in _complete_tags(self.root)]
        keep = set(complete[-self.keep_last:]) | {newest}
        for child in self.root.iterdir():
            if not TAG_RE.match(child.name) or not child.is_dir() or child.name in keep:
                continue
            shutil.rmtree(child, ignore_errors=True)

    def load(self, engine, ref: CheckpointRef) -> dict[str, Any]:
        """Restores model, optimizer, scheduler into the engine; returns our client state."""
        try:
            load_path, client_state = engine.load_checkpoint(str(ref.root), tag=ref.tag, load_module_strict=True)
        except (RuntimeError, OSError, KeyError, ValueError, AssertionError, EOFError, TypeError) as e:
            raise CheckpointError(f"checkpoint {ref.path} cannot be loaded (corrupt or from another model): "
                                  f"{type(e).__name__}: {str(e)[:400]}") from None
        if load_path is None or client_state is None:
            raise CheckpointError(f"checkpoint {ref.path}: DeepSpeed found no loadable state in it")
        if "fwl_step" not in client_state:
            raise CheckpointError(f"checkpoint {ref.path}: no fwl_scale training state in it")
        return client_state
