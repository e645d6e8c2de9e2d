"""`fwl`: one command per area, each registered by its area's cli.py, and the spellings kept beside them.

* every command parses to its area's function (parser level, nothing run);
* building every parser loads no torch (a fresh process), so `fwl --help` and `fwl train`'s early stop
  handler stay fast;
* `fwl layout` and launchers/plan_layout.py (the launchers' entry) print the same layout for the same
  allocation, and fail the same way when it does not fit.
`fwl eval --stream` beside `python -m fwl_scale.eval.streaming` on a checkpoint: tests/test_streaming_train.py;
`fwl hf export` through tools/convert_to_hf.py: tests/test_hf.py.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from fwl_scale.cli import build_parser
from tests.train_support import REPO, fwl_env, run_fwl


@pytest.mark.parametrize("argv, module, command", [
    (["train", "configs/tiny.yaml"], "fwl_scale.train.cli", "cmd_train"),
    (["eval", "c.yaml", "run"], "fwl_scale.eval.cli", "cmd_eval"),
    (["eval", "c.yaml", "run", "--stream", "--windows", "3", "--max-docs", "2"], "fwl_scale.eval.cli", "cmd_eval"),
    (["eval", "--compare", "a", "b", "--out", "o"], "fwl_scale.eval.cli", "cmd_eval"),
    (["ckpt", "convert", "run", "out"], "fwl_scale.train.checkpoint_cli", "cmd_ckpt_convert"),
    (["ckpt", "consolidate", "run", "w.safetensors"], "fwl_scale.train.checkpoint_cli", "cmd_ckpt_consolidate"),
    (["hf", "export", "run", "hf_dir", "--dtype", "bfloat16"], "fwl_scale.hf.cli", "cmd_export"),
    (["hf", "import", "hf_dir", "configs/tiny.yaml", "train.out_dir=x"], "fwl_scale.hf.cli", "cmd_import"),
    (["params", "configs/tiny.yaml"], "fwl_scale.plan.cli", "cmd_params"),
    (["plan", "configs/tiny.yaml", "--gpus", "8"], "fwl_scale.plan.cli", "cmd_plan"),
    (["layout", "configs/tiny.yaml", "--nodes", "1", "--tasks-per-node", "2"], "fwl_scale.plan.cli", "cmd_layout"),
    (["scaling", "fit", "spec.yaml"], "fwl_scale.plan.cli", "cmd_scaling"),
    (["data", "shards"], "fwl_scale.data.cli", "_cmd_shards"),
    (["study", "spec.yaml", "--list"], "fwl_scale.study.cli", "cmd_study"),
])
def test_every_command_parses_to_its_area(argv, module, command):
    ns = build_parser().parse_args(argv)
    assert (ns.func.__module__, ns.func.__name__) == (module, command)


def test_stream_options_parse():
    ns = build_parser().parse_args(["eval", "c.yaml", "run", "model.seq_len=16", "--stream", "--windows", "3",
                                    "--buckets", "2", "--max-docs", "2", "--json", "p.json"])
    assert (ns.config, ns.checkpoint, ns.overrides) == ("c.yaml", "run", ["model.seq_len=16"])
    assert ns.stream and (ns.windows, ns.buckets, ns.max_docs, ns.json) == (3, 2, 2, "p.json")


def test_stream_refuses_the_options_of_another_mode(capsys):
    from fwl_scale.cli import main

    assert main(["eval", "configs/tiny.yaml", "run", "--stream", "--out", "o"]) == 2
    assert "--out belongs to another mode" in capsys.readouterr().err


def test_building_every_parser_loads_no_torch():
    probe = "import sys; from fwl_scale.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=fwl_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False"]


ALLOCATION = ("--nodes", "2", "--tasks-per-node", "4", "--global-batch", "16")


def test_fwl_layout_is_the_launchers_plan_layout():
    config, overrides = "configs/tiny.yaml", ["parallel.tp=2", "parallel.micro_batch=2"]
    old = subprocess.run([sys.executable, str(REPO / "launchers" / "plan_layout.py"), "--config", config,
                          *ALLOCATION, "--", *overrides], cwd=REPO, capture_output=True, text=True, timeout=60)
    new = run_fwl("layout", config, *overrides, *ALLOCATION, timeout=60)
    assert old.returncode == new.returncode == 0, (old.stderr, new.stderr)
    assert new.stdout == old.stdout and new.stdout.split() == ["parallel.dp=4", "parallel.grad_accum=2"]
    assert new.stderr == old.stderr and "tp=2 cp=1 pp=1 dp=4" in new.stderr
    # tp = 3 does not divide the 4 ranks of a node: one message, exit 2, from both spellings.
    old = subprocess.run([sys.executable, str(REPO / "launchers" / "plan_layout.py"), "--config", config,
                          *ALLOCATION, "--", "model.n_heads=3", "model.d_model=48", "parallel.tp=3"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    new = run_fwl("layout", config, "model.n_heads=3", "model.d_model=48", "parallel.tp=3", *ALLOCATION, timeout=60)
    assert old.returncode == new.returncode == 2
    assert new.stderr == old.stderr and "layout does not fit the allocation" in new.stderr


@pytest.mark.parametrize("overrides,message", [
    (["parallel.pp=2", "parallel.cp=2", "parallel.tp=2"], "parallel.tp: pipeline × context × tensor parallelism"),
    (["parallel.pp=2", "train.bf16=true", "parallel.zero_stage=0"],
     "parallel.zero_stage: pipeline parallelism with train.bf16 needs zero_stage 1"),
    (["parallel.pp=2", "model.positions=learned"], "model.positions: learned position embeddings"),
    (["train.compile=true", "parallel.tp=2"], "train.compile: not supported with tensor parallelism"),
    (["train.compile=true", "parallel.cp=2"], "train.compile: not supported with context parallelism"),
    (["train.compile=true", "parallel.pp=2"], "train.compile: not supported with pipeline parallelism"),
    (["train.compile=true", "parallel.zero_stage=3"], "train.compile: not supported with parallel.zero_stage=3"),
    (["model.fwl.update=sequential", "parallel.cp=2"],
     "model.fwl.update: sequential is not supported with context parallelism (parallel.cp=2)"),
    (["train.compile=true", "model.fwl.update=sequential"],
     "train.compile: not supported with model.fwl.update=sequential"),
])
def test_what_the_trainer_refuses_is_refused_at_pre_flight(overrides, message):
    """The launchers' pre-flight (launchers/plan_layout.py, run by common.sh before any rank starts) refuses
    every layout the trainer would refuse once the allocation runs: exit 2, one message naming the field."""
    proc = subprocess.run([sys.executable, str(REPO / "launchers" / "plan_layout.py"), "--config", "configs/tiny.yaml",
                           *ALLOCATION, "--", *overrides], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and not proc.stdout, (proc.stdout, proc.stderr)
