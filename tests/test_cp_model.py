"""Context parallelism against the single-process model, on 2 and 4 gloo processes, float64.

One spawn per world size runs every layout: cp = 2 and 4 with the FWL state exchanged as a segmented scan
(`state`), as the earlier ranks' keys and values (`kv`) and by the `auto` rule; the baseline head; cp × tp
with and without sequence parallelism; chunked and quadratic forms inside a rank. The batch has documents
that start and end inside a rank, start exactly at a rank boundary, and span two, three or all ranks, and
ignored labels. Each rank compares with the unsplit model built from the same seed:

* its chunk of the per-token losses and logits; the loss averaged over the cp group;
* every parameter's gradient as DeepSpeed sees it — averaged over the cp group (its data-parallel group is
  dp × cp), tensor-parallel shards gathered — including the step sizes;
* the gradient at the body's input (embedding output) and output (FWL input) of its chunk.

Each rank's objective is its loss share plus cp × (its chunk's weighted token losses); the sum over ranks
is cp × the reference objective, so the averaged gradients must equal the reference ones and the chunk
gradients must equal cp × the reference's. Segments: a carried state with a pending position enters a
context-parallel segment, the state leaving it is compared, and gradients flow back through it.
The long-document remedies (model.fwl.normalize=mean, model.fwl.decay=learned, both) run the same
checks, the carried count included.

Tolerance: 1e-10 relative to max(1, |reference|): float64 round-off. A detached received state (or
detached earlier keys and values) leaves the forward exact and moves gradients by far more than 1e-4 —
checked below.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fwl_scale import IGNORE_INDEX
from fwl_scale.config import load_config
from fwl_scale.model import build_model
import fwl_scale.model.fwl.context_parallel as fwl_exchange
from fwl_scale.parallel import full_state_dict, init_parallel_state, load_full_state_dict
from fwl_scale.parallel.shards import is_sharded, merge_shards, take_shard
from tests.distributed import run_distributed
from tests.model_support import body_probes, perturb, worst

TOL = 1e-10
B, T, VOCAB = 3, 16, 50


# The long-document remedies (tests/test_fwl_long.py): normaliser, forgetting factor (λ ≈ 0.7, so it
# matters over 16 tokens), both.
MEAN = ("model.fwl.normalize=mean",)
DECAY = ("model.fwl.decay=learned", "model.fwl.decay_init=0.7")
REMEDIES = (MEAN, DECAY, MEAN + DECAY)
# Issue 22's variants: the sqrt normaliser and per-token step sizes (their factors travel with the kv pieces).
VARIANTS = ("model.fwl.normalize=sqrt", "model.fwl.step_size=token") + DECAY


def make_cfg(fwl: bool = True, tp: int = 1, cp: int = 1, sp: bool = False, dp: int = 1, chunk: int = 3,
             form: str = "chunked", exchange: str = "state", seq_len: int = T, extra: tuple[str, ...] = ()):
    counted = any(e.startswith("model.fwl.normalize=") and not e.endswith("=none") for e in extra)
    scale = [] if counted else ["model.fwl.grad_scale=0.5"]  # mean and sqrt have no k
    return load_config(None, [
        "model.d_model=16", "model.n_heads=4", "model.n_layers=2", f"model.seq_len={seq_len}",
        f"model.vocab_size={VOCAB}", "model.vocab_multiple=64", f"model.fwl.enabled={str(fwl).lower()}",
        f"model.fwl.chunk_size={chunk}", f"model.fwl.form={form}", "model.fwl.vocab_chunk=7",
        *scale, f"parallel.tp={tp}", f"parallel.cp={cp}", f"parallel.dp={dp}",
        f"parallel.sequence_parallel={str(sp).lower()}", f"parallel.cp_exchange={exchange}", *extra])


def make_batch(n_tokens: int = T, seed: int = 11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, n_tokens), generator=g)
    labels = ids.roll(-1, 1)
    docs = torch.zeros(B, n_tokens, dtype=torch.long)
    # Row 0: documents start at 5 and 13, inside ranks; the one from 5 spans ranks 1-3 at cp = 4.
    docs[0, 5:] = 1
    docs[0, 13:] = 2
    labels[0, 4] = labels[0, 12] = IGNORE_INDEX
    # Row 1: a document starts exactly at the middle rank boundary; the first spans ranks 0-1 at cp = 4.
    docs[1, n_tokens // 2:] = 7
    labels[1, n_tokens // 2 - 1] = IGNORE_INDEX
    labels[1, 2] = IGNORE_INDEX
    # Row 2: one document across every rank.
    labels[2, n_tokens - 1] = IGNORE_INDEX
    return ids, labels, docs


def averaged_grad(p, ps) -> torch.Tensor:
    """The gradient DeepSpeed applies: averaged over the data-parallel group (dp × cp; here dp = 1, so the
    cp group), the tensor-parallel shards merged."""
    g = p.grad.clone()
    dist.all_reduce(g, group=ps.groups["cp"])
    g /= ps.cp_size
    tp = ps.tp_context()
    if not is_sharded(p) or tp is None:
        return g
    shards = [torch.empty_like(g) for _ in range(tp.size)]
    dist.all_gather(shards, g.contiguous(), group=tp.group)
    return merge_shards(shards, p.partition_dim, p.partition_stride)


def cp_slice(t: torch.Tensor, ps, dim: int = 1) -> torch.Tensor:
    n = t.shape[dim] // ps.cp_size
    return t.narrow(dim, ps.cp_rank * n, n)


def gather_tp_seq(t: torch.Tensor, ps) -> torch.Tensor:
    tp = ps.tp_context()
    parts = [torch.empty_like(t) for _ in range(tp.size)]
    dist.all_gather(parts, t.contiguous(), group=tp.group)
    return torch.cat(parts, dim=1)


def token_weights(n_tokens: int = T) -> torch.Tensor:
    return torch.linspace(0.5, 1.5, B * n_tokens, dtype=torch.float64).reshape(B, n_tokens)


def run_with_probes(model, ids, labels, docs, cp: int, seq_start: int):
    with body_probes(model) as probes:
        out = model(ids, labels, docs)
        w = token_weights().narrow(1, seq_start, out.token_loss.shape[1])
        (out.loss + cp * 0.1 * (out.token_loss * w).sum()).backward()
    return out, {k: v.grad for k, v in probes.items()}


def models(ps, cfg, exchange: str):
    torch.manual_seed(0)
    ref = build_model(cfg.model).double()
    torch.manual_seed(0)
    model = build_model(cfg.model, parallel=ps, cp_exchange=exchange).double()
    full = full_state_dict(model, ps.tp_context())
    for name, t in ref.state_dict().items():
        assert torch.equal(full[name], t), f"init {name}"
    perturb(ref)
    load_full_state_dict(model, ref.state_dict())
    return ref, model


def check_model(ps, fwl: bool = True, exchange: str = "state", sp: bool = False, chunk: int = 3,
                form: str = "chunked", extra: tuple[str, ...] = ()) -> None:
    cfg = make_cfg(fwl, ps.tp_size, ps.cp_size, sp, chunk=chunk, form=form, exchange=exchange, extra=extra)
    what = f"[cp={ps.cp_size} tp={ps.tp_size} sp={sp} fwl={fwl} exchange={exchange} {form}/{chunk} {extra}]"
    ref, model = models(ps, cfg, exchange)
    ids, labels, docs = make_batch()
    out_ref, probes_ref = run_with_probes(ref, ids, labels, docs, 1, 0)
    out, probes = run_with_probes(model, ids, labels, docs, ps.cp_size, ps.cp_rank * (T // ps.cp_size))
    assert out.seq_start == ps.cp_rank * (T // ps.cp_size)
    assert worst(out.token_loss, cp_slice(out_ref.token_loss, ps)) < TOL, what
    loss = out.loss.detach().clone()
    dist.all_reduce(loss, group=ps.groups["cp"])
    assert abs(loss.item() / ps.cp_size - out_ref.loss.item()) < TOL, what
    assert out.n_valid.item() == out_ref.n_valid.item()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        err = worst(averaged_grad(p, ps), ref_params[name].grad)
        assert err < TOL, f"{what} gradient of {name}: {err:.3g}"
    for name in ("body_in", "body_out"):
        g = gather_tp_seq(probes[name], ps) if sp else probes[name]
        err = worst(g / ps.cp_size, cp_slice(probes_ref[name], ps))
        assert err < TOL, f"{what} gradient at {name}: {err:.3g}"
    if fwl:
        assert ref.fwl.step_sizes.grad.abs().min() > 1e-4, what
        if ref.fwl.decay_logits is not None:
            assert ref.fwl.decay_logits.grad.abs().min() > 1e-6, what
    with torch.no_grad():
        lg = model(ids, labels, docs, return_logits=True).logits
        lg_ref = ref(ids, labels, docs, return_logits=True).logits
    assert worst(lg, cp_slice(lg_ref, ps)) < TOL, what


def check_detached_exchange_is_caught(ps, exchange: str) -> None:
    """A received state (or earlier keys and values) without its backward: the forward stays exact and
    the gradients of the earlier ranks' tokens go wrong — the comparison above must see it."""
    cfg = make_cfg(True, ps.tp_size, ps.cp_size, exchange=exchange)
    ref, model = models(ps, cfg, exchange)
    ids, labels, docs = make_batch()
    original_scan, original_gather = fwl_exchange.exclusive_state_scan, fwl_exchange.gather_sequence
    if exchange == "state":
        fwl_exchange.exclusive_state_scan = lambda *a: [s.detach() for s in original_scan(*a)]
    else:
        fwl_exchange.gather_sequence = lambda t, group: original_gather(t, group).detach()
    try:
        out, _ = run_with_probes(model, ids, labels, docs, ps.cp_size, ps.cp_rank * (T // ps.cp_size))
    finally:
        fwl_exchange.exclusive_state_scan, fwl_exchange.gather_sequence = original_scan, original_gather
    out_ref, _ = run_with_probes(ref, ids, labels, docs, 1, 0)
    assert worst(out.token_loss, cp_slice(out_ref.token_loss, ps)) < TOL  # the forward cannot tell
    ref_params = dict(ref.named_parameters())
    errs = {name: worst(averaged_grad(p, ps), ref_params[name].grad) for name, p in model.named_parameters()}
    assert max(errs.values()) > 1e-4, f"detached {exchange} exchange not visible: {errs}"


def check_auto_rule(ps) -> None:
    cfg = make_cfg(True, ps.tp_size, ps.cp_size, exchange="auto")
    model = build_model(cfg.model, parallel=ps, cp_exchange="auto")
    # d = s = 16, 4s = 64: state (fp32) 2160·4 bytes vs kv 192·T_rank·2 bytes (bf16): crossover 22.5 tokens.
    assert model.fwl.exchange_for(22, torch.bfloat16) == "kv"
    assert model.fwl.exchange_for(23, torch.bfloat16) == "state"
    assert model.fwl.exchange_for(8, torch.float64) == "kv"  # the layouts above: auto runs kv


def run_segments(model, ids, labels, docs, cut: int):
    """Two segments, the first's last label pending, the state carried (not detached)."""
    lab1 = labels[:, :cut].clone()
    lab1[:, -1] = IGNORE_INDEX
    first = model(ids[:, :cut], lab1, docs[:, :cut], last_label_pending=True, return_state=True,
                  return_logits=True)
    second = model(ids[:, cut:], labels[:, cut:], docs[:, cut:], fwl_state=first.fwl_state, return_state=True,
                   return_logits=True)
    return first, second


def check_segments(ps, exchange: str, sp: bool = False, extra: tuple[str, ...] = ()) -> None:
    """A carried state with a pending position enters a context-parallel segment: values, the state
    leaving each segment (replicated over cp, sharded over tp) and the gradients through it."""
    cfg = make_cfg(True, ps.tp_size, ps.cp_size, sp, exchange=exchange, extra=extra)
    what = f"[segments cp={ps.cp_size} tp={ps.tp_size} sp={sp} {exchange} {extra}]"
    ref, model = models(ps, cfg, exchange)
    ids, labels, docs = make_batch(2 * T, seed=12)
    docs[0, T:] = 9  # a document starting exactly at the segment boundary
    docs[1, T - 3:] = 8  # ... and one starting just before it, running on across the next segment
    labels[1, T - 4] = IGNORE_INDEX
    w = torch.randn(B, 2 * T, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (a_ref, b_ref) = run_segments(ref, ids, labels, docs, T)
    (a, b) = run_segments(model, ids, labels, docs, T)
    w1, w2 = w[:, :T], w[:, T:]
    (a_ref.logits * w1).sum().add((b_ref.logits * w2).sum()).backward()
    ((a.logits * cp_slice(w1, ps)).sum() + (b.logits * cp_slice(w2, ps)).sum()).backward()
    assert worst(a.logits, cp_slice(a_ref.logits, ps)) < TOL, what
    assert worst(b.logits, cp_slice(b_ref.logits, ps)) < TOL, what
    tp = ps.tp_context()
    for st, st_ref in ((a.fwl_state, a_ref.fwl_state), (b.fwl_state, b_ref.fwl_state)):
        for name, dim in (("w1", 2), ("b1", 1), ("w2", 1), ("b2", None), ("alpha", None), ("beta", None)):
            mine, full = getattr(st, name), getattr(st_ref, name)
            if dim is not None and tp is not None:
                full = take_shard(full, dim, tp.rank, tp.size)
            assert worst(mine, full) < TOL, f"{what} state {name}"
        assert torch.equal(st.doc_id, st_ref.doc_id)
        assert (st.count is None) == (st_ref.count is None), what
        if st.count is not None:
            assert worst(st.count, st_ref.count) < TOL, f"{what} count"
    assert worst(a.fwl_state.pending_x, a_ref.fwl_state.pending_x) < TOL, what
    ref_params = dict(ref.named_parameters())
    # Each rank's objective here is its own chunk's logits (no cp factor): sum over cp, not average.
    for name, p in model.named_parameters():
        err = worst(averaged_grad(p, ps) * ps.cp_size, ref_params[name].grad)
        assert err < TOL, f"{what} gradient of {name}: {err:.3g}"


def _world2(rank: int, world: int) -> None:
    ps = init_parallel_state(make_cfg(cp=2))
    assert ps.cp_size == 2 and ps.get_data_parallel_world_size() == 2
    for exchange in ("state", "kv", "auto"):
        check_model(ps, exchange=exchange)
    check_model(ps, exchange="state", form="quadratic")
    check_model(ps, exchange="kv", chunk=16, form="auto")
    check_model(ps, fwl=False)
    check_auto_rule(ps)
    for exchange in ("state", "kv"):
        check_detached_exchange_is_caught(ps, exchange)
        check_segments(ps, exchange)
        for extra in REMEDIES + (VARIANTS,):
            check_model(ps, exchange=exchange, extra=extra)
            check_segments(ps, exchange, extra=extra)


def _world4(rank: int, world: int) -> None:
    ps = init_parallel_state(make_cfg(cp=4))
    for exchange in ("state", "kv"):
        check_model(ps, exchange=exchange)
        check_segments(ps, exchange)
        for extra in REMEDIES:
            check_model(ps, exchange=exchange, extra=extra)
        check_segments(ps, exchange, extra=MEAN + DECAY)
    check_model(ps, fwl=False)
    # cp = 2 × tp = 2: the FWL state sharded over tp, exchanged over cp; with and without sequence parallelism.
    for sp in (False, True):
        ps = init_parallel_state(make_cfg(tp=2, cp=2, sp=sp))
        assert ps.group_ranks["cp"] == [rank % 2, rank % 2 + 2]
        for exchange in ("state", "kv"):
            check_model(ps, exchange=exchange, sp=sp)
        check_segments(ps, "state", sp=sp)
        check_model(ps, exchange="state" if sp else "kv", sp=sp, extra=MEAN + DECAY)
        check_model(ps, exchange="kv", sp=sp, extra=VARIANTS)
    check_model(ps, fwl=False, sp=True)


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_matches_single_process(world):
    run_distributed(world, _world2 if world == 2 else _world4)
