"""Checkpoint faults (issue 24, items 3 and 4), each injected deterministically (a test hook or an edit of
the files, never a race with sleeps):

* a damaged newest checkpoint (one byte of a file changed): a resume verifies the checksums its marker
  recorded, falls back to the newest intact checkpoint with a warning naming the damaged file, sets the
  damaged one aside (kept, never deleted) and ends with the losses of the uninterrupted run; a damaged
  checkpoint the user names (`fwl eval`) is refused naming the file;
* a full disk in the middle of a save (ENOSPC part-way through a chosen file, $FWL_TEST_FAULT): the run
  exits 2 right after the failed save with one message naming the rank, step, file, the space needed and free;
  the partial save is removed, the previous checkpoint stays the newest, and the resumed run ends with
  the losses of the run that was not interrupted;
* both on 2 ranks (dp=2, ZeRO-1): the marker records the files of both ranks, a full disk on rank 1 only
  stops both ranks at once (no rank waits at a barrier), and a damaged shard written by rank 1 makes
  both ranks fall back to the same checkpoint;
* the fallback's decisions on hand-made checkpoint directories (no training): a corrupt marker, a
  truncated or missing file, no intact checkpoint at all, a checkpoint from before the checksums.

The resumed losses are compared bit for bit (same process count, same floating-point operations) with
those of a run without the fault: the faulted run itself where it trained without a break up to its last
step (a damaged checkpoint of a finished run, a full disk at the last save), else a reference run of the
same command.
"""
from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import pytest

from fwl_scale.checkpoint.native import (DAMAGED_SUFFIX, MARKER, POINTER, CheckpointError, CheckpointManager,
                                         CheckpointRef, checkpoint_files, find_latest, hash_files, read_marker,
                                         resolve_checkpoint, verify_checkpoint)
from fwl_scale.cli import main
from fwl_scale.signal_points import TEST_FAULT_ENV, parse_test_fault
from fwl_scale.train.loop import Trainer
from tests.train_support import launch_ranks, records, run_fwl, step_losses, tiny_config, tiny_overrides

STEPS = 6
# Saves at steps 3 and 6; gradient accumulation and a schedule, so that optimizer, scheduler and loader
# state all matter for the resumed losses.
COMMON = (f"train.steps={STEPS}", "train.save_every=3", "parallel.grad_accum=2", "parallel.micro_batch=2",
          "train.warmup_steps=3", "train.keep_last=2")


def flip_byte(path: Path) -> bytes:
    """Changes one byte in the middle of `path` (same size: only the checksum can tell); returns the new
    content."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return bytes(data)


def step_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run trained in this process without a break: checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert Trainer(tiny_config(out, *COMMON)).run() == 0
    assert sorted(step_losses(out)) == list(range(1, STEPS + 1))
    return out


def test_every_file_of_a_save_has_its_checksum_in_the_marker(finished_run):
    root = finished_run / "checkpoints"
    for tag in ("step_00000003", "step_00000006"):
        meta = read_marker(root / tag)
        assert sorted(meta["files"]) == checkpoint_files(root / tag) == ["mp_rank_00_model_states.pt"]
        assert meta["files"] == hash_files(root / tag, meta["files"])  # size and sha256 of what is on disk
        assert verify_checkpoint(CheckpointRef(root, tag, meta)) is True


def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, finished_run, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    root = out / "checkpoints"
    reference = step_losses(out)
    damaged_file = root / "step_00000006" / "mp_rank_00_model_states.pt"
    damaged_bytes = flip_byte(damaged_file)
    capsys.readouterr()

    resumed = Trainer(tiny_config(out, *COMMON))
    err = capsys.readouterr().err
    assert resumed.state.step == 3  # the newest intact checkpoint
    kept = root / f"step_00000006{DAMAGED_SUFFIX}"
    assert (f"fwl train: warning: checkpoint {root / 'step_00000006'} is damaged: {damaged_file}: its sha256 "
            f"differs from the one recorded when it was saved. Skipped: resuming from {root / 'step_00000003'} "
            f"(step 3) instead. The damaged checkpoint is kept as {kept}") in err
    # Set aside, not deleted; the pointer names the checkpoint resumed from, so nothing else picks it up.
    assert (kept / damaged_file.name).read_bytes() == damaged_bytes
    assert (root / POINTER).read_text().strip() == "step_00000003"
    assert find_latest(root).step == 3

    assert resumed.run() == 0
    assert step_losses(out) == reference  # steps 4-6 redone with the same losses, bit for bit
    start = records(out, "start")[-1]
    assert start["step"] == 3 and start["skipped_checkpoints"] == [
        {"path": str(root / "step_00000006"), "kept_as": str(kept),
         "problem": f"{damaged_file}: its sha256 differs from the one recorded when it was saved"}]
    # Step 6 saved again, intact; the pruning (keep_last=2) never touches the damaged one.
    assert step_dirs(root) == ["step_00000003", "step_00000006", kept.name]
    assert verify_checkpoint(find_latest(root)) is True
    assert (kept / damaged_file.name).read_bytes() == damaged_bytes


def test_fwl_eval_refuses_a_damaged_checkpoint_naming_the_file(tmp_path, finished_run, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    root = out / "checkpoints"
    damaged_file = root / "step_00000006" / "mp_rank_00_model_states.pt"
    flip_byte(damaged_file)
    config = str(out / "config.yaml")
    capsys.readouterr()
    # Named by its directory or through its run: refused, no fallback (the user chose it); the run's
    # older checkpoint is named as the one to ask for instead.
    for named in (root / "step_00000006", out):
        assert main(["eval", config, str(named), "--batches", "1"]) == 2
        err = capsys.readouterr().err
        assert (f"fwl: error: checkpoint {root / 'step_00000006'} is damaged: {damaged_file}: its sha256 differs "
                "from the one recorded when it was saved; it is not used.") in err
        assert f"can be named instead: {root / 'step_00000003'}" in err
    assert main(["eval", config, str(root / "step_00000003"), "--batches", "1"]) == 0
    assert f"checkpoint {root / 'step_00000003'} (step 3)" in capsys.readouterr().out
    assert damaged_file.is_file()  # evaluation never moves anything


def _released_bytes(message: str) -> int:
    m = re.search(r"was removed \(([\d,]+) bytes released\)", message)
    assert m, message
    return int(m.group(1).replace(",", ""))


def test_full_disk_mid_save_stops_with_one_message_and_the_resume_matches(tmp_path):
    """`fwl train` with ZeRO-1 writes two files per save (model states, optimizer shard), saving at steps 2,
    4 and 6. The 4th write of the process, the optimizer shard of the save at step 4, fails with ENOSPC
    part-way, after the model states of that save were written."""
    overrides = (*COMMON, "train.save_every=2", "parallel.zero_stage=1")
    reference = tmp_path / "reference"  # the same command without the fault
    proc = run_fwl("train", *tiny_overrides(reference, *overrides))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run"
    root = out / "checkpoints"
    args = ("train", *tiny_overrides(out, *overrides))
    proc = run_fwl(*args, **{TEST_FAULT_ENV: "ckpt_write@4:ENOSPC"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("fwl: error: "), proc.stderr[-3000:]
    message = errors[0]
    partial = root / "step_00000004"
    previous_bytes = sum(p.stat().st_size for p in (root / "step_00000002").iterdir())
    assert (f"rank 0: checkpoint of step 4 not saved: writing {partial / 'zero_pp_rank_0_mp_rank_00_optim_states.pt'}"
            " failed: No space left on device.") in message
    assert f"It needs about {previous_bytes:,} bytes" in message and "the size of the previous checkpoint" in message
    assert re.search(r"; [\d,]+ bytes \([\d.]+ \w+\) are free on that file system", message), message
    assert f"the newest complete checkpoint is still {root / 'step_00000002'} (step 2)" in message
    # The run stopped at the failed save. The partial save is gone (the model states and the part of the
    # shard it had written: its space released), nothing half-written is left, the previous checkpoint is
    # the newest.
    assert max(step_losses(out)) == 4
    assert _released_bytes(message) > 0 and not partial.exists()
    assert step_dirs(root) == ["step_00000002"] and not list(root.glob(".*"))
    assert find_latest(root).step == 2 and (root / POINTER).read_text().strip() == "step_00000002"

    proc = run_fwl(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in records(out, "start")] == [0, 2]
    assert step_losses(out) == step_losses(reference)  # bit for bit
    assert verify_checkpoint(find_latest(root)) is True


def test_two_ranks_full_disk_on_one_rank_and_a_damaged_shard(tmp_path):
    """dp=2, ZeRO-1: rank 0 writes the model states and its optimizer shard, rank 1 its optimizer shard.
    Saves at 2, 4, 6; the third write of rank 1 (its shard of the save at step 6) fails with ENOSPC. Both
    ranks must end within the launch's timeout of 400 s, below the collective timeout (600 s): a rank left
    waiting at a barrier for the other would fail the test."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    dp2 = ("parallel.micro_batch=2", "parallel.grad_accum=2", "parallel.zero_stage=1", f"train.steps={STEPS}",
           "train.save_every=2", "train.keep_last=3")
    results = launch_ranks(run, *dp2, rank_env={1: {TEST_FAULT_ENV: "ckpt_write@3:ENOSPC"}}, timeout=400)
    assert [code for code, _ in results] == [2, 2], [log[-2000:] for _, log in results]
    shard1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert (f"fwl: error: rank 1: checkpoint of step 6 not saved: writing {root / 'step_00000006' / shard1} "
            "failed: No space left on device.") in results[0][1]
    assert "It needs about" in results[0][1] and "are free on that file system" in results[0][1]
    assert ("fwl: error: rank 1: checkpoint of step 6 not saved: a write failed on rank 1; rank 0's message "
            "names the file") in results[1][1]
    assert step_dirs(root) == ["step_00000002", "step_00000004"] and find_latest(root).step == 4
    uninterrupted = step_losses(run)
    assert sorted(uninterrupted) == list(range(1, STEPS + 1))
    # The marker records the files of both ranks.
    meta = read_marker(root / "step_00000004")
    assert sorted(meta["files"]) == checkpoint_files(root / "step_00000004") == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", shard1]
    assert verify_checkpoint(find_latest(root)) is True

    # Rank 1's shard of the newest checkpoint is damaged: both ranks fall back to step 2 together.
    damaged_file = root / "step_00000004" / shard1
    flip_byte(damaged_file)
    results = launch_ranks(run, *dp2, timeout=400)
    assert [code for code, _ in results] == [0, 0], [log[-2000:] for _, log in results]
    assert f"fwl train: warning: checkpoint {root / 'step_00000004'} is damaged: {damaged_file}" in results[0][1]
    assert "fwl train: warning" not in results[1][1]  # one message, from rank 0
    assert [r["step"] for r in records(run, "start")] == [0, 2]
    assert step_losses(run) == uninterrupted  # steps 3-6 redone with the same losses on both ranks
    assert step_dirs(root) == ["step_00000002", "step_00000004", f"step_00000004{DAMAGED_SUFFIX}", "step_00000006"]


# ------------------------------------------------------------------ the fallback on hand-made directories
def make_checkpoint(root: Path, step: int, files: dict[str, bytes], checksums: bool = True) -> Path:
    """A checkpoint directory as a save leaves it: files, then the marker with their checksums."""
    tag_dir = root / f"step_{step:08d}"
    tag_dir.mkdir(parents=True)
    for name, data in files.items():
        (tag_dir / name).write_bytes(data)
    meta = {"format": 1, "step": step, "model": {}}
    if checksums:
        meta["files"] = hash_files(tag_dir, files)
    (tag_dir / MARKER).write_text(json.dumps(meta))
    (root / POINTER).write_text(tag_dir.name + "\n")
    return tag_dir


def test_fallback_past_corrupt_marker_truncated_and_missing_files(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, rank=0)
    root = manager.root
    files = {"model.pt": b"m" * 100, "optim.pt": b"o" * 300}
    for step in (2, 4, 6, 8):
        make_checkpoint(root, step, files)
    (root / "step_00000008" / MARKER).write_text('{"format": 1, "step": 8, "mo')  # a torn marker
    (root / "step_00000006" / "optim.pt").write_bytes(b"o" * 299)  # truncated
    (root / "step_00000004" / "model.pt").unlink()

    point = manager.resume_point()
    assert point.ref.step == 2 and point.verified
    assert [(s.path.name, s.kept_as.name) for s in point.skipped] == [
        ("step_00000008", "step_00000008.damaged"), ("step_00000006", "step_00000006.damaged"),
        ("step_00000004", "step_00000004.damaged")]
    problems = [s.problem for s in point.skipped]
    assert f"{MARKER} is corrupt" in problems[0]
    assert problems[1] == f"{root / 'step_00000006' / 'optim.pt'}: 299 bytes, 300 when it was saved"
    assert problems[2] == f"{root / 'step_00000004' / 'model.pt'}: missing"
    assert step_dirs(root) == ["step_00000002", "step_00000004.damaged", "step_00000006.damaged",
                               "step_00000008.damaged"]
    assert (root / POINTER).read_text().strip() == "step_00000002"

    # Damaged again at a step already set aside once: kept under the next free name.
    (make_checkpoint(root, 8, files) / "model.pt").write_bytes(b"x" * 100)
    assert [s.kept_as.name for s in manager.resume_point().skipped] == ["step_00000008.damaged2"]


def test_no_intact_checkpoint_is_an_error_and_moves_nothing(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, rank=0)
    root = manager.root
    for step in (3, 6):
        (make_checkpoint(root, step, {"model.pt": b"m" * 10}) / "model.pt").write_bytes(b"M" * 10)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint to resume from in .*step_00000006/model.pt: its "
                                              r"sha256 differs.*step_00000003/model.pt: its sha256 differs.*"
                                              r"Nothing was moved or removed"):
        manager.resume_point()
    assert step_dirs(root) == ["step_00000003", "step_00000006"]
    assert (root / POINTER).read_text().strip() == "step_00000006"
    with pytest.raises(CheckpointError, match=r"step_00000006 is damaged: .*model.pt: its sha256 differs.*"
                                              r"can be named instead: .*step_00000003"):
        resolve_checkpoint(tmp_path)


def test_a_checkpoint_from_before_the_checksums_loads_unverified(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, rank=0)
    make_checkpoint(manager.root, 5, {"model.pt": b"m"}, checksums=False)
    point = manager.resume_point()
    assert point.ref.step == 5 and not point.verified and point.skipped == []
    assert verify_checkpoint(resolve_checkpoint(tmp_path)) is False
    assert CheckpointManager(tmp_path / "empty", keep_last=2, rank=0).resume_point().ref is None


def test_the_fault_hook_is_checked_like_the_signal_hooks():
    assert parse_test_fault("ckpt_write@3:ENOSPC") == ("ckpt_write", 3, errno.ENOSPC)
    for bad in ("ckpt_write@3:NOSPACE", "ckpt_write@0:ENOSPC", "step@1:ENOSPC", "ckpt_write:ENOSPC"):
        with pytest.raises(ValueError, match=r"\$FWL_TEST_FAULT="):
            parse_test_fault(bad)
