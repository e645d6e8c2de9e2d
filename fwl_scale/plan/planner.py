"""`fwl plan CONFIG --gpus N --gpu-memory 80GiB`: the layouts that fit, ranked by predicted step time.

Every layout (tp, cp, pp, dp, ZeRO stage, micro batch, gradient accumulation, activation checkpointing)
of the allocation is checked by the rules the trainer applies (config.check_layout), then by the memory model (plan/memory.py) against the GPU's
memory less a headroom; each refusal keeps its reason.

Predicted step time (a ranking, not a promise):
  compute   = global tokens × training FLOPs per token (model/flops.py, the FWL's second-order work
              included) / (world × peak × efficiency), +1/3 of the body's FLOPs when checkpointing
              recomputes it; the pipeline bubble multiplies it by (ga + pp - 1) / ga;
  tp        = 4 all-reduces of the micro batch's [T_r, d] activations per block (2 forward, 2 backward),
              at the intra-node bandwidth (inter-node when tp spans nodes);
  cp        = one all-gather of keys and values per block, forward and backward;
  dp        = a ring all-reduce of the gradients (2 bytes each in bf16, 4 in fp32) per step; ZeRO 3
              adds the weights' all-gathers, forward and backward (1.5× the traffic);
  the inter-node bandwidth for dp and cp when the model-parallel group fills a node.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass

from fwl_scale.config import Config, ConfigError, check_layout
from fwl_scale.plan.memory import MemoryEstimate, ParamSplit, estimate, param_split
from fwl_scale.model.flops import train_flops_per_token

GIB = 2 ** 30
_UNITS = {"": 1, "b": 1, "kib": 2 ** 10, "mib": 2 ** 20, "gib": GIB, "tib": 2 ** 40,
          "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}


def parse_bytes(text: str, what: str = "--gpu-memory") -> float:
    """'80GiB', '141GB', '80g' (GiB) or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    unit = {"g": "gib", "m": "mib", "k": "kib", "t": "tib"}.get(unit, unit)
    if m is None or unit not in _UNITS:
        raise ConfigError(f"{what}: cannot read {text!r} as a size (e.g. 80GiB, 141GB)")
    return float(m.group(1)) * _UNITS[unit]


@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpu_memory: float  # bytes
    gpus_per_node: int = 8
    peak_tflops: float = 989.0  # H100 SXM dense bf16 (train/metrics.py's table)
    efficiency: float = 0.45  # fraction of peak a well-tuned step reaches
    intra_gbps: float = 300.0  # GB/s per GPU inside a node (NVLink)
    inter_gbps: float = 25.0  # GB/s per GPU across nodes (200 Gb/s InfiniBand)
    headroom: float = 0.10  # kept free: CUDA context, fragmentation, communication buckets


@dataclass(frozen=True)
class Layout:
    tp: int
    cp: int
    pp: int
    dp: int
    zero_stage: int
    micro_batch: int
    grad_accum: int
    checkpointing: bool

    def overrides(self) -> list[str]:
        return [f"parallel.tp={self.tp}", f"parallel.cp={self.cp}", f"parallel.pp={self.pp}",
                f"parallel.dp={self.dp}", f"parallel.zero_stage={self.zero_stage}",
                f"parallel.micro_batch={self.micro_batch}", f"parallel.grad_accum={self.grad_accum}",
                f"train.activation_checkpointing={str(self.checkpointing).lower()}"]


@dataclass(frozen=True)
class Verdict:
    layout: Layout
    memory: MemoryEstimate | None  # None when a rule refused the layout before the memory model
    step_s: float | None  # None when refused
    reason: str | None  # why it is refused; None when it fits


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def apply(cfg: Config, lay: Layout) -> Config:
    par = dataclasses.replace(cfg.parallel, tp=lay.tp, cp=lay.cp, pp=lay.pp, dp=lay.dp, zero_stage=lay.zero_stage,
                              micro_batch=lay.micro_batch, grad_accum=lay.grad_accum)
    train = dataclasses.replace(cfg.train, activation_checkpointing=lay.checkpointing)
    return dataclasses.replace(cfg, parallel=par, train=train)


def step_time(cfg: Config, lay: Layout, hw: Hardware) -> float:
    m = cfg.model
    flops = train_flops_per_token(m)
    world = lay.tp * lay.cp * lay.pp * lay.dp
    tokens = lay.micro_batch * lay.grad_accum * lay.dp * m.seq_len
    per_token = flops.total + (flops.body / 3 if lay.checkpointing else 0.0)
    compute = tokens * per_token / (world * hw.peak_tflops * 1e12 * hw.efficiency)
    compute *= (lay.grad_accum + lay.pp - 1) / lay.grad_accum
    act_bytes = 2 if cfg.train.bf16 else 4
    micro_tokens = lay.micro_batch * m.seq_len // lay.cp
    layers = m.n_layers // lay.pp
    mp = lay.tp * lay.cp * lay.pp
    tp_bw = (hw.intra_gbps if lay.tp <= hw.gpus_per_node else hw.inter_gbps) * 1e9
    tp = 0.0
    if lay.tp > 1:
        tp = lay.grad_accum * layers * 4 * 2 * (lay.tp - 1) / lay.tp * micro_tokens * m.d_model * act_bytes / tp_bw
    outer_bw = (hw.intra_gbps if mp * lay.dp <= hw.gpus_per_node else hw.inter_gbps) * 1e9
    cp = 0.0
    if lay.cp > 1:
        cp = lay.grad_accum * layers * 2 * (lay.cp - 1) * micro_tokens * 2 * m.d_model / lay.tp * act_bytes / outer_bw
    dp = 0.0
    if lay.dp > 1:
        params = param_split_cached(cfg).total / (lay.tp * lay.pp)
        traffic = 2 * (lay.dp - 1) / lay.dp * params * act_bytes * (1.5 if lay.zero_stage == 3 else 1.0)
        dp = traffic / outer_bw
    return compute + tp + cp + dp


_SPLITS: dict[str, ParamSplit] = {}


def param_split_cached(cfg: Config) -> ParamSplit:
    key = repr(cfg.model)
    if key not in _SPLITS:
        _SPLITS[key] = param_split(cfg)
    return _SPLITS[key]


def candidates(cfg: Config, hw: Hardware, global_batch: int) -> list[Layout]:
    m = cfg.model
    out = []
    cps = [c for c in _divisors(hw.gpus) if m.seq_len % c == 0 and c & (c - 1) == 0]
    for tp, cp, pp in itertools.product(_divisors(hw.gpus), cps, _divisors(hw.gpus)):
        if hw.gpus % (tp * cp * pp):
            continue
        dp = hw.gpus // (tp * cp * pp)
        if global_batch % dp:
            continue
        per_rank = global_batch // dp
        for mb, zero, ckpt in itertools.product(_divisors(per_rank), (0, 1, 2, 3), (False, True)):
            if mb > 64:
                continue
            if dp == 1 and zero > 0:
                continue  # ZeRO without data parallelism shards nothing
            out.append(Layout(tp, cp, pp, dp, zero, mb, per_rank // mb, ckpt))
    return out


def judge(cfg: Config, lay: Layout, hw: Hardware) -> Verdict:
    trial = apply(cfg, lay)
    try:
        check_layout(trial, hw.gpus, source="layout")
    except ConfigError as e:
        return Verdict(lay, None, None, str(e).removeprefix("layout: "))
    if lay.tp > hw.gpus_per_node:
        return Verdict(lay, None, None, f"tp={lay.tp} spans nodes of {hw.gpus_per_node} GPUs")
    mem = estimate(trial, lay.dp, param_split_cached(cfg))
    budget = hw.gpu_memory * (1 - hw.headroom)
    if mem.total > budget:
        return Verdict(lay, mem, None, f"needs {mem.total / GIB:.1f} GiB > {budget / GIB:.1f} GiB usable "
                                       f"(state {mem.state / GIB:.1f}, activations {mem.activations / GIB:.1f}, "
                                       f"transient {mem.transient / GIB:.1f})")
    return Verdict(lay, mem, step_time(trial, lay, hw), None)


def plan(cfg: Config, hw: Hardware, global_batch: int) -> list[Verdict]:
    """Every candidate layout judged; the fitting ones first, fastest first."""
    if hw.gpus < 1:
        raise ConfigError(f"--gpus: must be >= 1, got {hw.gpus}")
    if global_batch < 1:
        raise ConfigError(f"--global-batch: must be >= 1, got {global_batch}")
    verdicts = [judge(cfg, lay, hw) for lay in candidates(cfg, hw, global_batch)]
    if not verdicts:
        raise ConfigError(f"--global-batch {global_batch}: no data-parallel size of {hw.gpus} GPUs divides it")
    return sorted(verdicts, key=lambda v: (v.step_s is None, v.step_s or 0.0,
                                           v.memory.total if v.memory else 0.0))
