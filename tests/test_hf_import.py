"""Import of a transformers body saved on disk (tools/convert_to_hf.py import, fwl_scale/hf/body_import.py),
the models made here from tiny configs (no hub download), their weights moved off their initialisation:

* GPT-NeoX, GPT-2 and Llama (with and without grouped-query attention) bodies: as fwl_scale's baseline
  (the config that body_overrides gives) the logits are transformers' own on real token ids (fp32, 1e-5
  relative); with the FWL added on top, `import` makes a step-0 checkpoint holding the body and `fwl
  train` fine-tunes it; GPT-2 and Llama runs export back (tools/convert_to_hf.py) and load in
  transformers with fwl_scale's logits;
* refused, naming the field, with nothing written: an unknown architecture, a config that describes
  another body (every override it needs listed), a head_dim other than hidden_size / heads, rope scaling,
  GPT-2's scale_attn_by_inverse_layer_idx.
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM)

from fwl_scale.checkpoint.native import find_latest
from fwl_scale.checkpoint.weights import load_model_weights
from fwl_scale.hf.body_import import BodyImportError, body_overrides, body_weights
from fwl_scale.hf.convert import export_checkpoint, import_hf
from fwl_scale.model import build_model
from fwl_scale.train.loop import Trainer
from tests.hf_support import T, TOL, config, hf_side, reference, rel_err, trained  # noqa: F401 (a fixture)
from tests.train_support import step_losses

SHAPE = dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
BODIES = {
    "neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
        **SHAPE, intermediate_size=96, use_parallel_residual=False, rotary_pct=0.5, hidden_act="gelu_pytorch_tanh")),
    # GPT-2 ties its output matrix to its embedding; learned positions, Conv1D weights.
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=2, n_positions=64)),
    # intermediate_size not a multiple of hidden_size (model.mlp_hidden), rope base not the default.
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, intermediate_size=80, rope_theta=500.0)),
    # Grouped-query attention: 4 query heads, 2 key/value heads (model.n_kv_heads).
    "llama_gqa": lambda: LlamaForCausalLM(LlamaConfig(**{**SHAPE, "num_attention_heads": 4}, num_key_value_heads=2,
                                                      intermediate_size=80)),
}
WHAT = {"neox": "gpt_neox.layers.1.mlp.dense_h_to_4h.weight", "gpt2": "transformer.h.1.mlp.c_fc.weight",
        "llama": "model.layers.1.mlp.up_proj.weight", "llama_gqa": "model.layers.1.mlp.up_proj.weight"}


def save_body(name: str, path):
    torch.manual_seed(1)
    model = BODIES[name]().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # away from the zero biases / unit norms of its initialisation
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("name", ["neox", "gpt2", "llama", "llama_gqa"])
def test_import_transformers_body(trained, tmp_path, name):
    run, cfg, tok, text, ids = trained
    body = save_body(name, tmp_path / name)
    over = body_overrides(tmp_path / name)
    base = config(tmp_path / "unused", *over, "model.fwl.enabled=false")
    model = build_model(base.model)
    model.load_state_dict(body_weights(tmp_path / name, base))
    x = ids[:, 11:11 + T]  # one document (transformers' models have no document masking)
    with torch.no_grad():
        assert rel_err(model.eval()(x, return_logits=True).logits, body(x).logits) <= TOL

    new_run = tmp_path / f"{name}_fwl"
    import_hf(tmp_path / name, config(new_run, *over))
    saved = load_model_weights(find_latest(new_run / "checkpoints"))
    expected = body_weights(tmp_path / name, config(new_run, *over))
    assert all(torch.equal(saved[k], expected[k]) for k in expected) and any(k.startswith("fwl.") for k in saved)
    theirs = body.state_dict()[WHAT[name]]
    assert torch.equal(saved["blocks.1.mlp.fc.weight"], theirs.t() if name == "gpt2" else theirs)
    assert Trainer(config(new_run, *over)).run() == 0
    assert sorted(step_losses(new_run)) == [1, 2]
    if name == "neox":
        return  # its export is test_hf.py's (fwl_scale's own body)

    # The fine-tuned FWL model on the imported body exports and loads in transformers with our logits.
    export_checkpoint(new_run, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["norm"] == base.model.norm
    ours = build_model(config(new_run, *over).model)
    ours.load_state_dict(load_model_weights(find_latest(new_run / "checkpoints")))
    got = hf_side(tmp_path / "hf", tmp_path, ids[:, :T], [T])
    assert rel_err(got[f"logits{T}"], reference(ours.eval(), ids[:, :T], tok.eos_id).logits) <= TOL


def test_refused_bodies(tmp_path):
    """Each refusal names the file and field; the run directory is never created."""
    save_body("llama", tmp_path / "llama")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    LlamaConfig(**SHAPE, intermediate_size=80, head_dim=8).save_pretrained(tmp_path / "head_dim")
    LlamaConfig(**SHAPE, intermediate_size=80, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                "rope_theta": 10000.0}).save_pretrained(tmp_path / "rope")
    GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=2, scale_attn_by_inverse_layer_idx=True
               ).save_pretrained(tmp_path / "gpt2_scaled")
    llama_over = body_overrides(tmp_path / "llama")
    cases = [
        ("bert", [], r"bert.config.json: unsupported architecture 'bert': fwl_scale imports gpt_neox, gpt2, llama"),
        ("llama", [], r"llama.config.json: this llama body computes another function than the config.s model: .*"
                      r"model\.norm must be rmsnorm \(is layernorm\); model\.mlp must be swiglu \(is gelu\).*"
                      r"Add: .*model\.norm=rmsnorm model\.mlp=swiglu model\.bias=false"),
        ("head_dim", llama_over, r"head_dim.config.json: head_dim = 8: must be hidden_size / num_attention_heads = 16"),
        ("rope", llama_over, r"rope.config.json: rope_parameters.rope_type = 'linear': only the default rotary"),
        ("gpt2_scaled", [], r"gpt2_scaled.config.json: scale_attn_by_inverse_layer_idx = True: attention scaled by "
                            r"1/layer index is not supported"),
    ]
    for name, over, why in cases:
        with pytest.raises(BodyImportError, match=why):
            import_hf(tmp_path / name, config(tmp_path / f"{name}_run", *over))
        assert not (tmp_path / f"{name}_run").exists()
