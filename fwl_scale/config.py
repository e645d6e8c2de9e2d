"""Typed configuration: dataclasses loaded from YAML with dotted command-line overrides.

Every field is typed; loading rejects unknown keys and values of the wrong type with an error that
names the file and the dotted field, and `Config.validate()` checks the cross-field rules (shapes,
parallel layout) before anything runs.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fwl_scale.typed_yaml import ConfigError, from_dict, merge_override, parse_override, read_yaml


@dataclass
class FWLConfig:
    enabled: bool = True
    # Width s of the FWL (its output feeds the unembedding). None: d_model (required with tied embeddings).
    width: int | None = None
    hidden_mult: int = 4
    # Add the body output to W2's output before the FWL's LayerNorm (beyond the paper: the slow head is
    # then a plain head plus a residual MLP, so it starts where the plain unembedding starts). Needs
    # width == d_model.
    residual: bool = False
    # Std of the FWL's dense kernels W1, W2 at init. None: model.init_std (the official TF code: 0.05).
    init_std: float | None = None
    step_size_init: float = 0.01
    # tensor: one learned step size η per fast tensor (the paper's). token: η ⊙ 2σ(G x_j + g) for token j's
    #   gradient (a learned factor per token and fast tensor, TTT's per-token step size; 1 at init).
    step_size: str = "tensor"
    # What takes the fast step: the FWL's head (W1, b1, W2, b2, α, β: always) and, beyond the paper, the output
    # bias (out_bias: a learned unigram cache) and the unembedding (unembedding: U, tied or not; a learned
    # continuous cache). Their step sizes are exp(ρ), ρ learned from log(unembed_step_size_init) for c and
    # log(unembed_step_size_init / width) for U (its scores u_j·u'_i are of the order of the width).
    fast_set: list[str] = field(default_factory=lambda: ["head"])
    unembed_step_size_init: float = 1.0
    # How c's and U's sums are scaled: none = a λ-decayed sum with k = 1, a cache (a word seen once moves
    # its logit by about η; needs decay: learned); head = as the head's (normalize, grad_scale).
    unembed_normalize: str = "none"
    # Multiplies the learned step sizes; 0 evaluates the slow head alone (fast updates off).
    step_scale: float = 1.0
    # The gradient scale k of docs/design.md §1.2: a constant. None means 1 / model.seq_len. Not used with
    # normalize: mean (setting both is an error).
    grad_scale: float | None = None
    # Past the training length (docs/design.md §1.3; the fast path's docstring in model/fwl/layer.py):
    # normalize: none = the constant k above, so the sums grow with the position; mean = position i
    #   averages the gradients of the earlier positions of its document that carry a loss, k_i = 1/n_i
    #   (0 while n_i = 0); with a decay, n_i is the decayed count Σ λ^(i-1-j) w_j of each fast tensor,
    #   i.e. a λ-weighted mean. The count is carried in the FWL state. sqrt = k_i = 1/√n_i: between the
    #   mean (one occurrence 1,000 tokens back weighs 1/1000) and the plain sum (issue 22's hypothesis 2).
    normalize: str = "none"
    # decay: none | learned. learned = a forgetting factor λ ∈ (0, 1) per fast tensor, sigmoid-parametrised
    #   (fwl.decay_logits; no weight decay), so the sums are Σ λ^(i-1-j) ∇_j; decay_init is λ at init.
    decay: str = "none"
    decay_init: float = 0.99
    eps: float = 1e-5
    # Token chunk of the fast pass: state from earlier chunks + quadratic attention inside the chunk.
    chunk_size: int = 256
    # auto | quadratic | chunked (auto picks by the measured crossover, docs/design.md §1.5).
    form: str = "auto"
    # Token chunk for the vocabulary-sized work (slow gradient, losses), recomputed in backward.
    vocab_chunk: int = 1024
    # Where the per-token gradients are taken (docs/design.md §1.6; model/fwl/sequential.py):
    # parallel = at the slow weights θ, all of them (the paper's FWL: the fast pass is one causal linear
    #   attention); sequential = the forward's positions in inner chunks of inner_chunk tokens ([0, b), [b, 2b),
    #   ...), each chunk's gradients taken at the fast weights of its first position θ - η ⊙ k S (built from
    #   every earlier chunk, the carried state included; θ for a document that starts inside the chunk), as
    #   TTT's inner mini-batches. inner_chunk >= seq_len is parallel exactly. Not with context parallelism.
    update: str = "parallel"
    inner_chunk: int = 16


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    # The embedding is padded to a multiple of this (independent of tp), padded logits masked out.
    vocab_multiple: int = 128
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    # Key/value heads (grouped-query attention: each shared by n_heads / n_kv_heads query heads, Llama's
    # num_key_value_heads); None: n_heads.
    n_kv_heads: int | None = None
    seq_len: int = 256
    mlp_mult: int = 4
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Share of each head's width that rotary positions rotate (the first dims; NeoX's rotary_pct).
    rope_fraction: float = 1.0
    # The body's variants, so that transformers bodies can be imported exactly (fwl_scale/hf/body_import.py);
    # the defaults are fwl_scale's own body. norm: layernorm | rmsnorm (Llama's, no bias). mlp: gelu (tanh
    # GELU) | swiglu (down(SiLU(gate x) ⊙ up x), Llama's). bias: the body's linear layers have biases.
    # positions: rotary | learned (absolute positions from a table of max_positions rows, GPT-2's; like the
    # rotary ones they restart at each document when document_mask is on).
    norm: str = "layernorm"
    mlp: str = "gelu"
    # The MLP's hidden width; None: mlp_mult × d_model (Llama's intermediate_size is rarely a multiple).
    mlp_hidden: int | None = None
    bias: bool = True
    positions: str = "rotary"
    max_positions: int | None = None  # learned positions: the table's rows; None: seq_len
    init_std: float = 0.02
    tie_embeddings: bool = True
    # Attention restricted to the token's own document, positions restarting at each document.
    document_mask: bool = True
    # The kernel of document-masked attention (model/blocks.py, use_flex_attention). dense: SDPA with a
    # [B, 1, T, T] boolean mask (on CUDA that mask rules out flash: the memory-efficient kernel with a dense
    # bias). flex: FlexAttention with a block mask built from the document ids (causal and same document),
    # blocks without a visible key skipped. auto: flex on CUDA where torch has it (>= 2.5, Triton), else dense.
    # Either way dense where flex does not apply: context parallelism, a key/value cache, sequence lengths
    # that are not a multiple of 128; without document masking plain causal SDPA (flash) runs. The default
    # stays dense until bench/gpu_suite.sh's attention section has run flex on a GPU: a first GPU job
    # should not be where the untried kernel meets training.
    attention: str = "dense"
    fwl: FWLConfig = field(default_factory=FWLConfig)

    @property
    def padded_vocab_size(self) -> int:
        return int(math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def mlp_width(self) -> int:
        return self.mlp_hidden if self.mlp_hidden is not None else self.mlp_mult * self.d_model

    @property
    def position_rows(self) -> int:
        return self.max_positions if self.max_positions is not None else self.seq_len

    @property
    def rotary_dim(self) -> int:
        """The rotated width of each head (an even number of its first dims)."""
        return int(round(self.rope_fraction * (self.d_model // self.n_heads)))

    @property
    def fwl_width(self) -> int:
        return self.fwl.width if self.fwl.width is not None else self.d_model

    @property
    def fwl_grad_scale(self) -> float:
        return self.fwl.grad_scale if self.fwl.grad_scale is not None else 1.0 / self.seq_len

    @property
    def fwl_resolved(self) -> FWLConfig:
        """The FWL section with its defaults that depend on the model filled in (width, k, init std)."""
        return dataclasses.replace(self.fwl, width=self.fwl_width, grad_scale=self.fwl_grad_scale,
                                   init_std=self.fwl.init_std if self.fwl.init_std is not None else self.init_std)


@dataclass
class ParallelConfig:
    tp: int = 1
    cp: int = 1
    # None: whatever the world size leaves after tp * cp * pp.
    dp: int | None = None
    pp: int = 1
    sequence_parallel: bool = False
    # Context parallelism: how the FWL state crosses rank boundaries. state: one segmented scan of the
    # running sums (dk·dv per rank, fp32); kv: all-gather the FWL keys and values (T/cp·(dk+dv) per rank)
    # and attend to earlier ranks' tokens; auto: whichever sends fewer bytes (docs/design.md §1.5).
    cp_exchange: str = "auto"
    zero_stage: int = 0
    micro_batch: int = 8
    grad_accum: int = 1


@dataclass
class DataConfig:
    # "builtin" (public-domain plays fetched from PyPI at set-up) or paths/globs of .txt, .jsonl(.xz|.gz), .parquet.
    train: list[str] = field(default_factory=lambda: ["builtin"])
    # Validation documents; empty: hold out `valid_fraction` of the training documents (by whole document).
    valid: list[str] = field(default_factory=list)
    valid_fraction: float = 0.05
    # Where tokenizer, shards and manifests are written (relative paths: to the working directory).
    root: str = "data/tiny"
    tokenizer: str | None = None  # an existing sentencepiece model; None: train one into `root`
    tokenizer_type: str = "bpe"  # bpe | unigram
    shard_bytes: int = 64 * 1024 * 1024  # target size of one webdataset tar shard
    workers: int = 2  # tokenization worker processes (and sentencepiece training threads)
    # Characters of training text sampled (whole documents, deterministically) to train the tokenizer.
    tokenizer_sample_chars: int = 200_000_000
    seed: int = 1234  # the global training order (shards and documents); not the validation split
    # packed | contiguous (document-contiguous streams per batch slot, for carried FWL state)
    mode: str = "packed"
    text_field: str = "text"
    # Loader prefetch processes (0: in the training process). They only read ahead; the order is fixed.
    loader_workers: int = 1
    prefetch: int = 4  # batches each loader worker keeps ready


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: str = "offline"  # offline | online | disabled
    project: str = "fwl_scale"
    entity: str | None = None
    run_name: str | None = None
    run_id: str | None = None


@dataclass
class TrainConfig:
    steps: int = 600
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    # Learning rate of the FWL's own parameters, and of its step sizes, as multiples of lr.
    fwl_lr_mult: float = 1.0
    step_size_lr_mult: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    bf16: bool = False
    # fp32 matmuls on CUDA in TF32 (10-bit mantissa products, fp32 accumulation): the FWL's running sums
    # and every fp32 einsum; false keeps full fp32 ("highest"). No effect on CPU.
    tf32: bool = True
    activation_checkpointing: bool = False
    # Run the transformer blocks and the FWL through torch.compile (train/deepspeed_setup.py, compile_model).
    compile: bool = False
    seed: int = 1234
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    position_buckets: int = 8
    save_every: int = 200
    keep_last: int = 2
    out_dir: str = "runs/tiny"
    max_nonfinite_in_row: int = 5
    device: str = "auto"  # auto | cpu | cuda
    peak_tflops: float | None = None  # per device; None: from the device table
    # How long a collective of the job's process group may wait for its slowest rank before the job fails
    # (NCCL and gloo alike; DeepSpeed's default).
    collective_timeout_s: float = 600.0
    # How long the other ranks wait for rank 0 to prepare the tokenizer and shards on first use (a large
    # corpus takes hours): a wait of its own, outside the collective timeout above.
    data_prep_timeout_s: float = 86400.0
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    name: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, source: str = "config") -> "Config":
        m, f = self.model, self.model.fwl

        def need(ok: bool, fld: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"{source}: {fld}: {why}")

        for fld, v in [("model.d_model", m.d_model), ("model.n_layers", m.n_layers),
                       ("model.n_heads", m.n_heads), ("model.seq_len", m.seq_len),
                       ("model.vocab_size", m.vocab_size), ("model.vocab_multiple", m.vocab_multiple),
                       ("model.mlp_mult", m.mlp_mult), ("model.fwl.hidden_mult", f.hidden_mult),
                       ("model.fwl.chunk_size", f.chunk_size), ("model.fwl.vocab_chunk", f.vocab_chunk),
                       ("model.fwl.inner_chunk", f.inner_chunk)]:
            need(v > 0, fld, f"must be > 0, got {v}")
        need(m.d_model % m.n_heads == 0, "model.n_heads",
             f"must divide model.d_model ({m.d_model} % {m.n_heads} = {m.d_model % m.n_heads})")
        need((m.d_model // m.n_heads) % 2 == 0, "model.n_heads", "head width must be even for rotary positions")
        need(m.n_kv_heads is None or (m.n_kv_heads > 0 and m.n_heads % m.n_kv_heads == 0), "model.n_kv_heads",
             f"must be > 0 and divide model.n_heads ({m.n_heads}), got {m.n_kv_heads}")
        need(m.norm in ("layernorm", "rmsnorm"), "model.norm", f"must be layernorm or rmsnorm, got {m.norm!r}")
        need(m.mlp in ("gelu", "swiglu"), "model.mlp", f"must be gelu or swiglu, got {m.mlp!r}")
        need(m.mlp_hidden is None or m.mlp_hidden > 0, "model.mlp_hidden", f"must be > 0, got {m.mlp_hidden}")
        need(m.attention in ("auto", "dense", "flex"), "model.attention",
             f"must be auto, dense or flex, got {m.attention!r}")
        need(m.positions in ("rotary", "learned"), "model.positions",
             f"must be rotary or learned, got {m.positions!r}")
        need(m.max_positions is None or m.max_positions >= m.seq_len, "model.max_positions",
             f"must be >= model.seq_len ({m.seq_len}), got {m.max_positions}")
        need(m.max_positions is None or m.positions == "learned", "model.max_positions",
             "is the size of the learned position table: only with model.positions=learned")
        hd = m.d_model // m.n_heads
        need(0 < m.rope_fraction <= 1 and abs(m.rope_fraction * hd - m.rotary_dim) < 1e-6 and m.rotary_dim % 2 == 0,
             "model.rope_fraction", f"must be in (0, 1] and rotate an even number of the head's {hd} dims, "
             f"got {m.rope_fraction}")
        need(f.width is None or f.width > 0, "model.fwl.width", f"must be > 0, got {f.width}")
        if m.tie_embeddings and f.enabled:
            need(m.fwl_width == m.d_model, "model.fwl.width",
                 f"must equal model.d_model ({m.d_model}) with tied embeddings (U is the input embedding)")
        need(f.grad_scale is None or f.grad_scale > 0, "model.fwl.grad_scale", "must be > 0")
        need(f.eps > 0, "model.fwl.eps", "must be > 0")
        need(f.init_std is None or f.init_std > 0, "model.fwl.init_std", "must be > 0")
        need(f.step_scale >= 0, "model.fwl.step_scale", "must be >= 0")
        need(f.normalize in ("none", "mean", "sqrt"), "model.fwl.normalize",
             f"must be none, mean or sqrt, got {f.normalize!r}")
        need(f.normalize == "none" or f.grad_scale is None, "model.fwl.grad_scale",
             f"is not used with model.fwl.normalize={f.normalize} (k_i = 1/n_i or 1/√n_i replaces it): leave it unset")
        need(f.decay in ("none", "learned"), "model.fwl.decay", f"must be none or learned, got {f.decay!r}")
        need(f.step_size in ("tensor", "token"), "model.fwl.step_size", f"must be tensor or token, got {f.step_size!r}")
        need("head" in f.fast_set and all(m in ("head", "out_bias", "unembedding") for m in f.fast_set),
             "model.fwl.fast_set", f"must hold head and any of out_bias, unembedding; got {f.fast_set}")
        unembedding = [m for m in f.fast_set if m != "head"]
        need(not unembedding or f.step_size == "tensor", "model.fwl.step_size",
             f"must be tensor with a fast unembedding (model.fwl.fast_set {f.fast_set}): per-token factors of c "
             f"and U are not built yet")
        need(f.unembed_step_size_init > 0, "model.fwl.unembed_step_size_init", "must be > 0")
        need(f.unembed_normalize in ("none", "head"), "model.fwl.unembed_normalize",
             f"must be none or head, got {f.unembed_normalize!r}")
        need(not unembedding or f.unembed_normalize == "head" or f.decay == "learned", "model.fwl.decay",
             "must be learned with a fast unembedding whose sums are not normalised (model.fwl.unembed_normalize="
             "none): the decay bounds them")
        need(f.normalize != "sqrt" or f.decay == "learned", "model.fwl.decay",
             "must be learned with model.fwl.normalize=sqrt: without a decay its update grows like √n past "
             "the training length (the count n is then bounded by 1/(1 - λ))")
        need(0.0 < f.decay_init < 1.0, "model.fwl.decay_init", f"must lie in (0, 1), got {f.decay_init}")
        need(self.train.fwl_lr_mult > 0, "train.fwl_lr_mult", "must be > 0")
        need(self.train.step_size_lr_mult > 0, "train.step_size_lr_mult", "must be > 0")
        if f.residual and f.enabled:
            need(m.fwl_width == m.d_model, "model.fwl.width",
                 f"must equal model.d_model ({m.d_model}) with model.fwl.residual (the body output is added)")
        need(f.form in ("auto", "quadratic", "chunked"), "model.fwl.form",
             f"must be auto, quadratic or chunked, got {f.form!r}")
        need(f.update in ("parallel", "sequential"), "model.fwl.update",
             f"must be parallel or sequential, got {f.update!r}")
        need(f.update == "parallel" or (f.step_size == "tensor" and list(f.fast_set) == ["head"]), "model.fwl.update",
             f"sequential runs with model.fwl.step_size=tensor and model.fwl.fast_set=[head] only so far (got "
             f"{f.step_size}, {f.fast_set})")
        check_layout(self, source=source)
        d = self.data
        need(d.mode in ("packed", "contiguous"), "data.mode", f"must be packed or contiguous, got {d.mode!r}")
        need(d.tokenizer_type in ("bpe", "unigram"), "data.tokenizer_type", "must be bpe or unigram")
        need(0 <= d.valid_fraction < 1, "data.valid_fraction", "must be in [0, 1)")
        need(len(d.train) > 0, "data.train", "needs at least one source")
        for fld, v in [("data.shard_bytes", d.shard_bytes), ("data.workers", d.workers),
                       ("data.tokenizer_sample_chars", d.tokenizer_sample_chars), ("data.prefetch", d.prefetch)]:
            need(v > 0, fld, f"must be > 0, got {v}")
        need(d.loader_workers >= 0, "data.loader_workers", f"must be >= 0, got {d.loader_workers}")
        t = self.train
        need(t.steps > 0, "train.steps", "must be > 0")
        need(t.lr > 0, "train.lr", "must be > 0")
        need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
        need(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        need(t.keep_last >= 1, "train.keep_last", "must be >= 1")
        need(t.collective_timeout_s > 0, "train.collective_timeout_s", "must be > 0")
        need(t.data_prep_timeout_s > 0, "train.data_prep_timeout_s", "must be > 0")
        need(t.device in ("auto", "cpu", "cuda"), "train.device", "must be auto, cpu or cuda")
        need(t.wandb.mode in ("offline", "online", "disabled"), "train.wandb.mode",
             "must be offline, online or disabled")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_layout(cfg: Config, world_size: int | None = None, source: str = "config") -> int | None:
    """Every rule a parallel layout (tp × cp × dp × pp, ZeRO stage, sequence parallelism, and what the
    trainer does not run in a layout yet) must meet, in one place, reading the config alone. Without a world
    size, the rules of the config (Config.validate runs them when a config is loaded, so the launcher's
    pre-flight, `fwl layout`, `fwl plan` and the trainer refuse the same layouts); with one, also those only
    a launch can break, and dp is returned."""
    m, p = cfg.model, cfg.parallel

    def need(ok: bool, fld: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {fld}: {why}")

    for fld, v in [("parallel.tp", p.tp), ("parallel.cp", p.cp), ("parallel.pp", p.pp),
                   ("parallel.micro_batch", p.micro_batch), ("parallel.grad_accum", p.grad_accum)]:
        need(v >= 1, fld, f"must be >= 1, got {v}")
    need(p.dp is None or p.dp >= 1, "parallel.dp", f"must be >= 1, got {p.dp}")
    need(p.cp_exchange in ("auto", "state", "kv"), "parallel.cp_exchange",
         f"must be auto, state or kv, got {p.cp_exchange!r}")
    need(p.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", f"must be 0..3, got {p.zero_stage}")
    need(not (p.pp > 1 and p.zero_stage >= 2), "parallel.zero_stage",
         "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only; use zero_stage <= 1 with pp > 1")
    need(m.n_heads % p.tp == 0, "parallel.tp", f"must divide model.n_heads ({m.n_heads})")
    fast_unembedding = m.fwl.enabled and any(member != "head" for member in m.fwl.fast_set)
    for fld, v in (("parallel.tp", p.tp), ("parallel.cp", p.cp), ("parallel.pp", p.pp)):
        need(not (fast_unembedding and v > 1), fld,
             f"must be 1 with a fast unembedding (model.fwl.fast_set {m.fwl.fast_set}): it runs in one process "
             f"or data parallel only so far")
    need(not (fast_unembedding and p.zero_stage == 3), "parallel.zero_stage",
         f"must be at most 2 with a fast unembedding (model.fwl.fast_set {m.fwl.fast_set}): ZeRO-3 would have to "
         f"gather c and U for FastWeightLayer.head, which runs outside the module's forward hooks")
    need(m.kv_heads % p.tp == 0, "parallel.tp", f"must divide model.n_kv_heads ({m.kv_heads})")
    need((m.fwl.hidden_mult * m.fwl_width) % p.tp == 0, "parallel.tp",
         f"must divide the FWL hidden width ({m.fwl.hidden_mult * m.fwl_width})")
    need(m.mlp_width % p.tp == 0, "parallel.tp", f"must divide the MLP width ({m.mlp_width})")
    need(m.n_layers % p.pp == 0, "parallel.pp", f"must divide model.n_layers ({m.n_layers})")
    need(not p.sequence_parallel or m.seq_len % (p.tp * p.cp) == 0, "parallel.sequence_parallel",
         f"model.seq_len ({m.seq_len}) must be divisible by parallel.tp × parallel.cp ({p.tp} × {p.cp}): "
         f"each context-parallel chunk is split over the tensor-parallel ranks")
    need(m.seq_len % p.cp == 0, "parallel.cp", f"must divide model.seq_len ({m.seq_len})")
    # Sequential fast-weight updates make the head sequential along the sequence (chunk c starts from the fast
    # weights chunk c-1 ends with): a context-parallel rank would wait for the one before it. Not built.
    need(not (m.fwl.enabled and m.fwl.update == "sequential" and p.cp > 1), "model.fwl.update",
         f"sequential is not supported with context parallelism (parallel.cp={p.cp}) yet: each inner chunk starts "
         "from the fast weights the previous one ends with; use model.fwl.update=parallel or parallel.cp=1")
    # Not run by the trainer yet. pp × cp and pp × tp run and are tested against one process
    # (tests/test_engine_parallel.py, tests/test_pipeline_cp.py); pp × cp × tp needs 8 ranks to test, so it is
    # refused rather than served unchecked.
    need(not (p.pp > 1 and p.cp > 1 and p.tp > 1), "parallel.tp",
         f"pipeline × context × tensor parallelism (pp={p.pp}, cp={p.cp}, tp={p.tp}) is not supported yet "
         "(pp × cp and pp × tp are); drop one of the three")
    need(not (p.pp > 1 and cfg.train.bf16 and p.zero_stage == 0), "parallel.zero_stage",
         "pipeline parallelism with train.bf16 needs zero_stage 1: without ZeRO, DeepSpeed's bf16 optimizer "
         "cannot load the checkpoints it writes under the pipeline engine (DeepSpeed 0.19: its optimizer state "
         "is saved per data-parallel rank but loaded as one), so the run could not be resumed")
    need(not (p.pp > 1 and m.positions == "learned"), "model.positions",
         "learned position embeddings are not in the pipeline's first stage (train/pipeline.py EmbedStage) "
         "yet; use parallel.pp: 1")
    # train.compile is tested in one process and under plain data parallelism with ZeRO 0-2
    # (tests/test_compile.py): tensor and context parallelism run collectives inside the blocks and the FWL,
    # the pipeline engine builds its own stage modules, and ZeRO-3 gathers parameters in hooks of every
    # submodule, inside what would be traced.
    if cfg.train.compile:
        for fld, value, why in (("parallel.tp", p.tp, "tensor parallelism"), ("parallel.cp", p.cp, "context parallelism"),
                                ("parallel.pp", p.pp, "pipeline parallelism")):
            need(value == 1, "train.compile", f"not supported with {why} ({fld}={value}) yet; use "
                                              "train.compile=false or a layout without it")
        need(p.zero_stage != 3, "train.compile", "not supported with parallel.zero_stage=3 (its parameter-gathering "
                                                 "hooks would run inside the compiled modules); use zero_stage 0-2 "
                                                 "or train.compile=false")
        # The FWL compiles as one graph: the loop over seq_len / inner_chunk inner chunks is unrolled into it, so its
        # compile time grows with their number (tiny config, 4 chunks: the compiled FWL equals eager within 1e-6
        # but took 15 minutes to compile on 2 CPU cores; seq_len 2048 in chunks of 16 would be 128).
        need(not (m.fwl.enabled and m.fwl.update == "sequential" and m.fwl.inner_chunk < m.seq_len), "train.compile",
             f"not supported with model.fwl.update=sequential ({-(-m.seq_len // m.fwl.inner_chunk)} inner chunks "
             "unrolled into one graph) yet; use train.compile=false or model.fwl.update=parallel")
    if world_size is None:
        return None
    mp = p.tp * p.cp * p.pp
    if world_size % mp != 0:
        raise ConfigError(f"parallel: world size {world_size} is not a multiple of tp*cp*pp = "
                          f"{p.tp}*{p.cp}*{p.pp} = {mp}")
    dp = world_size // mp
    if p.dp is not None and p.dp != dp:
        raise ConfigError(f"parallel.dp: {p.dp} but world size {world_size} / (tp*cp*pp = {mp}) = {dp}")
    need(m.padded_vocab_size % p.tp == 0, "parallel.tp",
         f"{p.tp} must divide the padded vocabulary ({m.padded_vocab_size} = model.vocab_size {m.vocab_size} "
         f"rounded up to model.vocab_multiple {m.vocab_multiple}); choose a vocab_multiple divisible by tp")
    return dp


def config_to_nested(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """A Config from its nested-dict form (Config.to_dict(), e.g. stored in a checkpoint), type-checked
    and validated like a file."""
    try:
        cfg = from_dict(Config, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg.validate(source)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Reads a YAML config (None: the built-in defaults = `tiny`), applies `a.b=value` overrides,
    type-checks every field and validates the whole."""
    source = str(path) if path is not None else "built-in defaults"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        loaded = read_yaml(p)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
        data.setdefault("name", p.stem)
    for item in overrides or []:
        keys, value = parse_override(item, source)
        merge_override(data, keys, value)
    try:
        cfg = from_dict(Config, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg.validate(source)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_nested(cfg), sort_keys=False)
