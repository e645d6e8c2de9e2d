"""Context parallelism through `fwl train` on 2 gloo processes (cp = 2, dp = 1), in contiguous mode with
the FWL state carried across segments: it trains like the single-process run (losses and validation
within float32 reduction-order round-off), a signal to one rank stops both with a checkpoint, and the
resumed run continues bit for bit with cp = 2, and within round-off with cp = 1 (the carried state and
the data position move to the other layout)."""
from __future__ import annotations

import shutil

import pytest

from fwl_scale.train.carried import state_file
from fwl_scale.checkpoint.native import find_latest
from fwl_scale.train.loop import Trainer
from fwl_scale.signal_points import TEST_SIGNAL_ENV
from fwl_scale.train.signals import EXIT_REQUEUE
from tests.train_support import launch_ranks, records, step_losses, tiny_config

COMMON = ("data.mode=contiguous", "parallel.micro_batch=2", "parallel.grad_accum=2", "train.steps=10",
          "train.eval_every=5", "train.warmup_steps=2")
CP2 = ("parallel.cp=2", "parallel.cp_exchange=state")
# float32, another summation order (the state scan, gathered attention keys, the dp×cp average).
TOL = 2e-4


@pytest.fixture(scope="module")
def cp2_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp2")
    for code, log in launch_ranks(out, *COMMON, *CP2):
        assert code == 0, log[-3000:]
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, 11))
    return out, losses


def test_cp2_matches_single_process(tmp_path, cp2_reference):
    cp2, l2 = cp2_reference
    one = tmp_path / "cp1"
    assert Trainer(tiny_config(one, *COMMON)).run() == 0
    l1 = step_losses(one)
    for s in l1:
        assert abs(l1[s] - l2[s]) < TOL, (s, l1[s], l2[s])
    v1, v2 = records(one, "valid"), records(cp2, "valid")
    assert [v["step"] for v in v1] == [v["step"] for v in v2] == [5, 10]
    for a, b in zip(v1, v2):
        assert abs(a["loss"] - b["loss"]) < TOL
        assert all(abs(x - y) < TOL for x, y in zip(a["bucket_loss"], b["bucket_loss"]))
    ckpt = find_latest(cp2 / "checkpoints")
    assert (ckpt.path / state_file(0, 0)).is_file()  # written once: the state is replicated over cp


def test_cp2_signal_and_exact_resume(tmp_path, cp2_reference):
    _, ref_losses = cp2_reference
    run = tmp_path / "run"
    # Rank 1 alone sends itself SIGUSR1 at its 4th step boundary (after step 3; the test hook in
    # fwl_scale/train/signals.py): both ranks stop there with a checkpoint.
    results = launch_ranks(run, *COMMON, *CP2, rank_env={1: {TEST_SIGNAL_ENV: "step@4:SIGUSR1"}})
    assert [code for code, _ in results] == [EXIT_REQUEUE, EXIT_REQUEUE], [out[-2000:] for _, out in results]
    stopped_at = records(run, "stop")[-1]["step"]
    assert stopped_at == 3 and find_latest(run / "checkpoints").step == 3
    run_cp1 = tmp_path / "run_cp1"
    shutil.copytree(run, run_cp1)
    for code, out in launch_ranks(run, *COMMON, *CP2):
        assert code == 0, out[-3000:]
    assert step_losses(run) == ref_losses  # bit for bit
    # The same checkpoint resumed in one process (cp = 1): the carried state and the stream go on.
    assert Trainer(tiny_config(run_cp1, *COMMON)).run() == 0
    resumed = step_losses(run_cp1)
    for s in range(stopped_at + 1, 11):
        assert abs(resumed[s] - ref_losses[s]) < 5 * TOL, (s, resumed[s], ref_losses[s])
