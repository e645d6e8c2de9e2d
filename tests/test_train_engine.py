"""The DeepSpeed trainer in one process: it learns, its optimizer groups and schedule follow the rules,
its metrics are complete, layouts it cannot run yet are refused, and the FLOP count adds up."""
from __future__ import annotations

import math

import pytest
import torch

from fwl_scale.config import ConfigError, check_layout, load_config
from fwl_scale.model import build_model
from fwl_scale.train.deepspeed_setup import deepspeed_config, lr_factor, param_groups
from fwl_scale.model.flops import train_flops_per_token
from fwl_scale.model.fwl import fast_chunk
from fwl_scale.train.loop import Trainer
from tests.train_support import records, run_fwl, step_losses, tiny_config


def test_training_loss_falls_and_metrics_are_complete(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(out, "train.steps=40", "train.warmup_steps=5", "train.eval_every=20", "train.save_every=20",
                      "train.peak_tflops=1.0")
    trainer = Trainer(cfg)
    assert trainer.run() == 0
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, 41))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(36, 41)) / 5
    # From ~ln(512) = 6.24 the tiny model must clearly learn something on real text within 40 steps.
    assert first > 6.0 and last < first - 0.6, (first, last)
    rec = records(out, "train")[-1]
    for key in ("lr", "grad_norm", "tokens_per_s", "step_time_s", "tflops_per_device", "mfu", "tokens"):
        assert rec[key] is not None and rec[key] > 0, key
    assert rec["tokens"] == 40 * 4 * 32
    # MFU from the analytic count and the given peak of 1 TFLOP/s.
    assert math.isclose(rec["mfu"], rec["tflops_per_device"] / 1.0)
    assert math.isclose(rec["tflops_per_device"], rec["tokens_per_s"] * trainer.flops.total / 1e12)
    valid = records(out, "valid")
    assert [v["step"] for v in valid] == [20, 40]
    assert valid[-1]["loss"] < valid[0]["loss"]
    assert math.isclose(valid[-1]["perplexity"], math.exp(valid[-1]["loss"]))
    assert len(valid[-1]["bucket_loss"]) == cfg.train.position_buckets
    assert all(math.isfinite(x) for x in valid[-1]["bucket_loss"])
    # Warmup then cosine down to min_lr_ratio: the lr of update u is lr * lr_factor(u).
    lrs = {r["step"]: r["lr"] for r in records(out, "train")}
    assert math.isclose(lrs[1], cfg.train.lr * 1 / 5)
    assert math.isclose(lrs[5], cfg.train.lr)
    assert math.isclose(lrs[40], cfg.train.lr * lr_factor(39, cfg))
    assert lrs[40] < lrs[20] < lrs[6]
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000020", "step_00000040"]
    assert (out / "config.yaml").is_file()


def test_mfu_is_not_available_on_cpu_without_a_peak(tmp_path):
    out = tmp_path / "run"
    assert Trainer(tiny_config(out, "train.steps=2")).run() == 0
    rec = records(out, "train")[-1]
    assert rec["mfu"] is None and rec["tflops_per_device"] > 0


def test_param_groups_follow_the_weight_decay_rule():
    cfg = load_config(None, ["model.d_model=32", "model.n_heads=2", "model.vocab_size=256"])
    model = build_model(cfg.model)
    groups = param_groups(model, cfg)
    by_id = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(by_id) == len(names)
    for name, p in names.items():
        expect = 0.0 if p.ndim < 2 else 0.1
        assert by_id[id(p)] == expect, name
    # The learned step sizes, norms and biases are among the no-decay parameters.
    assert by_id[id(names["fwl.step_sizes"])] == 0.0
    assert by_id[id(names["fwl.alpha"])] == 0.0
    assert by_id[id(names["embed.weight"])] == 0.1
    assert all("lr" not in g for g in groups)  # no multipliers: every group runs at train.lr


def test_param_groups_give_the_fwl_and_its_step_sizes_their_learning_rates():
    cfg = load_config(None, ["model.d_model=32", "model.n_heads=2", "model.vocab_size=256", "train.lr=1e-3",
                             "train.fwl_lr_mult=0.5", "train.step_size_lr_mult=10"])
    model = build_model(cfg.model)
    groups = param_groups(model, cfg)
    lr = {id(p): g.get("lr", cfg.train.lr) for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        expect = 1e-2 if name == "fwl.step_sizes" else 5e-4 if name.startswith("fwl.") else 1e-3
        assert lr[id(p)] == pytest.approx(expect), name
        assert decay[id(p)] == (0.0 if p.ndim < 2 else cfg.train.weight_decay), name


def test_deepspeed_config_is_ours():
    cfg = load_config(None, ["parallel.micro_batch=3", "parallel.grad_accum=5", "parallel.zero_stage=2",
                             "train.bf16=true", "train.grad_clip=0.5"])
    ds = deepspeed_config(cfg, dp=4)
    assert ds["train_batch_size"] == 3 * 5 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is True
    assert ds["gradient_clipping"] == 0.5


def test_lr_schedule_shape():
    cfg = load_config(None, ["train.steps=100", "train.warmup_steps=10", "train.min_lr_ratio=0.1"])
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.55)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    values = [lr_factor(u, cfg) for u in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_layouts_the_trainer_does_not_run_are_refused():
    for over in (["parallel.tp=2"], ["parallel.cp=2"], ["parallel.pp=2"], ["parallel.tp=2", "parallel.pp=2"],
                 ["parallel.pp=2", "parallel.cp=2"], ["parallel.pp=2", "data.mode=contiguous"],
                 ["parallel.pp=2", "parallel.cp=2", "data.mode=contiguous"],
                 ["parallel.tp=2", "parallel.pp=2", "data.mode=contiguous"]):
        check_layout(load_config(None, over))  # implemented: no error
    # Refused as the config is read (Config.validate runs check_layout), before any work.
    with pytest.raises(ConfigError, match=r"parallel\.tp: pipeline × context × tensor parallelism \(pp=2, cp=2, "
                                          r"tp=2\) is not supported"):
        load_config(None, ["parallel.pp=2", "parallel.cp=2", "parallel.tp=2"])
    with pytest.raises(ConfigError, match=r"parallel\.zero_stage: pipeline parallelism with train.bf16 needs"):
        load_config(None, ["parallel.pp=2", "train.bf16=true"])
    check_layout(load_config(None, ["parallel.pp=2", "train.bf16=true", "parallel.zero_stage=1"]))


def test_flop_count():
    fwl = load_config("configs/tiny.yaml")
    base = load_config("configs/base_tiny.yaml")
    f, b = train_flops_per_token(fwl.model), train_flops_per_token(base.model)
    assert f.body == b.body  # the same body
    d, L, T, V = 128, 2, 256, 4096
    assert b.body == 6 * L * 12 * d * d + 12 * L * T * d
    assert b.head == 6 * d * V
    # tiny: s = d, h = 4d, one chunk of T (quadratic): slow 2dh+2hs+2sV, slow backward 2sV+2hs,
    # fast 2hs+2sV + two causal linear attentions 2T(d+h) and 2T(h+s); training is 3x.
    h = 4 * d
    fwd = 2 * d * h + 6 * h * d + 6 * d * V + 2 * T * (d + h) + 2 * T * (h + d)
    # tiny's recipe has a learned decay: the four vector sums become decayed products, 2T(h + 3s).
    assert fwl.model.fwl.decay == "learned"
    # Its mean normaliser's six decayed counts are one product too, 2T·6 + 2·6; labels only: training is 2x.
    assert fwl.model.fwl.normalize == "mean"
    assert f.head == 3 * (fwd + 2 * T * (h + 3 * d)) + 2 * (2 * T * 6 + 2 * 6)
    assert 2.0 < f.total / b.total < 3.5
    # The chunk used in the count is the model's own choice for the window.
    for name in ("tiny", "fwl_125m", "fwl_1b"):
        cfg = load_config(f"configs/{name}.yaml")
        model = build_model(cfg.model, device="meta")
        m = cfg.model
        assert fast_chunk(m.fwl_resolved, m.d_model, m.seq_len) == model.fwl.chunk_for(m.seq_len), name


def test_fwl_params_counts_the_ladder_on_the_meta_device():
    res = run_fwl("params", "configs/fwl_13b.yaml", timeout=120)
    assert res.returncode == 0, res.stderr
    counts = {}
    for line in res.stdout.splitlines():
        parts = line.split()
        if parts and parts[0] in ("body", "fwl", "embeddings", "total"):
            counts[parts[0]] = int(parts[1].replace(",", ""))
    assert counts["total"] == counts["body"] + counts["fwl"] + counts["embeddings"]
    assert 0.9 * 13e9 < counts["total"] < 1.1 * 13e9
    assert "training FLOPs per token" in res.stdout


def test_cpu_training_uses_the_cpu_accelerator(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", "train.steps=1"))
    assert trainer.device == torch.device("cpu") and trainer.dist.backend == "gloo"
    assert trainer.engine.zero_optimization_stage() == 0
    opt = trainer.engine.optimizer
    assert isinstance(opt, torch.optim.AdamW)  # torch's AdamW: nothing compiled
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]
    assert trainer.run() == 0


def test_activation_checkpointing_gives_the_same_training(tmp_path):
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    assert Trainer(tiny_config(plain, "train.steps=3")).run() == 0
    trainer = Trainer(tiny_config(ckpt, "train.steps=3", "train.activation_checkpointing=true"))
    assert trainer.engine.module.activation_checkpointing
    assert trainer.run() == 0
    # Recomputation repeats the same operations: the same losses, bit for bit.
    assert step_losses(ckpt) == step_losses(plain)
