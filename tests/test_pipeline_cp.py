"""Pipeline × context parallelism with the FWL state carried across segments, through `fwl train` on 4
gloo processes (pp = 2 × cp = 2, ZeRO-1, data.mode: contiguous), as one scenario against one process:

* it trains like the single process: losses and validation (by position bucket too) within float32
  reduction-order round-off; the carried state is written once per (dp, tp) rank, by the last stage's
  cp rank 0 (the first stage holds no FWL);
* a signal to one rank (the test hook of train/signals.py) stops every rank after step 2 with a
  checkpoint; resumed at the same layout, the run continues bit for bit as the uninterrupted one (model,
  optimizer, data position, carried state);
* conversion both ways: `fwl ckpt convert` of the step-3 checkpoint resumed by one process (pp = cp = 1),
  and the single process's resumed at pp = 2 × cp = 2: the carried state and the stream go on, the next
  steps within round-off of the uninterrupted runs'.

The gradients themselves (every parameter, the body input) are compared in tests/test_engine_parallel.py.
"""
from __future__ import annotations

import pytest

from fwl_scale.checkpoint.native import find_latest
from fwl_scale.train.carried import state_file
from fwl_scale.train.loop import Trainer
from fwl_scale.signal_points import TEST_SIGNAL_ENV
from fwl_scale.train.signals import EXIT_REQUEUE
from tests.train_support import launch_ranks, records, run_fwl, step_losses, tiny_config

STEPS = 6
COMMON = ("data.mode=contiguous", "parallel.micro_batch=2", "parallel.grad_accum=2", f"train.steps={STEPS}",
          "train.eval_every=3", "train.save_every=3", "train.keep_last=3", "train.warmup_steps=2")
PP_CP = ("parallel.pp=2", "parallel.cp=2", "parallel.cp_exchange=state", "parallel.zero_stage=1")
# float32, another summation order (the state scan, gathered keys and values, the dp × cp average).
TOL = 2e-4


def launch(out, *extra: str, **kw) -> list[tuple[int, str]]:
    return launch_ranks(out, *COMMON, *PP_CP, *extra, world=4, **kw)


def close(a: dict[int, float], b: dict[int, float], steps, tol: float = TOL) -> None:
    for s in steps:
        assert abs(a[s] - b[s]) < tol, (s, a[s], b[s])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("pp2cp2")
    for code, log in launch(out):
        assert code == 0, log[-4000:]
    return out


def test_pp_cp_carried_state_trains_like_one_process(tmp_path, uninterrupted):
    one = tmp_path / "one"
    assert Trainer(tiny_config(one, *COMMON)).run() == 0
    ref, got = step_losses(one), step_losses(uninterrupted)
    assert sorted(got) == list(range(1, STEPS + 1))
    close(got, ref, got)
    start = records(uninterrupted, "start")[0]
    assert start["world_size"] == 4 and start["layout"] == {"tp": 1, "cp": 2, "dp": 1, "pp": 2}
    v_ref, v_got = records(one, "valid"), records(uninterrupted, "valid")
    assert [v["step"] for v in v_got] == [3, 6]
    for a, b in zip(v_got, v_ref):
        assert a["tokens"] == b["tokens"] and abs(a["loss"] - b["loss"]) < TOL
        assert all(abs(x - y) < TOL for x, y in zip(a["bucket_loss"], b["bucket_loss"]))
    ckpt = find_latest(uninterrupted / "checkpoints")
    assert sorted(p.name for p in ckpt.path.glob("fwl_state_*.pt")) == [state_file(0, 0)]

    # The other direction: the single process's step-3 checkpoint, converted, resumed at pp = 2 × cp = 2
    # (the last stage's ranks take the carried state, every stage its layers and Adam moments).
    converted = tmp_path / "converted"
    proc = run_fwl("ckpt", "convert", str(one / "checkpoints" / "step_00000003"), str(converted))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for code, log in launch(converted):
        assert code == 0, log[-4000:]
    resumed = step_losses(converted)
    assert sorted(resumed) == [4, 5, 6] and records(converted, "start")[-1]["layout"]["pp"] == 2
    close(resumed, ref, (4, 5, 6))


def test_pp_cp_stop_resume_and_conversion(tmp_path, uninterrupted):
    ref = step_losses(uninterrupted)
    run = tmp_path / "run"
    # Rank 1 (first stage, cp rank 1) alone signals itself at its 3rd step boundary: all stop after step 2.
    results = launch(run, rank_env={1: {TEST_SIGNAL_ENV: "step@3:SIGUSR1"}})
    assert [code for code, _ in results] == [EXIT_REQUEUE] * 4, [log[-2000:] for _, log in results]
    assert records(run, "stop")[-1]["step"] == 2 and find_latest(run / "checkpoints").step == 2
    for code, log in launch(run):
        assert code == 0, log[-4000:]
    assert step_losses(run) == ref  # bit for bit

    converted = tmp_path / "converted"
    proc = run_fwl("ckpt", "convert", str(uninterrupted / "checkpoints" / "step_00000003"), str(converted))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    uref = find_latest(converted / "checkpoints")
    assert uref.meta["universal"] and uref.meta["source_layout"] == {"tp": 1, "cp": 2, "dp": 1, "pp": 2}
    assert (uref.path / state_file(0, 0)).is_file()
    assert Trainer(tiny_config(converted, *COMMON)).run() == 0
    got = step_losses(converted)
    assert sorted(got) == [4, 5, 6]
    close(got, ref, (4, 5, 6))
