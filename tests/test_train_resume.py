"""Checkpoints: a stop signal saves and exits with EXIT_REQUEUE, a resumed run gives bit-for-bit the losses
of an uninterrupted one (CPU, same process count: the same floating-point operations in the same order),
a crash resumes from the last complete periodic checkpoint and never from a half-written one (also a process
killed at each write step of a save), keep-last-k."""
from __future__ import annotations

import json
import os
import signal

import pytest

from fwl_scale.checkpoint.native import MARKER, POINTER, find_latest
from fwl_scale.train.loop import Trainer
from fwl_scale.signal_points import TEST_SIGNAL_ENV
from fwl_scale.train.signals import EXIT_REQUEUE, STOP_FILE_NAME
from tests.train_support import records, run_fwl, step_losses, tiny_config, tiny_overrides

STEPS = 10
# Gradient accumulation and a non-trivial schedule, so the optimizer, scheduler and loader state all matter.
COMMON = (f"train.steps={STEPS}", "parallel.grad_accum=2", "parallel.micro_batch=2", "train.warmup_steps=3",
          "train.eval_every=5")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert Trainer(tiny_config(out, *COMMON)).run() == 0
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return out, losses


class SignalAt:
    """Sends a real signal to this process after step `step` (the trainer stops at the next boundary)."""

    def __init__(self, step: int, sig: signal.Signals):
        self.step, self.sig, self.sent = step, sig, False

    def __call__(self, trainer, stats) -> None:
        if trainer.state.step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_saves_exits_75_and_resume_is_exact(tmp_path, uninterrupted, sig):
    _, reference = uninterrupted
    out = tmp_path / "run"
    cfg = tiny_config(out, *COMMON)
    before = signal.getsignal(sig)
    trainer = Trainer(cfg, after_step=SignalAt(3, sig))
    assert signal.getsignal(sig) != before  # the trainer's handler is in place while it runs
    assert trainer.run() == EXIT_REQUEUE
    stopped_at = trainer.state.step
    assert stopped_at == 4  # the signal came after step 3's boundary check; step 4's boundary saw it
    ref = find_latest(out / "checkpoints")
    assert ref is not None and ref.step == stopped_at and (ref.path / MARKER).is_file()
    assert (out / "checkpoints" / POINTER).read_text().strip() == ref.tag
    assert records(out, "stop")[-1]["reason"] == sig.name
    assert signal.getsignal(sig) == before  # and the previous one is back after the run

    resumed = Trainer(tiny_config(out, *COMMON))
    assert resumed.state.step == stopped_at
    assert resumed.run() == 0
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == reference  # bit for bit
    valid_ref = {r["step"]: r["loss"] for r in records(uninterrupted[0], "valid")}
    valid = {r["step"]: r["loss"] for r in records(out, "valid")}
    assert valid == valid_ref


def test_crash_resumes_from_last_complete_checkpoint(tmp_path, uninterrupted):
    _, reference = uninterrupted
    out = tmp_path / "run"

    class Crash(Exception):
        pass

    def crash_after_5(trainer, stats):
        if trainer.state.step == 5:
            raise Crash  # no warning: no checkpoint at 5

    with pytest.raises(Crash):
        Trainer(tiny_config(out, *COMMON, "train.save_every=3"), after_step=crash_after_5).run()
    root = out / "checkpoints"
    assert find_latest(root).step == 3
    # A save that died half-way (shards written, no marker) must never be resumed from, even if newer,
    # and even if DeepSpeed's own `latest` file points at it.
    broken = root / "step_00000004"
    broken.mkdir()
    (broken / "mp_rank_00_model_states.pt").write_bytes(b"half a checkpoint")
    (root / "latest").write_text("step_00000004")
    resumed = Trainer(tiny_config(out, *COMMON, "train.save_every=3"))
    assert resumed.state.step == 3
    assert resumed.run() == 0
    assert step_losses(out) == reference  # steps 4-5 were redone with the same result
    # keep_last=2: only the newest two complete checkpoints remain; the broken directory is gone.
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000009", "step_00000010"]


def test_stop_file_stops_and_is_removed(tmp_path, uninterrupted):
    _, reference = uninterrupted
    out = tmp_path / "run"

    def touch_stop(trainer, stats):
        if trainer.state.step == 6:
            (out / STOP_FILE_NAME).touch()

    assert Trainer(tiny_config(out, *COMMON), after_step=touch_stop).run() == EXIT_REQUEUE
    assert not (out / STOP_FILE_NAME).exists()
    assert find_latest(out / "checkpoints").step == 7  # touched after step 6: seen at step 7's boundary
    assert Trainer(tiny_config(out, *COMMON)).run() == 0
    assert step_losses(out) == reference


def test_wandb_run_id_survives_a_requeue(tmp_path):
    out = tmp_path / "run"
    extra = ("train.steps=4", "train.wandb.enabled=true", "train.wandb.mode=offline")
    assert Trainer(tiny_config(out, *extra), after_step=SignalAt(1, signal.SIGUSR1)).run() == EXIT_REQUEUE
    run_id = (out / "wandb_run_id").read_text().strip()
    assert run_id
    ckpt = find_latest(out / "checkpoints")
    meta = json.loads((ckpt.path / MARKER).read_text())
    assert meta["step"] == 2
    (out / "wandb_run_id").unlink()  # the id also travels in the checkpoint's client state
    trainer = Trainer(tiny_config(out, *extra))
    assert trainer.metrics.run_id == run_id
    assert trainer.run() == 0
    assert (out / "wandb_run_id").read_text().strip() == run_id
    offline_runs = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline_runs) >= 1


def test_latest_is_the_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"

    def make(step: int, complete: bool) -> None:
        d = root / f"step_{step:08d}"
        d.mkdir(parents=True)
        if complete:
            (d / MARKER).write_text(json.dumps({"format": 1, "step": step, "model": {}}))

    assert find_latest(root) is None
    make(3, True)
    make(6, True)
    make(9, False)  # died while saving
    assert find_latest(root).step == 6  # no pointer yet (crash before the first pointer write)
    (root / POINTER).write_text("step_00000003\n")
    # Crash after step 6's marker, before the pointer moved: 6 is complete and is the latest.
    assert find_latest(root).step == 6
    (root / "step_00000006" / MARKER).unlink()
    assert find_latest(root).step == 3


def test_killed_at_each_write_of_a_save_resumes_from_a_complete_checkpoint(tmp_path):
    """`fwl train` killed (SIGKILL, through the test hook in fwl_scale/train/signals.py) at each write
    step of CheckpointManager.save, one run after another on the same directory: the marker never
    precedes the data, every resume starts from the newest complete checkpoint, and the run ends with
    the uninterrupted losses (of the same command uninterrupted: `fwl train` runs with OMP_NUM_THREADS=1,
    and another thread count may round a matmul differently than the in-process fixture does)."""
    out = tmp_path / "run"
    root = out / "checkpoints"
    args = ("train", *tiny_overrides(out, *COMMON, "train.save_every=3", "train.keep_last=2"))
    ref_out = tmp_path / "reference"
    proc = run_fwl("train", *tiny_overrides(ref_out, *COMMON, "train.save_every=3", "train.keep_last=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = step_losses(ref_out)
    assert sorted(reference) == list(range(1, STEPS + 1))

    def killed_at(point: str) -> None:
        proc = run_fwl(*args, **{TEST_SIGNAL_ENV: point})
        assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr[-3000:])

    # The save at step 6 (the second one) dies after DeepSpeed's files, before the marker.
    killed_at("ckpt_data@2:SIGKILL")
    assert (root / "step_00000006").is_dir() and not (root / "step_00000006" / MARKER).exists()
    assert find_latest(root).step == 3
    # Resumed from 3; the save at 6 dies after the marker, before the pointer moved: 6 is complete.
    killed_at("ckpt_marker@1:SIGKILL")
    assert (root / POINTER).read_text().strip() == "step_00000003" and find_latest(root).step == 6
    # Resumed from 6; the save at 9 dies after the pointer, before older checkpoints are pruned.
    killed_at("ckpt_pointer@1:SIGKILL")
    assert find_latest(root).step == 9 and (root / "step_00000003").is_dir()
    proc = run_fwl(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in records(out, "start")] == [0, 3, 6, 9]
    assert step_losses(out) == reference  # steps redone after each crash, with the same result
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000009", "step_00000010"]
