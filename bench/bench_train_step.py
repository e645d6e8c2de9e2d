"""Training-step time of FWL vs baseline (model.fwl.enabled=false), eager and compiled (train.compile), and of
document-masked attention's kernels (model.attention: the dense mask vs FlexAttention's block mask), through
the real DeepSpeed engine, next to the analytic FLOP ratio (fwl_scale/model/flops.py), measured in one run
on one device.

    python bench/bench_train_step.py                                   # CPU: tiny and 125M (T = 64), eager
    python bench/bench_train_step.py --compile both                    # ... and compiled (Inductor)
    python bench/bench_train_step.py --device cuda --bf16 --shapes 125m,1b --seq 2048 --micro 125m=8 1b=4 \\
        --compile both --json results.json                             # a GPU (bench/gpu_suite.sh)
    python bench/bench_train_step.py --device cuda --bf16 --attention dense,flex --doc-len 512 ...
                                                                       # dense mask vs document kernel

A step = forward, backward and optimizer step of one micro-batch (AdamW, ZeRO 0, clipping), on random
token ids (the cost does not depend on the text), one document per row or, with --doc-len, rows packed with
documents of that mean length (the document kernel skips the tiles between documents; the dense mask does
not). `attn` names the kernel that ran, after model.attention when that differs (auto:dense; model/blocks.py
use_flex_attention: auto is flex on CUDA, dense on CPU; lengths that are not a multiple of 128 run dense).
Each row: medians over the timed steps after warmup, of forward+backward (what the analytic count covers)
and of the whole step; MFU = analytic FLOPs over the forward+backward time, over the device's bf16 peak
(GPUs of fwl_scale/train/metrics.py's table; n/a on CPU); the load average when the row was taken (a shared
machine). The compiled rows' warm-up steps hold the compilation; its wall time is printed.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fwl_scale.config import Config, load_config  # noqa: E402
from fwl_scale.model import build_model  # noqa: E402
from fwl_scale.model.blocks import use_flex_attention  # noqa: E402
from fwl_scale.train.deepspeed_setup import build_engine, compile_model  # noqa: E402
from fwl_scale.train.distributed import DistInfo, init_distributed  # noqa: E402
from fwl_scale.model.flops import train_flops_per_token  # noqa: E402
from fwl_scale.train.metrics import device_name, peak_tflops  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # name -> (FWL config, baseline config, default window, default micro-batch)
    "tiny": ("configs/tiny.yaml", "configs/base_tiny.yaml", 256, 8),
    "125m": ("configs/fwl_125m.yaml", "configs/base_125m.yaml", 64, 1),
    "1b": ("configs/fwl_1b.yaml", "configs/base_1b.yaml", 64, 1),
}


def packed_doc_ids(B: int, T: int, doc_len: int, g: torch.Generator) -> torch.Tensor:
    """Document ids [B, T]: rows packed with documents of mean length `doc_len` (a new document starts at each
    token with probability 1/doc_len: geometric lengths, as packing a corpus of varied lengths gives); 0: one
    document per row."""
    if doc_len <= 0:
        return torch.zeros(B, T, dtype=torch.long)
    starts = torch.rand(B, T, generator=g) < 1.0 / doc_len
    starts[:, 0] = False
    return starts.long().cumsum(dim=1)


def attention_kernel(cfg: Config, device: torch.device) -> str:
    """The kernel the model's document-masked attention runs on `device` (GPT.attention_inputs), after
    model.attention where that differs: dense, flex, auto:dense, auto:flex, or causal without document masking."""
    if not cfg.model.document_mask:
        return "causal"
    kernel = "flex" if use_flex_attention(cfg.model.attention, device, cfg.model.seq_len) else "dense"
    return kernel if kernel == cfg.model.attention else f"{cfg.model.attention}:{kernel}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """One model in the DeepSpeed engine with a fixed random batch; `step(mode)` times one training step.
    `backend`: None (eager only) or torch.compile's backend for train/deepspeed_setup.py's compile_model; a compiled
    model also runs eager steps (torch.compiler.set_stance("force_eager")), so that eager and compiled
    steps of the same model alternate and a change of machine load affects both alike. set_stance needs
    torch >= 2.6, so only a compiled model's steps use it: eager-only runs work on the whole declared range."""

    def __init__(self, cfg: Config, dist: DistInfo, backend: str | None, doc_len: int = 0):
        self.cfg, self.device, self.compiled = cfg, dist.device, backend is not None
        self.kernel = attention_kernel(cfg, dist.device)
        torch.manual_seed(0)
        model = build_model(cfg.model)
        model.set_activation_checkpointing(cfg.train.activation_checkpointing)
        self.n_params = sum(p.numel() for p in model.parameters())
        if backend is not None:
            compile_model(model, backend)
        self.engine, _ = build_engine(cfg, model, dist)
        B, T, V = cfg.parallel.micro_batch, cfg.model.seq_len, cfg.model.vocab_size
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, V, (B, T + 1), generator=g).to(dist.device)
        self.batch = (ids[:, :-1], ids[:, 1:], packed_doc_ids(B, T, doc_len, g).to(dist.device))
        self.fwd_bwd: dict[str, list[float]] = {"eager": [], "compiled": []}
        self.total: dict[str, list[float]] = {"eager": [], "compiled": []}
        self.first: dict[str, float] = {}  # the first step's wall time (compiled: the compilation)

    def close(self) -> None:
        """Frees the engine's parameters, optimizer state and buffers before the next shape is built: a
        deleted DeepSpeed engine stays alive through its hooks until destroyed."""
        self.engine.destroy()
        del self.engine, self.batch
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def step(self, mode: str, record: bool) -> None:
        stance = "force_eager" if mode == "eager" else "default"
        sync(self.device)
        t0 = time.perf_counter()
        with torch.compiler.set_stance(stance) if self.compiled else contextlib.nullcontext():
            out = self.engine(*self.batch)
            self.engine.backward(out.loss)
        sync(self.device)
        t1 = time.perf_counter()
        self.engine.step()
        sync(self.device)
        if record:
            self.fwd_bwd[mode].append(t1 - t0)
            self.total[mode].append(time.perf_counter() - t0)
        elif mode not in self.first:
            self.first[mode] = time.perf_counter() - t0


def parse_per_shape(values: list[str], what: str) -> dict[str, int]:
    """`--seq 2048` (every shape) or `--seq 125m=2048 1b=1024`."""
    out: dict[str, int] = {}
    for v in values:
        name, _, num = v.rpartition("=")
        if name and name not in SHAPES:
            raise SystemExit(f"--{what}: unknown shape {name!r} (known: {', '.join(SHAPES)})")
        try:
            n = int(num)
        except ValueError:
            raise SystemExit(f"--{what}: {v!r} is not an integer or SHAPE=integer") from None
        for s in ([name] if name else SHAPES):
            out[s] = n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny,125m", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--seq", nargs="*", default=[], help="window: T (all shapes) or SHAPE=T ...")
    ap.add_argument("--micro", nargs="*", default=[], help="micro-batch: B (all shapes) or SHAPE=B ...")
    ap.add_argument("--compile", default="off", choices=["off", "on", "both"],
                    help="eager only, compiled only, or both (train.compile)")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend (aot_eager: tracing without code generation, for a smoke run)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--attention", default="",
                    help="comma-separated model.attention values (auto, dense, flex), each timed on the same "
                         "batch; default: the config's")
    ap.add_argument("--doc-len", type=int, default=0,
                    help="pack each row with documents of this mean length (0: one document per row)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for every model")
    ap.add_argument("--json", help="also write the rows and the ratios here")
    args = ap.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    if args.compile != "off" and not hasattr(torch.compiler, "set_stance"):
        ap.error(f"--compile {args.compile} needs torch >= 2.6 (torch.compiler.set_stance alternates eager and "
                 f"compiled steps of one model); this is torch {torch.__version__}")
    for s in shapes:
        if s not in SHAPES:
            raise SystemExit(f"--shapes: unknown shape {s!r} (known: {', '.join(SHAPES)})")
    seq, micro = parse_per_shape(args.seq, "seq"), parse_per_shape(args.micro, "micro")
    modes = {"off": ["eager"], "on": ["compiled"], "both": ["eager", "compiled"]}[args.compile]
    attentions = [a for a in args.attention.split(",") if a] or [None]  # None: the config's model.attention

    common = ["train.wandb.enabled=false", "parallel.zero_stage=0", "parallel.grad_accum=1",
              f"train.bf16={str(args.bf16).lower()}", f"train.device={args.device}",
              "train.activation_checkpointing=false", *args.set]
    dist = init_distributed(load_config(REPO / SHAPES[shapes[0]][0], common))
    from deepspeed.utils import logger as ds_logger  # deepspeed is imported by init_distributed, for its accelerator

    ds_logger.setLevel(logging.WARNING)
    peak = peak_tflops(dist.device, None)
    print(f"machine: {device_name(dist.device)}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}, "
          f"{'bf16' if args.bf16 else 'fp32'}; median of {args.steps} steps after {args.warmup} warmup, "
          f"FWL and baseline steps alternating; peak {peak or 'n/a'} TFLOP/s; compile backend {args.compile_backend}; "
          f"{f'documents of mean length {args.doc_len}' if args.doc_len > 0 else 'one document per row'}")
    header = (f"{'model':<5} {'head':<9} {'mode':<8} {'attn':<10} {'T':>5} {'micro':>5} {'params':>9} "
              f"{'GFLOP/tok':>10} "
              f"{'fwd+bwd s':>10} {'step s':>9} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'first s':>8} {'load':>5}")
    print(header)
    print("-" * len(header))
    rows, summary = [], []
    for name in shapes:
        fwl_path, base_path, default_seq, default_micro = SHAPES[name]
        extra = [f"model.seq_len={seq.get(name, default_seq)}", f"parallel.micro_batch={micro.get(name, default_micro)}"]
        backend = args.compile_backend if "compiled" in modes else None
        # Both models (under each --attention value) side by side and, with --compile both, each model's eager
        # and compiled steps: all alternating, so that a change in machine load (a shared machine) affects
        # every row alike.
        timers = {(head, attention): StepTimer(load_config(REPO / path, common + extra + (
                      [f"model.attention={attention}"] if attention else [])), dist, backend, args.doc_len)
                  for attention in attentions for head, path in (("FWL", fwl_path), ("baseline", base_path))}
        for i in range(args.warmup + args.steps):
            for timer in timers.values():
                for mode in modes:
                    timer.step(mode, record=i >= args.warmup)
        for mode in modes:
            result = {}
            for (head, attention), timer in timers.items():
                cfg = timer.cfg
                fb, sec = statistics.median(timer.fwd_bwd[mode]), statistics.median(timer.total[mode])
                flops = train_flops_per_token(cfg.model).total
                tokens = cfg.parallel.micro_batch * cfg.model.seq_len
                tflops = flops * tokens / fb / 1e12
                row = {"shape": name, "head": head, "mode": mode, "attention": cfg.model.attention,
                       "kernel": timer.kernel, "doc_len": args.doc_len, "T": cfg.model.seq_len,
                       "micro": cfg.parallel.micro_batch, "params": timer.n_params, "flops_per_token": flops,
                       "fwd_bwd_s": fb, "step_s": sec, "tokens_per_s": tokens / sec, "tflops": tflops,
                       "mfu": tflops / peak if peak else None, "first_step_s": timer.first[mode],
                       "load": os.getloadavg()[0]}
                rows.append(row)
                result[head, attention] = row
                mfu = f"{row['mfu']:.1%}" if peak else "n/a"
                print(f"{name:<5} {head:<9} {mode:<8} {timer.kernel:<10} {row['T']:>5} {row['micro']:>5} "
                      f"{timer.n_params / 1e6:>8.2f}M {flops / 1e9:>10.4f} {fb:>10.4f} {sec:>9.4f} "
                      f"{tokens / sec:>9.0f} {tflops:>8.4f} {mfu:>6} {timer.first[mode]:>8.1f} {row['load']:>5.1f}",
                      flush=True)
            for attention in attentions:
                f, b = result["FWL", attention], result["baseline", attention]
                summary.append({"shape": name, "mode": mode, "attention": f["attention"], "kernel": f["kernel"],
                                "fwd_bwd_ratio": f["fwd_bwd_s"] / b["fwd_bwd_s"],
                                "step_ratio": f["step_s"] / b["step_s"],
                                "analytic_ratio": f["flops_per_token"] / b["flops_per_token"]})
        for timer in timers.values():
            timer.close()
        del timers
    print("(TFLOP/s: analytic FLOPs over the forward+backward time; the step adds the optimizer, whose cost\n"
          " grows with the parameter count, not with tokens; first s: the first warm-up step, compilation included)")
    print()
    # With several --attention values each line names the kernel its rows ran.
    def kernel_of(r: dict) -> str:
        return f" ({r['kernel']} attention)" if len(attentions) > 1 else ""

    for s in summary:
        print(f"{s['shape']} {s['mode']}{kernel_of(s)}: FWL / baseline  forward+backward {s['fwd_bwd_ratio']:.2f}x, "
              f"whole step {s['step_ratio']:.2f}x measured; {s['analytic_ratio']:.2f}x analytic FLOPs "
              f"(measured / analytic {s['fwd_bwd_ratio'] / s['analytic_ratio']:.2f})")
    by = {(r["shape"], r["head"], r["mode"], r["attention"]): r for r in rows}
    for name in shapes:
        for head in ("FWL", "baseline"):
            for attention in dict.fromkeys(r["attention"] for r in rows):
                if (name, head, "eager", attention) in by and (name, head, "compiled", attention) in by:
                    e, c = by[name, head, "eager", attention], by[name, head, "compiled", attention]
                    print(f"{name} {head}{kernel_of(e)}: compiled / eager forward+backward "
                          f"{c['fwd_bwd_s'] / e['fwd_bwd_s']:.2f}x")
            for mode in modes:  # the dense mask against the document kernel, on the same batch
                kernels = {r["kernel"].rpartition(":")[2]: r for r in rows
                           if (r["shape"], r["head"], r["mode"]) == (name, head, mode)}
                if "dense" in kernels and "flex" in kernels:
                    d, f = kernels["dense"], kernels["flex"]
                    print(f"{name} {head} {mode}: flex / dense attention  forward+backward "
                          f"{f['fwd_bwd_s'] / d['fwd_bwd_s']:.2f}x, whole step {f['step_s'] / d['step_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name(dist.device), "peak_tflops": peak,
                                               "bf16": args.bf16, "doc_len": args.doc_len, "rows": rows,
                                               "ratios": summary}, indent=1))


if __name__ == "__main__":
    main()
