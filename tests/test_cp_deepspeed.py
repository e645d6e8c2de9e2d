"""Context parallelism under DeepSpeed: `deepspeed.initialize(mpu=ParallelState)` averages gradients over
its data-parallel group, which is dp × cp; with each cp rank's loss share (GPT.forward) that average must
be the unsplit model's gradient. Checked by training: 4 steps of plain SGD without clipping (clipping
would hide a gradient off by a constant factor; the update is the gradient itself, so a wrong one changes
the next losses at once), ZeRO 1, 2 and 3 (stage 2 reduces inside backward, stage 3 gathers the
parameters around our collectives), against the unsplit model trained data-parallel on the same batches.

2 ranks: cp = 2 (state and kv exchange) vs dp = 2 with the same batch on both ranks (= one process).
4 ranks: cp = 2 × dp = 2 vs dp = 4 where ranks 2d, 2d+1 get batch d; cp = 2 × tp = 2 vs dp = 4 with one
batch everywhere.

Tolerance: 1e-5 relative on the losses (float32 round-off over 4 steps); a gradient off by the factor cp,
or one rank's share missing, moves them by 1e-3 or more.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fwl_scale.config import load_config
from fwl_scale.model import build_model
from fwl_scale.parallel import init_parallel_state
from fwl_scale.train.deepspeed_setup import register_zero3_externals
from tests.distributed import run_distributed

STEPS = 4
TOL = 1e-5
B, T, VOCAB = 2, 16, 50


def make_cfg(tp: int = 1, cp: int = 1, exchange: str = "state"):
    return load_config(None, ["model.d_model=16", "model.n_heads=4", "model.n_layers=2", f"model.seq_len={T}",
                              f"model.vocab_size={VOCAB}", "model.vocab_multiple=64", "model.fwl.vocab_chunk=7",
                              "model.fwl.chunk_size=4", "model.fwl.step_size_init=0.3",
                              f"parallel.tp={tp}", f"parallel.cp={cp}", f"parallel.cp_exchange={exchange}"])


def batches(dp_rank: int) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(100 + dp_rank)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (B, T), generator=g)
        docs = torch.zeros(B, T, dtype=torch.long)
        docs[0, 5:] = 1  # a document starting inside the first half, running across the cp boundary
        out.append((ids, ids.roll(-1, 1), docs))
    return out


def train_losses(model, stage: int, ps, dp_rank: int) -> list[float]:
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1,
              "gradient_clipping": 0.0, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=ps)
    register_zero3_externals(engine, model)  # what the engine builder does
    losses = []
    for ids, labels, docs in batches(dp_rank):
        out = engine(ids, labels, docs)
        engine.backward(out.loss)
        engine.step()
        # The mean over the data-parallel group (dp × cp) is the mean of the unsplit losses.
        loss = out.loss.detach().clone()
        dist.all_reduce(loss, group=ps.get_data_parallel_group())
        losses.append(loss.item() / ps.get_data_parallel_world_size())
    return losses


def reference(world: int, data_rank: int) -> list[float]:
    """The unsplit model, data-parallel over the whole world; this rank trains on batch `data_rank`."""
    ps = init_parallel_state(make_cfg(), world)
    torch.manual_seed(0)
    return train_losses(build_model(make_cfg().model), 0, ps, data_rank)


def _checks(rank: int, world: int) -> None:
    layouts = ([(1, 2, "state", 2), (1, 2, "kv", 1), (1, 2, "state", 3)] if world == 2
               else [(1, 2, "state", 2), (2, 2, "state", 1)])  # (tp, cp, exchange, ZeRO stage)
    refs: dict[int, list[float]] = {}
    for tp, cp, exchange, stage in layouts:
        cfg = make_cfg(tp, cp, exchange)
        ps = init_parallel_state(cfg)
        if ps.dp_size not in refs:  # the same batches as the layout's data-parallel ranks
            refs[ps.dp_size] = reference(world, ps.dp_rank)
        ref = refs[ps.dp_size]
        torch.manual_seed(0)
        model = build_model(cfg.model, parallel=ps, cp_exchange=exchange)
        got = train_losses(model, stage, ps, ps.dp_rank)
        err = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
        assert err < TOL, f"tp={tp} cp={cp} dp={ps.dp_size} {exchange} ZeRO-{stage}: {got} vs unsplit {ref}"


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_under_deepspeed(world):
    run_distributed(world, _checks)
