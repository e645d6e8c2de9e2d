"""train.compile: the blocks and the FWL through torch.compile (Inductor on CPU) against eager.

Compile time is what these tests cost (minutes on a cold Inductor cache, seconds on a warm one), so every
test uses the shapes of tests/train_support.py's tiny config: the graphs compiled by the first test (the
block's and the FWL's, with and without grad) serve the others in the same process.

Tolerance (fp32): values and every gradient within 1e-5 of the largest eager magnitude of the same
tensor. Inductor reorders and fuses float32 reductions (a few hundred operations deep through the FWL's
second-order path), which moves results by O(1e-7..1e-6) relative (measured: token losses 7e-8, gradients
8.0e-7 with the FWL, 5.4e-7 without); the
test also shows the bound is tight enough to matter: a 1% change of one FWL step size (η_W1) moves a
gradient by 7.4e-5 relative, 7x the bound.
"""
from __future__ import annotations

import copy
import signal

import pytest
import torch

from fwl_scale.config import ConfigError
from fwl_scale.model import build_model
from fwl_scale.train.deepspeed_setup import compile_model
from fwl_scale.train.distributed import check_compile_toolchain
from fwl_scale.train.loop import Trainer
from fwl_scale.train.signals import EXIT_REQUEUE
from tests.train_support import step_losses, tiny_config

REL = 1e-5
STEPS = 6
# The recipe of configs/tiny.yaml in the mixed-chunk form (two chunks per window): every path of the FWL.
RECIPE = ("model.fwl.form=chunked", "model.fwl.residual=true", "model.fwl.normalize=mean", "model.fwl.decay=learned")


def batch(cfg, seed: int = 0):
    B, T, V = cfg.parallel.micro_batch, cfg.model.seq_len, cfg.model.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T + 1), generator=g)
    docs = torch.zeros(B, T, dtype=torch.long)
    docs[0, 11:] = 1  # a document starts inside the first chunk, another in the second
    docs[1, 20:] = 1
    return ids[:, :-1], ids[:, 1:], docs


def loss_and_grads(model, ids, labels, docs):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels, docs)
    # A fixed random weighting of the token losses, so that no gradient is a plain mean.
    w = torch.rand(out.token_loss.shape, generator=torch.Generator().manual_seed(5))
    (out.token_loss * w).sum().backward()
    return out.token_loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def worst_relative(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp(min=1e-30)) for n in b)


@pytest.mark.parametrize("fwl", [True, False], ids=["fwl", "baseline"])
def test_compiled_values_and_gradients_equal_eager(tmp_path, fwl):
    cfg = tiny_config(tmp_path, *RECIPE, f"model.fwl.enabled={str(fwl).lower()}")
    torch.manual_seed(0)
    eager = build_model(cfg.model)
    compiled = compile_model(copy.deepcopy(eager))
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their names
    ids, labels, docs = batch(cfg)
    loss_e, grads_e = loss_and_grads(eager, ids, labels, docs)
    loss_c, grads_c = loss_and_grads(compiled, ids, labels, docs)
    assert float((loss_c - loss_e).abs().max() / loss_e.abs().max()) < REL
    assert set(grads_c) == set(grads_e)
    assert worst_relative(grads_c, grads_e) < REL
    with torch.no_grad():  # the inference graphs (validation runs them)
        assert float((compiled(ids, labels, docs).token_loss - loss_e).abs().max() / loss_e.abs().max()) < REL
    if fwl:
        # The bound discriminates: the same compiled graphs with one step size 1% off are far outside it.
        with torch.no_grad():
            compiled.fwl.step_sizes[0] *= 1.01
        _, grads_off = loss_and_grads(compiled, ids, labels, docs)
        assert worst_relative(grads_off, grads_e) > 2 * REL  # (measured: 7.4e-5)


def test_no_graph_breaks(tmp_path):
    """The FWL is one graph (its chunk loop unrolled, so the per-chunk work fuses) in the mixed-chunk form
    with a carried state and a pending position, and so is a block (graph capture only: seconds)."""
    cfg = tiny_config(tmp_path, *RECIPE)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ids, labels, docs = batch(cfg)
    assert model.fwl.chunk_for(cfg.model.seq_len) < cfg.model.seq_len  # two chunks: the state path is traced
    h = model.body(ids, docs)
    _, state = model.fwl(h, model.unembedding, labels, docs, return_state=True, last_label_pending=True)
    runs = [(model.fwl, (h, model.unembedding, labels, docs)),
            (model.fwl, (h, model.unembedding, labels, docs, state, ids[:, 0], True, True)),
            (model.blocks[0], (h, *model.attention_inputs(ids, docs)[:2]))]
    for module, args in runs:
        report = torch._dynamo.explain(module)(*args)
        assert (report.graph_count, report.graph_break_count) == (1, 0), report.break_reasons


def test_compiled_training_equals_eager_and_resumes(tmp_path):
    common = (*RECIPE, f"train.steps={STEPS}", "train.warmup_steps=2")
    assert Trainer(tiny_config(tmp_path / "eager", *common)).run() == 0
    assert Trainer(tiny_config(tmp_path / "compiled", *common, "train.compile=true")).run() == 0
    eager, compiled = step_losses(tmp_path / "eager"), step_losses(tmp_path / "compiled")
    assert sorted(compiled) == list(range(1, STEPS + 1))
    # Losses after a few AdamW steps: each step's fp32 differences feed the next, still within REL.
    for step, loss in eager.items():
        assert abs(compiled[step] - loss) < REL * abs(loss), (step, compiled[step], loss)

    # Stopped after step 3 (a real SIGUSR1), resumed compiled: the uninterrupted compiled run's losses.
    out = tmp_path / "resumed"

    def stop_after_3(trainer, stats):
        if trainer.state.step == 3:
            signal.raise_signal(signal.SIGUSR1)

    cfg = tiny_config(out, *common, "train.compile=true")
    assert Trainer(cfg, after_step=stop_after_3).run() == EXIT_REQUEUE
    assert Trainer(cfg).run() == 0
    resumed = step_losses(out)
    assert resumed == compiled  # same kernels, same order: bit for bit


@pytest.mark.parametrize("override,field", [("parallel.tp=2", "parallel.tp"), ("parallel.cp=2", "parallel.cp"),
                                            ("parallel.pp=2", "parallel.pp"),
                                            ("parallel.zero_stage=3", "parallel.zero_stage=3")])
def test_compile_refuses_unsupported_layouts(tmp_path, override, field):
    with pytest.raises(ConfigError, match=rf"train\.compile: .*{field}"):  # as the config is read
        tiny_config(tmp_path, "train.compile=true", override)


def test_compile_needs_a_cpp_compiler_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler anywhere on it
    monkeypatch.setenv("CXX", "g++")
    cfg = tiny_config(tmp_path, "train.compile=true")
    with pytest.raises(ConfigError, match="train.compile: .*C\\+\\+ compiler"):
        check_compile_toolchain(cfg, torch.device("cpu"))
    check_compile_toolchain(tiny_config(tmp_path), torch.device("cpu"))  # eager needs none
