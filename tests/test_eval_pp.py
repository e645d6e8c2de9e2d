"""`fwl eval --out` with the model split over pipeline stages as trained (fwl_scale/eval/stages.py): a pp=2
checkpoint (ZeRO-1) evaluated by 2 gloo ranks, each holding its stage, equals the one-process evaluation
of the converted checkpoint for every method, dynamic evaluation included (RMS, segments shorter than the
window: the backward runs through both stages, and the tied embedding's two gradients are summed); the
pipeline checkpoint read whole by one process gives the very same numbers as the converted one; at
pp=2 × dp=2 the documents are split over two pipelines."""
from __future__ import annotations

import json
import math

import pytest
import torch

from fwl_scale.train.checkpoint_convert import convert_checkpoint
from fwl_scale.checkpoint.native import CheckpointError, CheckpointRef, resolve_checkpoint
from fwl_scale.checkpoint.weights import load_model_weights, load_pipeline_layer_weights
from fwl_scale.config import load_config
from fwl_scale.eval.docrun import DocEvalOptions, run_document_eval
from fwl_scale.eval.ranks import eval_ranks
from tests.distributed import run_distributed
from tests.train_support import launch_ranks

PP2 = ("parallel.pp=2", "parallel.zero_stage=1", "train.steps=2")
OPTS = dict(max_docs=3, max_tokens=80, tune_docs=1, tune_tokens=48, stat_segments=4, lrs=[1e-4], decays=[0.1],
            dynamic_segment=8, progress=False)
# A stage computes what one process computes, with the same kernels on the same shapes, and float32 travels
# between stages exactly; the tied embedding's two gradients are one sum either way. So the numbers are
# the same bit for bit (measured), against one process on the ranks' one thread.
# The FWL with tied embeddings updates everything (the backward crosses both stages, the tied gradient is
# summed between them); the baseline, untied, only its head (no stage but the last has anything to update).
CASES = {"fwl": ((), "all"), "base": (("model.fwl.enabled=false", "model.tie_embeddings=false"), "head")}


@pytest.fixture(scope="module")
def pp_runs(tmp_path_factory):
    """A pp=2 FWL and baseline checkpoint (2 steps each), and each one converted (layout-free)."""
    root = tmp_path_factory.mktemp("evalpp")
    out = {}
    for name, (extra, _) in CASES.items():
        for code, log in launch_ranks(root / name, *PP2, *extra):
            assert code == 0, log[-3000:]
        convert_checkpoint(root / name, root / f"{name}_converted")
        out[name] = (root / name, root / f"{name}_converted")
    return out


def _eval(rank, world, config, overrides, run_dir, out, params):
    run_document_eval(load_config(config, overrides), run_dir, DocEvalOptions(out=out, dynamic_params=params, **OPTS),
                      log=lambda s: None)


def _one_process(config, overrides, run_dir, out, params) -> None:
    # The reference computes with the ranks' one thread (float32 sums depend on the thread count).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _eval(0, 1, config, overrides, run_dir, out, params)
    finally:
        torch.set_num_threads(threads)


def results(d) -> dict:
    return json.loads((d / "results.json").read_text())


def assert_same_evaluation(a: dict, b: dict, rel: float) -> None:
    assert a["documents_id"] == b["documents_id"]
    assert [m["method"] for m in a["methods"]] == [m["method"] for m in b["methods"]]
    for x, y in zip(a["methods"], b["methods"]):
        assert x["tokens"] == y["tokens"] and x["tokens"] > 0
        assert y["loss"] == pytest.approx(x["loss"], rel=rel, abs=0), x["method"]
        for axis in ("by_position", "by_frequency", "by_repetition"):
            for u, v in zip(x[axis], y[axis]):
                assert u["tokens"] == v["tokens"]
                both_empty = math.isnan(u["loss"]) and math.isnan(v["loss"])
                assert both_empty or v["loss"] == pytest.approx(u["loss"], rel=rel, abs=0), (x["method"], axis)


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_evaluation_equals_one_process(pp_runs, tmp_path, name):
    run_dir, converted = pp_runs[name]
    params = CASES[name][1]
    config = str(run_dir / "config.yaml")
    _one_process(config, ["parallel.pp=1"], str(converted), tmp_path / "one", params)
    _one_process(config, ["parallel.pp=1"], str(run_dir), tmp_path / "one_native", params)
    run_distributed(2, _eval, config, [], str(run_dir), str(tmp_path / "pp2"), params)
    one, native, pp2 = (results(tmp_path / d) for d in ("one", "one_native", "pp2"))
    assert pp2["pipeline_parallel"] == 2 and pp2["world_size"] == 2 and one["pipeline_parallel"] == 1
    methods = [m["method"] for m in one["methods"]]
    assert methods == (["slow_head", "fwl_reset", "fwl_carried", "dynamic"] if name == "fwl" else ["plain", "dynamic"])
    assert one["dynamic_tuning"]["chosen"]["segment"] == 8 and one["dynamic_tuning"]["chosen"]["params"] == params
    # The pipeline's layer files read whole are the converted checkpoint's weights, bit for bit.
    assert [m["loss"] for m in native["methods"]] == [m["loss"] for m in one["methods"]]
    assert_same_evaluation(one, pp2, 0.0)
    # Dynamic evaluation adapts at pp as in one process: it moves the loss away from the windowed model's.
    plain = one["methods"][1 if name == "fwl" else 0]["loss"]
    assert abs(one["methods"][-1]["loss"] - plain) > 1e-3 * plain
    assert one["methods"][-1]["flops_per_token"] == pp2["methods"][-1]["flops_per_token"]


def _eval_caches(rank, world, config, overrides, run_dir, out, first):
    opts = DocEvalOptions(out=out, methods=[first, "unigram_cache", "continuous_cache"], cache_weights=[0.1, 0.3],
                          cache_decays=[0.9], cache_thetas=[0.1], cache_length=20, **OPTS)
    run_document_eval(load_config(config, overrides), run_dir, opts, log=lambda s: None)


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_caches_equal_one_process(pp_runs, tmp_path, name):
    """The caches (fwl_scale/eval/cache.py) read the unembedding's input, which the last stage broadcasts."""
    run_dir, converted = pp_runs[name]
    first = "fwl_carried" if name == "fwl" else "plain"
    config = str(run_dir / "config.yaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _eval_caches(0, 1, config, ["parallel.pp=1"], str(converted), tmp_path / "one", first)
    finally:
        torch.set_num_threads(threads)
    run_distributed(2, _eval_caches, config, [], str(run_dir), str(tmp_path / "pp2"), first)
    one, pp2 = results(tmp_path / "one"), results(tmp_path / "pp2")
    assert [m["method"] for m in pp2["methods"]] == [first, "unigram_cache", "continuous_cache"]
    assert pp2["cache_tuning"] == {k: {**v, "wall_s": pp2["cache_tuning"][k]["wall_s"]}
                                   for k, v in one["cache_tuning"].items()}
    assert_same_evaluation(one, pp2, 0.0)


def test_pipelines_side_by_side_split_the_documents(pp_runs, tmp_path):
    run_dir, _ = pp_runs["fwl"]
    config = str(run_dir / "config.yaml")
    run_distributed(2, _eval, config, [], str(run_dir), str(tmp_path / "pp2"), "all")
    run_distributed(4, _eval, config, [], str(run_dir), str(tmp_path / "pp2dp2"), "all")
    pp2, pp2dp2 = results(tmp_path / "pp2"), results(tmp_path / "pp2dp2")
    assert pp2dp2["world_size"] == 4 and pp2dp2["pipeline_parallel"] == 2
    # Only the order of the float64 sums over the two pipelines differs.
    assert_same_evaluation(pp2, pp2dp2, 1e-12)


def test_pipeline_layouts_evaluation_cannot_run_are_refused(pp_runs, tmp_path):
    run_dir, _ = pp_runs["base"]
    config = str(run_dir / "config.yaml")
    with pytest.raises(ValueError, match=r"parallel.tp=1 × parallel.pp=2 needs 2 ranks .*torchrun --nproc-per-node 2"):
        eval_ranks(load_config(config, []))
    # bf16 pipeline checkpoints keep their fp32 weights in the optimizer: refused with the conversion.
    ref = resolve_checkpoint(run_dir)
    bf16 = CheckpointRef(ref.root, ref.tag, {**ref.meta, "bf16": True})
    for read in (load_model_weights, lambda r: load_pipeline_layer_weights(r, 0)):
        with pytest.raises(CheckpointError, match=r"fp32 weights are in the optimizer's state \(bf16\); convert it first"):
            read(bf16)
    # A checkpoint of another model is refused naming the field; nothing is written.
    with pytest.raises(CheckpointError, match=r"belongs to another model: model.d_model"):
        _eval(0, 1, config, ["parallel.pp=1", "model.d_model=64"], str(run_dir), str(tmp_path / "x"), "all")
    assert not (tmp_path / "x").exists()


def test_tensor_parallel_stages_equal_one_process(tmp_path):
    """tp=2 × pp=2 (sequence parallelism in training), 4 ranks: each rank its stage's tp shards."""
    run_dir = tmp_path / "tp2pp2"
    for code, log in launch_ranks(run_dir, *PP2, "parallel.tp=2", "parallel.sequence_parallel=true", world=4):
        assert code == 0, log[-3000:]
    convert_checkpoint(run_dir, tmp_path / "converted")
    config = str(run_dir / "config.yaml")
    _one_process(config, ["parallel.pp=1", "parallel.tp=1"], str(tmp_path / "converted"), tmp_path / "one", "all")
    run_distributed(4, _eval, config, [], str(run_dir), str(tmp_path / "tp2pp2_eval"), "all")
    one, split = results(tmp_path / "one"), results(tmp_path / "tp2pp2_eval")
    assert split["tensor_parallel"] == 2 and split["pipeline_parallel"] == 2 and split["world_size"] == 4
    # The float32 sums inside the tp-split model run in another order (tests/test_eval_tp.py measures ≤ 4e-9).
    assert_same_evaluation(one, split, 1e-7)
