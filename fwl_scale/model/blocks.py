"""The transformer body's pieces: rotary positions, causal attention (document-masked, context-parallel,
or over a key/value cache), the MLP and the pre-norm block. Tensor-parallel through the layers of
parallel/layers.py (model/parallelize.py says where each tensor lives).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fwl_scale.config import ModelConfig
from fwl_scale.parallel.context_parallel import CPContext, gather_sequence
from fwl_scale.parallel.layers import ColumnParallelLinear, LayerNorm, RowParallelLinear
from fwl_scale.parallel.layout import TPContext
from fwl_scale.parallel.shards import tp_size


def document_positions(doc_ids_bt: Tensor) -> Tensor:
    """Position of each token inside its document (restarting at every document change)."""
    B, T = doc_ids_bt.shape
    idx = torch.arange(T, device=doc_ids_bt.device).expand(B, T)
    starts = torch.ones_like(doc_ids_bt, dtype=torch.bool)
    starts[:, 1:] = doc_ids_bt[:, 1:] != doc_ids_bt[:, :-1]
    start_idx = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return idx - start_idx


class Rotary(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, q: Tensor, k: Tensor, positions_bt: Tensor) -> tuple[Tensor, Tensor]:
        angles = positions_bt.to(torch.float32)[..., None] * self.inv_freq.to(positions_bt.device)  # [B, T, hd/2]
        cos = angles.cos()[:, None].to(q.dtype)
        sin = angles.sin()[:, None].to(q.dtype)

        def rotate(t: Tensor) -> Tensor:
            t1, t2 = t[..., ::2], t[..., 1::2]
            return torch.stack([t1 * cos - t2 * sin, t1 * sin + t2 * cos], dim=-1).flatten(-2)

        return rotate(q), rotate(k)


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
        self.n_heads = cfg.n_heads // tp_size(tp)  # this rank's heads
        self.head_dim = cfg.d_model // cfg.n_heads
        # The fused q|k|v rows: each of the three blocks split by heads (stride 3).
        self.qkv = ColumnParallelLinear(cfg.d_model, 3 * cfg.d_model, tp=tp, stride=3, device=device)
        self.proj = RowParallelLinear(cfg.d_model, cfg.d_model, tp=tp, device=device)
        self.rotary = Rotary(self.head_dim, cfg.rope_theta)

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor | None, cp: CPContext | None = None,
                kv: KVCache | None = None) -> Tensor:
        """`kv` (streaming): this layer's keys and values of the window's earlier tokens; the new ones are
        appended, and `mask` is [B, 1, T, earlier + T]."""
        qkv = self.qkv(x)  # [B, T, 3·local width]: the whole sequence even under sequence parallelism
        B, T = qkv.shape[:2]
        q, k, v = qkv.view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.rotary(q, k, positions)
        if kv is not None:
            k, v = kv.append(k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif cp is not None:
            # Every rank's keys and values (rotated at their global positions), one all-gather; `mask`
            # is [B, 1, T/cp, end of this chunk]: global causality and documents; later keys are dropped.
            kv = gather_sequence(torch.cat([k, v], dim=1), cp.group, dim=2)[:, :, :mask.shape[-1]]
            k, v = kv.split(self.n_heads, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, tp: TPContext | None = None):
        super().__init__()
        self.fc = ColumnParallelLinear(cfg.d_model, cfg.mlp_mult * cfg.d_model, tp=tp, device=device)
        self.proj = RowParallelLinear(cfg.mlp_mult * cfg.d_model, cfg.d_model, tp=tp, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, tp: TPContext | None = None):
        super().__init__()
        self.norm1 = LayerNorm(cfg.d_model, eps=cfg.norm_eps, tp=tp, device=device)
        self.attn = Attention(cfg, device, tp)
        self.norm2 = LayerNorm(cfg.d_model, eps=cfg.norm_eps, tp=tp, device=device)
        self.mlp = MLP(cfg, device, tp)

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor | None, cp: CPContext | None = None,
                kv: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), positions, mask, cp, kv)
        return x + self.mlp(self.norm2(x))
