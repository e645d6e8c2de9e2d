"""`fwl eval --out` with the model split over tensor-parallel ranks as trained (fwl_scale/eval/ranks.py): a
tp=2 checkpoint (sequence parallelism, ZeRO-1) evaluated by 2 gloo ranks, each holding its shards, equals
the one-process evaluation of the converted checkpoint for every method (dynamic evaluation included,
RMS with segments shorter than the window); the converted checkpoint split again over 2 ranks gives the
very same numbers as the native shards; layouts evaluation cannot run are refused, naming the fix (pipeline
stages: tests/test_eval_pp.py)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from fwl_scale.train.checkpoint_convert import convert_checkpoint
from fwl_scale.checkpoint.native import CheckpointError
from fwl_scale.config import load_config
from fwl_scale.eval.docrun import DocEvalOptions, run_document_eval
from fwl_scale.eval.ranks import eval_ranks
from tests.distributed import run_distributed
from tests.train_support import launch_ranks

TP2 = ("parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=1", "train.steps=2")
OPTS = dict(max_docs=3, max_tokens=80, tune_docs=1, tune_tokens=48, stat_segments=4, lrs=[1e-4], decays=[0.1],
            dynamic_segment=8, progress=False)
# The float32 sums inside the model split over two ranks in another order: round-off of a float32 mean
# (measured: the losses differ by at most 4e-9 relative, dynamic evaluation's updates included; a breakdown
# bucket, a few tokens in some, by 3e-8).
TOL, BUCKET_TOL = 1e-7, 1e-6


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory):
    """A tp=2 FWL and baseline checkpoint (2 steps each), and each one converted (layout-free)."""
    root = tmp_path_factory.mktemp("evaltp")
    out = {}
    for name, extra in (("fwl", ()), ("base", ("model.fwl.enabled=false",))):
        for code, log in launch_ranks(root / name, *TP2, *extra):
            assert code == 0, log[-3000:]
        convert_checkpoint(root / name, root / f"{name}_converted")
        out[name] = (root / name, root / f"{name}_converted")
    return out


def _eval(rank, world, config, overrides, run_dir, out):
    run_document_eval(load_config(config, overrides), run_dir, DocEvalOptions(out=out, **OPTS), log=lambda s: None)


def results(d) -> dict:
    return json.loads((d / "results.json").read_text())


@pytest.mark.parametrize("name", ["fwl", "base"])
def test_tensor_parallel_evaluation_equals_one_process(tp_runs, tmp_path, name):
    run_dir, converted = tp_runs[name]
    config = str(run_dir / "config.yaml")
    # The one-process reference computes with the ranks' one thread (float32 sums depend on the thread count).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _eval(0, 1, config, ["parallel.tp=1"], str(converted), str(tmp_path / "one"))
    finally:
        torch.set_num_threads(threads)
    run_distributed(2, _eval, config, [], str(run_dir), str(tmp_path / "tp2"))
    run_distributed(2, _eval, config, [], str(converted), str(tmp_path / "tp2_converted"))
    one, tp2, tp2c = (results(tmp_path / d) for d in ("one", "tp2", "tp2_converted"))
    assert tp2["tensor_parallel"] == 2 and tp2["world_size"] == 2 and one["tensor_parallel"] == 1
    assert one["documents_id"] == tp2["documents_id"]
    methods = [m["method"] for m in one["methods"]]
    assert methods == (["slow_head", "fwl_reset", "fwl_carried", "dynamic"] if name == "fwl" else ["plain", "dynamic"])
    assert one["dynamic_tuning"]["chosen"]["segment"] == 8
    for a, b, c in zip(one["methods"], tp2["methods"], tp2c["methods"]):
        assert a["method"] == b["method"] and a["tokens"] == b["tokens"] == c["tokens"] and a["tokens"] > 0
        assert b["loss"] == pytest.approx(a["loss"], rel=TOL), a["method"]
        for axis in ("by_position", "by_frequency", "by_repetition"):
            for x, y in zip(a[axis], b[axis]):
                assert x["tokens"] == y["tokens"]
                both_empty = math.isnan(x["loss"]) and math.isnan(y["loss"])
                assert both_empty or y["loss"] == pytest.approx(x["loss"], rel=BUCKET_TOL)
        # The converted checkpoint sliced over the same 2 ranks holds the very same shards.
        assert c["loss"] == b["loss"], a["method"]
    # Dynamic evaluation adapts at tp as in one process: it moves the loss away from the windowed model's.
    plain = one["methods"][1 if name == "fwl" else 0]["loss"]
    assert abs(one["methods"][-1]["loss"] - plain) > 1e-3 * plain


def _eval_caches(rank, world, config, overrides, run_dir, out, first):
    opts = DocEvalOptions(out=out, methods=[first, "unigram_cache", "continuous_cache"], cache_weights=[0.1, 0.3],
                          cache_decays=[0.9], cache_thetas=[0.1], cache_length=20, **OPTS)
    run_document_eval(load_config(config, overrides), run_dir, opts, log=lambda s: None)


@pytest.mark.parametrize("name", ["fwl", "base"])
def test_tensor_parallel_caches_equal_one_process(tp_runs, tmp_path, name):
    """The caches (fwl_scale/eval/cache.py) read the unembedding's input, replicated over the tp ranks."""
    run_dir, converted = tp_runs[name]
    first = "fwl_carried" if name == "fwl" else "plain"
    config = str(run_dir / "config.yaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _eval_caches(0, 1, config, ["parallel.tp=1"], str(converted), str(tmp_path / "one"), first)
    finally:
        torch.set_num_threads(threads)
    run_distributed(2, _eval_caches, config, [], str(run_dir), str(tmp_path / "tp2"), first)
    one, tp2 = results(tmp_path / "one"), results(tmp_path / "tp2")
    assert [m["method"] for m in tp2["methods"]] == [first, "unigram_cache", "continuous_cache"]
    assert [m["cache"] for m in tp2["methods"][1:]] == [m["cache"] for m in one["methods"][1:]]
    for a, b in zip(one["methods"], tp2["methods"]):
        assert a["tokens"] == b["tokens"] > 0 and b["loss"] == pytest.approx(a["loss"], rel=TOL), a["method"]


def test_layouts_evaluation_cannot_run_are_refused(tp_runs, tmp_path):
    run_dir, _ = tp_runs["base"]
    config = str(run_dir / "config.yaml")
    with pytest.raises(ValueError, match=r"parallel.tp=2 × parallel.pp=1 needs 2 ranks .*torchrun --nproc-per-node 2"):
        eval_ranks(load_config(config, []))
    # The native tp=2 shards in one process: refused with the conversion, nothing written.
    with pytest.raises(CheckpointError, match=r"split over tp=2, pp=1 ranks; convert it first"):
        _eval(0, 1, config, ["parallel.tp=1"], str(run_dir), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def _groups(rank, world):
    where = eval_ranks(load_config(None, ["parallel.tp=2"]))
    # tp fastest, as in training: ranks 2k and 2k+1 hold one model, data-parallel rank k.
    assert (where.rank, where.size, where.tp.rank, where.tp.size, where.world) == (rank // 2, 2, rank % 2, 2, 4)
    assert where.leader == (rank == 0) and where.share(list(range(5))) == list(range(5))[rank // 2::2]
    t = where.sum(torch.tensor([float(rank)]))  # over the ranks holding the same shards
    assert t.item() == 2 * (rank % 2) + 2
    t = torch.tensor([float(rank)])
    torch.distributed.all_reduce(t, group=where.tp.group)  # over the ranks of one model
    assert t.item() == 4 * (rank // 2) + 1
    assert where.max(float(rank)) == 3.0


def test_groups_of_tp_2_by_dp_2():
    run_distributed(4, _groups)
