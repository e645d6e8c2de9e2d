"""Starting an fwl_scale model from an existing transformers body saved on disk (no hub downloads).

Three architectures, each in the forms fwl_scale's body computes exactly (model.norm, mlp, bias,
positions, rope_fraction choose the variant; `body_overrides` gives the settings a body needs, and a
config that differs is refused with all of them listed):

* GPT-NeoX (`GPTNeoXForCausalLM`): sequential residual (use_parallel_residual: false), rotary on all or
  the first part of each head (partial_rotary_factor / rotary_pct → model.rope_fraction), tanh GELU
  (gelu_new / gelu_pytorch_tanh / gelu_fast), biases, LayerNorm.
* GPT-2 (`GPT2LMHeadModel`): learned absolute positions (model.positions: learned, max_positions =
  n_positions), tanh GELU, biases, LayerNorm; its Conv1D weights are stored [in, out], so transposed.
* Llama (`LlamaForCausalLM`): RMSNorm, SwiGLU MLP (gate/up/down → mlp.gate/fc/proj), no biases
  (attention_bias = mlp_bias, both false or both true), rotary, grouped-query attention or not; separate
  q, k, v projections fused here.

Conversion details: fwl_scale's fused q|k|v rows are [(q, k, v), head, head_dim] (GPT-2's c_attn is the
same; NeoX's are [head, (q, k, v), head_dim]); NeoX and Llama rotate the pairs (i, i + r/2) of the first r
dims of a head, fwl_scale the pairs (2i, 2i + 1), so the q and k rows of each head are permuted
accordingly (their dot products, hence attention, are unchanged); the vocabulary rows are padded with
zeros to model.vocab_multiple (padding is masked). The FWL's own parameters keep fwl_scale's seeded
initialisation.

Grouped-query attention (Llama's num_key_value_heads < num_attention_heads) is model.n_kv_heads: k and v
rows fused into attn.kv, q apart (attn.q). Refused, naming the field: rope scaling (a rope_type other
than default), a head_dim other than hidden_size / heads, GPT-2's scale_attn_by_inverse_layer_idx or
unscaled attention, cross-attention, other activations, NeoX's parallel residual.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from fwl_scale.config import Config, ConfigError

TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
SUPPORTED = ("gpt_neox", "gpt2", "llama")


class BodyImportError(ConfigError):
    """A transformers body that cannot become fwl_scale's; the message names the file and field."""


def _tensors(d: Path) -> dict[str, Tensor]:
    # Function-level: safetensors is only needed here, not by the rest of the config-reading module.
    from safetensors.torch import load_file

    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    out = {}
    for name in files:
        if not (d / name).is_file():
            raise BodyImportError(f"{d / name}: missing (safetensors weights expected)")
        out.update(load_file(str(d / name)))
    return out


def _read(hf_dir: str | Path) -> tuple[Path, dict, str]:
    d = Path(hf_dir)
    try:
        hf = json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BodyImportError(f"{d / 'config.json'}: unreadable ({e})") from None
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise BodyImportError(f"{d / 'config.json'}: unsupported architecture {kind!r}: fwl_scale imports "
                              f"{', '.join(SUPPORTED)} bodies")
    return d, hf, kind


def _rope(where: str, hf: dict, kind: str) -> tuple[float, float]:
    """(theta, rotated fraction of a head) of a NeoX or Llama config (transformers 5's rope_parameters,
    or the older top-level rope_theta / rotary_emb_base / rotary_pct and rope_scaling)."""
    rope = hf.get("rope_parameters") or {}
    kind_of = rope.get("rope_type", rope.get("type", "default"))
    if kind_of != "default":
        raise BodyImportError(f"{where}: rope_parameters.rope_type = {kind_of!r}: only the default rotary "
                              "positions are supported (no rope scaling)")
    if hf.get("rope_scaling"):
        raise BodyImportError(f"{where}: rope_scaling = {hf['rope_scaling']!r}: rope scaling is not supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    default_fraction = 0.25 if kind == "gpt_neox" else 1.0
    fraction = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", default_fraction)))
    return float(theta), float(fraction)


def _refuse(where: str, checks: list[tuple[str, Any, Any, str]]) -> None:
    for key, have, need, why in checks:
        if have != need:
            raise BodyImportError(f"{where}: {key} = {have!r}: {why}")


def _model_fields(where: str, hf: dict, kind: str) -> dict[str, Any]:
    """fwl_scale's ModelConfig settings that compute this body's function (mlp_width for the MLP's hidden
    width), after refusing what fwl_scale's body cannot compute."""
    if kind == "gpt2":
        _refuse(where, [
            ("scale_attn_weights", hf.get("scale_attn_weights", True), True, "attention without the 1/sqrt(head "
             "width) scale is not supported"),
            ("scale_attn_by_inverse_layer_idx", hf.get("scale_attn_by_inverse_layer_idx", False), False,
             "attention scaled by 1/layer index is not supported"),
            ("add_cross_attention", hf.get("add_cross_attention", False), False, "cross-attention is not supported")])
        if hf.get("activation_function", "gelu_new") not in TANH_GELU:
            raise BodyImportError(f"{where}: activation_function = {hf.get('activation_function')!r}: the MLP "
                                  f"must be the tanh GELU ({', '.join(TANH_GELU)})")
        d = hf["n_embd"]
        return {"d_model": d, "n_layers": hf["n_layer"], "n_heads": hf["n_head"], "kv_heads": hf["n_head"],
                "vocab_size": hf["vocab_size"],
                "norm_eps": hf.get("layer_norm_epsilon", 1e-5), "norm": "layernorm", "mlp": "gelu",
                "mlp_width": hf.get("n_inner") or 4 * d, "bias": True, "positions": "learned",
                "max_positions": hf.get("n_positions", 1024), "tie_embeddings": hf.get("tie_word_embeddings", True)}
    theta, fraction = _rope(where, hf, kind)
    d, H = hf["hidden_size"], hf["num_attention_heads"]
    fields = {"d_model": d, "n_layers": hf["num_hidden_layers"], "n_heads": H, "kv_heads": H,
              "vocab_size": hf["vocab_size"],
              "mlp_width": hf["intermediate_size"], "positions": "rotary", "rope_theta": theta,
              "rope_fraction": fraction, "tie_embeddings": hf.get("tie_word_embeddings", False)}
    if kind == "gpt_neox":
        _refuse(where, [("use_parallel_residual", hf.get("use_parallel_residual", True), False,
                         "the parallel residual is not supported (must be false)"),
                        ("attention_bias", hf.get("attention_bias", True), True,
                         "NeoX's MLP keeps its biases, so the attention's must be there too (must be true)")])
        if hf.get("hidden_act") not in TANH_GELU:
            raise BodyImportError(f"{where}: hidden_act = {hf.get('hidden_act')!r}: the MLP must be the tanh "
                                  f"GELU ({', '.join(TANH_GELU)})")
        return {**fields, "norm_eps": hf.get("layer_norm_eps", 1e-5), "norm": "layernorm", "mlp": "gelu",
                "bias": True}
    kv_heads = hf.get("num_key_value_heads") or H
    if H % kv_heads:
        raise BodyImportError(f"{where}: num_key_value_heads = {kv_heads} does not divide num_attention_heads = {H}")
    _refuse(where, [
        ("head_dim", hf.get("head_dim") or d // H, d // H, f"must be hidden_size / num_attention_heads = {d // H}"),
        ("hidden_act", hf.get("hidden_act"), "silu", "the gated MLP must be SiLU"),
        ("partial_rotary_factor", fraction, 1.0, "Llama rotates whole heads"),
        ("mlp_bias", hf.get("mlp_bias", False), hf.get("attention_bias", False),
         "must equal attention_bias (model.bias covers every linear layer of the body)")])
    return {**fields, "kv_heads": kv_heads, "norm_eps": hf.get("rms_norm_eps", 1e-6), "norm": "rmsnorm", "mlp": "swiglu",
            "bias": bool(hf.get("attention_bias", False))}


# Settings compared through ModelConfig's resolved property, set through its field.
RENAMED = {"mlp_width": "mlp_hidden", "kv_heads": "n_kv_heads"}


def _mismatches(fields: dict[str, Any], cfg: Config) -> list[tuple[str, Any, Any]]:
    """(override key, the body's value, the config's) where the config computes another function."""
    m = cfg.model
    out = []
    for k, need in fields.items():
        if k in RENAMED:
            if getattr(m, k) != need:
                out.append((f"model.{RENAMED[k]}", need, getattr(m, k)))
        elif k == "max_positions":
            if m.position_rows != need:
                out.append(("model.max_positions", need, m.position_rows))
        elif getattr(m, k) != need:
            out.append((f"model.{k}", need, getattr(m, k)))
    return out


def _value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def body_overrides(hf_dir: str | Path) -> list[str]:
    """The model overrides (`model.d_model=...`, ...) of the fwl_scale config whose body is this one."""
    d, hf, kind = _read(hf_dir)
    fields = _model_fields(str(d / "config.json"), hf, kind)
    return [f"model.{RENAMED.get(k, k)}={_value(v)}" for k, v in fields.items()]


def _check(d: Path, hf: dict, kind: str, cfg: Config) -> None:
    where = str(d / "config.json")
    bad = _mismatches(_model_fields(where, hf, kind), cfg)
    if bad:
        raise BodyImportError(f"{where}: this {kind} body computes another function than the config's model: "
                              + "; ".join(f"{k} must be {_value(need)} (is {_value(have)})" for k, need, have in bad)
                              + ". Add: " + " ".join(f"{k}={_value(need)}" for k, need, _ in bad))


def _rotary_perm(hd: int, rot: int) -> Tensor:
    """Row order within a head: our rotary pair (2i, 2i+1) is NeoX's and Llama's (i, i + rot/2); the dims
    past `rot` are not rotated and stay."""
    pairs = torch.stack([torch.arange(rot // 2), torch.arange(rot // 2) + rot // 2], dim=1).flatten()
    return torch.cat([pairs, torch.arange(rot, hd)])


def _layer_map(kind: str, i: int, H: int, KV: int, hd: int, perm: Tensor) -> list[tuple[str, Any, Callable]]:
    """(our name, their name or names, conversion) of one block's tensors (KV: key/value heads)."""
    a = f"blocks.{i}."
    T = lambda t: t.t()  # noqa: E731 (GPT-2's Conv1D holds [in, out])
    same = lambda t: t  # noqa: E731

    def heads(t: Tensor) -> Tensor:  # q or k rows [n heads · hd, ...], each head's rows permuted
        n = t.shape[0] // hd
        return t.reshape(n, hd, *t.shape[1:])[:, perm].reshape(n * hd, *t.shape[1:])

    def neox_qkv(t: Tensor) -> Tensor:
        t = t.reshape(H, 3, hd, *t.shape[1:])
        t = torch.stack([t[:, 0, perm], t[:, 1, perm], t[:, 2]], dim=0)  # [3, H, hd, ...]
        return t.reshape(3 * H * hd, *t.shape[3:])

    def llama_qkv(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return torch.cat([heads(q), heads(k), v])

    def llama_kv(k: Tensor, v: Tensor) -> Tensor:
        return torch.cat([heads(k), v])

    if kind == "gpt_neox":
        b = f"gpt_neox.layers.{i}."
        out = [(a + "attn.qkv.", b + "attention.query_key_value.", neox_qkv)]
        pairs = [("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"), ("attn.proj", "attention.dense"),
                 ("mlp.fc", "mlp.dense_h_to_4h"), ("mlp.proj", "mlp.dense_4h_to_h")]
        return out + [(a + o + ".", b + t + ".", same) for o, t in pairs]
    if kind == "gpt2":
        b = f"transformer.h.{i}."
        return [(a + "norm1.", b + "ln_1.", same), (a + "norm2.", b + "ln_2.", same),
                (a + "attn.qkv.", b + "attn.c_attn.", T), (a + "attn.proj.", b + "attn.c_proj.", T),
                (a + "mlp.fc.", b + "mlp.c_fc.", T), (a + "mlp.proj.", b + "mlp.c_proj.", T)]
    b = f"model.layers.{i}."
    attn = ([(a + "attn.qkv.", tuple(b + f"self_attn.{x}_proj." for x in "qkv"), llama_qkv)] if KV == H else
            [(a + "attn.q.", b + "self_attn.q_proj.", heads),
             (a + "attn.kv.", (b + "self_attn.k_proj.", b + "self_attn.v_proj."), llama_kv)])
    return attn + [(a + "norm1.", b + "input_layernorm.", same), (a + "norm2.", b + "post_attention_layernorm.", same),
            (a + "attn.proj.", b + "self_attn.o_proj.", same), (a + "mlp.gate.", b + "mlp.gate_proj.", same),
            (a + "mlp.fc.", b + "mlp.up_proj.", same), (a + "mlp.proj.", b + "mlp.down_proj.", same)]


OUTER = {  # (our name, theirs): embeddings, learned positions, final norm; the output matrix apart
    "gpt_neox": [("embed.weight", "gpt_neox.embed_in.weight"), ("norm_f.", "gpt_neox.final_layer_norm.")],
    "gpt2": [("embed.weight", "transformer.wte.weight"), ("pos_embed.weight", "transformer.wpe.weight"),
             ("norm_f.", "transformer.ln_f.")],
    "llama": [("embed.weight", "model.embed_tokens.weight"), ("norm_f.", "model.norm.")],
}


def body_weights(hf_dir: str | Path, cfg: Config) -> dict[str, Tensor]:
    """fwl_scale's state dict for cfg.model: body and embeddings from the transformers model in `hf_dir`,
    everything else (the FWL) from fwl_scale's initialisation seeded with train.seed."""
    # Function-level: fwl_scale.model imports this package's neighbours (hf.convert imports us).
    from fwl_scale.model import build_model

    d, hf, kind = _read(hf_dir)
    _check(d, hf, kind, cfg)
    src = _tensors(d)
    torch.manual_seed(cfg.train.seed)
    state = build_model(cfg.model).state_dict()
    m = cfg.model
    H, hd, V = m.n_heads, m.d_model // m.n_heads, m.vocab_size
    perm = _rotary_perm(hd, m.rotary_dim)
    loaded: set[str] = set()

    def get(theirs: str) -> Tensor:
        if theirs not in src:
            raise BodyImportError(f"{d}: no tensor {theirs!r} in its weights")
        return src[theirs]

    def put(ours: str, t: Tensor, theirs: str) -> None:
        t = t.to(state[ours].dtype)
        if ours in ("embed.weight", "lm_head.weight"):
            t = torch.cat([t, t.new_zeros(state[ours].shape[0] - V, t.shape[1])])
        if t.shape != state[ours].shape:
            raise BodyImportError(f"{d}: {theirs} gives shape {tuple(t.shape)}, {ours} needs {tuple(state[ours].shape)}")
        state[ours] = t
        loaded.add(ours)

    def load(ours: str, theirs: str | tuple[str, ...], f: Callable) -> None:
        names = (theirs,) if isinstance(theirs, str) else theirs
        suffixes = ("weight", "bias") if ours.endswith(".") else ("",)
        for s in suffixes:
            if ours + s in state:
                put(ours + s, f(*(get(n + s) for n in names)), names[0] + s)

    for ours, theirs in OUTER[kind]:
        load(ours, theirs, lambda t: t)
    if not m.tie_embeddings:
        head = "embed_out.weight" if kind == "gpt_neox" and "embed_out.weight" in src else "lm_head.weight"
        put("lm_head.weight", get(head), head)
    for i in range(m.n_layers):
        for ours, theirs, f in _layer_map(kind, i, H, m.kv_heads, hd, perm):
            load(ours, theirs, f)
    left = sorted(k for k in state if k not in loaded and not k.startswith("fwl."))
    if left:  # a body tensor would keep its random initialisation
        raise BodyImportError(f"{d}: nothing of this {kind} body maps to {', '.join(left[:6])}")
    return state
