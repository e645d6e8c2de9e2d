"""Import of a transformers body saved on disk (tools/convert_to_hf.py import, fwl_scale/hf/body_import.py),
the models made here from tiny configs (no hub download): a GPT-NeoX body computes fwl_scale's body's
function, so as a baseline its logits are NeoX's, and with the FWL added on top `fwl train` fine-tunes it;
GPT-2 and Llama bodies compute other functions and are refused, naming why, with nothing written."""
from __future__ import annotations

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM)

from fwl_scale.checkpoint.native import find_latest
from fwl_scale.checkpoint.weights import load_model_weights
from fwl_scale.hf.body_import import BodyImportError, body_weights
from fwl_scale.hf.convert import import_hf
from fwl_scale.model import build_model
from fwl_scale.train.loop import Trainer
from tests.hf_support import T, TOL, config, rel_err, trained  # noqa: F401 (a fixture)
from tests.train_support import step_losses


def test_import_transformers_body(trained, tmp_path):
    """A GPT-NeoX body made here: as fwl_scale's baseline its logits are NeoX's; with the FWL added on top
    `import` makes a step-0 checkpoint holding its body and `fwl train` fine-tunes it; GPT-2 and Llama are
    refused."""
    run, cfg, tok, text, ids = trained
    torch.manual_seed(1)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        use_parallel_residual=False, rotary_pct=1.0, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for p in neox.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # away from the zero biases / unit norms of its initialisation
    neox.save_pretrained(tmp_path / "neox")
    base = config(tmp_path / "unused", "model.tie_embeddings=false", "model.fwl.enabled=false")
    model = build_model(base.model)
    model.load_state_dict(body_weights(tmp_path / "neox", base))
    x = ids[:, 11:11 + T]  # one document (NeoX has no document masking)
    with torch.no_grad():
        assert rel_err(model.eval()(x, return_logits=True).logits, neox(x).logits) <= TOL

    new_run = tmp_path / "neox_fwl"
    fwl_cfg = ("model.tie_embeddings=false",)
    import_hf(tmp_path / "neox", config(new_run, *fwl_cfg))
    saved = load_model_weights(find_latest(new_run / "checkpoints"))
    expected = body_weights(tmp_path / "neox", config(new_run, *fwl_cfg))
    assert all(torch.equal(saved[k], expected[k]) for k in expected) and any(k.startswith("fwl.") for k in saved)
    assert torch.equal(saved["blocks.1.mlp.fc.weight"], neox.state_dict()["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"])
    assert Trainer(config(new_run, *fwl_cfg)).run() == 0
    assert sorted(step_losses(new_run)) == [1, 2]

    # GPT-2 and Llama bodies of the same shape compute other functions than fwl_scale's body (learned
    # absolute positions; RMSNorm and a gated SiLU MLP without biases): refused, naming why, nothing written.
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=2)).save_pretrained(tmp_path / "gpt2")
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=128)).save_pretrained(tmp_path / "llama")
    for name, why in [("gpt2", "GPT-2 adds learned absolute position embeddings"),
                      ("llama", "Llama uses RMSNorm and a SwiGLU MLP without biases")]:
        with pytest.raises(BodyImportError, match=rf"{name}.config.json: unsupported architecture '{name}': {why}"):
            import_hf(tmp_path / name, config(tmp_path / f"{name}_run", *fwl_cfg))
        assert not (tmp_path / f"{name}_run").exists()
