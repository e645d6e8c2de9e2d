"""Training with the FWL state carried across consecutive segments (contiguous mode, truncated BPTT).

* The trainer really carries it: a micro-batch's loss equals the model's loss on that segment given the
  state after the previous micro-batch of the same slots, and differs from the loss without it.
* Resume is exact: stopped by a signal and resumed, the run's losses equal an uninterrupted run's bit for
  bit (CPU, same process count); without restoring the carried state they would not (checked).
* The saved state reassembles for another data-/tensor-parallel layout with the same global slot count.
"""
from __future__ import annotations

import os
import signal

import pytest
import torch

from fwl_scale.checkpoint.native import find_latest
from fwl_scale.model.fwl import FWLState
from fwl_scale.parallel.shards import take_shard
from fwl_scale.train.carried import CarriedState, CarriedStateError, state_file
from fwl_scale.train.loop import Trainer
from fwl_scale.train.signals import EXIT_REQUEUE
from tests.train_support import step_losses, tiny_config

STEPS = 6
COMMON = ("data.mode=contiguous", f"train.steps={STEPS}", "parallel.grad_accum=2", "parallel.micro_batch=2",
          "train.warmup_steps=2", "train.eval_every=1000")


class Recorder:
    """Wraps the engine's forward to keep every micro-batch's inputs, state and loss."""

    def __init__(self, trainer: Trainer):
        self.calls = []
        engine = trainer.engine
        original = engine.forward

        def forward(*args, **kwargs):
            out = original(*args, **kwargs)
            state = kwargs.get("fwl_state")
            with torch.no_grad():  # the same weights, again with the state and without it
                again = trainer.engine.module(*args, fwl_state=state).loss
                fresh = trainer.engine.module(*args).loss
            self.calls.append({"args": [a.clone() for a in args], "state": state, "again": again, "fresh": fresh,
                               "loss": out.loss.detach().clone(), "out_state": out.fwl_state})
            return out

        engine.forward = forward


def test_trainer_carries_the_state(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", *COMMON, "train.steps=1"))
    assert trainer.carried.enabled
    rec = Recorder(trainer)
    trainer.train_step()  # two micro-batches at the initial weights
    first, second = rec.calls
    assert first["state"] is None and second["state"] is not None
    assert torch.equal(second["state"].w1, first["out_state"].w1.detach())
    # The second segment continues the first one's documents in every slot (long books).
    assert torch.equal(second["args"][2][:, 0], first["args"][2][:, -1])
    assert torch.equal(second["again"], second["loss"])  # the loss trained on is the carried-state loss
    assert abs(second["fresh"].item() - second["loss"].item()) > 1e-4  # ... which the state changes
    assert torch.equal(first["fresh"], first["loss"])
    assert not second["state"].w1.requires_grad  # truncated: nothing flows into the previous segment


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("carried_uninterrupted")
    assert Trainer(tiny_config(out, *COMMON)).run() == 0
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def stop_after(step: int):
    def hook(trainer, stats):
        if trainer.state.step == step:
            os.kill(os.getpid(), signal.SIGUSR1)
    return hook


def test_resume_with_carried_state_is_exact(tmp_path, uninterrupted):
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(out, *COMMON), after_step=stop_after(2))
    assert trainer.run() == EXIT_REQUEUE
    ref = find_latest(out / "checkpoints")
    assert (ref.path / state_file(0, 0)).is_file()
    resumed = Trainer(tiny_config(out, *COMMON))
    assert resumed.carried.state is not None
    assert torch.equal(resumed.carried.state.w1, trainer.carried.state.w1)
    assert resumed.run() == 0
    assert step_losses(out) == uninterrupted  # bit for bit


def test_resume_without_the_state_would_differ(tmp_path, uninterrupted, monkeypatch):
    out = tmp_path / "run"
    assert Trainer(tiny_config(out, *COMMON), after_step=stop_after(2)).run() == EXIT_REQUEUE
    monkeypatch.setattr(CarriedState, "load", lambda self, tag_dir, device: None)
    assert Trainer(tiny_config(out, *COMMON)).run() == 0
    losses = step_losses(out)
    assert all(losses[s] == uninterrupted[s] for s in range(1, 4))
    assert any(abs(losses[s] - uninterrupted[s]) > 1e-6 for s in range(4, STEPS + 1))


def random_state(rows: int, d: int = 4, h: int = 8, s: int = 4, seed: int = 0) -> FWLState:
    g = torch.Generator().manual_seed(seed)
    shapes = {"w1": (rows, d, h), "b1": (rows, h), "w2": (rows, h, s), "b2": (rows, s), "alpha": (rows, s),
              "beta": (rows, s)}
    t = {k: torch.randn(v, generator=g) for k, v in shapes.items()}
    t["doc_id"] = torch.arange(rows) + 10 * seed
    return FWLState.from_tensors(t)


def test_state_reassembles_for_another_layout(tmp_path):
    """Saved by dp = 2 × tp = 2 with 3 rows per rank (6 global slots); loaded by dp = 3 × tp = 1 (2 rows)
    and dp = 1 × tp = 2 (6 rows): each gets its global rows and its shard."""
    full = random_state(6)
    for dp in range(2):
        for tp in range(2):
            c = CarriedState(True, 3, dp, 2, tp, 2)
            rows = {k: v[dp * 3:(dp + 1) * 3] for k, v in full.tensors().items()}
            for name, dim in (("w1", 2), ("b1", 1), ("w2", 1)):
                rows[name] = take_shard(rows[name], dim, tp, 2)
            c.state = FWLState.from_tensors(rows)
            c.save(tmp_path)
    # A context-parallel peer (cp rank 1) writes nothing: the state is replicated over cp.
    peer = CarriedState(True, 3, 0, 2, 0, 2, cp_rank=1)
    peer.state = full
    (tmp_path / "peer").mkdir()
    peer.save(tmp_path / "peer")
    assert not any((tmp_path / "peer").iterdir())
    for dp_size, tp_size, micro in ((3, 1, 2), (1, 2, 6), (2, 2, 3)):
        for dp in range(dp_size):
            for tp in range(tp_size):
                c = CarriedState(True, micro, dp, dp_size, tp, tp_size)
                c.load(tmp_path, torch.device("cpu"))
                for name, t in full.tensors().items():
                    want = t[dp * micro:(dp + 1) * micro]
                    if name in ("w1", "b1", "w2"):
                        want = take_shard(want, {"w1": 2, "b1": 1, "w2": 1}[name], tp, tp_size)
                    assert torch.equal(c.state.tensors()[name], want), (dp_size, tp_size, name)
    with pytest.raises(CarriedStateError, match="global slots"):
        CarriedState(True, 4, 0, 2, 0, 1).load(tmp_path, torch.device("cpu"))
    (tmp_path / state_file(1, 1)).unlink()
    with pytest.raises(CarriedStateError, match="missing"):
        CarriedState(True, 6, 0, 1, 0, 1).load(tmp_path, torch.device("cpu"))


def test_stream_position_measurement_on_a_checkpoint(tmp_path, capsys):
    """fwl eval --stream on a trained checkpoint: loss by position over several windows, with and without the
    carried state, and the fast update's size per window; the spelling before it, python -m
    fwl_scale.eval.streaming, gives the same results with a deprecation note on stderr."""
    import json

    from fwl_scale.cli import main as fwl_main
    from fwl_scale.eval.streaming import main

    out = tmp_path / "run"
    assert Trainer(tiny_config(out, *COMMON, "train.steps=1")).run() == 0
    capsys.readouterr()  # the training's own output
    report = tmp_path / "positions.json"
    # The run's own config (the trainer writes it next to its checkpoints).
    code = main(["--windows", "3", "--buckets", "2", "--docs", "2", "--json", str(report), str(out / "config.yaml"),
                 str(out)])
    assert code == 0
    old_spelling = capsys.readouterr()
    printed = old_spelling.out
    assert "state carried" in printed and "windows alone" in printed and "fast update" in printed
    assert "deprecated" in old_spelling.err and "fwl eval CONFIG CHECKPOINT --stream" in old_spelling.err
    data = json.loads(report.read_text())
    carried, alone = data["state carried"], data["windows alone"]
    assert len(carried["loss"]) == 6 and carried["edges"][-1] == [80, 96]
    assert carried["loss"][:2] == alone["loss"][:2]  # the first window has nothing to carry
    assert len(carried["update_w1"]) == 3 and carried["update_w1"][2] > carried["update_w1"][0]
    report_fwl = tmp_path / "positions_fwl.json"
    assert fwl_main(["eval", str(out / "config.yaml"), str(out), "--stream", "--windows", "3", "--buckets", "2",
                     "--max-docs", "2", "--json", str(report_fwl)]) == 0
    captured = capsys.readouterr()
    assert captured.out == printed and "deprecated" not in captured.err
    assert json.loads(report_fwl.read_text()) == data
