"""Metrics: JSONL records in out_dir, wandb (offline unless configured), throughput, TFLOP/s and MFU.

MFU = achieved model FLOPs per second per device (from the analytic count in flops.py) divided by the
device's peak dense bf16 tensor throughput, looked up by device name or given as train.peak_tflops.
"""
from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from fwl_scale.atomic import atomic_write_text
from fwl_scale.config import Config, config_to_nested

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s per device, from the vendors' data sheets. Matched
# by substring of torch.cuda.get_device_name(), first match wins (so longer names come first).
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 6000 Ada", 364.0),
    ("A6000", 155.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),  # fp16: V100 has no bf16
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
    ("MI250", 362.0),
]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({os.cpu_count()} cores visible)"


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """Per-device peak TFLOP/s: train.peak_tflops if given, else the table entry for a known GPU,
    else None (CPUs: MFU is reported as n/a)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value
    return None


class Throughput:
    """Tokens/s over the steps since the last report (wall time between reports)."""

    def __init__(self) -> None:
        self._t = time.perf_counter()
        self._tokens = 0
        self._steps = 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens
        self._steps += 1

    def report(self) -> tuple[float, float]:
        """(tokens per second, seconds per step) since the last call; resets the window."""
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        tps = self._tokens / dt
        sps = dt / max(self._steps, 1)
        self._t, self._tokens, self._steps = now, 0, 0
        return tps, sps

    def restart(self) -> None:
        """Excludes time spent outside training steps (validation, checkpoints) from the window."""
        self._t = time.perf_counter()
        self._tokens = 0
        self._steps = 0


def efficiency(tokens_per_s: float, flops_per_token: float, world_size: int,
               peak: float | None) -> tuple[float, float | None]:
    """(achieved TFLOP/s per device, MFU or None)."""
    tflops = tokens_per_s * flops_per_token / world_size / 1e12
    mfu = tflops / peak if peak else None
    return tflops, mfu


def _clean(value: Any) -> Any:
    """JSON-safe numbers: NaN and inf become strings rather than invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsLog:
    """Appends one JSON object per line to <out_dir>/metrics.jsonl (main rank only), mirrors to wandb.

    The wandb run id is kept in <out_dir>/wandb_run_id (and in each checkpoint's client state) so that a
    resumed or requeued run continues the same wandb run."""

    def __init__(self, cfg: Config, out_dir: Path, is_main: bool, run_id: str | None = None):
        self.cfg = cfg
        self.out_dir = out_dir
        self.is_main = is_main
        self.path = out_dir / "metrics.jsonl"
        self.wandb_run = None
        self.run_id = run_id
        if not is_main:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        w = cfg.train.wandb
        if w.enabled and w.mode != "disabled":
            self.run_id = self.run_id or w.run_id or self._stored_run_id() or uuid.uuid4().hex[:12]
            self._store_run_id(self.run_id)
            self.wandb_run = self._start_wandb(self.run_id)

    def _id_file(self) -> Path:
        return self.out_dir / "wandb_run_id"

    def _stored_run_id(self) -> str | None:
        f = self._id_file()
        if f.is_file():
            text = f.read_text().strip()
            return text or None
        return None

    def _store_run_id(self, run_id: str) -> None:
        atomic_write_text(self._id_file(), run_id + "\n")

    def _start_wandb(self, run_id: str):
        import wandb  # heavy, and only when train.wandb.enabled

        w = self.cfg.train.wandb
        return wandb.init(project=w.project, entity=w.entity, name=w.run_name or self.cfg.name, id=run_id,
                          resume="allow", mode=w.mode, dir=str(self.out_dir),
                          config=config_to_nested(self.cfg))

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.is_main:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(_clean(record)) + "\n")
        if self.wandb_run is not None:
            flat = {}
            for k, v in values.items():
                if isinstance(v, (int, float)) and v is not None:
                    flat[f"{kind}/{k}"] = v
                elif isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
                    for i, x in enumerate(v):
                        flat[f"{kind}/{k}_{i}"] = x
            self.wandb_run.log(flat, step=step)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def read_metrics(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    records = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if kind is None or r.get("kind") == kind:
                records.append(r)
    return records
