"""Checkpoints of every layout, at the engine level, on 2 and 4 gloo processes (one spawn per world size):

* exact resume: a fresh engine of the same layout loading DeepSpeed's own checkpoint continues with the
  very same loss, bit for bit (tp=2+SP ZeRO-1, pp=2 ZeRO-0, dp=2 ZeRO-2, dp=2 ZeRO-3, dp=2 bf16, pp=2 ZeRO-1
  bf16; 4 ranks: tp=2×pp=2 ZeRO-1, tp=2×dp=2 ZeRO-3);
* conversion: the universal checkpoint read out of each layout is loaded into another layout (each
  source into the next in the list, so every optimizer wrapper is written and read), read out again and
  compared: identical weights and Adam moments, bit for bit; the next step's loss equals the source's
  within float32 round-off (1e-6 relative; 1e-4 where one side trains in bf16, whose forward differs).

The conversion across process counts (tp=2, pp=2, dp=2 -> 1) through `fwl ckpt convert` and the trainer
is tests/test_train_parallel.py. Bad input at the end: damaged or missing universal files, a destination
that already holds checkpoints, a launch of the wrong size.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fwl_scale.config import ConfigError
from fwl_scale.checkpoint.native import (CheckpointError, CheckpointManager, CheckpointRef, checkpoint_files,
                                         find_latest, read_marker)
from tests.distributed import run_distributed
from tests.engine_support import build, describe, train_step

TOL, TOL_BF16 = 1e-6, 1e-4

LAYOUTS = {
    2: [dict(tp=2, sp=True, zero=1), dict(pp=2), dict(zero=2), dict(zero=3), dict(bf16=True),
        dict(pp=2, zero=1, bf16=True)],
    4: [dict(tp=2, pp=2, sp=True, zero=1), dict(tp=2, zero=3)],
}


def client_state(step: int) -> dict:
    return {"fwl_step": {"step": step, "tokens": 0, "skipped_total": 0, "nonfinite_in_row": 0}, "data": {},
            "rng": [], "marker": f"client state at step {step}"}


def _checks(rank: int, world: int, tmp: str) -> None:
    from fwl_scale.checkpoint.universal import UniversalReader, load_universal, write_universal

    layouts = LAYOUTS[world]
    universal: list[Path] = []
    next_loss: list[float] = []
    for i, layout in enumerate(layouts):
        what = f"[{describe(layout)}]"
        cfg, ps, te = build(world, **layout)
        for s in range(2):
            train_step(te, ps, cfg, s)
        run = Path(tmp) / f"w{world}_src{i}"
        ref = CheckpointManager(run, keep_last=2, rank=rank).save(te.engine, 2, client_state(2), cfg, ps.dp_size)
        # The marker records every rank's files, and the resume's check (each rank a share of them) passes.
        if rank == 0:
            assert sorted(ref.meta["files"]) == checkpoint_files(ref.path), what
        assert CheckpointManager(run, keep_last=2, rank=rank).resume_point().ref.tag == ref.tag, what
        udir = Path(tmp) / f"w{world}_universal{i}"
        if rank == 0:
            udir.mkdir()
        dist.barrier()
        write_universal(te, udir, 2, client_state(2), {"layout": layout})
        universal.append(udir)
        next_loss.append(train_step(te, ps, cfg, 2))
        del te
        # Exact resume from DeepSpeed's own files.
        cfg, ps, fresh = build(world, **layout)
        client = CheckpointManager(run, keep_last=2, rank=rank).load(fresh.engine, ref)
        assert client["marker"] == "client state at step 2"
        resumed = train_step(fresh, ps, cfg, 2)
        assert resumed == next_loss[i], f"{what} resumed step 3 loss {resumed} != uninterrupted {next_loss[i]}"

    for i, layout in enumerate(layouts):
        j = (i + 1) % len(layouts)
        target = layouts[j]
        what = f"[{describe(layout)} -> {describe(target)}]"
        cfg, ps, te = build(world, **target)
        client = load_universal(te, CheckpointRef(universal[i].parent, universal[i].name, {}))
        assert client["marker"] == "client state at step 2"
        again = Path(tmp) / f"w{world}_again{i}"
        if rank == 0:
            again.mkdir()
        dist.barrier()
        write_universal(te, again, 2, client, {})
        a, b = UniversalReader(universal[i]), UniversalReader(again)
        assert sorted(a.where) == sorted(b.where), what
        for key in a.where:
            assert torch.equal(a.get(key), b.get(key)), f"{what} {key} changed in the conversion"
        assert a.index["adam_step"] == b.index["adam_step"], (what, a.index["adam_step"], b.index["adam_step"])
        assert a.index["scheduler"] == b.index["scheduler"], (what, a.index["scheduler"], b.index["scheduler"])
        loss = train_step(te, ps, cfg, 2)
        tol = TOL_BF16 if layout.get("bf16") or target.get("bf16") else TOL
        err = abs(loss - next_loss[i]) / next_loss[i]
        assert err < tol, f"{what} next-step loss {loss} vs the source's {next_loss[i]} (rel. {err:.1e})"


@pytest.mark.parametrize("world", [2, 4])
def test_exact_resume_and_conversion_between_layouts(world, tmp_path):
    run_distributed(world, _checks, str(tmp_path))
    if world != 2:
        return
    # --- bad input, on what the 2-rank run left behind ---------------------------------------------
    from fwl_scale.train.checkpoint_convert import convert_checkpoint
    from fwl_scale.checkpoint.universal import UniversalReader

    udir = tmp_path / "w2_universal0"
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in udir.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    (damaged / "optim-stage00.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"damaged: optim-stage00.safetensors is corrupt"):
        UniversalReader(damaged)
    (damaged / "optim-stage00.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"damaged: optim-stage00.safetensors is missing"):
        UniversalReader(damaged)
    src = find_latest(tmp_path / "w2_src0" / "checkpoints")
    assert src is not None and read_marker(src.path)["layout"]["tp"] == 2
    # A destination with checkpoints of its own is never overwritten.
    with pytest.raises(CheckpointError, match=r"already holds checkpoints"):
        convert_checkpoint(src.path, tmp_path / "w2_src1")
    # Inside a launcher, the launch must have the source's size.
    old = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK")}
    os.environ.update(WORLD_SIZE="3", RANK="0")
    try:
        with pytest.raises(ConfigError, match=r"written by 2 ranks; this launch has 3"):
            convert_checkpoint(src.path, tmp_path / "new")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert not (tmp_path / "new").exists()
