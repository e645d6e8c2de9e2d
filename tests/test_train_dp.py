"""Data parallelism through `fwl train` on 2 gloo processes (as a launcher starts them: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment): dp=2 equals dp=1 with the same global batch; a
signal delivered to one rank only stops both at the same step with a checkpoint and exit 75; the resumed
run continues exactly, with dp=2 and also with dp=1; bf16 training at dp=2 follows one bf16 process."""
from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch

from fwl_scale.checkpoint.native import find_latest
from fwl_scale.checkpoint.weights import load_model_weights
from fwl_scale.train.loop import Trainer
from fwl_scale.signal_points import TEST_HOLD_ENV, TEST_SIGNAL_ENV
from fwl_scale.train.signals import EXIT_REQUEUE
from tests.test_train_nonfinite import poison
from tests.train_support import launch_ranks, records, step_losses, tiny_config

# The same global batch of 8 rows: dp=1 accumulates 4 micro-batches of 2 rows; with dp=2 each rank
# accumulates 2 micro-batches of 2 rows (the loader hands rank d rows [2d, 2d+2) of each global
# micro-batch of 4 rows), so accumulation and the all-reduce are both exercised.
DP1 = ("parallel.micro_batch=2", "parallel.grad_accum=4")
DP2 = ("parallel.micro_batch=2", "parallel.grad_accum=2")
# Different reduction order (all-reduce average vs accumulation) changes the last bits of the
# gradients; over a few Adam steps the losses stay this close.
TOL = 2e-4


STEPS = ("train.steps=24", "train.eval_every=12")


@pytest.fixture(scope="module")
def dp2_reference(tmp_path_factory):
    """An uninterrupted dp=2 run (with a prefetching loader worker per rank)."""
    out = tmp_path_factory.mktemp("dp2")
    for code, log in launch_ranks(out, *DP2, *STEPS, "data.loader_workers=1"):
        assert code == 0, log[-3000:]
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, 25))
    assert records(out, "start")[0]["world_size"] == 2
    return out, losses


def test_dp2_matches_dp1_with_the_same_global_batch(tmp_path, dp2_reference):
    dp2, l2 = dp2_reference
    dp1 = tmp_path / "dp1"
    assert Trainer(tiny_config(dp1, *DP1, *STEPS)).run() == 0
    l1 = step_losses(dp1)
    assert sorted(l1) == sorted(l2)
    for s in l1:
        assert abs(l1[s] - l2[s]) < TOL, (s, l1[s], l2[s])
    assert l1[24] < l1[1] - 0.3  # it trained
    v1, v2 = records(dp1, "valid"), records(dp2, "valid")
    assert [v["step"] for v in v1] == [v["step"] for v in v2] == [12, 24]
    for a, b in zip(v1, v2):
        assert a["tokens"] == b["tokens"] and abs(a["loss"] - b["loss"]) < TOL
    w1 = load_model_weights(find_latest(dp1 / "checkpoints"))
    w2 = load_model_weights(find_latest(dp2 / "checkpoints"))
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-4, rtol=0), k


def test_dp2_zero2_matches_zero0(tmp_path, dp2_reference):
    """ZeRO-2 (gradients reduced into partitions during backward, optimizer state sharded) with
    accumulation over an explicit boundary: the same training as ZeRO-0."""
    _, ref_losses = dp2_reference
    out = tmp_path / "zero2"
    for code, log in launch_ranks(out, *DP2, *STEPS, "parallel.zero_stage=2"):
        assert code == 0, log[-3000:]
    losses = step_losses(out)
    assert sorted(losses) == sorted(ref_losses)
    for s in losses:
        assert abs(losses[s] - ref_losses[s]) < TOL, (s, losses[s], ref_losses[s])
    assert find_latest(out / "checkpoints").meta["zero_stage"] == 2


def test_bf16_dp2_trains_like_one_bf16_process(tmp_path):
    """bf16 through `fwl train`, 8 steps: dp=2 with ZeRO-1 (DeepSpeed's ZeRO optimizer holds the fp32
    masters) against one process with ZeRO-0 (its bf16 optimizer wrapper, whose initial zero-gradient step
    the engine undoes), the same global batch. Measured: at most 2.0e-4 apart. The bound, 1e-3, is checked
    here against a wrong update: the one-process run with step 3 dropped (its loss made NaN, so the step is
    skipped) moves every later loss by 2.7e-2 or more (half the learning rate: by 2e-2 or more)."""
    bf16, tol = "train.bf16=true", 1e-3
    one, dp2, dropped = tmp_path / "one", tmp_path / "dp2", tmp_path / "dropped"
    assert Trainer(tiny_config(one, *DP1, bf16)).run() == 0
    for code, log in launch_ranks(dp2, *DP2, bf16, "parallel.zero_stage=1"):
        assert code == 0, log[-3000:]
    ref, got = step_losses(one), step_losses(dp2)
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    assert records(dp2, "start")[0]["world_size"] == 2 and find_latest(dp2 / "checkpoints").meta["zero_stage"] == 1
    for s in ref:
        assert abs(got[s] - ref[s]) < tol, (s, got[s], ref[s])
    trainer = Trainer(tiny_config(dropped, *DP1, bf16))
    poison(trainer, {8})  # the first micro-batch of step 3 (4 per step): the whole step is skipped
    assert trainer.run() == 0
    wrong = step_losses(dropped)
    assert [r["step"] for r in records(dropped, "skip")] == [3]
    assert min(abs(wrong[s] - ref[s]) for s in range(4, 9)) > 10 * tol


def test_signal_to_one_rank_stops_both_at_the_same_step_and_resumes(tmp_path, dp2_reference):
    _, ref_losses = dp2_reference
    run = tmp_path / "run"
    # Rank 1 sends itself SIGUSR1 at its 6th step boundary (after step 5; the hook in
    # fwl_scale/train/signals.py); rank 0 gets no signal.
    results = launch_ranks(run, *DP2, *STEPS, rank_env={1: {TEST_SIGNAL_ENV: "step@6:SIGUSR1"}})
    assert [code for code, _ in results] == [EXIT_REQUEUE, EXIT_REQUEUE], [out[-2000:] for _, out in results]
    stop = records(run, "stop")[-1]
    stopped_at = stop["step"]
    assert stopped_at == 5  # both ranks stopped at the boundary where rank 1 was signalled
    assert stop["reason"] == "another rank"  # rank 0 got no signal: it stopped on rank 1's request
    assert find_latest(run / "checkpoints").step == stopped_at
    assert max(step_losses(run)) == stopped_at  # no rank went on past the agreed step

    # Resume with dp=2 (the requeued job; here without a loader worker): bit-for-bit the uninterrupted run.
    run_dp1 = tmp_path / "run_dp1"
    shutil.copytree(run, run_dp1)
    for code, out in launch_ranks(run, *DP2, *STEPS):
        assert code == 0, out[-3000:]
    assert step_losses(run) == ref_losses
    # Resume the same checkpoint with dp=1 (same global batch through accumulation): the loader continues
    # with the rows not yet consumed, the losses follow within the dp tolerance.
    assert Trainer(tiny_config(run_dp1, *DP1, *STEPS)).run() == 0
    resumed = step_losses(run_dp1)
    assert sorted(resumed) == list(range(1, 25))
    for s in range(stopped_at + 1, 25):
        assert abs(resumed[s] - ref_losses[s]) < 5 * TOL, (s, resumed[s], ref_losses[s])


def test_bad_data_on_rank_0_stops_every_rank(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    # No rank may wait for rank 0 forever.
    results = launch_ranks(tmp_path / "run", *DP2, f"data.train=[{empty}]", f"data.root={tmp_path / 'data'}",
                           timeout=120)
    assert results[0][0] == 2 and "empty.jsonl" in results[0][1], results[0][1][-2000:]
    assert results[1][0] == 2 and "data preparation failed on rank 0" in results[1][1], results[1][1][-2000:]


def test_a_slow_data_preparation_outlasts_the_collective_timeout(tmp_path):
    """Rank 0 held once its data is prepared, well past train.collective_timeout_s while rank 1 waits for
    it: the wait has its own group and timeout (train.data_prep_timeout_s), so the run trains to its end.
    On the job's group rank 1's collective would end the job after the timeout (NCCL: an abort)."""
    hold = tmp_path / "release"
    timeout_s = 10
    releaser = threading.Thread(target=_release_after, args=(hold, 3 * timeout_s), daemon=True)
    releaser.start()
    results = launch_ranks(tmp_path / "run", *DP2, "train.steps=2", f"train.collective_timeout_s={timeout_s}",
                           rank_env={0: {TEST_HOLD_ENV: f"data_ready@1:{hold}"}}, timeout=300)
    releaser.join()
    assert hold.with_name("release.reached").exists()
    for code, log in results:
        assert code == 0, log[-3000:]
    assert sorted(step_losses(tmp_path / "run")) == [1, 2]


def _release_after(hold, seconds: float) -> None:
    """Releases the hold `seconds` after rank 0 reached it (rank 1 is waiting for it all that time)."""
    reached = hold.with_name(hold.name + ".reached")
    while not reached.exists():
        time.sleep(0.1)
    time.sleep(seconds)
    hold.touch()
