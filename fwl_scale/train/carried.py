"""Training with the FWL state carried across consecutive segments (truncated backpropagation through
the state), on the loader's document-contiguous stream.

In `data.mode: contiguous` every batch row (slot) continues its document stream from the previous batch,
and the label of a row's last position is known (the next segment's first token). So the FWL's running
sums after one micro-batch are exactly what the next micro-batch of the same slots starts from: the fast
weights keep adapting over a whole document, as in streaming evaluation, instead of restarting every
seq_len tokens. The state is detached between micro-batches (gradients do not flow into earlier segments:
truncated backpropagation), and it resets by itself where a slot moves on to another document (its
doc_id no longer matches). With the FWL enabled, contiguous mode carries the state; packed mode never does.

The carried state is part of the checkpoint, so a resumed run continues bit for bit: every data-parallel
rank holds its own rows' state (tensor-parallel ranks their shards, context-parallel ranks the same
replicated state), written by the ranks with cp rank 0 as one file each into the checkpoint's directory
before the checkpoint is marked complete. A resume with another data-parallel or tensor-parallel size
(the loader allows it as long as micro_batch × dp, the global slot count, stays) reassembles the global
rows and merges/re-slices the shards. A skipped step (non-finite loss) drops the state: the slots start
afresh, as after a document boundary.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fwl_scale.atomic import atomic_write
from fwl_scale.config import Config
from fwl_scale.model.fwl import FWLState
from fwl_scale.parallel.shards import merge_shards, take_shard

FORMAT = "fwl_scale.carried_state/1"
# Tensor-parallel sharding of the state (FWLState): the hidden width 4s of w1, b1, w2 (and of the pending
# position's chunk-start update of model.fwl.update=sequential).
SHARD_DIM = {"w1": 2, "b1": 1, "w2": 1, "pending_w1": 2, "pending_b1": 1, "pending_w2": 1}


def carries_state(cfg: Config) -> bool:
    return cfg.model.fwl.enabled and cfg.data.mode == "contiguous"


def state_file(dp_rank: int, tp_rank: int) -> str:
    return f"fwl_state_dp{dp_rank:05d}_tp{tp_rank:03d}.pt"


def _save_through_python_file(payload: dict[str, Any], path: Path) -> None:
    # Through a Python file, a failed write (a full disk) surfaces as OSError with its errno, which the
    # checkpoint names in its message; through a path, torch's zip writer reports it without one.
    with open(path, "wb") as f:
        torch.save(payload, f)


class CarriedStateError(RuntimeError):
    pass


class CarriedState:
    """The FWL state of this rank's rows between micro-batches (None: nothing carried yet)."""

    def __init__(self, enabled: bool, micro_batch: int, dp_rank: int = 0, dp_size: int = 1, tp_rank: int = 0,
                 tp_size: int = 1, cp_rank: int = 0):
        self.enabled = enabled
        self.micro_batch = micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.cp_rank = cp_rank
        self.state: FWLState | None = None

    def forward_kwargs(self) -> dict[str, Any]:
        return {"fwl_state": self.state, "return_state": True} if self.enabled else {}

    def advance(self, out) -> None:
        """Keeps the state after a micro-batch for the next one, cut from the graph (truncated BPTT)."""
        if self.enabled:
            if out.fwl_state is None:
                raise CarriedStateError("the model returned no FWL state although it was asked for one")
            self.state = out.fwl_state.detach()

    def reset(self) -> None:
        self.state = None

    # ------------------------------------------------------------------------------ checkpoints
    def save(self, tag_dir: Path) -> list[Path]:
        """Writes this rank's file (ranks with cp rank 0; the state is replicated over cp); returns the
        paths written (the checkpoint records their checksums)."""
        if not self.enabled or self.cp_rank != 0:
            return []
        payload = {"format": FORMAT, "dp_rank": self.dp_rank, "dp_size": self.dp_size, "tp_rank": self.tp_rank,
                   "tp_size": self.tp_size, "micro_batch": self.micro_batch,
                   "state": None if self.state is None else {k: v.detach().cpu() for k, v in
                                                             self.state.tensors().items()}}
        path = Path(tag_dir) / state_file(self.dp_rank, self.tp_rank)
        atomic_write(path, lambda tmp: _save_through_python_file(payload, tmp))
        return [path]

    def load(self, tag_dir: Path, device: torch.device) -> None:
        """Restores the state saved in `tag_dir` (none there: a checkpoint of a run that carried nothing
        yet, or of packed mode; the state starts empty)."""
        self.state = None
        if not self.enabled:
            return
        tag_dir = Path(tag_dir)
        files = sorted(tag_dir.glob("fwl_state_dp*_tp*.pt"))
        if not files:
            return
        own = tag_dir / state_file(self.dp_rank, self.tp_rank)
        first = self._read(files[0])
        if (first["dp_size"], first["tp_size"], first["micro_batch"]) == (self.dp_size, self.tp_size,
                                                                          self.micro_batch) and own.is_file():
            tensors = self._read(own)["state"]
        else:
            tensors = self._reassemble(files, first)
        if tensors is not None:
            self.state = FWLState.from_tensors({k: v.to(device) for k, v in tensors.items()})

    def _read(self, path: Path) -> dict[str, Any]:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except (RuntimeError, OSError, EOFError, ValueError) as e:
            raise CarriedStateError(f"carried FWL state {path} cannot be read: {type(e).__name__}: {e}") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise CarriedStateError(f"carried FWL state {path}: not a {FORMAT} file")
        return payload

    def _reassemble(self, files: list[Path], first: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """Another dp/tp layout: every saved row in global slot order, shards merged, then this rank's
        rows and shard."""
        dp_saved, tp_saved = first["dp_size"], first["tp_size"]
        by_rank = {}
        for f in files:
            p = self._read(f)
            by_rank[(p["dp_rank"], p["tp_rank"])] = p
        missing = [(d, t) for d in range(dp_saved) for t in range(tp_saved) if (d, t) not in by_rank]
        if missing:
            raise CarriedStateError(f"carried FWL state in {files[0].parent}: files of (dp, tp) ranks {missing[:4]} "
                                    f"are missing")
        if any(p["state"] is None for p in by_rank.values()):
            return None
        if first["micro_batch"] * dp_saved != self.micro_batch * self.dp_size:
            raise CarriedStateError(f"carried FWL state in {files[0].parent}: saved for {first['micro_batch']} × "
                                    f"{dp_saved} global rows, now micro_batch × dp = {self.micro_batch} × "
                                    f"{self.dp_size}; keep the number of global slots to resume a carried state")
        names = list(by_rank[(0, 0)]["state"])
        out = {}
        for name in names:
            rows = []
            for d in range(dp_saved):
                parts = [by_rank[(d, t)]["state"][name] for t in range(tp_saved)]
                rows.append(merge_shards(parts, SHARD_DIM[name]) if name in SHARD_DIM else parts[0])
            full = torch.cat(rows, dim=0)
            mine = full[self.dp_rank * self.micro_batch:(self.dp_rank + 1) * self.micro_batch]
            if name in SHARD_DIM:
                mine = take_shard(mine, SHARD_DIM[name], self.tp_rank, self.tp_size)
            out[name] = mine.contiguous()
        return out
