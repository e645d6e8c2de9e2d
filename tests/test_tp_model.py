"""Tensor and sequence parallelism against the single-process model, on 2 and 4 gloo processes, float64.

One spawn per world size runs every layout: the FWL model and the baseline, with and without sequence
parallelism, documents inside the sequence and ignored labels. Each rank compares with the tp = 1 model
built from the same seed: the initial weights (exactly), the loss and per-token losses, the gradient of
every parameter (shards gathered), the step sizes' gradient, and the gradients at the body's input
(embedding output) and output (the FWL's input). A replicated tensor must carry the whole gradient on
every rank, so those are compared rank by rank, not summed.

Tolerance: 1e-10 relative to max(1, |reference|) — float64 round-off of a few thousand operations summed
in another order. A missing all-reduce, a detached path or a wrong mask shows up at 1e-4 or more (the
step-size check below demonstrates it).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fwl_scale import IGNORE_INDEX
from fwl_scale.config import load_config
from fwl_scale.model import build_model
from fwl_scale.model.fwl import FastWeightLayer
from fwl_scale.parallel import (all_reduce_tp, copy_to_tp, full_state_dict, gather_from_sequence, gather_from_tp,
                                init_parallel_state, load_full_state_dict, reduce_from_tp,
                                reduce_scatter_to_sequence, scatter_to_tp)
from fwl_scale.parallel.shards import is_sharded, merge_shards, take_shard
from tests.distributed import run_distributed
from tests.model_support import body_probes, perturb, worst

TOL = 1e-10
B, T, VOCAB = 2, 16, 50


# The long-document remedies together (tests/test_fwl_long.py): normaliser and forgetting factor.
REMEDIES = ("model.fwl.normalize=mean", "model.fwl.decay=learned", "model.fwl.decay_init=0.7")
# Issue 22's variants: the sqrt normaliser and per-token step sizes (the factors of W1, b1, W2 scale
# sharded or partial sums: their gradient is all-reduced).
VARIANTS = ("model.fwl.normalize=sqrt", "model.fwl.decay=learned", "model.fwl.decay_init=0.7",
            "model.fwl.step_size=token")
SEQUENTIAL = ("model.fwl.update=sequential",)


def make_cfg(fwl: bool, tp: int, sp: bool, dp: int = 1, vocab_multiple: int = 64, tied: bool = True,
             extra: tuple[str, ...] = ()):
    counted = any(e.startswith("model.fwl.normalize=") and not e.endswith("=none") for e in extra)
    scale = [] if counted else ["model.fwl.grad_scale=0.5"]  # mean and sqrt have no k
    over = ["model.d_model=16", "model.n_heads=4", "model.n_layers=2", f"model.seq_len={T}",
            f"model.vocab_size={VOCAB}", f"model.vocab_multiple={vocab_multiple}",
            f"model.fwl.enabled={str(fwl).lower()}", f"model.tie_embeddings={str(tied).lower()}",
            "model.fwl.chunk_size=4", "model.fwl.vocab_chunk=7", *scale,
            f"parallel.tp={tp}", f"parallel.dp={dp}", f"parallel.sequence_parallel={str(sp).lower()}", *extra]
    if not tied:
        over.append("model.fwl.width=8")
    return load_config(None, over)


def make_batch():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = ids.roll(-1, 1)
    docs = torch.zeros(B, T, dtype=torch.long)
    docs[0, 5:] = 1  # documents start inside the sequence
    docs[0, 11:] = 2
    labels[0, 4] = IGNORE_INDEX  # a document's last position
    labels[0, 8] = IGNORE_INDEX
    labels[1, T - 1] = IGNORE_INDEX
    return ids, labels, docs


def gather_grad(p, tp) -> torch.Tensor:
    g = p.grad
    if not is_sharded(p):
        return g
    shards = [torch.empty_like(g) for _ in range(tp.size)]
    dist.all_gather(shards, g.contiguous(), group=tp.group)
    return merge_shards(shards, p.partition_dim, p.partition_stride)


def gather_seq(t: torch.Tensor, tp) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(tp.size)]
    dist.all_gather(parts, t.contiguous(), group=tp.group)
    return torch.cat(parts, dim=1)


def run_with_probes(model, ids, labels, docs):
    """Forward + backward of a loss that weighs every token differently; returns the output and the
    gradients at the body's input and output."""
    with body_probes(model) as probes:
        out = model(ids, labels, docs)
        w = torch.linspace(0.5, 1.5, B * T, dtype=out.token_loss.dtype).reshape(B, T)
        (out.loss + (out.token_loss * w).sum() * 0.1).backward()
    return out, {k: v.grad for k, v in probes.items()}


def check_model(ps, fwl: bool, sp: bool, vocab_multiple: int = 64, tied: bool = True,
                checkpointing: bool = False, extra: tuple[str, ...] = ()) -> None:
    tp = ps.tp_context()
    cfg = make_cfg(fwl, ps.tp_size, sp, ps.dp_size, vocab_multiple, tied, extra)
    what = f"[fwl={fwl} sp={sp} tp={ps.tp_size} V%{vocab_multiple} tied={tied} ckpt={checkpointing} {extra}]"
    torch.manual_seed(0)
    ref = build_model(cfg.model).double()
    torch.manual_seed(0)
    model = build_model(cfg.model, parallel=ps).double()
    assert model.sequence_parallel == sp
    # Initialisation: the shards are the single-process tensors, bit for bit.
    full = full_state_dict(model, tp)
    for name, t in ref.state_dict().items():
        assert torch.equal(full[name], t), f"{what} init {name}"

    perturb(ref)
    load_full_state_dict(model, ref.state_dict())
    ref.set_activation_checkpointing(checkpointing)
    model.set_activation_checkpointing(checkpointing)
    ids, labels, docs = make_batch()
    out_ref, probes_ref = run_with_probes(ref, ids, labels, docs)
    out, probes = run_with_probes(model, ids, labels, docs)

    assert abs(out.loss.item() - out_ref.loss.item()) < TOL, what
    assert worst(out.token_loss, out_ref.token_loss) < TOL, what
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        err = worst(gather_grad(p, tp), ref_params[name].grad)
        assert err < TOL, f"{what} gradient of {name}: {err:.3g}"
    for name in ("body_in", "body_out"):
        g = gather_seq(probes[name], tp) if sp else probes[name]
        err = worst(g, probes_ref[name])
        assert err < TOL, f"{what} gradient at {name}: {err:.3g}"
    if fwl:
        # The fast weights really act: the step sizes get a sizeable gradient.
        assert ref.fwl.step_sizes.grad.abs().min() > 1e-4, what
        if ref.fwl.decay_logits is not None:
            assert ref.fwl.decay_logits.grad.abs().min() > 1e-6, what

    with torch.no_grad():
        logits = model(ids, labels, docs, return_logits=True)
        logits_ref = ref(ids, labels, docs, return_logits=True)
    assert logits.logits.shape == (B, T, VOCAB)
    assert worst(logits.logits, logits_ref.logits) < TOL, what
    assert abs(logits.loss.item() - out_ref.loss.item()) < TOL, what


def perturbed_pair(cfg, ps):
    """The single-process model with perturbed parameters (float64) and the tensor-parallel model holding
    the same weights."""
    torch.manual_seed(0)
    ref = build_model(cfg.model).double()
    perturb(ref)
    torch.manual_seed(0)
    model = build_model(cfg.model, parallel=ps).double()
    load_full_state_dict(model, ref.state_dict())
    return ref, model


def check_missing_step_size_reduce(ps) -> None:
    """Without the all-reduce of the step sizes' gradient (η_W1, η_b1, η_W2 scale per-rank parts) the
    forward is still right and the gradient silently wrong: the comparison above must catch it."""
    tp = ps.tp_context()
    cfg = make_cfg(True, ps.tp_size, False)
    ref, model = perturbed_pair(cfg, ps)
    ids, labels, docs = make_batch()
    original = FastWeightLayer.step_sizes_for_shards
    FastWeightLayer.step_sizes_for_shards = lambda self: self.step_sizes
    try:
        out, _ = run_with_probes(model, ids, labels, docs)
    finally:
        FastWeightLayer.step_sizes_for_shards = original
    out_ref, _ = run_with_probes(ref, ids, labels, docs)
    assert abs(out.loss.item() - out_ref.loss.item()) < TOL
    g, g_ref = model.fwl.step_sizes.grad, ref.fwl.step_sizes.grad
    per_tensor = ((g - g_ref).abs() / g_ref.abs().clamp(min=1e-12)).tolist()
    assert min(per_tensor[:3]) > 1e-3, f"missing all-reduce not visible: {per_tensor}"  # W1, b1, W2
    assert max(per_tensor[3:]) < 1e-8  # b2, alpha, beta are replicated computations
    assert gather_grad(model.fwl.w1, tp).sub(ref.fwl.w1.grad).abs().max() < TOL


def check_missing_decay_reduce(ps) -> None:
    """λ of W1, b1 and W2 scale sharded or partial sums like their step sizes: without the all-reduce of
    their gradient (replicated decay logits straight into the sharded work) the check above must fail."""
    cfg = make_cfg(True, ps.tp_size, False, extra=REMEDIES)
    ref, model = perturbed_pair(cfg, ps)
    ids, labels, docs = make_batch()
    original = FastWeightLayer.log_decay
    FastWeightLayer.log_decay = lambda self: F.logsigmoid(self.decay_logits)
    try:
        run_with_probes(model, ids, labels, docs)
    finally:
        FastWeightLayer.log_decay = original
    run_with_probes(ref, ids, labels, docs)
    g, g_ref = model.fwl.decay_logits.grad, ref.fwl.decay_logits.grad
    per_tensor = ((g - g_ref).abs() / g_ref.abs().clamp(min=1e-12)).tolist()
    assert min(per_tensor[:3]) > 1e-3, f"missing all-reduce not visible: {per_tensor}"  # W1, b1, W2
    assert max(per_tensor[3:]) < 1e-8  # b2, alpha, beta are replicated computations


def run_segments(model, ids, labels, docs, cut: int):
    """Two segments with the FWL state carried (not detached) and the first segment's last label
    withheld (pending), as in streaming."""
    lab1 = labels[:, :cut].clone()
    lab1[:, -1] = IGNORE_INDEX
    first = model(ids[:, :cut], lab1, docs[:, :cut], last_label_pending=True, return_state=True,
                  return_logits=True)
    second = model(ids[:, cut:], labels[:, cut:], docs[:, cut:], fwl_state=first.fwl_state, return_state=True,
                   return_logits=True)
    return first, second


def check_segments(ps, sp: bool, extra: tuple[str, ...] = ()) -> None:
    tp = ps.tp_context()
    cfg = make_cfg(True, ps.tp_size, sp, extra=extra)
    torch.manual_seed(0)
    ref = build_model(cfg.model).double()
    perturb(ref)
    model = build_model(cfg.model, parallel=ps).double()
    load_full_state_dict(model, ref.state_dict())
    ids, labels, docs = make_batch()
    docs[1, 8:] = 4  # a document starting exactly at the cut
    w = torch.randn(B, T, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    results = []
    for m in (ref, model):
        a, b = run_segments(m, ids, labels, docs, cut=8)
        logits = torch.cat([a.logits, b.logits], dim=1)
        (logits * w).sum().backward()
        results.append((logits, a.fwl_state, b.fwl_state))
    (l_ref, s1_ref, s2_ref), (l_tp, s1, s2) = results
    assert worst(l_tp, l_ref) < TOL
    assert s1.pending_x is not None and worst(s1.pending_x, s1_ref.pending_x) < TOL
    assert (s1.pending_w1 is not None) == ("model.fwl.update=sequential" in extra)
    # The state is sharded like the weights: w1 over 4s (its last dim), b1 too, w2 over 4s (rows).
    for st, st_ref in ((s1, s1_ref), (s2, s2_ref)):
        for name, dim in (("w1", 2), ("b1", 1), ("w2", 1), ("b2", None), ("alpha", None), ("beta", None)):
            # (model.fwl.update=sequential: a pending position's chunk-start update too, sharded like the sums.)
            for field in (name, "pending_" + name):
                mine, full = getattr(st, field), getattr(st_ref, field)
                assert (mine is None) == (full is None), f"state {field}"
                if full is None:
                    continue
                if dim is not None:
                    full = take_shard(full, dim, tp.rank, tp.size)
                assert worst(mine, full) < TOL, f"state {field}"
        assert (st.count is None) == (st_ref.count is None)
        if st.count is not None:
            assert worst(st.count, st_ref.count) < TOL, "state count"
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        err = worst(gather_grad(p, tp), ref_params[name].grad)
        assert err < TOL, f"[segments sp={sp}] gradient of {name}: {err:.3g}"


def check_mappings(ps) -> None:
    """Each mapping's forward and backward against its definition, with a different loss weight on
    every rank (sharded use) or the same one (replicated use)."""
    tp = ps.tp_context()
    n, r = tp.size, tp.rank
    g = torch.Generator().manual_seed(5)
    x_full = torch.randn(2, 4 * n, 3, dtype=torch.float64, generator=g)
    ws = [torch.randn(2, 4 * n, 3, dtype=torch.float64, generator=g) for _ in range(n)]  # per-rank weights
    w_sum = sum(ws)

    def grad_of(fn, x, w):
        x = x.clone().requires_grad_()
        y = fn(x)
        (y * w).sum().backward()
        return y, x.grad

    # copy_to: replicated input used with a per-rank weight -> the gradient is the sum over ranks.
    y, gx = grad_of(lambda x: copy_to_tp(x, tp), x_full, ws[r])
    assert torch.equal(y, x_full) and worst(gx, w_sum) < TOL
    # reduce_from: per-rank parts summed; replicated use -> each part gets the whole gradient.
    part = x_full * (r + 1)
    y, gx = grad_of(lambda x: reduce_from_tp(x, tp), part, ws[0])
    assert worst(y, x_full * sum(range(1, n + 1))) < TOL and worst(gx, ws[0]) < TOL
    # all_reduce_tp: summed, then used with a per-rank weight -> backward sums as well.
    y, gx = grad_of(lambda x: all_reduce_tp(x, tp), part, ws[r])
    assert worst(y, x_full * sum(range(1, n + 1))) < TOL and worst(gx, w_sum) < TOL
    # scatter / gather along the last dim and along the sequence.
    wsh = take_shard(ws[r], 1, r, n)
    y, gx = grad_of(lambda x: scatter_to_tp(x, tp, dim=1), x_full, wsh)
    assert torch.equal(y, take_shard(x_full, 1, r, n))
    assert worst(gx, merge_shards([take_shard(ws[q], 1, q, n) for q in range(n)], 1)) < TOL
    y, gx = grad_of(lambda x: gather_from_tp(x, tp, dim=1), take_shard(x_full, 1, r, n), ws[0])
    assert torch.equal(y, x_full) and worst(gx, take_shard(ws[0], 1, r, n)) < TOL
    y, gx = grad_of(lambda x: gather_from_sequence(x, tp), take_shard(x_full, 1, r, n), ws[r])
    assert torch.equal(y, x_full) and worst(gx, take_shard(w_sum, 1, r, n)) < TOL
    y, gx = grad_of(lambda x: reduce_scatter_to_sequence(x, tp), part, wsh)
    assert worst(y, take_shard(x_full * sum(range(1, n + 1)), 1, r, n)) < TOL
    assert worst(gx, merge_shards([take_shard(ws[q], 1, q, n) for q in range(n)], 1)) < TOL


def check_groups(ps, expect: dict[str, list[int]]) -> None:
    for name, ranks in expect.items():
        assert ps.group_ranks[name] == ranks, (name, ps.group_ranks[name])
        t = torch.tensor([float(ps.rank)])
        dist.all_reduce(t, group=ps.groups[name])
        assert t.item() == sum(ranks), name


def _world2(rank: int, world: int) -> None:
    ps = init_parallel_state(make_cfg(True, 2, False))
    check_mappings(ps)
    for fwl in (True, False):
        for sp in (False, True):
            ps = init_parallel_state(make_cfg(fwl, 2, sp))
            check_model(ps, fwl, sp)
    check_model(ps, True, True, tied=False)  # untied lm_head, FWL width 8 != d_model
    check_model(init_parallel_state(make_cfg(True, 2, False)), True, False, checkpointing=True)
    check_missing_step_size_reduce(init_parallel_state(make_cfg(True, 2, False)))
    for sp in (False, True):
        check_segments(init_parallel_state(make_cfg(True, 2, sp)), sp)
    # The long-document remedies: λ of W1, b1, W2 scale sharded or partial sums (gradient all-reduced).
    check_model(init_parallel_state(make_cfg(True, 2, True)), True, True, extra=REMEDIES)
    check_segments(init_parallel_state(make_cfg(True, 2, False)), False, extra=REMEDIES)
    check_missing_decay_reduce(init_parallel_state(make_cfg(True, 2, False)))
    check_model(init_parallel_state(make_cfg(True, 2, True)), True, True, extra=VARIANTS)
    check_segments(init_parallel_state(make_cfg(True, 2, False)), False, extra=VARIANTS)
    # Sequential updates (tests/test_fwl_sequential.py): the products with the chunk-start sums are sharded like
    # the fast pass's; inner chunks of 5 (two fast chunks of 4 in each) and of 3, with a pending position's
    # chunk-start update carried (sharded) across the cut.
    check_model(init_parallel_state(make_cfg(True, 2, True)), True, True,
                extra=SEQUENTIAL + ("model.fwl.inner_chunk=5",))
    check_segments(init_parallel_state(make_cfg(True, 2, False)), False,
                   extra=SEQUENTIAL + ("model.fwl.inner_chunk=3",) + REMEDIES)


def _world4(rank: int, world: int) -> None:
    # tp = 4 with a padded vocabulary of 128 for 50 words: two ranks hold padding only.
    for sp in (False, True):
        ps = init_parallel_state(make_cfg(True, 4, sp, vocab_multiple=128))
        check_model(ps, True, sp, vocab_multiple=128)
    check_model(init_parallel_state(make_cfg(False, 4, True)), False, True)
    # tp = 2 × dp = 2: two independent tensor-parallel replicas; the groups are the layout's.
    ps = init_parallel_state(make_cfg(True, 2, True, dp=2))
    lo = 0 if rank < 2 else 2
    check_groups(ps, {"tp": [lo, lo + 1], "dp": [rank % 2, rank % 2 + 2], "dp_cp": [rank % 2, rank % 2 + 2],
                      "tp_pp": [lo, lo + 1], "pp": [rank], "cp": [rank]})
    assert ps.get_data_parallel_world_size() == 2 and ps.get_model_parallel_world_size() == 2
    check_model(ps, True, True)
    # tp = 2 × pp = 2 and tp = 2 × cp = 2: only the groups (pipeline and context parallelism are elsewhere).
    cfg = make_cfg(True, 2, False)
    cfg.parallel.pp = 2
    ps = init_parallel_state(cfg)
    check_groups(ps, {"tp": [lo, lo + 1], "pp": [rank % 2, rank % 2 + 2], "tp_pp": [0, 1, 2, 3], "dp_cp": [rank]})
    cfg = make_cfg(True, 2, False)
    cfg.parallel.cp = 2
    ps = init_parallel_state(cfg)
    check_groups(ps, {"cp": [rank % 2, rank % 2 + 2], "dp_cp": [rank % 2, rank % 2 + 2], "dp": [rank]})


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_matches_single_process(world):
    run_distributed(world, _world2 if world == 2 else _world4)
