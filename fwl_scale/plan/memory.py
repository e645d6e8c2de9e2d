"""Analytic peak memory of one training rank, per layout (tp, cp, pp, dp, ZeRO stage, micro batch,
activation checkpointing).

peak = model state + saved activations + the backward's largest transient, on the busiest rank.

Model state (the ZeRO paper's accounting, bytes per parameter of this rank's model-parallel shard):
  bf16: weights 2, gradients 2, optimizer 12 (fp32 master copy + Adam's m and v);
  fp32: weights 4, gradients 4, optimizer 8.
  ZeRO 1 divides the optimizer by dp, ZeRO 2 also the gradients, ZeRO 3 also the weights (plus the
  gathered weights of one block, forward and backward). The shard: body/(tp·pp) on every stage; the
  (tied) embedding/tp on the first and the last stage, the FWL/tp on the last.

Saved activations, elements per token of this rank (T_r = T/cp tokens of each of the micro batch's
sequences), counted from the tensors the code keeps for backward (model/gpt.py, model/fwl/) and
checked against measurement (plan/measure.py; tests/test_plan_memory.py states the bound):
  body block: 16 d/tp (qkv 3d, rotated q and k 2d, v made contiguous d, attention output d, its
    reshape d, MLP input of 4d and GELU output 4d) + 6 d (residual stream, two LayerNorm inputs and
    outputs; /tp under sequence parallelism) + T (the document mask as an additive float [T, T] per
    sequence) + 2d (cp - 1) (the keys and values gathered from the other context-parallel ranks).
    Activation checkpointing keeps the block input d and recomputes one block in backward (a
    transient that does not meet the vocabulary's: the head's backward is over by then).
  FWL head (h = hidden_mult·s): 11 h/tp + 12 s (slow pass, hand-written slow gradients, fast pass)
    + 6 C (the causal linear attentions' [T, C] score matrices of a chunk C) + 20 C with the learned
    decay (its [T, C] weights per fast tensor) + 2 (d h + h s)/tp per chunk with more than one chunk
    (the running matrix sums entering each chunk), 3 (d h + h s)/tp with the decay (a decayed copy
    too; this coefficient was set by the measurement, the others by the count). Sequential updates
    (model.fwl.update=sequential, inner chunks of b < T_r tokens): C and the chunk states are those of each
    inner chunk, plus 6 h/tp + 4 s per token (the slow pass and its gradient at the chunk's start weights:
    the products with the incoming sums and the per-position α, β, bias updates) and the state entering each
    inner chunk after the first, (d h + h s)/tp each, two more with the decay (the backward through the chain
    of states holds their gradients), and inside an inner chunk of several fast chunks the states of all but
    the first (its entering state is the inner chunk's). These coefficients were set by the measurement.
  head input: the final LayerNorm's input and output, 2 d.
Transient: the vocabulary work runs in token chunks recomputed in backward; its peak is three fp32
  [chunk, V/tp] tensors (logits, log-softmax and its gradient), chunk = min(vocab_chunk, tokens).
Pipeline parallelism (1F1B): the first stage holds pp micro batches in flight, the last one; the
  busiest of the two is reported.
Not modelled: the CUDA context, allocator fragmentation, communication buckets — the planner keeps a
  headroom fraction of the GPU's memory for them.
"""
from __future__ import annotations

from dataclasses import dataclass

from fwl_scale.config import Config
from fwl_scale.model.fwl import fast_chunk

STATE_BYTES = {True: (2, 2, 12), False: (4, 4, 8)}  # bf16 → (weights, gradients, optimizer) per parameter


@dataclass(frozen=True)
class ParamSplit:
    """Whole-model parameter counts by part (GPT.param_counts)."""

    body: int
    fwl: int
    embeddings: int

    @property
    def total(self) -> int:
        return self.body + self.fwl + self.embeddings


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the busiest rank, by part."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    transient: float

    @property
    def state(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.state + self.activations + self.transient


def param_split(cfg: Config) -> ParamSplit:
    """Exact counts from the model built on the meta device (shapes only, no memory)."""
    # Function-level: building the model imports torch, which the config-only paths do not need.
    from fwl_scale.model import build_model

    counts = build_model(cfg.model, device="meta").param_counts()
    return ParamSplit(body=counts["body"], fwl=counts["fwl"], embeddings=counts["embeddings"])


def body_block_elements(cfg: Config, tokens: int) -> tuple[float, float]:
    """(saved elements of one block, of which the part checkpointing keeps) for `tokens` of this rank."""
    m, p = cfg.model, cfg.parallel
    d, T = m.d_model, m.seq_len
    norm_part = 6 * d / (p.tp if p.sequence_parallel else 1)
    per_token = 16 * d / p.tp + norm_part + (T if m.document_mask else 0) + 2 * d * (p.cp - 1)
    return per_token * tokens, d * tokens / (p.tp if p.sequence_parallel else 1)


def fwl_elements(cfg: Config, tokens: int) -> float:
    """Saved elements of the FWL head for `tokens` tokens of T_r-long sequence chunks."""
    m, p = cfg.model, cfg.parallel
    d, s = m.d_model, m.fwl_width
    h = m.fwl.hidden_mult * s
    t_rank = m.seq_len // p.cp
    state = (d * h + h * s) / p.tp  # the matrix sums of one state
    # The window one fast pass covers: the rank's tokens, or an inner chunk of sequential updates.
    window = t_rank
    decay = m.fwl.decay != "none"
    per_token = 11 * h / p.tp + 12 * s
    sequential = m.fwl.update == "sequential" and m.fwl.inner_chunk < t_rank
    if sequential:
        window = m.fwl.inner_chunk
        n_inner = -(-t_rank // window)
        per_token += 6 * h / p.tp + 4 * s + (n_inner - 1 + (2 if decay else 0)) * state / t_rank
    C = min(fast_chunk(m.fwl_resolved, m.d_model, m.seq_len if window == t_rank else window), window)
    per_token += 6 * C + (20 * C if decay else 0)
    n_chunks = -(-window // C)
    if n_chunks > 1:
        states = 3 if decay else 2
        per_token += states * state * (n_chunks - 1 if sequential else n_chunks) / window
    return per_token * tokens


def estimate(cfg: Config, dp: int, split: ParamSplit) -> MemoryEstimate:
    """Peak bytes of the busiest rank for cfg's layout at data-parallel size dp."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    w_b, g_b, o_b = STATE_BYTES[t.bf16]
    act_b = 2 if t.bf16 else 4
    tokens = p.micro_batch * m.seq_len // p.cp
    block, kept = body_block_elements(cfg, tokens)
    layers = m.n_layers // p.pp
    block_params = split.body / m.n_layers / p.tp

    def stage(first: bool, last: bool) -> MemoryEstimate:
        params = split.body / (p.tp * p.pp)
        if first or last:
            params += split.embeddings / p.tp
        if last:
            params += split.fwl / p.tp
        weights = params * w_b / (dp if p.zero_stage >= 3 else 1)
        if p.zero_stage >= 3:
            weights += 2 * block_params * w_b  # one block gathered in forward, one in backward
        grads = params * g_b / (dp if p.zero_stage >= 2 else 1)
        opt = params * o_b / (dp if p.zero_stage >= 1 else 1)
        in_flight = p.pp if first else 1
        elems = in_flight * layers * (kept if t.activation_checkpointing else block)
        # The recomputed block lives in the backward of the body, after the head's chunks are freed.
        transient = block * act_b if t.activation_checkpointing else 0.0
        if last:
            elems += 2 * m.d_model * tokens
            if m.fwl.enabled:
                elems += fwl_elements(cfg, tokens)
            chunk = min(m.fwl.vocab_chunk, tokens)
            transient = max(transient, 3 * chunk * m.padded_vocab_size / p.tp * 4)
        return MemoryEstimate(weights, grads, opt, elems * act_b, transient)

    stages = [stage(True, p.pp == 1)] + ([stage(False, True)] if p.pp > 1 else [])
    return max(stages, key=lambda e: e.total)
