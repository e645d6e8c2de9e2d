"""Evaluation: the loss-by-position arithmetic, `fwl eval CONFIG CKPT` on a trained checkpoint (matching the
trainer's own validation), weights from ZeRO checkpoints, whole documents in consecutive windows."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from fwl_scale import IGNORE_INDEX
from fwl_scale.eval.perplexity import bucket_edges, evaluate_batches, evaluate_documents
from fwl_scale.eval.run import load_for_eval
from fwl_scale.checkpoint.native import find_latest
from fwl_scale.checkpoint.weights import load_model_weights
from fwl_scale.train.loop import Trainer
from tests.train_support import records, run_fwl, tiny_config


def test_bucket_edges_cover_every_position_once():
    for T, n in [(32, 8), (10, 3), (7, 7), (5, 8)]:
        edges = bucket_edges(T, n)
        covered = [p for a, b in edges for p in range(a, b)]
        assert covered == list(range(T))


def test_loss_by_position_arithmetic():
    T, B = 8, 3
    labels = torch.arange(B * T).reshape(B, T) % 5
    labels[1, 6] = IGNORE_INDEX
    labels[2, :2] = IGNORE_INDEX

    def forward(ids, lab, docs):  # token loss = its position (0 where ignored), as the model reports it
        pos = torch.arange(T, dtype=torch.float32).expand(B, T)
        return SimpleNamespace(token_loss=torch.where(lab == IGNORE_INDEX, 0.0, pos))

    batch = {"input_ids": torch.zeros(B, T, dtype=torch.long), "labels": labels,
             "doc_ids": torch.zeros(B, T, dtype=torch.long)}
    res = evaluate_batches(forward, [batch, batch], 4, torch.device("cpu"))
    valid = (labels != IGNORE_INDEX)
    pos = torch.arange(T).expand(B, T)
    assert res.tokens == 2 * int(valid.sum())
    assert res.loss == pytest.approx(float(pos[valid].float().mean()))
    assert res.perplexity == pytest.approx(math.exp(res.loss))
    assert res.bucket_edges == [(0, 2), (2, 4), (4, 6), (6, 8)]
    # bucket 0: positions 0,1 valid in rows 0,1 only -> mean 0.5; bucket 3: positions 6,7 minus (1,6).
    assert res.bucket_loss[0] == pytest.approx(0.5)
    assert res.bucket_loss[1] == pytest.approx(2.5)
    assert res.bucket_loss[3] == pytest.approx((6 + 7 + 7 + 6 + 7) / 5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(out, "train.steps=6", "train.eval_every=6", "train.eval_batches=3")
    assert Trainer(cfg).run() == 0
    return out, cfg


def test_fwl_eval_prints_perplexity_and_matches_training_validation(trained, tmp_path):
    out, cfg = trained
    report = tmp_path / "eval.json"
    res = run_fwl("eval", str(out / "config.yaml"), str(out), "--json", str(report), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "validation: loss" in res.stdout and "perplexity" in res.stdout
    assert res.stdout.count("positions ") == cfg.train.position_buckets
    got = json.loads(report.read_text())
    trained_valid = records(out, "valid")[-1]
    assert got["step"] == 6
    assert got["valid"]["tokens"] == trained_valid["tokens"]
    assert got["valid"]["loss"] == pytest.approx(trained_valid["loss"], abs=1e-5)
    assert got["valid"]["bucket_loss"] == pytest.approx(trained_valid["bucket_loss"], abs=1e-5)


def test_long_documents_in_windows(trained):
    out, cfg = trained
    from fwl_scale.data import eval_documents, prepare_data

    model, _ = load_for_eval(cfg, out, torch.device("cpu"))
    paths = prepare_data(cfg)
    T = cfg.model.seq_len
    reset = evaluate_documents(model, eval_documents(cfg, paths, 2), T, torch.device("cpu"), max_windows=4)
    carried = evaluate_documents(model, eval_documents(cfg, paths, 2), T, torch.device("cpu"), carry_state=True,
                                 max_windows=4)
    assert reset.documents == carried.documents == 2
    assert reset.window_tokens == carried.window_tokens == [2 * T] * 4
    # The first window has no earlier state: identical either way; later windows see the carried sums.
    assert carried.window_loss[0] == pytest.approx(reset.window_loss[0], abs=1e-6)
    assert any(abs(a - b) > 1e-4 for a, b in zip(carried.window_loss[1:], reset.window_loss[1:]))
    # Without carrying, window w is exactly the model on that window alone.
    doc = next(iter(eval_documents(cfg, paths, 1)))
    ids, labels = doc[2 * T:3 * T][None], doc[2 * T + 1:3 * T + 1][None]
    with torch.no_grad():
        direct = model(ids, labels, torch.zeros_like(ids)).token_loss.sum()
    single = evaluate_documents(model, [doc], T, torch.device("cpu"), max_windows=3)
    assert single.window_loss[2] == pytest.approx(float(direct) / T, abs=1e-6)

    res = run_fwl("eval", str(out / "config.yaml"), str(out), "--batches", "1", "--long-docs", "1",
                  "--max-windows", "3", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FWL state carried across windows" in res.stdout and "each window on its own" in res.stdout
    assert res.stdout.count("document positions") == 6


def test_weights_from_zero_checkpoints_equal_the_engine(tmp_path):
    for stage, bf16 in [(1, "false"), (2, "true")]:
        out = tmp_path / f"z{stage}"
        trainer = Trainer(tiny_config(out, "train.steps=2", f"parallel.zero_stage={stage}", f"train.bf16={bf16}"))
        assert trainer.run() == 0
        weights = load_model_weights(find_latest(out / "checkpoints"))
        if bf16 == "true":  # the fp32 masters, of which the engine's bf16 module is the rounding
            from deepspeed.utils import safe_get_full_fp32_param

            engine_weights = {n: safe_get_full_fp32_param(p) for n, p in trainer.engine.module.named_parameters()}
        else:
            engine_weights = {n: p.detach() for n, p in trainer.engine.module.named_parameters()}
        assert set(engine_weights) <= set(weights)
        for name, value in engine_weights.items():
            assert torch.equal(weights[name], value.float()), name


def test_bf16_evaluation_casts_parameters_and_keeps_the_rotary_frequencies(trained, monkeypatch):
    """DeepSpeed's bf16 engine casts parameters only; an evaluation that cast the rotary frequencies too
    would rotate by other angles than training's validation did."""
    out, cfg = trained
    import fwl_scale.eval.run as eval_run

    monkeypatch.setattr(eval_run, "eval_dtype", lambda cfg, device: torch.bfloat16)
    model, _ = load_for_eval(cfg, out, torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    buffers = dict(model.named_buffers())
    rotary = [name for name in buffers if name.endswith("inv_freq")]
    assert rotary and all(buffers[name].dtype == torch.float32 for name in rotary)
    monkeypatch.undo()
    fp32, _ = load_for_eval(cfg, out, torch.device("cpu"))
    ids = torch.arange(2 * cfg.model.seq_len).reshape(2, -1) % cfg.model.vocab_size
    with torch.no_grad():
        loss_bf16 = model(ids, ids.roll(-1, 1), torch.zeros_like(ids)).loss.float()
        loss_fp32 = fp32(ids, ids.roll(-1, 1), torch.zeros_like(ids)).loss
    assert abs(float(loss_bf16 - loss_fp32)) < 0.05 * float(loss_fp32)
