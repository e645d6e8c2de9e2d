"""Every layout of the trainer's engine against the single-process model on the same data, on 2 and 4 gloo
processes (one spawn per world size, every layout inside).

The engine is built exactly as the trainer builds it (`build_training_engine`: the plain engine with
mpu=ParallelState for pp = 1, the pipeline engine for pp > 1) and driven with the trainer's calls (engine
forward/backward/step, or `PipelineStep.run`). Every layout trains on the same global batch of 4 micro-
batches of 2 rows per step (dp × grad_accum = 4, so accumulation runs wherever dp < 4), with the trainer's
AdamW, warmup + cosine schedule and active gradient clipping (the norm at step 1 is ~2, the clip 1.0).

The reference, computed in every process: the single-process model (same seed) in plain torch — the four
micro-batches' losses averaged, torch's AdamW and clip_grad_norm_, the same LambdaLR.

Layouts: 2 ranks — tp=2, tp=2+SP ZeRO-1, pp=2 ZeRO-0, pp=2 ZeRO-1 with activation checkpointing, pp=2
with the FWL state carried across micro-batches (and steps), dp=2 ZeRO 1/2/3; 4 ranks — tp=2×pp=2+SP
ZeRO-1 (also with a carried state), pp=2×cp=2 ZeRO-1 (the FWL's state exchange), pp=2×cp=2 with a carried state (the key/value
exchange), tp=2×dp=2 ZeRO-3. The carried layouts are compared with the single process carrying its state
through the same M micro-batches (it changes the step-1 gradients by up to 0.95 of a tensor's largest
entry, so the check sees a state that is dropped or passed to the wrong micro-batch). Checked per layout:
the loss of steps 1-3; at step 1, after the gradients are reduced and before the optimizer step, the gradient of every parameter (tensor-parallel shards gathered, the step sizes among
them), the gradient norm the clipping uses, and the gradient at the body input (the embedding output) of
every micro-batch. And the pipeline's non-finite-loss decision (check_pipeline_nonfinite), which drops a
carried state (check_pipeline_skip_drops_carried_state).

Tolerances (float32): losses 2e-5 relative; gradients 1e-4 of the tensor's largest entry; the norm 1e-5
relative. That is reduction-order round-off (another all-reduce order, flat ZeRO buffers, another
accumulation order); a missing or doubled reduction, a wrong clipping norm or a misrouted pipeline tensor
is off by 1e-2 or more.

bf16 (dp=2 with accumulation, ZeRO 0, its own test): the parameters themselves are bf16, so it is compared
with the single-process model trained in bf16 (reference_bf16): step-1 gradients within 3e-2 of the largest
entry (measured <= 7e-3), losses within 1e-4 relative, and the parameters after each step within 0.03 of
the reference's update (what a wrong update breaks: see the test).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fwl_scale.model import build_model
from fwl_scale.parallel.shards import is_sharded, merge_shards
from fwl_scale.train.deepspeed_setup import lr_factor, param_groups
from tests.distributed import run_distributed
from fwl_scale.train.carried import CarriedState
from tests.engine_support import B, M, SEED, build, make_cfg, micro_batch, train_step

STEPS = 3
TOL_LOSS, TOL_GRAD, TOL_NORM = 2e-5, 1e-4, 1e-5
BF16_TOL_LOSS, BF16_TOL_GRAD, BF16_TOL_PARAMS = 1e-4, 3e-2, 0.03


def embed_output_probe(module) -> list[torch.Tensor]:
    """The embedding's outputs (the body input), kept with their gradients."""
    outputs: list[torch.Tensor] = []

    def hook(_mod, _inp, out):
        out.retain_grad()
        outputs.append(out)

    module.register_forward_hook(hook)
    return outputs


def accumulate_step(model, step: int, carried: CarriedState | None = None) -> float:
    """Backward of step `step`'s M micro-batches, averaged; returns the mean loss. `carried`: each micro-
    batch starts from the FWL state the previous one (of this step or the last) left."""
    total = 0.0
    for k in range(M):
        out = model(*micro_batch(step, k).values(), **(carried.forward_kwargs() if carried else {}))
        if carried is not None:
            carried.advance(out)
        (out.loss / M).backward()
        total += out.loss.item()
    return total / M


def reference(carried: bool = False) -> dict:
    """`carried`: the FWL state carried from micro-batch to micro-batch (contiguous training), as by one
    rank that sees all M micro-batches in order (the layouts compared with it have dp = 1)."""
    cfg = make_cfg(1)
    state = CarriedState(True, B) if carried else None
    torch.manual_seed(SEED)
    model = build_model(cfg.model)
    t = cfg.train
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: lr_factor(u, cfg))
    body_in = embed_output_probe(model.embed)
    out = {"loss": []}
    for s in range(STEPS):
        opt.zero_grad()
        out["loss"].append(accumulate_step(model, s, state))
        if s == 0:
            out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
            out["body_in"] = [x.grad.clone() for x in body_in]
            out["norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip))
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        body_in.clear()
        opt.step()
        sched.step()
    return out


def reference_bf16() -> dict:
    """The single-process model with bf16 parameters in plain torch, as DeepSpeed's bf16 optimizer
    without ZeRO trains it: gradients accumulated in bf16, float32 master weights that AdamW (clipped)
    updates, parameters the masters rounded to bf16. Step 1's gradients, and the losses and parameters
    of every step. (Against float32 the gradients are not comparable everywhere: e.g. the step size of
    b2 has a gradient of -2.1e-4 in float32 and -4.4e-5 in bf16, in one process.)"""
    cfg = make_cfg(1)
    torch.manual_seed(SEED)
    model = build_model(cfg.model).to(torch.bfloat16)
    params = dict(model.named_parameters())
    master = {n: p.detach().float().clone().requires_grad_(True) for n, p in params.items()}
    by_id = {id(p): n for n, p in params.items()}
    t = cfg.train
    groups = [{**g, "params": [master[by_id[id(p)]] for p in g["params"]]} for g in param_groups(model, cfg)]
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: lr_factor(u, cfg))
    body_in = embed_output_probe(model.embed)
    out: dict = {"loss": [], "params": [], "init": {n: m.detach().clone() for n, m in master.items()}}
    for s in range(STEPS):
        model.zero_grad()
        out["loss"].append(accumulate_step(model, s))
        for n, m in master.items():
            m.grad = params[n].grad.float()
        if s == 0:
            out["grads"] = {n: m.grad.clone() for n, m in master.items()}
            out["body_in"] = [x.grad.float() for x in body_in]
            out["norm"] = float(torch.sqrt(sum(g.double().pow(2).sum() for g in out["grads"].values())))
        torch.nn.utils.clip_grad_norm_(list(master.values()), t.grad_clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            for n, m in master.items():
                params[n].copy_(m.to(torch.bfloat16))
        out["params"].append({n: p.detach().float().clone() for n, p in params.items()})
        body_in.clear()
    return out


def check_bf16_params(te, ref_bf16: dict, s: int, what: str) -> None:
    """After step s + 1: the parameters against the bf16 reference's, relative to how far the reference
    moved them from the initialisation."""
    names = list(ref_bf16["init"])
    mine = dict(te.named_parameters())  # dp only, ZeRO 0: every rank holds every parameter whole
    got = torch.cat([mine[n].detach().float().reshape(-1) for n in names])
    ref = torch.cat([ref_bf16["params"][s][n].reshape(-1) for n in names])
    init = torch.cat([ref_bf16["init"][n].reshape(-1) for n in names])
    err = float((got - ref).norm() / (ref - init).norm())
    assert err < BF16_TOL_PARAMS, f"{what} step {s + 1}: parameters off by {err:.3f} of the reference's update"


def full_grad(p: torch.nn.Parameter, ps) -> torch.Tensor:
    """The data-parallel-reduced gradient of `p`, tensor-parallel shards gathered (collective over tp)."""
    from deepspeed.utils import safe_get_full_grad

    g = safe_get_full_grad(p).detach().float()
    if is_sharded(p):
        parts = [torch.empty_like(g) for _ in range(ps.tp_size)]
        dist.all_gather(parts, g.contiguous(), group=ps.groups["tp"])
        g = merge_shards(parts, p.partition_dim, p.partition_stride)
    return g


def worst(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)


def run_layout(world: int, ref: dict, tp: int = 1, pp: int = 1, sp: bool = False, zero: int = 0,
               bf16: bool = False, ref_bf16: dict | None = None, act_ckpt: bool = False, cp: int = 1,
               exchange: str = "auto", carried: bool = False) -> None:
    """`carried`: the FWL state carried across micro-batches where the FWL runs (compare with
    reference(carried=True); dp = 1)."""
    what = (f"[tp={tp}{' SP' if sp else ''} cp={cp}{f' {exchange}' if cp > 1 else ''} pp={pp} "
            f"dp={world // (tp * pp * cp)} ZeRO-{zero}{' bf16' if bf16 else ''}"
            f"{' activation checkpointing' if act_ckpt else ''}{' carried state' if carried else ''}]")
    cfg, ps, te = build(world, tp=tp, pp=pp, sp=sp, zero=zero, bf16=bf16, act_ckpt=act_ckpt, cp=cp, exchange=exchange)
    assert not carried or ps.dp_size == 1, "the carried reference is one stream of M micro-batches"
    state = CarriedState(carried and te.is_last_stage, cfg.parallel.micro_batch, tp_rank=ps.tp_rank,
                         tp_size=ps.tp_size, cp_rank=ps.cp_rank)
    if te.is_pipeline and te.pipeline.head is not None and carried:
        te.pipeline.head.carried = state  # what PipelineEngine.train_step does
    engine = te.engine
    gas, dp = cfg.parallel.grad_accum, ps.dp_size
    tol_loss, tol_grad = (BF16_TOL_LOSS, BF16_TOL_GRAD) if bf16 else (TOL_LOSS, TOL_GRAD)
    step1 = ref_bf16 if bf16 else ref  # the run compared with: float32, or bf16 in one process
    holds_embedding_input = ps.pp_rank == 0
    body_in = embed_output_probe(te.model.embed) if holds_embedding_input else []
    seen: dict = {}

    def check_gradients() -> None:
        for name, p in te.named_parameters():
            err = worst(full_grad(p, ps), step1["grads"][name])
            assert err < tol_grad, f"{what} gradient of {name}: off by {err:.2e} of its largest entry"
            seen[name] = err
        for i, x in enumerate(body_in):
            g = x.grad.float()
            for axis, split in (("tp", ps.sequence_parallel), ("cp", cp > 1)):
                if split:  # this rank's chunk of the sequence
                    parts = [torch.empty_like(g) for _ in range(ps.layout.sizes()[axis])]
                    dist.all_gather(parts, g.contiguous(), group=ps.groups[axis])
                    g = torch.cat(parts, dim=1)
            # DeepSpeed scales each micro-batch loss by 1/grad_accum and averages parameter gradients over
            # dp × cp; the reference scales by 1/(dp · grad_accum), and each cp rank's loss share is cp
            # times its part: the activation gradient differs by dp · cp.
            k = ps.dp_rank * gas + i
            err = worst(g / (dp * cp), step1["body_in"][k])
            assert err < tol_grad, f"{what} gradient at the body input of micro-batch {k}: off by {err:.2e}"

    for s in range(STEPS):
        mine = [micro_batch(s, ps.dp_rank * gas + i) for i in range(gas)]
        if te.is_pipeline:
            result = te.pipeline_step.run(mine, before_step=check_gradients if s == 0 else None)
            assert not result.skipped
            loss, norm = result.loss, result.grad_norm
        else:
            total = torch.zeros((), dtype=torch.float64)
            for i, b in enumerate(mine):
                engine.set_gradient_accumulation_boundary(i == gas - 1)
                out = engine(*b.values(), **state.forward_kwargs())
                state.advance(out)
                engine.backward(out.loss)
                total += out.loss.detach().double()
            if s == 0:
                check_gradients()
            own_norm = te.grad_norm() if zero == 0 and not bf16 else None
            engine.step()
            reported = engine.get_global_grad_norm()
            norm = float(reported) if reported is not None else own_norm
            dist.all_reduce(total, group=ps.get_data_parallel_group())
            loss = float(total) / (gas * ps.get_data_parallel_world_size())
        err = abs(loss - step1["loss"][s]) / step1["loss"][s]
        assert err < tol_loss, f"{what} step {s + 1}: loss {loss} vs single-process {step1['loss'][s]}"
        if bf16:
            check_bf16_params(te, ref_bf16, s, what)
        if s == 0:
            assert norm is not None and abs(norm - step1["norm"]) / step1["norm"] < (tol_grad if bf16 else TOL_NORM), \
                f"{what} gradient norm {norm} vs single-process {step1['norm']}"
        body_in.clear()
    # Every parameter was checked, each on the ranks that hold it.
    held = torch.tensor([len(seen)], dtype=torch.float64)
    expected_names = set(ref["grads"])
    assert set(seen) <= expected_names
    if pp == 1:
        assert set(seen) == expected_names, f"{what} unchecked: {sorted(expected_names - set(seen))}"
    else:
        names = [None] * world
        dist.all_gather_object(names, sorted(seen))
        assert set().union(*map(set, names)) == expected_names, what
    del held


def check_pipeline_nonfinite(world: int, zero: int) -> None:
    """pp=2: a NaN loss in one micro-batch on the last stage skips the step on every rank (the decision is
    taken after the backward passes, before any gradient reduction) and leaves no trace: parameters,
    optimizer state and the learning rate are unchanged, and the next step equals the one of a run that
    never saw the bad batch, bit for bit."""
    from fwl_scale.train.pipeline import HeadStage

    what = f"[pp=2 ZeRO-{zero}]"
    cfg, ps, te = build(world, pp=2, zero=zero)
    train_step(te, ps, cfg, 0)
    heads = [f for f in te.engine.module.forward_funcs if isinstance(f, HeadStage)]
    calls = {"n": 0}
    if heads:
        original = heads[0].forward

        def poisoned(inputs):
            out = original(inputs)
            calls["n"] += 1
            return out * float("nan") if calls["n"] == 2 else out  # the step's second micro-batch

        heads[0].forward = poisoned

    def snapshot() -> list[torch.Tensor]:
        state = [p.detach().clone() for p in te.engine.module.parameters()]
        for st in te.engine.basic_optimizer.state.values():
            state += [v.detach().clone() for v in st.values() if torch.is_tensor(v)]
        return state

    before, lr = snapshot(), te.engine.get_lr()[0]
    gas = cfg.parallel.grad_accum
    result = te.pipeline_step.run([micro_batch(1, ps.dp_rank * gas + i) for i in range(gas)])
    assert result.skipped and result.loss != result.loss, f"{what} the NaN step was not skipped on rank {ps.rank}"
    after = snapshot()
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after)), \
        f"{what} a skipped step changed parameters or optimizer state"
    assert te.engine.get_lr()[0] == lr
    if heads:
        heads[0].forward = original
    after_skip = train_step(te, ps, cfg, 2)
    cfg2, ps2, clean = build(world, pp=2, zero=zero)
    train_step(clean, ps2, cfg2, 0)
    assert train_step(clean, ps2, cfg2, 2) == after_skip, f"{what} the skipped step left a trace"


def check_pipeline_skip_drops_carried_state(world: int) -> None:
    """pp=2 with a carried FWL state, through the trainer's PipelineEngine.train_step: a skipped step (a NaN
    loss in its second micro-batch) drops the state on the last stage, as the plain engine does, so the
    next step starts its slots afresh — bit for bit the step of a run that never saw the bad step and
    reset its state there, and not that of a run that kept its state (which the check tells apart)."""
    def run(mode: str) -> float:
        cfg, ps, te = build(world, pp=2)
        carried = CarriedState(te.is_last_stage, cfg.parallel.micro_batch)

        def batches(step: int):
            it = iter([micro_batch(step, i) for i in range(cfg.parallel.grad_accum)])
            return lambda: next(it)

        te.train_step(batches(0), carried, lambda: False)
        head = te.pipeline.head
        if mode == "skip":
            calls = {"n": 0}
            original = head.forward if head is not None else None

            def poisoned(inputs):
                out = original(inputs)
                calls["n"] += 1
                return out * float("nan") if calls["n"] == 2 else out

            if head is not None:
                head.forward = poisoned
            assert te.train_step(batches(1), carried, lambda: False).skipped
            if head is not None:
                del head.forward
                assert carried.state is None, "[pp=2 carried] the skipped step kept its state"
        elif mode == "reset":
            carried.reset()
        return te.train_step(batches(2), carried, lambda: False).loss

    after_skip, after_reset, kept = run("skip"), run("reset"), run("kept")
    assert after_skip == after_reset, f"[pp=2 carried] after a skipped step {after_skip} vs {after_reset}"
    assert kept != after_reset, "[pp=2 carried] the check cannot tell a kept state from a dropped one"


def _two_ranks(rank: int, world: int) -> None:
    ref = reference()
    run_layout(world, ref, tp=2)
    run_layout(world, ref, tp=2, sp=True, zero=1)
    run_layout(world, ref, pp=2)
    run_layout(world, ref, pp=2, zero=1, act_ckpt=True)  # blocks recomputed in backward inside the stages
    run_layout(world, reference(carried=True), pp=2, carried=True)
    for zero in (1, 2, 3):
        run_layout(world, ref, zero=zero)
    for zero in (0, 1):
        check_pipeline_nonfinite(world, zero)
    check_pipeline_skip_drops_carried_state(world)


def _four_ranks(rank: int, world: int) -> None:
    ref = reference()
    run_layout(world, ref, tp=2, pp=2, sp=True, zero=1)
    run_layout(world, reference(carried=True), tp=2, pp=2, sp=True, zero=1, carried=True)  # state sharded by tp
    # Context-parallel stages: the body's all-gather and the FWL's exchange inside each stage's cp group.
    run_layout(world, ref, pp=2, cp=2, exchange="state", zero=1)
    run_layout(world, reference(carried=True), pp=2, cp=2, exchange="kv", carried=True)
    run_layout(world, ref, tp=2, zero=3)  # ZeRO-3 partitions tensor-parallel shards over dp = 2


@pytest.mark.parametrize("world", [2, 4])
def test_every_layout_trains_like_the_single_process_model(world):
    run_distributed(world, _two_ranks if world == 2 else _four_ranks)


def _bf16(rank: int, world: int) -> None:
    run_layout(world, reference(), bf16=True, ref_bf16=reference_bf16())


def test_bf16_trains_like_the_bf16_single_process_model():
    """dp=2 bf16 with accumulation, ZeRO 0, against one bf16 process over 3 steps: losses within 1e-4
    relative (measured 2.7e-6 and 2.1e-5 against a reference that reproduces the phantom step the engine
    builder now undoes, engine.undo_initial_optimizer_step; a
    dropped optimizer step moves them 4e-4 and 1.5e-3), parameters within 0.03 of the reference's update
    (measured <= 0.008; half the learning rate is off by >= 0.47, a dropped step by >= 1.3)."""
    run_distributed(2, _bf16)
