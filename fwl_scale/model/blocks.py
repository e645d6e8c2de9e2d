"""The transformer body's pieces: rotary or learned positions, causal attention (document-masked,
context-parallel, or over a key/value cache), the MLP and the pre-norm block. Tensor-parallel through the
layers of parallel/layers.py (parallel/regions.py says where each tensor lives).

Document-masked attention runs SDPA with a dense boolean mask, or FlexAttention with a block mask built
from the document ids (model.attention; use_flex_attention says where each runs).

The body's variants (ModelConfig.norm, mlp, bias, positions, rope_fraction, n_kv_heads) exist so that
transformers bodies import exactly (fwl_scale/hf/body_import.py): LayerNorm or RMSNorm, a tanh-GELU or a
SwiGLU MLP, linear layers with or without biases, rotary positions on all or the first part of each head,
or learned absolute ones, multi-head or grouped-query attention. The defaults build fwl_scale's own
body, parameter for parameter as before they existed.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fwl_scale.config import ModelConfig
from fwl_scale.parallel.context_parallel import CPContext, gather_sequence
from fwl_scale.parallel.layers import ColumnParallelLinear, LayerNorm, RMSNorm, RowParallelLinear
from fwl_scale.parallel.layout import TPContext
from fwl_scale.parallel.mappings import copy_to_tp
from fwl_scale.parallel.shards import set_replicated, tp_size

try:  # FlexAttention came with torch 2.5; the project accepts 2.4, where model.attention resolves to dense
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:
    BlockMask = create_block_mask = flex_attention = None

# The block mask's tile (FlexAttention's default): the kernels skip the (query, key) tiles without a visible key.
FLEX_BLOCK_SIZE = 128


def document_positions(doc_ids_bt: Tensor) -> Tensor:
    """Position of each token inside its document (restarting at every document change)."""
    B, T = doc_ids_bt.shape
    idx = torch.arange(T, device=doc_ids_bt.device).expand(B, T)
    starts = torch.ones_like(doc_ids_bt, dtype=torch.bool)
    starts[:, 1:] = doc_ids_bt[:, 1:] != doc_ids_bt[:, :-1]
    start_idx = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return idx - start_idx


def use_flex_attention(attention: str, device: torch.device, seq_len: int) -> bool:
    """Whether document-masked attention over `seq_len` tokens on `device` runs FlexAttention, for
    model.attention = `attention` (auto | dense | flex). The callers keep the dense mask where the block
    mask cannot serve (GPT.attention_inputs: context parallelism; GPT.cached_attention_inputs: a key/value
    cache); this decides the rest:

    - dense, or a torch without FlexAttention: dense.
    - seq_len not a multiple of FLEX_BLOCK_SIZE: dense. The mask_mod reads the document ids at q_idx and
      kv_idx, and a partial last tile has the kernels evaluate it at padded indices past the ids. Whole
      tiles only, to be safe: torch 2.13's compiled CPU kernel gave wrong outputs at T = 40 (one partial
      tile; right at T = 128 and 200), and FlexAttention's bugs reported upstream cluster at such lengths.
      Every config's training window is a multiple of 128; shorter evaluation windows take the dense path.
    - flex: FlexAttention on any device. On CUDA compiled (the fused Triton kernel); elsewhere torch's
      eager reference, which materialises the scores as the dense path does and in torch 2.13 refuses a
      backward on CPU (so flex on CPU serves evaluation and the tests, not training).
    - auto: FlexAttention on CUDA where Triton is installed (torch.compile generates the kernel with it),
      else dense: CPU keeps today's path, which is what the tests and CI run."""
    if attention == "dense" or flex_attention is None or seq_len % FLEX_BLOCK_SIZE:
        return False
    return attention == "flex" or (device.type == "cuda" and triton_installed())


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def document_block_mask(doc_ids_bt: Tensor) -> BlockMask:
    """FlexAttention's block mask of causal attention inside each document: query i sees key j <= i of the
    same document (GPT.attention_inputs' dense mask, as tiles). Built once per forward, shared by every
    layer; building it materialises the [B, T, T] booleans for a moment (the dense mask is held all
    forward), the block mask keeps O(B·(T/128)²) tile indices and the mask_mod."""
    def same_document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids_bt[b, q_idx] == doc_ids_bt[b, kv_idx])

    B, T = doc_ids_bt.shape
    return create_block_mask(same_document_causal, B, None, T, T, device=doc_ids_bt.device,
                             BLOCK_SIZE=FLEX_BLOCK_SIZE)


@functools.cache
def compiled_flex_attention():
    """flex_attention through torch.compile: its fused kernel exists only as generated code (called eagerly
    it materialises the scores). Made on first use so that importing the model does not start the compiler."""
    return torch.compile(flex_attention)


def flex_document_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> Tensor:
    """Attention of q [B, heads, T, hd] to k, v [B, key/value heads, T, hd] under `block_mask`. Grouped-query
    heads are broadcast by the kernel (query head h uses key/value head h // group, as Attention.expand)."""
    if q.device.type == "cuda" and not torch.compiler.is_compiling():
        attend = compiled_flex_attention()
    else:  # inside a compiled block (train.compile) dynamo lowers the call itself; off CUDA: the eager reference
        attend = flex_attention
    return attend(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


class Rotary(nn.Module):
    """Rotates the pairs (2i, 2i + 1) of the first `rotary_dim` dims of each head (all of them by default)
    by position × theta^(-2i/rotary_dim); the other dims pass unchanged (NeoX's partial rotary)."""

    def __init__(self, head_dim: int, theta: float, rotary_dim: int | None = None):
        super().__init__()
        rot = head_dim if rotary_dim is None else rotary_dim
        self.partial = rot < head_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, q: Tensor, k: Tensor, positions_bt: Tensor) -> tuple[Tensor, Tensor]:
        angles = positions_bt.to(torch.float32)[..., None] * self.inv_freq.to(positions_bt.device)  # [B, T, rot/2]
        cos = angles.cos()[:, None].to(q.dtype)
        sin = angles.sin()[:, None].to(q.dtype)
        rot = 2 * self.inv_freq.shape[0]

        def rotate(t: Tensor) -> Tensor:
            r = t[..., :rot] if self.partial else t
            t1, t2 = r[..., ::2], r[..., 1::2]
            out = torch.stack([t1 * cos - t2 * sin, t1 * sin + t2 * cos], dim=-1).flatten(-2)
            return torch.cat([out, t[..., rot:]], dim=-1) if self.partial else out

        return rotate(q), rotate(k)


class LearnedPositions(nn.Module):
    """Absolute position embeddings added to the token embeddings (GPT-2's), one row per position inside
    the document (or the sequence without document masking). Replicated under tensor parallelism; under
    sequence parallelism a rank adds the rows of its own sequence chunk, so the table's gradient is a
    per-rank part, summed over tp inside autograd (as the norms' are)."""

    def __init__(self, rows: int, dim: int, tp: TPContext | None = None, device=None):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(rows, dim, device=device))
        set_replicated(self.weight)
        self.weight.tp_rank = 0 if tp is None else tp.rank

    def forward(self, x: Tensor, positions_bt: Tensor) -> Tensor:
        """x [B, n, d] (under sequence parallelism this rank's chunk of the `positions_bt` [B, T] tokens)."""
        w = self.weight
        if self.tp is not None and self.tp.sequence_parallel:
            n = x.shape[1]
            positions_bt = positions_bt[:, self.tp.rank * n:(self.tp.rank + 1) * n]
            w = copy_to_tp(w, self.tp)
        return x + F.embedding(positions_bt, w)


def norm_layer(cfg: ModelConfig, device=None, tp: TPContext | None = None) -> nn.Module:
    """The body's norm: LayerNorm or RMSNorm (model.norm)."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps, tp=tp, device=device)
    return LayerNorm(cfg.d_model, eps=cfg.norm_eps, tp=tp, device=device)


class KVCache:
    """One attention layer's rotated keys and values [B, heads, L, head_dim] of the tokens so far."""

    def __init__(self):
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, tp: TPContext | None = None):
        super().__init__()
        if cfg.n_heads % tp_size(tp):
            raise ValueError(f"model.n_heads ({cfg.n_heads}) is not divisible by the tensor-parallel size {tp_size(tp)}")
        if cfg.attention == "flex" and flex_attention is None:
            raise ValueError(f"model.attention=flex needs FlexAttention (torch >= 2.5), this is torch "
                             f"{torch.__version__}: use model.attention=auto or dense")
        self.n_heads = cfg.n_heads // tp_size(tp)  # this rank's heads
        self.n_kv_heads = cfg.kv_heads // tp_size(tp)  # the key/value heads of this rank's query heads
        self.head_dim = hd = cfg.d_model // cfg.n_heads
        if cfg.kv_heads == cfg.n_heads:
            # The fused q|k|v rows: each of the three blocks split by heads (stride 3).
            self.qkv = ColumnParallelLinear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias, tp=tp, stride=3, device=device)
        else:  # grouped-query attention: fewer k|v rows, split by key/value heads (stride 2)
            self.q = ColumnParallelLinear(cfg.d_model, cfg.d_model, bias=cfg.bias, tp=tp, device=device)
            self.kv = ColumnParallelLinear(cfg.d_model, 2 * cfg.kv_heads * hd, bias=cfg.bias, tp=tp, stride=2,
                                           device=device)
        self.proj = RowParallelLinear(cfg.d_model, cfg.d_model, bias=cfg.bias, tp=tp, device=device)
        self.rotary = Rotary(self.head_dim, cfg.rope_theta, cfg.rotary_dim) if cfg.positions == "rotary" else None

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor | BlockMask | None, cp: CPContext | None = None,
                kv: KVCache | None = None) -> Tensor:
        """`mask` (GPT.attention_inputs): None for plain causal attention, a boolean [B, 1, T, keys] tensor for
        SDPA, or a BlockMask for FlexAttention (document masking with model.attention's document kernel).
        `kv` (streaming): this layer's keys and values of the window's earlier tokens; the new ones are
        appended, and `mask` is [B, 1, T, earlier + T]."""
        q, k, v = self.project(x)  # the whole sequence even under sequence parallelism
        B, T = q.shape[0], q.shape[2]
        if self.rotary is not None:
            q, k = self.rotary(q, k, positions)
        if kv is not None:
            k, v = kv.append(k, v)
            y = F.scaled_dot_product_attention(q, self.expand(k), self.expand(v), attn_mask=mask)
        elif cp is not None:
            # Every rank's keys and values (rotated at their global positions), one all-gather; `mask`
            # is [B, 1, T/cp, end of this chunk]: global causality and documents; later keys are dropped.
            kv = gather_sequence(torch.cat([k, v], dim=1), cp.group, dim=2)[:, :, :mask.shape[-1]]
            k, v = kv.split(self.n_kv_heads, dim=1)
            y = F.scaled_dot_product_attention(q, self.expand(k), self.expand(v), attn_mask=mask)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, self.expand(k), self.expand(v), is_causal=True)
        elif isinstance(mask, Tensor):
            y = F.scaled_dot_product_attention(q, self.expand(k), self.expand(v), attn_mask=mask)
        else:  # a BlockMask: the keys and values stay unrepeated, the kernel broadcasts them
            y = flex_document_attention(q, k, v, mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, heads, T, hd] and k, v [B, key/value heads, T, hd] of this rank's heads."""
        hd = self.head_dim
        if self.n_kv_heads == self.n_heads:
            qkv = self.qkv(x)
            B, T = qkv.shape[:2]
            return tuple(qkv.view(B, T, 3, self.n_heads, hd).permute(2, 0, 3, 1, 4))
        x = self.q.enter(x)  # one copy (or sequence gather) into the tp region serves both projections
        B, T = x.shape[:2]
        q = F.linear(x, self.q.weight, self.q.bias).view(B, T, self.n_heads, hd).transpose(1, 2)
        k, v = F.linear(x, self.kv.weight, self.kv.bias).view(B, T, 2, self.n_kv_heads, hd).permute(2, 0, 3, 1, 4)
        return q, k, v

    def expand(self, t: Tensor) -> Tensor:
        """Key/value heads repeated for their query heads (query head h uses key/value head h // group,
        transformers' repeat_kv); the cache and the cp exchange hold them unrepeated."""
        group = self.n_heads // self.n_kv_heads
        return t if group == 1 else t.repeat_interleave(group, dim=1)


class MLP(nn.Module):
    """proj(GELU(fc x)), or with model.mlp = swiglu proj(SiLU(gate x) ⊙ fc x) (Llama's down, gate, up):
    fc and gate column-parallel, proj row-parallel."""

    def __init__(self, cfg: ModelConfig, device=None, tp: TPContext | None = None):
        super().__init__()
        h = cfg.mlp_width
        self.fc = ColumnParallelLinear(cfg.d_model, h, bias=cfg.bias, tp=tp, device=device)
        self.gate = (ColumnParallelLinear(cfg.d_model, h, bias=cfg.bias, tp=tp, device=device)
                     if cfg.mlp == "swiglu" else None)
        self.proj = RowParallelLinear(h, cfg.d_model, bias=cfg.bias, tp=tp, device=device)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is None:
            return self.proj(F.gelu(self.fc(x), approximate="tanh"))
        x = self.fc.enter(x)  # one copy (or sequence gather) into the tp region serves both projections
        up = F.linear(x, self.fc.weight, self.fc.bias)
        return self.proj(F.silu(F.linear(x, self.gate.weight, self.gate.bias)) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, tp: TPContext | None = None):
        super().__init__()
        self.norm1 = norm_layer(cfg, device, tp)
        self.attn = Attention(cfg, device, tp)
        self.norm2 = norm_layer(cfg, device, tp)
        self.mlp = MLP(cfg, device, tp)

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor | BlockMask | None, cp: CPContext | None = None,
                kv: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), positions, mask, cp, kv)
        return x + self.mlp(self.norm2(x))
