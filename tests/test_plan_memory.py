"""The analytic memory model (fwl_scale/plan/memory.py) against the measured peak of real training
steps on CPU (fwl_scale/plan/measure.py): fp32, one process, forward + backward + AdamW.

Stated error: within 10% of the measured peak on every shape below (on the configs of
tests/test_plan_memory.py's development, d = 128–256, T = 128–256, with and without the FWL's decay,
chunked and quadratic, with and without checkpointing, it was within 6%)."""
import pytest

from fwl_scale.config import load_config
from fwl_scale.plan.measure import measure_peak
from fwl_scale.plan.memory import estimate, param_split

SMALL = ["model.d_model=64", "model.n_heads=2", "model.vocab_size=1024", "model.seq_len=64",
         "model.fwl.chunk_size=64", "model.fwl.vocab_chunk=128", "parallel.micro_batch=4"]
CASES = [
    ("configs/base_tiny.yaml", ["model.n_layers=3"]),
    ("configs/base_tiny.yaml", ["model.n_layers=3", "train.activation_checkpointing=true"]),
    ("configs/tiny.yaml", ["model.n_layers=2"]),
    ("configs/tiny.yaml", ["model.n_layers=1", "model.fwl.decay=none", "model.fwl.normalize=none"]),
    ("configs/tiny.yaml", ["model.n_layers=2", "model.fwl.chunk_size=16", "model.fwl.form=chunked"]),
    ("configs/tiny.yaml", ["model.n_layers=2", "model.d_model=128", "model.n_heads=4",
                           "train.activation_checkpointing=true"]),
    # Sequential updates (model.fwl.update=sequential): 16 inner chunks of one fast chunk; 2 of two fast chunks;
    # without the remedies (measured within 8% on d = 64–128, T = 64–128, b = 4–32).
    ("configs/tiny.yaml", ["model.n_layers=2", "model.fwl.update=sequential", "model.fwl.inner_chunk=4"]),
    ("configs/tiny.yaml", ["model.n_layers=2", "model.d_model=128", "model.n_heads=4", "model.fwl.update=sequential",
                           "model.fwl.inner_chunk=32", "model.fwl.chunk_size=16", "model.fwl.form=chunked"]),
    ("configs/tiny.yaml", ["model.n_layers=1", "model.d_model=128", "model.n_heads=4", "model.fwl.decay=none",
                           "model.fwl.normalize=none", "model.fwl.update=sequential", "model.fwl.inner_chunk=16"]),
]


@pytest.mark.parametrize("config,overrides", CASES, ids=[" ".join(o) for _, o in CASES])
def test_memory_model_within_stated_error_of_measured_peak(config, overrides):
    cfg = load_config(config, SMALL + overrides)
    measured = measure_peak(cfg)
    predicted = estimate(cfg, 1, param_split(cfg)).total
    assert abs(predicted / measured - 1) < 0.10, (predicted / 2**20, measured / 2**20)


def test_measure_counts_exactly_the_tensors_alive():
    """The measurement itself against a hand count: fp32 parameters + AdamW's two moments + the
    in-place-zeroed gradients are alive at the end; the peak can only be above."""
    import torch

    from fwl_scale.plan.measure import LiveBytes

    mode = LiveBytes()
    with mode:
        a = torch.ones(1000)  # 4000 bytes
        b = torch.ones(500)  # 2000 bytes
        del a
        c = b * 2  # 2000 bytes
    assert mode.peak == 6000 and mode.live == 4000
    del b, c
    assert mode.live == 0
