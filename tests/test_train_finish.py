"""`fwl train` ends with one line that says where the checkpoint and the metrics are and which `fwl eval`
command to run next — and that command works as printed."""
from __future__ import annotations

import shlex

from fwl_scale.checkpoint.native import find_latest
from fwl_scale.cli import main
from tests.train_support import need_corpus, tiny_overrides


def test_train_ends_with_where_and_what_next(capsys, tmp_path):
    need_corpus()
    out = tmp_path / "run"
    assert main(["train", *tiny_overrides(out, "train.steps=2")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    ckpt = find_latest(out / "checkpoints")
    assert last == (f"fwl train: done at step 2: checkpoint {ckpt.path}, metrics {out / 'metrics.jsonl'}; "
                    f"next: fwl eval {out / 'config.yaml'} {out}")
    command = shlex.split(last.split("next: ", 1)[1])
    assert command[:2] == ["fwl", "eval"]
    assert main([*command[1:], "--batches", "1"]) == 0
    assert f"checkpoint {ckpt.path} (step 2)" in capsys.readouterr().out
