"""The body's variants (model.norm, mlp, mlp_hidden, bias, positions, rope_fraction; model/blocks.py), which
imported GPT-2 and Llama bodies use (tests/test_hf_import.py compares them with transformers):

* each new piece against its formula written out, float64: RMSNorm, the SwiGLU MLP, partial rotary
  positions (and that attention scores still depend on relative positions only), learned positions
  restarting at each document;
* the key/value cache of streaming and generation equals the body on the whole window (float64);
* grouped-query attention is multi-head attention with each key/value head repeated (float64);
* tensor parallelism (2 gloo ranks, with and without sequence parallelism): a Llama-like body (RMSNorm,
  SwiGLU with gate/up column-parallel and down row-parallel, no biases, partial rotary; with and without
  grouped-query attention, q and k|v column-parallel by heads) and a GPT-2-like one (learned positions,
  replicated) equal the single-process model — initialisation, loss, every gradient (tests/test_tp_model.py's
  check, 1e-10 relative); the same bodies at cp=2 (tests/test_cp_model.py's check);
* bad settings refused naming the field.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fwl_scale.config import ConfigError, load_config
from fwl_scale.model import build_model
from fwl_scale.model.blocks import KVCache, Rotary, document_positions
from fwl_scale.parallel import init_parallel_state
from tests.distributed import run_distributed
from tests.model_support import perturb
from tests.test_cp_model import check_model as check_cp_model
from tests.test_cp_model import make_cfg as make_cp_cfg
from tests.test_tp_model import check_model, make_cfg

LLAMA_LIKE = ("model.norm=rmsnorm", "model.mlp=swiglu", "model.mlp_hidden=24", "model.bias=false",
              "model.rope_fraction=0.5")
GPT2_LIKE = ("model.positions=learned", "model.max_positions=20", "model.mlp_hidden=40")
GQA = ("model.n_heads=4", "model.n_kv_heads=2")  # grouped-query attention, two query heads per key/value head


def small(*over: str):
    return load_config(None, ["model.d_model=16", "model.n_heads=2", "model.n_layers=1", "model.seq_len=12",
                              "model.vocab_size=50", "model.vocab_multiple=64", *over]).model


def test_variant_pieces_against_formulas():
    torch.manual_seed(0)
    model = build_model(small(*LLAMA_LIKE, "model.norm_eps=1e-3")).double()
    perturb(model)
    block = model.blocks[0]
    assert block.attn.qkv.bias is None and block.mlp.proj.bias is None and not hasattr(block.norm1, "bias")
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    w = block.norm1.weight
    assert torch.allclose(block.norm1(x), x / (x.pow(2).mean(-1, keepdim=True) + 1e-3).sqrt() * w, rtol=1e-12, atol=0)
    mlp = block.mlp
    want = (F.silu(x @ mlp.gate.weight.T) * (x @ mlp.fc.weight.T)) @ mlp.proj.weight.T
    assert torch.allclose(mlp(x), want, rtol=1e-12, atol=1e-14)

    # Partial rotary: the pairs (2i, 2i+1) of the first 4 of 8 dims turned by position·theta^(-2i/4), the rest kept.
    rot = Rotary(8, 100.0, 4).double()
    q, k = torch.randn(2, 1, 3, 8, dtype=torch.float64), torch.randn(2, 1, 3, 8, dtype=torch.float64)
    pos = torch.tensor([[0, 5, 9], [2, 3, 4]])
    rq, _ = rot(q, k, pos)
    want = q.clone()
    # The frequencies are made in float32, as transformers makes them (the import's reference).
    assert torch.allclose(rot.inv_freq, torch.tensor([1.0, 100.0 ** -0.5], dtype=torch.float64), rtol=1e-7, atol=0)
    for i in range(2):
        a = pos[:, None, :].double() * rot.inv_freq[i]
        want[..., 2 * i] = q[..., 2 * i] * a.cos() - q[..., 2 * i + 1] * a.sin()
        want[..., 2 * i + 1] = q[..., 2 * i] * a.sin() + q[..., 2 * i + 1] * a.cos()
    assert torch.allclose(rq, want, rtol=0, atol=1e-12)
    # Attention scores depend on relative positions only: shifting every position changes nothing.
    s1 = torch.einsum("bhqd,bhkd->bhqk", *rot(q, k, pos))
    s2 = torch.einsum("bhqd,bhkd->bhqk", *rot(q, k, pos + 7))
    assert torch.allclose(s1, s2, rtol=0, atol=1e-12)

    # Learned positions: the table's row of each token's position inside its document is added.
    torch.manual_seed(0)
    gpt2 = build_model(small(*GPT2_LIKE)).double()
    ids = torch.randint(0, 50, (2, 12))
    docs = torch.zeros(2, 12, dtype=torch.long)
    docs[0, 7:] = 1
    got = gpt2.embed_tokens(ids, document_positions(docs))
    want = gpt2.embed.weight[ids] + gpt2.pos_embed.weight[torch.cat([torch.arange(7), torch.arange(5)])]
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], gpt2.embed.weight[ids[1]] + gpt2.pos_embed.weight[:12])
    assert gpt2.pos_embed.weight.shape == (20, 16) and gpt2.param_counts()["embeddings"] == 64 * 16 + 20 * 16


@pytest.mark.parametrize("variant", [LLAMA_LIKE, LLAMA_LIKE + GQA, GPT2_LIKE])
def test_kv_cache_equals_recomputed_window(variant):
    """Streaming and generation (GPT.body_cached, a key/value cache per layer) on a variant body: the body
    on the whole window, float64, with documents starting inside it (learned positions restart there)."""
    torch.manual_seed(0)
    model = build_model(small(*variant, "model.n_layers=2")).double().eval()
    perturb(model)
    ids = torch.randint(0, 50, (2, 12))
    docs = torch.zeros(2, 12, dtype=torch.long)
    docs[0, 4:], docs[1, 7:] = 1, 1
    with torch.no_grad():
        whole = model.body(ids, docs)
        kv = [KVCache() for _ in model.blocks]
        cuts = [0, 3, 4, 5, 8, 9, 12]
        got = torch.cat([model.body_cached(ids[:, a:b], docs[:, a:b], docs[:, :a], kv)
                         for a, b in zip(cuts[:-1], cuts[1:])], dim=1)
    assert float((got - whole).abs().max()) <= 1e-12 * float(whole.abs().max())


def test_grouped_query_attention_is_attention_with_repeated_heads():
    """n_kv_heads = 2 of 4: the same function as full multi-head attention whose k and v rows are each key/value
    head's repeated for its query heads (float64, documents inside the sequence)."""
    torch.manual_seed(0)
    gqa = build_model(small(*LLAMA_LIKE, *GQA)).double()
    perturb(gqa)
    mha = build_model(small(*LLAMA_LIKE, "model.n_heads=4")).double()
    state = gqa.state_dict()
    for i, block in enumerate(gqa.blocks):
        k, v = block.attn.kv.weight.view(2, 2, 4, 16)  # (k, v), key/value head, head_dim, d
        rep = lambda t: t.repeat_interleave(2, dim=0).reshape(16, 16)  # noqa: E731
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([block.attn.q.weight, rep(k), rep(v)])
        del state[f"blocks.{i}.attn.q.weight"], state[f"blocks.{i}.attn.kv.weight"]
    mha.load_state_dict(state)
    ids = torch.randint(0, 50, (2, 12))
    docs = torch.zeros(2, 12, dtype=torch.long)
    docs[0, 5:] = 1
    with torch.no_grad():
        a, b = gqa(ids, doc_ids=docs, return_logits=True).logits, mha(ids, doc_ids=docs, return_logits=True).logits
    assert float((a - b).abs().max()) <= 1e-12 * float(b.abs().max())
    assert gqa.blocks[0].attn.kv.weight.shape == (2 * 2 * 4, 16)


def test_bad_settings_name_the_field():
    for over, field in [(("model.rope_fraction=0.3",), "model.rope_fraction"), (("model.norm=batchnorm",), "model.norm"),
                        (("model.mlp=relu",), "model.mlp"), (("model.positions=alibi",), "model.positions"),
                        (("model.positions=learned", "model.max_positions=8"), "model.max_positions"),
                        (("model.max_positions=64",), "model.max_positions"),
                        (("model.mlp_hidden=30", "parallel.tp=4"), "parallel.tp"),
                        (("model.n_kv_heads=3",), "model.n_kv_heads"),
                        (("model.n_heads=4", "model.n_kv_heads=2", "parallel.tp=4"), "parallel.tp")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            small(*over)
    with pytest.raises(ConfigError, match=r"model\.positions: learned position embeddings are not in the pipeline"):
        load_config(None, ["model.positions=learned", "parallel.pp=2"])


def _world2(rank: int, world: int) -> None:
    for variant in (LLAMA_LIKE, LLAMA_LIKE + GQA, GPT2_LIKE):
        for sp in (False, True):
            check_model(init_parallel_state(make_cfg(True, 2, sp, extra=variant)), True, sp, extra=variant)
    check_model(init_parallel_state(make_cfg(False, 2, True, extra=LLAMA_LIKE)), False, True, extra=LLAMA_LIKE)
    # Context parallelism: the gathered keys and values are the unrepeated key/value heads; learned
    # positions are the chunk's global ones.
    for variant in (LLAMA_LIKE + GQA, GPT2_LIKE):
        check_cp_model(init_parallel_state(make_cp_cfg(cp=2, extra=variant)), extra=variant)


def test_variants_parallel_equal_single_process():
    run_distributed(2, _world2)
