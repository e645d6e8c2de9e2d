"""Analytic training FLOPs per token (forward + backward), for throughput, TFLOP/s and MFU.

Counting rules (model FLOPs, not hardware FLOPs: recomputation by activation checkpointing or by the
token-chunked vocabulary work is *not* counted, as in the usual MFU definition):

* A matmul of an m-vector by an m x n matrix costs 2mn forward; its backward costs twice that (the
  gradient with respect to the input and to the weight), so training costs 3x the forward.
* Body (docs/design.md §2): per layer the matmul weights are qkv (d x 3d), the attention output (d x d) and
  the MLP (d x md, md x d): N_layer = (4 + 2m) d². Attention scores and the weighted sum cost 2Td each
  forward per token, counted over the full window T (PaLM's convention: no saving for the causal mask).
  Training: 6 L N_layer + 12 L T d per token. Biases, norms and elementwise work are left out.
* Baseline head: the unembedding s x V, V the padded vocabulary (model.padded_vocab_size: its padding
  rows are multiplied too, for aligned matmul widths, and masked): 6 d V per token.
* FWL head (docs/design.md §1.1, d -> h = hidden_mult * s -> s -> V), forward per token:
    slow pass      W1 x (2dh), W2 a (2hs), slow logits U u (2sV)
    slow backward  Uᵀ gz (2sV), W2ᵀ gh2 (2hs)      (gh1 and the LayerNorm backward are elementwise)
    fast pass      W2 a' (2hs), fast logits U u' (2sV), and two causal linear attentions,
                   W1's (key/query width d, value width h) and W2's (key/query h, value s);
                   h1' reuses the slow W1 x, so W1 costs nothing more than its attention.
  A causal linear attention with key width k and value width v in mixed-chunk form with chunk C
  (C = T in the quadratic form) costs per token 2C(k + v) inside the chunk (scores and weighted sum
  over the full chunk, the same convention as the body's attention), plus 4kv for the state
  (reading q·S and adding kᵀv) when the window spans more than one chunk.
  With a forgetting factor (model.fwl.decay) the four vector sums (b1: width h; b2, alpha, beta: s) are
  no longer cumulative sums but the chunk's λ-weights applied as a product, 2C(h + 3s) per token; the
  weights inside the linear attentions are elementwise. The normaliser's counts (model.fwl.normalize:
  mean, one scalar per token for each of the 6 fast tensors) are cumulative sums without a decay; with
  one, all 6 are the chunk's λ-weights applied as one product, 2C·6 per token, plus 2·6 for the chunk
  totals.
  Per-token step sizes (model.fwl.step_size=token): the factors G x, 2·d·6 per token.
  A fast unembedding (model.fwl.fast_set, model/fwl/unembedding.py) walks the vocabulary twice more at the
  slow outputs (the slow softmax's log-sum-exp, then each chunk's gradients g_j: 2sV each) and adds the
  weighted sum of the g_j over the T positions of the window, 2TV per token (like attention, over the full
  window), plus with U the scores u_j·u'_i, 2Ts.
  Sequential updates (model.fwl.update=sequential, docs/design.md §1.6): each inner chunk of b tokens runs
  the fast pass above over its own tokens (its fast-pass chunk C chosen for b). Made of one fast chunk, it
  runs only the state terms it needs: reading the state that enters (2kv, every inner chunk but the first)
  and the totals of the state that leaves (2kv, every one but the last); of several, both (4kv). Every chunk
  after the first takes its slow pass and slow gradient at the chunk's start weights, products with the
  incoming sums: x S_w1 (2dh), a S_w2 (2hs), gh2 S_w2ᵀ (2hs) per token (the bias, α and β updates are
  elementwise).
  Training is 3x this forward: the backward through the slow backward is the second-order path, and
  each of its ops is an ordinary differentiable op whose backward costs twice its forward. The counts
  depend on the labels only, so their backward is the λ-weights' gradient alone: training is 2x theirs.
"""
from __future__ import annotations

from dataclasses import dataclass

from fwl_scale.config import ModelConfig
from fwl_scale.model.fwl import fast_chunk


@dataclass
class FlopCount:
    """Training FLOPs per token, split by part."""

    body: float  # transformer blocks: 6 N + attention
    head: float  # baseline unembedding, or the whole FWL block (it contains the unembedding)

    @property
    def total(self) -> float:
        return self.body + self.head


def linear_attention_fwd(key: int, value: int, chunk: int, seq_len: int, enters: bool = False,
                         leaves: bool = False) -> float:
    """Forward FLOPs per token of causal linear attention in mixed-chunk form over a window of seq_len tokens
    (see module docstring); `enters`, `leaves`: a state enters the window, its final state is asked for."""
    c = min(chunk, seq_len)
    flops = 2.0 * c * (key + value)
    if seq_len > c:
        flops += 4.0 * key * value
    else:
        flops += 2.0 * key * value * (int(enters) + int(leaves))
    return flops


def fwl_fwd_per_token(cfg: ModelConfig) -> float:
    d, s, V, T = cfg.d_model, cfg.fwl_width, cfg.padded_vocab_size, cfg.seq_len
    words = cfg.vocab_size  # the fast unembedding walks the real vocabulary's columns only
    h = cfg.fwl.hidden_mult * s
    slow = 2 * d * h + 2 * h * s + 2 * s * V
    slow_backward = 2 * s * V + 2 * h * s
    fast_unembedding = any(member != "head" for member in cfg.fwl.fast_set)
    fast = 2 * h * s + 2 * s * (words if fast_unembedding else V)  # a fast unembedding makes its own logits
    if cfg.fwl.step_size == "token":
        fast += 2 * d * 6
    if fast_unembedding:
        fast += 2 * s * words + 2 * s * words + 2 * T * words + (2 * T * s if "unembedding" in cfg.fwl.fast_set else 0)
    # The running sums over each window that one fast pass covers: the sequence, or each inner chunk.
    window = min(cfg.fwl.inner_chunk, T) if cfg.fwl.update == "sequential" else T
    sums = 0.0
    for start in range(0, T, window):
        n = min(window, T - start)
        chunk = fast_chunk(cfg.fwl_resolved, cfg.d_model, n)
        enters, leaves = start > 0, start + n < T
        per_token = (linear_attention_fwd(d, h, chunk, n, enters, leaves)
                     + linear_attention_fwd(h, s, chunk, n, enters, leaves))
        chunk = min(chunk, n)
        if cfg.fwl.decay != "none":
            per_token += 2 * chunk * (h + 3 * s)
        if start > 0:
            per_token += 2 * d * h + 2 * h * s + 2 * h * s  # the slow pass and gradient at the chunk's start
        sums += n * per_token
    return float(slow + slow_backward + fast + sums / T)


NORMALISED_TENSORS = 6  # the fast tensors with a count each (model/fwl/state.py FAST_TENSORS)


def decayed_counts_fwd_per_token(cfg: ModelConfig) -> float:
    """The normaliser's decayed counts (model/fast_weights.causal_count with a decay), see above. They run
    in chunks of model.fwl.chunk_size whatever the fast pass's form; a fast unembedding normalised like the
    head adds two counts."""
    if cfg.fwl.normalize == "none" or cfg.fwl.decay == "none":
        return 0.0
    unembedding_counted = any(member != "head" for member in cfg.fwl.fast_set) and cfg.fwl.unembed_normalize == "head"
    n = NORMALISED_TENSORS + (2 if unembedding_counted else 0)
    return float(2 * min(cfg.fwl.chunk_size, cfg.seq_len) * n + 2 * n)


def train_flops_per_token(cfg: ModelConfig) -> FlopCount:
    d, L, T, V = cfg.d_model, cfg.n_layers, cfg.seq_len, cfg.padded_vocab_size
    kv_width = cfg.kv_heads * (d // cfg.n_heads)
    n_layer = 2 * d * d + 2 * d * kv_width + (3 if cfg.mlp == "swiglu" else 2) * d * cfg.mlp_width
    body = 6.0 * L * n_layer + 12.0 * L * T * d
    head = (3.0 * fwl_fwd_per_token(cfg) + 2.0 * decayed_counts_fwd_per_token(cfg) if cfg.fwl.enabled
            else 6.0 * d * V)
    return FlopCount(body=body, head=head)
