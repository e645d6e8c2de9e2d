"""The analytic training FLOP count (model/flops.py, what tokens/s, TFLOP/s per device and MFU are computed
from) against the FLOPs the real model executes, counted by torch.utils.flop_counter.FlopCounterMode over
a forward and backward pass.

Counting conventions line up exactly: FlopCounterMode counts matrix products (mm, addmm, bmm, attention)
and no elementwise work, like the analytic count. Two things are switched off for the count, because the
analytic count is of model FLOPs: the recomputation of the vocabulary-sized chunks in backward (the
chunks' checkpoint runs them directly here) and the CPU's fused attention kernel, which FlopCounterMode
does not see (the math kernel runs instead; its products are the ones counted). Then the counts agree
exactly — the FWL in its quadratic and chunked forms and the baseline, with and without document masks.

Under tensor parallelism every rank counts its part. MFU counts model FLOPs, so FLOPs per device are the
count divided by the number of devices (as `metrics.efficiency` divides them); the parts add up to the
count plus what tensor parallelism repeats on purpose (docs/design.md §3.2): inside each chunk of the fast pass,
W1's scores x_i·x_j (replicated query and key, width d) and W2's weighted sum of the replicated value
gh2 (width s, over this rank's partial scores, summed by the one all-reduce) run on every rank —
(tp - 1)·6·C·(d + s) FLOPs per token, C the chunk. The test pins that down exactly.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import fwl_scale.model.fwl.unembedding as unembedding_module
import fwl_scale.model.vocab as vocab_module
from fwl_scale.config import load_config
from fwl_scale.model import build_model
from fwl_scale.model.flops import train_flops_per_token
from fwl_scale.model.fwl import FastWeightLayer, fast_chunk
from fwl_scale.parallel.layout import TPContext
from tests.distributed import run_distributed

B, T, V = 2, 64, 500  # padded to 512: the padding rows are multiplied and counted


def make_cfg(*extra: str, tp: int = 1):
    return load_config(None, ["model.d_model=64", "model.n_heads=4", "model.n_layers=2", f"model.seq_len={T}",
                              f"model.vocab_size={V}", "model.vocab_multiple=128", "model.fwl.chunk_size=16",
                              f"parallel.tp={tp}", f"parallel.sequence_parallel={str(tp > 1).lower()}", *extra])


def executed_flops_per_token(model) -> float:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, T), generator=g)
    docs = torch.zeros_like(ids)
    docs[0, 20:] = 1
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(ids, ids.roll(-1, 1), docs).loss.backward()
    return counter.get_total_flops() / (B * T)


def _direct(fn, *args, use_reentrant=False, **kwargs):
    return fn(*args, **kwargs)


@pytest.mark.parametrize("extra", [
    ("model.fwl.form=quadratic",),
    ("model.fwl.form=chunked",),  # four chunks: the state terms are counted too
    ("model.fwl.form=chunked", "model.document_mask=false"),
    ("model.fwl.enabled=false",),
    # The long-document remedies: the decayed vector sums are products, the counts elementwise.
    ("model.fwl.form=chunked", "model.fwl.normalize=mean", "model.fwl.decay=learned"),
    ("model.fwl.form=quadratic", "model.fwl.decay=learned"),
    # The counts run in chunks of model.fwl.chunk_size whatever the form (auto: quadratic here).
    ("model.fwl.normalize=mean", "model.fwl.decay=learned"),
    # Issue 22's variants: per-token step sizes, the fast unembedding (c, U, both).
    ("model.fwl.form=chunked", "model.fwl.step_size=token", "model.fwl.normalize=sqrt", "model.fwl.decay=learned"),
    ("model.fwl.fast_set=[head,out_bias]", "model.fwl.decay=learned"),
    ("model.fwl.fast_set=[head,unembedding]", "model.fwl.normalize=mean", "model.fwl.decay=learned",
     "model.fwl.unembed_normalize=head"),
    ("model.fwl.fast_set=[head,out_bias,unembedding]", "model.fwl.form=chunked", "model.fwl.decay=learned"),
    # Sequential updates: four inner chunks of one fast chunk each (the state terms each needs, the slow pass
    # at the start weights from the second); inner chunks 24, 24, 16 in fast chunks of 8 (a shorter last one),
    # with the remedies; one inner chunk of the window (the parallel count).
    ("model.fwl.update=sequential", "model.fwl.inner_chunk=16"),
    ("model.fwl.update=sequential", "model.fwl.inner_chunk=24", "model.fwl.chunk_size=8", "model.fwl.form=chunked",
     "model.fwl.normalize=mean", "model.fwl.decay=learned"),
    ("model.fwl.update=sequential", "model.fwl.inner_chunk=64", "model.fwl.form=chunked"),
])
def test_analytic_count_equals_executed_matmul_flops(extra, monkeypatch):
    monkeypatch.setattr(vocab_module, "checkpoint", _direct)  # no recomputation of vocabulary chunks
    monkeypatch.setattr(unembedding_module, "checkpoint", _direct)
    cfg = make_cfg(*extra)
    torch.manual_seed(0)
    executed = executed_flops_per_token(build_model(cfg.model))
    assert executed == train_flops_per_token(cfg.model).total


def _tensor_parallel(rank: int, world: int) -> None:
    from fwl_scale.parallel import init_parallel_state

    vocab_module.checkpoint = _direct  # (a spawned process: nothing to restore)
    cfg = make_cfg("model.fwl.form=chunked", tp=world)
    ps = init_parallel_state(cfg)
    torch.manual_seed(0)
    mine = torch.tensor([executed_flops_per_token(build_model(cfg.model, parallel=ps))], dtype=torch.float64)
    dist.all_reduce(mine)
    m = cfg.model
    repeated = (world - 1) * 6 * min(m.fwl.chunk_size, T) * (m.d_model + m.fwl_width)
    assert float(mine) == train_flops_per_token(m).total + repeated, (float(mine), train_flops_per_token(m))


def test_tensor_parallel_parts_add_up_to_the_count():
    run_distributed(2, _tensor_parallel)


@pytest.mark.parametrize("seq_len", [100, 112, 128])
def test_form_and_count_do_not_depend_on_tp(seq_len):
    """`auto` decides by the whole hidden width: at T = 112 a tp rank's share (4s/2) would chunk where tp = 1
    runs quadratic (crossovers 101.3 and 118.4 with d = 64, 4s = 256, C = 16), so every layout would compute
    another form than the one counted."""
    counts = set()
    for tp in (1, 2, 4):
        cfg = make_cfg("model.fwl.form=auto", f"model.seq_len={seq_len}", tp=tp)
        m = cfg.model
        layer = FastWeightLayer(m.fwl_resolved, m.d_model, m.vocab_size, m.padded_vocab_size,
                                tp=TPContext(group=None, size=tp, rank=tp - 1), device="meta")
        assert layer.chunk_for(seq_len) == fast_chunk(m.fwl_resolved, m.d_model, seq_len), tp
        assert layer.chunk_for(seq_len) == (seq_len if seq_len <= 118 else 16), tp
        counts.add(train_flops_per_token(m).total)
    assert len(counts) == 1, counts
