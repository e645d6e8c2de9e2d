"""Starting an fwl_scale model from an existing transformers body saved on disk (no hub downloads).

Supported: GPT-NeoX (`GPTNeoXForCausalLM`) in the form fwl_scale's body computes exactly — sequential
residual (use_parallel_residual: false), rotary on the whole head (partial_rotary_factor 1), tanh-GELU
(gelu_new / gelu_pytorch_tanh / gelu_fast), biases — with untied embeddings (its embed_in and output
matrix). Conversion: NeoX's fused q|k|v rows are [head, (q, k, v), head_dim], fwl_scale's [(q, k, v),
head, head_dim]; NeoX rotates the pairs (i, i + head_dim/2), fwl_scale the pairs (2i, 2i + 1), so the q
and k rows of each head are permuted accordingly (their dot products, hence attention, are unchanged);
the vocabulary rows are padded with zeros to model.vocab_multiple (padding is masked). The FWL's own
parameters keep fwl_scale's seeded initialisation. GPT-2 (learned absolute positions) and Llama (RMSNorm,
SwiGLU, no biases) bodies compute other functions than fwl_scale's body and are refused, naming why.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from fwl_scale.config import Config, ConfigError

TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
WHY_NOT = {
    "gpt2": "GPT-2 adds learned absolute position embeddings; fwl_scale's body has rotary positions only",
    "llama": "Llama uses RMSNorm and a SwiGLU MLP without biases; fwl_scale's body has LayerNorm and a GELU MLP",
}


class BodyImportError(ConfigError):
    """A transformers body that cannot become fwl_scale's; the message names the file and field."""


def _tensors(d: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    out = {}
    for name in files:
        if not (d / name).is_file():
            raise BodyImportError(f"{d / name}: missing (safetensors weights expected)")
        out.update(load_file(str(d / name)))
    return out


def _check(d: Path, hf: dict, cfg: Config) -> None:
    m = cfg.model
    rope = hf.get("rope_parameters") or {}
    want = [("use_parallel_residual", hf.get("use_parallel_residual", True), False, "must be false"),
            ("partial_rotary_factor", rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)), 1.0, "must be 1"),
            ("attention_bias", hf.get("attention_bias", True), True, "must be true"),
            ("tie_word_embeddings", hf.get("tie_word_embeddings", False), m.tie_embeddings, "model.tie_embeddings"),
            ("hidden_size", hf.get("hidden_size"), m.d_model, "model.d_model"),
            ("num_hidden_layers", hf.get("num_hidden_layers"), m.n_layers, "model.n_layers"),
            ("num_attention_heads", hf.get("num_attention_heads"), m.n_heads, "model.n_heads"),
            ("intermediate_size", hf.get("intermediate_size"), m.mlp_mult * m.d_model, "model.mlp_mult × d_model"),
            ("vocab_size", hf.get("vocab_size"), m.vocab_size, "model.vocab_size"),
            ("layer_norm_eps", hf.get("layer_norm_eps"), m.norm_eps, "model.norm_eps"),
            ("rope_theta", rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0)), m.rope_theta, "model.rope_theta")]
    for key, have, need, what in want:
        if have != need:
            raise BodyImportError(f"{d / 'config.json'}: {key} = {have!r}, needs {need!r} ({what})")
    if hf.get("hidden_act") not in TANH_GELU:
        raise BodyImportError(f"{d / 'config.json'}: hidden_act = {hf.get('hidden_act')!r}; fwl_scale's MLP is the "
                              f"tanh GELU ({', '.join(TANH_GELU)})")
    if m.tie_embeddings:
        raise BodyImportError(f"{d / 'config.json'}: a GPT-NeoX body has its own output matrix; set "
                              "model.tie_embeddings=false")


def body_weights(hf_dir: str | Path, cfg: Config) -> dict[str, Tensor]:
    """fwl_scale's state dict for cfg.model: body and embeddings from the transformers model in `hf_dir`,
    everything else (the FWL) from fwl_scale's initialisation seeded with train.seed."""
    from fwl_scale.model import build_model

    d = Path(hf_dir)
    try:
        hf = json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BodyImportError(f"{d / 'config.json'}: unreadable ({e})") from None
    kind = hf.get("model_type")
    if kind != "gpt_neox":
        why = WHY_NOT.get(kind, "only GPT-NeoX bodies are supported")
        raise BodyImportError(f"{d / 'config.json'}: unsupported architecture {kind!r}: {why}")
    _check(d, hf, cfg)
    src = _tensors(d)
    torch.manual_seed(cfg.train.seed)
    state = build_model(cfg.model).state_dict()
    H, hd, V = cfg.model.n_heads, cfg.model.d_model // cfg.model.n_heads, cfg.model.vocab_size
    # Our rotary pair (2i, 2i+1) is NeoX's (i, i + hd/2).
    perm = torch.stack([torch.arange(hd // 2), torch.arange(hd // 2) + hd // 2], dim=1).flatten()

    def qkv(t: Tensor) -> Tensor:
        t = t.reshape(H, 3, hd, *t.shape[1:])
        t = torch.stack([t[:, 0, perm], t[:, 1, perm], t[:, 2]], dim=0)  # [3, H, hd, ...]
        return t.reshape(3 * H * hd, *t.shape[3:])

    def put(ours: str, theirs: str, f=lambda t: t) -> None:
        if theirs not in src:
            raise BodyImportError(f"{d}: no tensor {theirs!r} in its weights")
        t = f(src[theirs].to(state[ours].dtype))
        if ours in ("embed.weight", "lm_head.weight"):
            t = torch.cat([t, t.new_zeros(state[ours].shape[0] - V, t.shape[1])])
        if t.shape != state[ours].shape:
            raise BodyImportError(f"{d}: {theirs} has shape {tuple(t.shape)}, {ours} needs {tuple(state[ours].shape)}")
        state[ours] = t

    put("embed.weight", "gpt_neox.embed_in.weight")
    put("lm_head.weight", "embed_out.weight" if "embed_out.weight" in src else "lm_head.weight")
    put("norm_f.weight", "gpt_neox.final_layer_norm.weight")
    put("norm_f.bias", "gpt_neox.final_layer_norm.bias")
    for i in range(cfg.model.n_layers):
        a, b = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        for ours, theirs in [("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"),
                             ("attn.proj", "attention.dense"), ("mlp.fc", "mlp.dense_h_to_4h"),
                             ("mlp.proj", "mlp.dense_4h_to_h")]:
            put(a + ours + ".weight", b + theirs + ".weight")
            put(a + ours + ".bias", b + theirs + ".bias")
        put(a + "attn.qkv.weight", b + "attention.query_key_value.weight", qkv)
        put(a + "attn.qkv.bias", b + "attention.query_key_value.bias", qkv)
    return state
