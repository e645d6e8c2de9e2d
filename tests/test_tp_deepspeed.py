"""The tensor-parallel model under DeepSpeed (2 gloo processes): `deepspeed.initialize(mpu=ParallelState)`
with ZeRO 1, 2 and 3 and active gradient clipping trains like the single-process model.

What it guards: the shard attributes DeepSpeed's gradient norm reads (a replicated parameter counted once,
a shard on every rank), gradients that are complete inside backward (ZeRO-2/3 take .grad during backward),
and ZeRO-3 gathering the tied unembedding again for the loss chunks recomputed in backward.

Reference: the tp = 1 model on the same two processes as data parallelism with the same batch on both
ranks, which is the single-process step. Tolerance: 1e-5 relative on the losses of 4 steps — float32
round-off (the model is not float64 here); wrong clipping or a missing gradient reduction moves them by
1e-4 or more.
"""
from __future__ import annotations

import pytest
import torch

from fwl_scale.config import load_config
from fwl_scale.model import build_model
from fwl_scale.parallel import init_parallel_state
from fwl_scale.train.deepspeed_setup import register_zero3_externals
from tests.distributed import run_distributed

STEPS = 4
TOL = 1e-5


def make_cfg(tp: int, fwl: bool = True):
    return load_config(None, ["model.d_model=16", "model.n_heads=4", "model.n_layers=2", "model.seq_len=16",
                              "model.vocab_size=50", "model.vocab_multiple=64", "model.fwl.vocab_chunk=7",
                              f"model.fwl.enabled={str(fwl).lower()}", f"parallel.tp={tp}",
                              f"parallel.sequence_parallel={str(tp > 1).lower()}"])


def train_losses(model, stage: int, mpu) -> list[float]:
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "gradient_clipping": 0.05,  # far below the gradient norm: clipping acts on every step
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    # Plain SGD: the update is proportional to the clipped gradient, so a wrong norm shows at once (Adam
    # would divide most of a wrong clipping factor out again).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=mpu)
    register_zero3_externals(engine, model)  # what the engine builder does
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(STEPS):
        ids = torch.randint(0, 50, (2, 16), generator=g)
        out = engine(ids, ids.roll(-1, 1))
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    return losses


def _checks(rank: int, world: int) -> None:
    for fwl in (True, False):
        ps_ref = init_parallel_state(make_cfg(1, fwl))  # dp = 2, the same batch on both ranks
        torch.manual_seed(0)
        ref = train_losses(build_model(make_cfg(1, fwl).model), 0, ps_ref)
        for stage in ((1, 2, 3) if fwl else (3,)):
            cfg = make_cfg(2, fwl)
            ps = init_parallel_state(cfg)
            torch.manual_seed(0)
            got = train_losses(build_model(cfg.model, parallel=ps), stage, ps)
            err = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
            assert err < TOL, f"fwl={fwl} tp=2 ZeRO-{stage}: losses {got} vs single-process {ref}"


def test_tensor_parallel_under_deepspeed_zero_and_clipping():
    run_distributed(2, _checks)
