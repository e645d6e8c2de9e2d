"""Memory held for backward, measured exactly and independently of the device: a saved-tensor hook that
sums the storage of every distinct tensor autograd keeps (used by the bench scripts beside this file)."""
from __future__ import annotations

import torch


class SavedBytes:
    """Sums the storage of every distinct tensor autograd keeps for backward."""

    def __init__(self):
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            self.seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())
