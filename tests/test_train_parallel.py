"""Tensor, pipeline and ZeRO-3 data parallelism through `fwl train` on 2 gloo processes (as a launcher
starts them), on real text, against one process with the same global batch:

* tp=2 with sequence parallelism (ZeRO-2), pp=2 (ZeRO-1), dp=2 (ZeRO-3): training losses and validation
  equal the single process (the validation counts every token once, not once per tensor-parallel rank);
  without a terminal, plain log lines instead of a progress bar;
* exact resume (tp=2, pp=2): a run resumed from the step-3 checkpoint continues with the very same losses
  as the uninterrupted run (model, optimizer, schedule, RNG, data position);
* conversion: `fwl ckpt convert` of the step-3 checkpoint of each layout, resumed by one process
  (tp=2 -> 1, pp=2 -> 1, dp=2 -> 1), the single process's resumed with dp=2 (1 -> 2), and the tp=2 run's
  resumed by 4 processes at tp=2 x dp=2 (2 -> 4: the loader at a larger dp, the optimizer state split
  another way): the next steps' losses equal the uninterrupted run's;
* bad input: the native tp=2 checkpoint resumed with tp=1 (refused, naming the conversion), a converted
  checkpoint of another model shape (refused), nothing written in either case; `fwl ckpt consolidate`
  gives the converted checkpoint's weights in one file.

Tolerance: 2e-4 on the losses (as tests/test_train_dp.py: another reduction order over a few Adam steps);
resume in the same layout is compared for equality.
"""
from __future__ import annotations

import pytest
import torch

from fwl_scale.checkpoint.native import CheckpointError, find_latest
from fwl_scale.checkpoint.weights import load_model_weights
from fwl_scale.train.loop import Trainer
from tests.train_support import launch_ranks, records, run_fwl, step_losses, tiny_config

TOL = 2e-4
STEPS = ("train.steps=6", "train.eval_every=3", "train.save_every=3", "train.keep_last=3")
ONE = ("parallel.micro_batch=2", "parallel.grad_accum=2")  # the global batch: 4 rows
LAYOUTS = {
    "tp": ("parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=2", *ONE),
    "pp": ("parallel.pp=2", "parallel.zero_stage=1", *ONE),
    "dp": ("parallel.zero_stage=3", "parallel.micro_batch=2", "parallel.grad_accum=1"),
}


def launch(out, *extra: str, args: tuple[str, ...] = ()) -> list[tuple[int, str]]:
    results = launch_ranks(out, *extra, args=args)
    for code, log in results:
        assert code == 0, log[-4000:]
    return results


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, the same global batch: the reference."""
    out = tmp_path_factory.mktemp("single")
    assert Trainer(tiny_config(out, *ONE, *STEPS)).run() == 0
    return out


@pytest.fixture(scope="module", params=list(LAYOUTS))
def uninterrupted(request, tmp_path_factory):
    name = request.param
    out = tmp_path_factory.mktemp(name)
    logs = launch(out, *LAYOUTS[name], *STEPS)
    return name, out, logs


def close(a: dict[int, float], b: dict[int, float], steps, tol: float = TOL) -> None:
    for s in steps:
        assert abs(a[s] - b[s]) < tol, (s, a[s], b[s])


def test_layout_trains_like_one_process(uninterrupted, single):
    name, out, logs = uninterrupted
    ref, got = step_losses(single), step_losses(out)
    assert sorted(got) == list(range(1, 7))
    close(got, ref, range(1, 7))
    start = records(out, "start")[0]
    assert start["world_size"] == 2 and start["layout"][name] == 2
    v_ref, v_got = records(single, "valid"), records(out, "valid")
    assert [v["step"] for v in v_got] == [3, 6]
    for a, b in zip(v_got, v_ref):
        assert a["tokens"] == b["tokens"] and abs(a["loss"] - b["loss"]) < TOL
    # stderr is a pipe here: one plain line per train.log_every step from rank 0, no redrawn bar.
    log = logs[0][1]
    assert "[step 6/6] loss" in log and "tok/s" in log and "\r" not in log
    assert sum(line.startswith("[step ") and " loss " in line and "validation" not in line
               for line in log.splitlines()) == 6


def test_resume_and_conversion(uninterrupted, tmp_path):
    name, out, _ = uninterrupted
    ref = step_losses(out)
    ckpt = out / "checkpoints" / "step_00000003"
    if name != "dp":  # exact resume in the same layout (ZeRO-3's native resume: tests/test_ckpt_convert.py)
        resumed = tmp_path / "resumed"
        launch(resumed, *LAYOUTS[name], *STEPS, args=("--resume-from", str(ckpt)))
        got = step_losses(resumed)
        assert sorted(got) == [4, 5, 6] and all(got[s] == ref[s] for s in (4, 5, 6)), (got, ref)
    # Conversion, resumed by one process.
    converted = tmp_path / "converted"
    proc = run_fwl("ckpt", "convert", str(ckpt), str(converted))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    uref = find_latest(converted / "checkpoints")
    assert uref.meta["universal"] and uref.step == 3 and uref.meta["source_layout"][name] == 2
    assert Trainer(tiny_config(converted, *ONE, *STEPS)).run() == 0
    got = step_losses(converted)
    assert sorted(got) == [4, 5, 6]
    close(got, ref, (4, 5, 6))
    if name != "tp":
        return

    # --- bad input and consolidation, on the tp=2 run --------------------------------------------
    fresh = tmp_path / "fresh"
    with pytest.raises(CheckpointError, match=r"saved with parallel.tp=2, the config has 1.*fwl ckpt convert"):
        Trainer(tiny_config(fresh, *ONE, *STEPS), resume_from=ckpt)
    with pytest.raises(CheckpointError, match=r"belongs to another model: model.d_model: 32 in the checkpoint"):
        Trainer(tiny_config(fresh, *ONE, *STEPS, "model.d_model=64"), resume_from=uref.path)
    assert not fresh.exists()
    with pytest.raises(CheckpointError, match=r"split over tp=2, pp=1 ranks; convert it first"):
        load_model_weights(find_latest(out / "checkpoints"))  # what fwl eval reads
    single_file = tmp_path / "model.safetensors"
    proc = run_fwl("ckpt", "consolidate", str(uref.path), str(single_file))
    assert proc.returncode == 0, proc.stderr[-3000:]
    from fwl_scale.checkpoint.weights import read_consolidated

    weights, config = read_consolidated(single_file)
    expected = load_model_weights(uref)
    assert weights.keys() == expected.keys() and config["model"]["d_model"] == 32
    assert all(torch.equal(weights[k], expected[k]) for k in weights)


def test_one_process_checkpoint_resumed_on_two(single, tmp_path):
    """The other direction: the single process's step-3 checkpoint, converted, resumed by 2 processes
    with dp = 2 (ZeRO-3: the optimizer state partitioned; the loader continues at a larger dp): the next
    steps' losses equal the single process's."""
    name = "dp"
    converted = tmp_path / "converted"
    proc = run_fwl("ckpt", "convert", str(single / "checkpoints" / "step_00000003"), str(converted))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    launch(converted, *LAYOUTS[name], *STEPS)
    got = step_losses(converted)
    assert sorted(got) == [4, 5, 6] and records(converted, "start")[-1]["layout"][name] == 2
    close(got, step_losses(single), (4, 5, 6))


@pytest.mark.parametrize("uninterrupted", ["tp"], indirect=True)
def test_two_process_checkpoint_resumed_on_four(uninterrupted, single, tmp_path):
    """2 -> 4: the tp=2 (ZeRO-2, dp=1) run's step-3 checkpoint, converted, resumed by 4 processes at
    tp=2 x dp=2 with SP and ZeRO-1 (the same global batch of 4 rows: 2 per data-parallel rank). The next
    steps' losses equal the single process's, and the 2-process run's own."""
    name, out, _ = uninterrupted
    converted = tmp_path / "converted"
    proc = run_fwl("ckpt", "convert", str(out / "checkpoints" / "step_00000003"), str(converted))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    four = ("parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=1", "parallel.micro_batch=2",
            "parallel.grad_accum=1")
    for code, log in launch_ranks(converted, *four, *STEPS, world=4):
        assert code == 0, log[-4000:]
    start = records(converted, "start")[-1]
    assert start["world_size"] == 4 and start["layout"]["tp"] == 2 and start["layout"]["dp"] == 2, start
    got = step_losses(converted)
    assert sorted(got) == [4, 5, 6]
    close(got, step_losses(single), (4, 5, 6))
    close(got, step_losses(out), (4, 5, 6))
