"""Measured peak memory of real training steps on CPU, the reference the analytic memory model
(plan/memory.py) is checked against.

CPU torch keeps no allocator statistics, and RSS includes the allocator's caches, so the count is
taken where the tensors are made: a dispatch mode sees every op's output storage, adds its bytes when
it first appears and subtracts them when the storage is freed (a weakref finalizer). The peak of that
running sum is the peak of live tensor bytes — what torch.cuda.max_memory_allocated reports on a GPU.
"""
from __future__ import annotations

import weakref

import torch
# TorchDispatchMode is torch's documented hook for seeing every op (the torch.utils.checkpoint and
# FlopCounterMode machinery uses it); it lives in a module torch names private.
from torch.utils._python_dispatch import TorchDispatchMode

from fwl_scale.config import Config
from fwl_scale.model import build_model


class LiveBytes(TorchDispatchMode):
    """Live tensor bytes (each storage counted once) and their peak, while the mode is active."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def track(self, storage: torch.UntypedStorage) -> None:
        if storage in self._seen:
            return
        n = storage.nbytes()
        self._seen[storage] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, n)

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self.track(t.untyped_storage())
        return out


def measure_peak(cfg: Config, steps: int = 2, seed: int = 0) -> int:
    """Peak live bytes over `steps` training steps (forward, backward, AdamW) of cfg's model on CPU in
    fp32, one process, micro batch parallel.micro_batch with two documents per sequence. Gradients are
    zeroed in place, not freed, as DeepSpeed's engine keeps its gradient buffers."""
    torch.manual_seed(seed)
    m = cfg.model
    model = build_model(m)
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    B, T = cfg.parallel.micro_batch, m.seq_len
    ids = torch.randint(0, m.vocab_size, (B, T))
    docs = torch.zeros(B, T, dtype=torch.long)
    docs[:, T // 2:] = 1
    mode = LiveBytes()
    for p in model.parameters():
        mode.track(p.untyped_storage())
    with mode:
        for _ in range(steps):
            model(ids, ids, docs).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
    return mode.peak
