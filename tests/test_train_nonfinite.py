"""Non-finite losses: decided before backward (all-reduced flag), the whole step is skipped (no parameter or
optimizer change, even when earlier micro-batches of the step were already backpropagated), counted, and
training stops with a clear error after train.max_nonfinite_in_row in a row; with dp = 2, a NaN that only
one rank sees skips the step on both."""
from __future__ import annotations

import pytest
import torch

from fwl_scale.train.loop import Trainer, TrainingError
from tests.distributed import run_distributed
from tests.train_support import need_corpus, records, tiny_config


def poison(trainer: Trainer, bad_calls: set[int]) -> None:
    """Makes the model's loss NaN on the given forward calls (0-based, counting micro-batches)."""
    module = trainer.engine.module
    original = module.forward
    count = {"n": 0}

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        if count["n"] in bad_calls:
            out.loss = out.loss * float("nan")
        count["n"] += 1
        return out

    module.forward = forward


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {f"param.{k}": v.detach().float().clone() for k, v in trainer.engine.module.state_dict().items()}
    opt = trainer.engine.optimizer
    for i, st in enumerate(getattr(opt, "state", {}).values()):
        for k, v in st.items():
            if torch.is_tensor(v):
                state[f"opt.{i}.{k}"] = v.detach().float().clone()
    return state


@pytest.mark.parametrize("zero_stage, bf16, bad_micro", [
    (0, False, 0), (0, False, 1), (1, False, 1), (2, False, 0), (2, False, 1), (0, True, 1),
])
def test_nonfinite_step_is_skipped_whole(tmp_path, zero_stage, bf16, bad_micro):
    extra = ("parallel.grad_accum=2", "parallel.micro_batch=2", f"parallel.zero_stage={zero_stage}",
             f"train.bf16={str(bf16).lower()}", "train.steps=3", "train.warmup_steps=0")
    # Reference: the same run where step 2 is skipped because its loss is NaN in micro-batch `bad_micro`.
    trainer = Trainer(tiny_config(tmp_path / "run", *extra))
    poison(trainer, {2 + bad_micro})  # calls 0,1: step 1; calls 2,3: step 2
    first = trainer.train_step()
    assert not first.skipped and first.grad_norm is not None and first.grad_norm > 0
    before = snapshot(trainer)
    lr_before = trainer.engine.get_lr()[0]
    skipped = trainer.train_step()
    assert skipped.skipped and skipped.loss != skipped.loss  # NaN
    after = snapshot(trainer)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed in a skipped step"
    assert trainer.engine.get_lr()[0] == lr_before  # the schedule does not advance either
    third = trainer.train_step()
    assert not third.skipped and third.loss == third.loss

    # The step after the skip sees exactly the gradients of its own batch: compare with a run in which
    # the bad micro-batch was the first one (nothing to discard) -- identical losses.
    if bad_micro == 1:
        other = Trainer(tiny_config(tmp_path / "run0", *extra))
        poison(other, {2})
        other.train_step()
        other.train_step()
        assert other.train_step().loss == third.loss
    trainer.stop.uninstall()


def test_run_counts_skips_and_stops_after_too_many_in_a_row(tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(out, "train.steps=20", "train.max_nonfinite_in_row=3"))
    poison(trainer, {1, 4, 5, 6, 7, 8})  # step 2 alone, then steps 5.. in a row
    with pytest.raises(TrainingError, match=r"not finite in 3 steps in a row.*max_nonfinite_in_row=3"):
        trainer.run()
    skips = records(out, "skip")
    assert [s["step"] for s in skips] == [2, 5, 6, 7]
    assert [s["nonfinite_in_row"] for s in skips] == [1, 1, 2, 3]
    assert skips[-1]["skipped_total"] == 4
    train = {r["step"]: r for r in records(out, "train")}
    assert train[3]["loss"] == train[3]["loss"] and train[3]["skipped_total"] == 1


def _nan_on_rank_1_only(rank: int, world: int, root: str) -> None:
    for zero_stage in (0, 2):
        extra = ("parallel.grad_accum=2", "parallel.micro_batch=2", f"parallel.zero_stage={zero_stage}",
                 "train.steps=3", "train.warmup_steps=0")
        trainer = Trainer(tiny_config(f"{root}/zero{zero_stage}", *extra))
        if rank == 1:
            poison(trainer, {3})  # step 2's second micro-batch (its first was already backpropagated)
        assert not trainer.train_step().skipped
        before, lr_before = snapshot(trainer), trainer.engine.get_lr()[0]
        skipped = trainer.train_step()
        what = f"[ZeRO {zero_stage}, rank {rank}]"
        assert skipped.skipped and skipped.loss != skipped.loss, f"{what} the step rank 1 poisoned was not skipped"
        after = snapshot(trainer)
        assert all(torch.equal(before[k], after[k]) for k in before), f"{what} a skipped step changed the state"
        assert trainer.engine.get_lr()[0] == lr_before
        third = trainer.train_step()
        assert not third.skipped and third.loss == third.loss
        # Both ranks still hold the same model.
        flat = torch.cat([v.reshape(-1) for k, v in sorted(snapshot(trainer).items()) if k.startswith("param.")])
        other = [torch.empty_like(flat) for _ in range(world)]
        torch.distributed.all_gather(other, flat)
        assert torch.equal(other[0], other[1]), f"{what} the ranks' parameters differ after the skip"
        trainer.stop.uninstall()


def test_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """dp = 2, the NaN on rank 1 only: the all-reduced decision skips step 2 on both ranks (ZeRO 0: own
    discard; ZeRO 2: gradients already partly reduced, discarded through DeepSpeed's overflow check)."""
    need_corpus()  # built here, once, not by two ranks at the same time
    run_distributed(2, _nan_on_rank_1_only, str(tmp_path))
