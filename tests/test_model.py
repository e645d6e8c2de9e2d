"""The GPT model around the FWL: document isolation, chunked losses, the FWL head against the naive
reference at model level, configs and parameter counts."""
from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest
import torch

from fwl_scale import IGNORE_INDEX
from fwl_scale.config import ConfigError, load_config
from fwl_scale.model import build_model
from fwl_scale.model.fwl.naive import naive_fwl_logits
from tests.fwl_support import packed_batch_with_ignored_label

TOL = 1e-10
ROOT = Path(__file__).resolve().parents[1]


def tiny_model(fwl: bool, **over):
    overrides = ["model.d_model=16", "model.n_heads=2", "model.n_layers=2", "model.seq_len=16",
                 "model.vocab_size=50", "model.vocab_multiple=64", f"model.fwl.enabled={str(fwl).lower()}",
                 "model.fwl.chunk_size=4", "model.fwl.vocab_chunk=7", "model.fwl.step_size_init=0.5"]
    overrides += [f"{k}={v}" for k, v in over.items()]
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    return build_model(cfg.model).double(), cfg


@pytest.mark.parametrize("form", ["auto", "quadratic", "chunked"])
def test_every_form_gives_the_same_model(form):
    # T = 32 is past `auto`'s crossover (4 + 2·16·64/80 ≈ 30): `auto` and `chunked` run the mixed-chunk
    # form, compared with the quadratic form in loss and every gradient.
    T = 32
    ref, _ = tiny_model(True, **{"model.fwl.form": "quadratic", "model.seq_len": T})
    m, _ = tiny_model(True, **{"model.fwl.form": form, "model.seq_len": T})
    m.load_state_dict(ref.state_dict())
    assert m.fwl.chunk_for(16) == {"auto": 16, "quadratic": 16, "chunked": 4}[form]
    assert m.fwl.chunk_for(T) == {"auto": 4, "quadratic": T, "chunked": 4}[form]
    assert m.fwl.chunk_for(4096) == {"auto": 4, "quadratic": 4096, "chunked": 4}[form]
    ids = torch.randint(0, 50, (2, T))
    docs = torch.zeros(2, T, dtype=torch.long)
    docs[0, 9:] = 1
    l_ref, l = ref(ids, ids.roll(-1, 1), docs).loss, m(ids, ids.roll(-1, 1), docs).loss
    assert abs(l_ref.item() - l.item()) < TOL
    g_ref = torch.autograd.grad(l_ref, list(ref.parameters()))
    g = torch.autograd.grad(l, list(m.parameters()))
    for (name, _), a, b in zip(m.named_parameters(), g, g_ref):
        assert (a - b).abs().max() < TOL, name


@pytest.mark.parametrize("fwl", [True, False])
def test_documents_are_isolated(fwl):
    """A document packed after another gives the same losses as the document alone."""
    model, _ = tiny_model(fwl)
    a = torch.randint(0, 50, (1, 6))
    b = torch.randint(0, 50, (1, 10))
    ids = torch.cat([a, b], dim=1)
    docs = torch.tensor([[0] * 6 + [1] * 10])
    labels = torch.cat([a.roll(-1, 1), b.roll(-1, 1)], dim=1)
    labels[0, 5] = IGNORE_INDEX
    labels[0, -1] = IGNORE_INDEX
    packed = model(ids, labels, docs).token_loss[0, 6:]
    alone = model(b, labels[:, 6:], torch.ones(1, 10, dtype=torch.long)).token_loss[0]
    assert (packed - alone).abs().max() < TOL


@pytest.mark.parametrize("residual", [False, True])
def test_model_head_matches_naive_reference(residual):
    model, cfg = tiny_model(True, **{"model.fwl.residual": str(residual).lower()})
    ids, docs, labels = packed_batch_with_ignored_label()
    out = model(ids, labels, docs, return_logits=True)
    h = model.body(ids, docs)
    ref = naive_fwl_logits(model.fwl, h, model.unembedding, labels, docs)
    assert (out.logits - ref).abs().max() < TOL
    ce = torch.nn.functional.cross_entropy(ref.reshape(-1, 50), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    assert abs(out.loss.item() - ce.item()) < TOL
    # Every parameter gets the same gradient through the chunked fast path and the reference.
    g_fast = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    g_ref = torch.autograd.grad(ce, list(model.parameters()), allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), g_fast, g_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            assert (a - b).abs().max() < TOL, name


def test_vocab_chunking_does_not_change_loss_or_gradients():
    m1, _ = tiny_model(True)
    m2, _ = tiny_model(True, **{"model.fwl.vocab_chunk": 1000})
    m2.load_state_dict(m1.state_dict())
    ids = torch.randint(0, 50, (2, 16))
    l1, l2 = m1(ids, ids.roll(-1, 1)).loss, m2(ids, ids.roll(-1, 1)).loss
    assert abs(l1.item() - l2.item()) < TOL
    g1 = torch.autograd.grad(l1, list(m1.parameters()))
    g2 = torch.autograd.grad(l2, list(m2.parameters()))
    assert max((a - b).abs().max().item() for a, b in zip(g1, g2)) < TOL


def test_activation_checkpointing_keeps_gradients():
    m, _ = tiny_model(True)
    ids = torch.randint(0, 50, (2, 16))
    g1 = torch.autograd.grad(m(ids, ids.roll(-1, 1)).loss, list(m.parameters()))
    m.set_activation_checkpointing(True)
    g2 = torch.autograd.grad(m(ids, ids.roll(-1, 1)).loss, list(m.parameters()))
    assert max((a - b).abs().max().item() for a, b in zip(g1, g2)) < TOL


@pytest.mark.parametrize("fwl", [True, False])
def test_padded_vocabulary_never_predicted(fwl):
    """The padding rows (embedding/unembedding rows 50-63, the FWL's output bias) take no probability:
    made large, they change neither the logits nor the loss, which is the cross-entropy over the 50 real
    entries (the FWL's update softmax included)."""
    m, cfg = tiny_model(fwl)
    assert cfg.model.padded_vocab_size == 64
    ids = torch.randint(0, 50, (2, 16))
    labels = ids.roll(-1, 1)
    before = m(ids, labels, return_logits=True)
    with torch.no_grad():
        m.embed.weight[50:] = 10 * torch.randn(14, 16, dtype=torch.float64)  # random: LayerNorm'd h sums to 0
        if fwl:
            m.fwl.out_bias[50:] = 30.0
    after = m(ids, labels, return_logits=True)
    assert after.logits.shape[-1] == 50
    assert (after.logits - before.logits).abs().max() < TOL
    ce = torch.nn.functional.cross_entropy(after.logits.reshape(-1, 50), labels.reshape(-1))
    assert abs(after.loss.item() - ce.item()) < TOL and abs(after.loss.item() - before.loss.item()) < TOL
    # The padding rows are multiplied (aligned matmul widths) but take no gradient from any loss.
    after.loss.backward()
    assert m.embed.weight.grad[50:].abs().max() == 0
    if fwl:
        assert m.fwl.out_bias.grad[50:].abs().max() == 0


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "configs" / "*.yaml"))))
def test_ladder_configs_land_within_ten_percent_of_their_name(path):
    cfg = load_config(path)
    counts = build_model(cfg.model, device="meta").param_counts()
    m = re.search(r"_(\d+)([mb])$", cfg.name)
    if m is None:
        assert cfg.name in ("tiny", "base_tiny")
        return
    n, unit = int(m.group(1)), m.group(2)
    named = {"1b": 1.3e9, "3b": 2.7e9, "7b": 6.7e9}.get(f"{n}{unit}", n * (1e6 if unit == "m" else 1e9))
    assert abs(counts["total"] - named) / named < 0.10, (cfg.name, counts)
    assert counts["fwl"] > 0 if cfg.model.fwl.enabled else counts["fwl"] == 0


@pytest.mark.parametrize("override, field", [
    ("model.n_heads=5", "model.n_heads"),
    ("model.fwl.width=0", "model.fwl.width"),
    ("model.fwl.width=64", "model.fwl.width"),  # tied embeddings need s = d
    ("model.d_model=-8", "model.d_model"),
    ("model.bogus=1", "model.bogus"),
    ("train.lr=fast", "train.lr"),
    ("parallel.zero_stage=5", "parallel.zero_stage"),
    ("model.fwl.form=cubic", "model.fwl.form"),
    ("model.fwl.normalize=median", "model.fwl.normalize"),
    ("model.fwl.decay=fixed", "model.fwl.decay"),
    ("model.fwl.decay_init=1.0", "model.fwl.decay_init"),
    ("model.fwl.decay_init=0", "model.fwl.decay_init"),
])
def test_bad_config_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(ROOT / "configs" / "tiny.yaml", [override])


def test_malformed_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {d_model: 128\n")
    with pytest.raises(ConfigError, match="bad.yaml.*malformed YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
