"""Shared pieces of the engine-level parallel tests (test_engine_parallel, test_ckpt_convert): a tiny
config for any layout on a world of N gloo processes, deterministic micro-batches, building the trainer's
engine and running one optimizer step the way the trainer does."""
from __future__ import annotations

import torch
import torch.distributed as dist

from fwl_scale import IGNORE_INDEX
from fwl_scale.config import load_config

B, T, VOCAB = 2, 16, 50
M = 4  # micro-batches per optimizer step (dp × grad_accum), the same global batch for every layout
SEED = 5


def make_cfg(world: int, tp: int = 1, pp: int = 1, sp: bool = False, zero: int = 0, bf16: bool = False,
             act_ckpt: bool = False, cp: int = 1, exchange: str = "auto"):
    dp = world // (tp * pp * cp)
    return load_config(None, [
        "model.d_model=16", "model.n_heads=4", "model.n_layers=2", f"model.seq_len={T}", f"model.vocab_size={VOCAB}",
        "model.vocab_multiple=64", "model.fwl.chunk_size=4", "model.fwl.vocab_chunk=7",
        "model.fwl.step_size_init=0.3", "data.loader_workers=0",
        f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.cp={cp}", f"parallel.cp_exchange={exchange}",
        f"parallel.sequence_parallel={str(sp).lower()}",
        f"parallel.zero_stage={zero}", "parallel.micro_batch=2", f"parallel.grad_accum={M // dp}",
        "train.lr=0.01", "train.warmup_steps=1", "train.steps=10", "train.grad_clip=1.0", "train.weight_decay=0.1",
        f"train.bf16={str(bf16).lower()}", f"train.activation_checkpointing={str(act_ckpt).lower()}",
        "train.wandb.enabled=false"])


def describe(layout: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in layout.items()) or "dp only"


def micro_batch(step: int, k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + k)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = ids.roll(-1, 1)
    docs = torch.zeros(B, T, dtype=torch.long)
    docs[0, 6:] = 1  # a document starting inside the sequence
    labels[0, 5] = IGNORE_INDEX
    labels[1, T - 1] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "doc_ids": docs}


def build(world: int, **layout):
    """(cfg, ParallelState, TrainingEngine) as the trainer builds them, from the seeded initialisation."""
    from fwl_scale.parallel import init_parallel_state
    from fwl_scale.train.distributed import DistInfo
    from fwl_scale.train.engine import build_training_engine

    cfg = make_cfg(world, **layout)
    ps = init_parallel_state(cfg)
    info = DistInfo(rank=ps.rank, world_size=world, local_rank=ps.rank, dp=ps.dp_size, device=torch.device("cpu"),
                    backend="gloo")
    torch.manual_seed(SEED)
    return cfg, ps, build_training_engine(cfg, ps, info)


def train_step(te, ps, cfg, step: int, before_step=None) -> float:
    """One optimizer step on micro-batches (step, k) of this rank's data-parallel share; returns the mean
    loss over the global batch (every rank)."""
    gas = cfg.parallel.grad_accum
    mine = [micro_batch(step, ps.dp_rank * gas + i) for i in range(gas)]
    if te.is_pipeline:
        result = te.pipeline_step.run(mine, before_step=before_step)
        return result.loss
    engine = te.engine
    total = torch.zeros((), dtype=torch.float64)
    for i, b in enumerate(mine):
        engine.set_gradient_accumulation_boundary(i == gas - 1)
        out = engine(*b.values())
        engine.backward(out.loss)
        total += out.loss.detach().double()
    if before_step is not None:
        before_step()
    engine.step()
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    return float(total) / (gas * ps.dp_size)
