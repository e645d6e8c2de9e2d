"""Bad input to `fwl train` / `fwl eval`: a clear error naming the file, field or checkpoint, a non-zero
exit, and nothing already written destroyed or changed."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fwl_scale.cli import main
from fwl_scale.checkpoint.native import MARKER, POINTER, CheckpointError, find_latest
from fwl_scale.train.loop import Trainer
from tests.train_support import need_corpus, run_fwl, tiny_config, tiny_overrides


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    assert Trainer(tiny_config(out, "train.steps=3", "train.eval_every=3")).run() == 0
    return out


def fwl_main(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def test_malformed_yaml_and_unknown_keys(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: [32\n")
    res = run_fwl("train", str(bad), timeout=120)  # as a process: the exit status and stderr
    assert res.returncode == 2
    assert f"{bad}: malformed YAML" in res.stderr
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  d_modle: 32\n")
    code, err = fwl_main(capsys, "train", str(unknown))
    assert code == 2 and f"{unknown}: unknown key model.d_modle" in err
    code, err = fwl_main(capsys, "eval", str(unknown), str(tmp_path))
    assert code == 2 and "unknown key model.d_modle" in err
    code, err = fwl_main(capsys, "params", "configs/tiny.yaml", "train.nonsense=1")
    assert code == 2 and "unknown key train.nonsense" in err
    code, err = fwl_main(capsys, "train", "configs/tiny.yaml", "model.n_heads=3")
    assert code == 2 and "model.n_heads: must divide model.d_model" in err
    assert not (Path.cwd() / "runs" / "unknown").exists()


def test_invalid_layout_or_world_size_is_refused_before_any_work(capsys, tmp_path):
    need_corpus()
    # A layout the model cannot be split by: named field, exit 2, nothing written.
    code, err = fwl_main(capsys, "train", *tiny_overrides(tmp_path / "run", "parallel.tp=3"))
    assert code == 2 and "parallel.tp: must divide model.n_heads" in err, err
    # A valid layout for another world size (this process is a world of one).
    code, err = fwl_main(capsys, "train", *tiny_overrides(tmp_path / "run", "parallel.tp=2"))
    assert code == 2 and "world size 1 is not a multiple of tp*cp*pp" in err, err
    # A combination the engine does not serve, refused as such before the world size is looked at.
    code, err = fwl_main(capsys, "train", *tiny_overrides(tmp_path / "run", "parallel.pp=2", "parallel.cp=2",
                                                          "parallel.tp=2"))
    assert code == 2 and "parallel.tp: pipeline × context × tensor parallelism (pp=2, cp=2, tp=2)" in err, err
    assert not (tmp_path / "run").exists()


def test_empty_corpus_is_a_clear_error(capsys, tmp_path):
    need_corpus()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err = fwl_main(capsys, "train", *tiny_overrides(tmp_path / "run", f"data.train=[{empty}]",
                                                          f"data.root={tmp_path / 'data'}"))
    assert code == 2 and "empty.jsonl" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_foreign_checkpoint_is_refused_and_nothing_changes(capsys, trained_run):
    before = tree_digest(trained_run)
    code, err = fwl_main(capsys, "train", *tiny_overrides(trained_run, "train.steps=6", "model.d_model=64",
                                                          "model.n_heads=4"))
    assert code == 2
    assert "belongs to another model" in err and "model.d_model: 32 in the checkpoint, 64 in the config" in err
    assert str(trained_run / "checkpoints" / "step_00000003") in err
    code, err = fwl_main(capsys, "eval", "configs/tiny.yaml", str(trained_run))
    assert code == 2 and "belongs to another model" in err
    assert tree_digest(trained_run) == before


def test_corrupt_checkpoint_is_named_and_nothing_changes(capsys, trained_run, tmp_path):
    """The run's only checkpoint is damaged: no intact one to fall back to (tests/test_checkpoint_faults.py
    has the fallback), so training and evaluation both stop naming the file, and nothing is moved."""
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    states = run / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt"
    size = states.stat().st_size
    states.write_bytes(states.read_bytes()[:1000])  # truncated by a full disk, say
    before = tree_digest(run)
    damage = f"{states}: 1000 bytes, {size} when it was saved"
    code, err = fwl_main(capsys, "train", *tiny_overrides(run, "train.steps=6"))
    root = states.parent.parent
    assert code == 2 and f"no intact checkpoint to resume from in {root}: {states.parent}: {damage}" in err, err
    code, err = fwl_main(capsys, "eval", str(run / "config.yaml"), str(run))
    assert code == 2 and f"checkpoint {states.parent} is damaged: {damage}" in err, err
    assert tree_digest(run) == before

    # A checkpoint from before the checksums: the damage is found when it is loaded, and named there.
    marker = states.parent / MARKER
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "files"}))
    before = tree_digest(run)
    code, err = fwl_main(capsys, "train", *tiny_overrides(run, "train.steps=6"))
    assert code == 2 and f"checkpoint {states.parent} cannot be loaded" in err, err
    code, err = fwl_main(capsys, "eval", str(run / "config.yaml"), str(run))
    assert code == 2 and f"checkpoint {states.parent} cannot be read" in err, err
    assert tree_digest(run) == before


def test_missing_checkpoints_and_pointers(capsys, trained_run, tmp_path):
    need_corpus()
    missing = tmp_path / "nowhere"
    code, err = fwl_main(capsys, "train", *tiny_overrides(tmp_path / "run"), "--resume-from", str(missing))
    assert code == 2 and f"checkpoint {missing}: no such file or directory" in err
    assert not (tmp_path / "run").exists()
    # An existing directory that is not a checkpoint.
    code, err = fwl_main(capsys, "train", *tiny_overrides(tmp_path / "run"), "--resume-from", str(tmp_path))
    assert code == 2 and "no complete fwl_scale checkpoint" in err
    # Our pointer names a checkpoint that was deleted: never silently start from scratch over it.
    import shutil

    run = tmp_path / "pointer"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "checkpoints" / "step_00000003")
    with pytest.raises(CheckpointError, match=r"latest_complete names 'step_00000003'.*does not exist"):
        find_latest(run / "checkpoints")
    code, err = fwl_main(capsys, "train", *tiny_overrides(run, "train.steps=6"))
    assert code == 2 and POINTER in err


def test_no_resume_refuses_to_overwrite_a_run(capsys, trained_run):
    before = tree_digest(trained_run)
    code, err = fwl_main(capsys, "train", *tiny_overrides(trained_run, "train.steps=6"), "--no-resume")
    assert code == 2 and "already holds checkpoints" in err and "resuming is disabled" in err
    assert tree_digest(trained_run) == before


def test_resume_from_a_checkpoint_into_a_new_run(trained_run, tmp_path):
    out = tmp_path / "continued"
    trainer = Trainer(tiny_config(out, "train.steps=5"), resume_from=trained_run)
    assert trainer.state.step == 3
    assert trainer.run() == 0
    assert find_latest(out / "checkpoints").step == 5
