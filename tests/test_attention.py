"""Document-masked attention's two kernels (model.attention; model/blocks.py): SDPA with a dense [B, 1, T, T]
boolean mask, and FlexAttention with a block mask built from the document ids.

* the op: FlexAttention under document_block_mask equals SDPA under GPT.attention_inputs' dense mask —
  outputs and the gradients of q, k, v, float64, grouped-query heads, tiles that are full (one document over
  the whole row), partial and empty (packed documents);
* the whole model (grouped-query attention, two layers, the FWL head) on packed documents: loss, logits and
  every parameter's gradient equal with model.attention = flex and dense, float64;
* the compiled path (compiled_flex_attention on CUDA, train.compile's blocks): flex_document_attention through
  torch.compile, here Inductor's CPU kernel (the mask_mod lowered into generated code as for the CUDA one),
  forward, float32, with a second batch of other documents (the ids are read, not baked into the graph);
* where each kernel runs: the dense mask wherever the block mask does not apply, today's dense path by
  default on CPU, a bad value refused naming the field.

Tolerances, relative to the largest value. float64: 1e-12. Both kernels compute the same softmax in another
order (measured: at most 6e-16 on the op's outputs and gradients and on the model's logits and gradients); a
key wrongly visible or hidden moves the outputs by O(0.1). float32 (the compiled op): 1e-6, about 8 float32
ulps of outputs of order 1, each a softmax-weighted sum over at most 128 keys (measured: 9e-8).

torch 2.13 refuses FlexAttention's backward on CPU in its argument check (`_validate_device`: the CPU kernel
that torch.compile generates has no backward) before it runs the eager reference, which differentiates on any
device. `cpu_flex_backward` lets the check see detached tensors, so the gradients of the reference — the
semantics the CUDA kernel is tested against upstream — are compared here; the GPU suite times the kernel.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fwl_scale.config import ConfigError, load_config
from fwl_scale.model import build_model
from fwl_scale.model.blocks import (FLEX_BLOCK_SIZE, BlockMask, document_block_mask, flex_attention,
                                    flex_document_attention, triton_installed, use_flex_attention)
from tests.model_support import perturb

pytestmark = [
    pytest.mark.skipif(flex_attention is None, reason=f"torch {torch.__version__} has no FlexAttention (>= 2.5)"),
    # flex_document_attention runs torch's eager reference off CUDA on purpose; torch says it is unfused, once.
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
]
TOL64, TOL32 = 1e-12, 1e-6


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """FlexAttention's argument check shown detached tensors: only its refusal of a CPU backward goes."""
    import torch.nn.attention.flex_attention as flex_module  # here: torch < 2.5 lacks it (and skips these tests)

    check = flex_module._validate_device
    monkeypatch.setattr(flex_module, "_validate_device", lambda q, k, v: check(q.detach(), k.detach(), v.detach()))


def dense_document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """GPT.attention_inputs' dense mask without context parallelism: causal and same document, [B, 1, T, T]."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


def packed_documents(T: int, lengths: list[int]) -> torch.Tensor:
    """Two rows: one document over the whole row (full tiles below the diagonal), and documents of `lengths`."""
    assert sum(lengths) == T
    packed = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return torch.stack([torch.zeros(T, dtype=torch.long), packed])


def worst(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach(), ref.detach()
    return float((a - ref).abs().max()) / max(1.0, float(ref.abs().max()))


def test_flex_op_equals_dense_mask_values_and_gradients(cpu_flex_backward):
    """3 tiles of 128: the packed row's documents [50, 200, 134] leave the tile (queries 256-383, keys 0-127)
    empty and cross tile edges; 4 query heads on 2 key/value heads."""
    T = 3 * FLEX_BLOCK_SIZE
    docs = packed_documents(T, [50, 200, 134])
    block_mask = document_block_mask(docs)
    assert isinstance(block_mask, BlockMask) and block_mask.shape == (2, 1, T, T)
    # The tiles it keeps are those with a visible key: (queries 256-383, keys 0-127) of the packed row is skipped.
    n = T // FLEX_BLOCK_SIZE
    visible = dense_document_mask(docs).view(2, 1, n, FLEX_BLOCK_SIZE, n, FLEX_BLOCK_SIZE).any(-1).any(-2)
    assert torch.equal(block_mask.to_dense().bool(), visible) and not visible[1, 0, 2, 0] and visible[0, 0, 2, 0]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, T, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, T, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(2, 4, T, 8, generator=g, dtype=torch.float64)  # a loss that weighs every output apart

    flex = flex_document_attention(q, k, v, block_mask)
    flex_grads = torch.autograd.grad((flex * w).sum(), (q, k, v))
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1),
                                           attn_mask=dense_document_mask(docs))
    dense_grads = torch.autograd.grad((dense * w).sum(), (q, k, v))
    assert worst(flex, dense) <= TOL64
    for name, a, b in zip("qkv", flex_grads, dense_grads):
        assert worst(a, b) <= TOL64, name


def small_model(attention: str, *over: str):
    cfg = load_config(None, ["model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.n_layers=2",
                             f"model.seq_len={FLEX_BLOCK_SIZE}", "model.vocab_size=50", "model.vocab_multiple=64",
                             "model.fwl.chunk_size=32", f"model.attention={attention}", *over]).model
    torch.manual_seed(0)
    model = build_model(cfg).double()
    perturb(model)
    return model


def test_model_with_flex_equals_dense_on_packed_documents(cpu_flex_backward, monkeypatch):
    T = FLEX_BLOCK_SIZE
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (2, T + 1), generator=g)
    docs = packed_documents(T, [30, 70, 28])
    runs = {}
    for attention in ("dense", "flex"):
        model = small_model(attention)
        _, mask, _, _ = model.attention_inputs(ids[:, :-1], docs)
        assert isinstance(mask, BlockMask if attention == "flex" else torch.Tensor)
        out = model(ids[:, :-1], ids[:, 1:], docs, return_logits=True)
        out.loss.backward()
        runs[attention] = out, {name: p.grad for name, p in model.named_parameters()}
    (dense, dense_grads), (flex, flex_grads) = runs["dense"], runs["flex"]
    assert worst(flex.loss, dense.loss) <= TOL64 and worst(flex.logits, dense.logits) <= TOL64
    assert flex_grads.keys() == dense_grads.keys() and any("attn.kv" in name for name in flex_grads)
    for name in dense_grads:
        assert worst(flex_grads[name], dense_grads[name]) <= TOL64, name

    # Evaluation needs no patch: torch runs FlexAttention's forward on CPU as it is.
    monkeypatch.undo()
    model = small_model("flex")
    with torch.no_grad():
        logits = model(ids[:, :-1], ids[:, 1:], docs, return_logits=True).logits
    assert worst(logits, dense.logits) <= TOL64


def test_compiled_flex_op_equals_dense_mask():
    """The call as torch.compile traces it (inside a compiled block, or compiled_flex_attention on CUDA):
    Inductor's CPU kernel, forward only (it has no backward), float32. A second batch with other documents
    runs the same graph and must follow its own ids."""
    T = FLEX_BLOCK_SIZE
    compiled = torch.compile(flex_document_attention, backend="inductor")
    g = torch.Generator().manual_seed(2)
    for lengths in ([30, 70, 28], [100, 28]):
        docs = packed_documents(T, lengths)
        q = torch.randn(2, 4, T, 8, generator=g)
        k, v = torch.randn(2, 2, T, 8, generator=g), torch.randn(2, 2, T, 8, generator=g)
        with torch.no_grad():
            got = compiled(q, k, v, document_block_mask(docs))
        want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1),
                                              attn_mask=dense_document_mask(docs))
        assert worst(got, want) <= TOL32, lengths


def test_where_each_kernel_runs():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object only: no CUDA needed
    T = FLEX_BLOCK_SIZE
    assert not use_flex_attention("dense", cuda, T) and not use_flex_attention("dense", cpu, T)
    assert use_flex_attention("flex", cpu, T) and use_flex_attention("flex", cuda, 4 * T)
    assert not use_flex_attention("flex", cuda, T + 8)  # a partial tile: dense (use_flex_attention's docstring)
    assert not use_flex_attention("auto", cpu, T)  # CPU: today's dense path, what the tests and CI run
    assert use_flex_attention("auto", cuda, T) == triton_installed()

    ids = torch.randint(0, 50, (2, T))
    docs = packed_documents(T, [30, 70, 28])
    assert load_config(None, []).model.attention == "dense"  # until a GPU run has tried flex
    default = small_model("auto")
    assert isinstance(default.attention_inputs(ids, docs)[1], torch.Tensor)

    flex = small_model("flex")
    assert isinstance(flex.attention_inputs(ids, docs)[1], BlockMask)
    assert isinstance(flex.attention_inputs(ids[:, :96], docs[:, :96])[1], torch.Tensor)  # T = 96: dense
    assert flex.attention_inputs(ids, None)[1] is None  # no documents: plain causal SDPA (flash on CUDA)
    # A key/value cache (streaming, generation): n queries against C + n keys, always the dense mask.
    _, cached = flex.cached_attention_inputs(ids[:, 100:], docs[:, 100:], docs[:, :100])
    assert isinstance(cached, torch.Tensor) and cached.shape == (2, 1, T - 100, T)
    no_docs = small_model("flex", "model.document_mask=false")
    assert no_docs.attention_inputs(ids, docs)[1] is None

    with pytest.raises(ConfigError, match=r"model\.attention: must be auto, dense or flex, got 'sparse'"):
        small_model("sparse")
