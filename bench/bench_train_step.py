"""Training-step time of FWL vs baseline (model.fwl.enabled=false), eager and compiled (train.compile), through
the real DeepSpeed engine, next to the analytic FLOP ratio (fwl_scale/model/flops.py), measured in one run
on one device.

    python bench/bench_train_step.py                                   # CPU: tiny and 125M (T = 64), eager
    python bench/bench_train_step.py --compile both                    # ... and compiled (Inductor)
    python bench/bench_train_step.py --device cuda --bf16 --shapes 125m,1b --seq 2048 --micro 125m=8 1b=4 \\
        --compile both --json results.json                             # a GPU (bench/gpu_suite.sh)

A step = forward, backward and optimizer step of one micro-batch (AdamW, ZeRO 0, clipping), on random
token ids (the cost does not depend on the text). Each row: medians over the timed steps after warmup, of
forward+backward (what the analytic count covers) and of the whole step; MFU = analytic FLOPs over the
forward+backward time, over the device's bf16 peak (GPUs of fwl_scale/train/metrics.py's table; n/a on
CPU); the load average when the row was taken (a shared machine). The compiled rows' warm-up steps hold the
compilation; its wall time is printed.
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """One model in the DeepSpeed engine with a fixed random batch; `step(mode)` times one training step.
    `backend`: None (eager only) or torch.compile's backend for train/deepspeed_setup.py's compile_model; a compiled
    model also runs eager steps (torch.compiler.set_stance("force_eager")), so that eager and compiled
    steps of the same model alternate and a change of machine load affects both alike. set_stance needs
    torch >= 2.6, so only a compiled model's steps use it: eager-only runs work on the whole declared range."""

    def __init__(self, cfg: Config, dist: DistInfo, backend: str | None):
        self.cfg, self.device, self.compiled = cfg, dist.device, backend is not None
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
        self.batch = (ids[:, :-1], ids[:, 1:], torch.zeros(B, T, dtype=torch.long, device=dist.device))
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
          f"FWL and baseline steps alternating; peak {peak or 'n/a'} TFLOP/s; compile backend {args.compile_backend}")
    header = (f"{'model':<5} {'head':<9} {'mode':<8} {'T':>5} {'micro':>5} {'params':>9} {'GFLOP/tok':>10} "
              f"{'fwd+bwd s':>10} {'step s':>9} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'first s':>8} {'load':>5}")
    print(header)
    print("-" * len(header))
    rows, summary = [], []
    for name in shapes:
        fwl_path, base_path, default_seq, default_micro = SHAPES[name]
        extra = [f"model.seq_len={seq.get(name, default_seq)}", f"parallel.micro_batch={micro.get(name, default_micro)}"]
        backend = args.compile_backend if "compiled" in modes else None
        # Both models side by side and, with --compile both, each model's eager and compiled steps: all
        # alternating, so that a change in machine load (a shared machine) affects every row alike.
        timers = {head: StepTimer(load_config(REPO / path, common + extra), dist, backend)
                  for head, path in (("FWL", fwl_path), ("baseline", base_path))}
        for i in range(args.warmup + args.steps):
            for timer in timers.values():
                for mode in modes:
                    timer.step(mode, record=i >= args.warmup)
        for mode in modes:
            result = {}
            for head, timer in timers.items():
                cfg = timer.cfg
                fb, sec = statistics.median(timer.fwd_bwd[mode]), statistics.median(timer.total[mode])
                flops = train_flops_per_token(cfg.model).total
                tokens = cfg.parallel.micro_batch * cfg.model.seq_len
                tflops = flops * tokens / fb / 1e12
                row = {"shape": name, "head": head, "mode": mode, "T": cfg.model.seq_len,
                       "micro": cfg.parallel.micro_batch, "params": timer.n_params, "flops_per_token": flops,
                       "fwd_bwd_s": fb, "step_s": sec, "tokens_per_s": tokens / sec, "tflops": tflops,
                       "mfu": tflops / peak if peak else None, "first_step_s": timer.first[mode],
                       "load": os.getloadavg()[0]}
                rows.append(row)
                result[head] = row
                mfu = f"{row['mfu']:.1%}" if peak else "n/a"
                print(f"{name:<5} {head:<9} {mode:<8} {row['T']:>5} {row['micro']:>5} {timer.n_params / 1e6:>8.2f}M "
                      f"{flops / 1e9:>10.4f} {fb:>10.4f} {sec:>9.4f} {tokens / sec:>9.0f} {tflops:>8.4f} {mfu:>6} "
                      f"{timer.first[mode]:>8.1f} {row['load']:>5.1f}", flush=True)
            f, b = result["FWL"], result["baseline"]
            summary.append({"shape": name, "mode": mode, "fwd_bwd_ratio": f["fwd_bwd_s"] / b["fwd_bwd_s"],
                            "step_ratio": f["step_s"] / b["step_s"],
                            "analytic_ratio": f["flops_per_token"] / b["flops_per_token"]})
        for timer in timers.values():
            timer.close()
        del timers
    print("(TFLOP/s: analytic FLOPs over the forward+backward time; the step adds the optimizer, whose cost\n"
          " grows with the parameter count, not with tokens; first s: the first warm-up step, compilation included)")
    print()
    for s in summary:
        print(f"{s['shape']} {s['mode']}: FWL / baseline  forward+backward {s['fwd_bwd_ratio']:.2f}x, whole step "
              f"{s['step_ratio']:.2f}x measured; {s['analytic_ratio']:.2f}x analytic FLOPs "
              f"(measured / analytic {s['fwd_bwd_ratio'] / s['analytic_ratio']:.2f})")
    by = {(r["shape"], r["head"], r["mode"]): r for r in rows}
    for name in shapes:
        for head in ("FWL", "baseline"):
            if (name, head, "eager") in by and (name, head, "compiled") in by:
                e, c = by[(name, head, "eager")], by[(name, head, "compiled")]
                print(f"{name} {head}: compiled / eager forward+backward {c['fwd_bwd_s'] / e['fwd_bwd_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name(dist.device), "peak_tflops": peak,
                                               "bf16": args.bf16, "rows": rows, "ratios": summary}, indent=1))


if __name__ == "__main__":
    main()
