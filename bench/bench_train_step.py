"""Training-step time of FWL vs baseline (model.fwl.enabled=false) through the real DeepSpeed engine, for
`tiny` and a 125M-shaped model, next to the analytic FLOP ratio (fwl_scale/train/flops.py), measured in
one run on one device.

    python bench/bench_train_step.py                     # CPU: 125M at a short window so it takes minutes
    python bench/bench_train_step.py --seq-125m 2048 --micro-125m 8 --bf16   # a GPU

A step = forward, backward and optimizer step of one micro-batch (AdamW, ZeRO 0, clipping), on random
token ids (the cost does not depend on the text). Each row: medians over the timed steps after warmup, of
forward+backward (what the analytic count covers) and of the whole step.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fwl_scale.config import Config, load_config  # noqa: E402
from fwl_scale.train.engine import DistInfo, build_engine, init_distributed  # noqa: E402
from fwl_scale.train.flops import train_flops_per_token  # noqa: E402
from fwl_scale.train.metrics import device_name  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """One model in the DeepSpeed engine with a fixed random batch; `step()` times one training step."""

    def __init__(self, cfg: Config, dist: DistInfo):
        from fwl_scale.model import build_model

        self.cfg, self.device = cfg, dist.device
        torch.manual_seed(0)
        model = build_model(cfg.model)
        model.set_activation_checkpointing(cfg.train.activation_checkpointing)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.engine, _ = build_engine(cfg, model, dist)
        B, T, V = cfg.parallel.micro_batch, cfg.model.seq_len, cfg.model.vocab_size
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, V, (B, T + 1), generator=g).to(dist.device)
        self.batch = (ids[:, :-1], ids[:, 1:], torch.zeros(B, T, dtype=torch.long, device=dist.device))
        self.fwd_bwd: list[float] = []
        self.total: list[float] = []

    def step(self, record: bool) -> None:
        sync(self.device)
        t0 = time.perf_counter()
        out = self.engine(*self.batch)
        self.engine.backward(out.loss)
        sync(self.device)
        t1 = time.perf_counter()
        self.engine.step()
        sync(self.device)
        if record:
            self.fwd_bwd.append(t1 - t0)
            self.total.append(time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-125m", type=int, default=64, help="window of the 125M-shaped model")
    ap.add_argument("--micro-125m", type=int, default=1, help="micro-batch of the 125M-shaped model")
    ap.add_argument("--micro-tiny", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()

    common = ["train.wandb.enabled=false", "parallel.zero_stage=0", f"train.bf16={str(args.bf16).lower()}"]
    pairs = [
        ("tiny", "configs/tiny.yaml", "configs/base_tiny.yaml", [f"parallel.micro_batch={args.micro_tiny}"]),
        ("125M", "configs/fwl_125m.yaml", "configs/base_125m.yaml",
         [f"model.seq_len={args.seq_125m}", f"parallel.micro_batch={args.micro_125m}", "parallel.grad_accum=1",
          "train.activation_checkpointing=false"]),
    ]
    first = load_config(REPO / pairs[0][1], common)
    dist = init_distributed(first)
    from deepspeed.utils import logger as ds_logger
    import logging

    ds_logger.setLevel(logging.WARNING)
    print(f"machine: {device_name(dist.device)}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}, "
          f"{'bf16' if args.bf16 else 'fp32'}; median of {args.steps} steps after {args.warmup} warmup, "
          "FWL and baseline steps alternating")
    header = (f"{'model':<6} {'head':<9} {'T':>5} {'micro':>5} {'params':>9} {'GFLOP/tok':>10} "
              f"{'fwd+bwd s':>10} {'step s':>9} {'tok/s':>9} {'GFLOP/s':>8}")
    print(header)
    print("-" * len(header))
    summary = []
    for name, fwl_path, base_path, extra in pairs:
        result = {}
        # Both models side by side, their steps alternating, so that a change in machine load (a shared
        # machine) affects both alike.
        timers = {head: StepTimer(load_config(REPO / path, common + extra), dist)
                  for head, path in (("FWL", fwl_path), ("baseline", base_path))}
        for i in range(args.warmup + args.steps):
            for timer in timers.values():
                timer.step(record=i >= args.warmup)
        for head, timer in timers.items():
            cfg = timer.cfg
            fb, sec = statistics.median(timer.fwd_bwd), statistics.median(timer.total)
            flops = train_flops_per_token(cfg.model).total
            tokens = cfg.parallel.micro_batch * cfg.model.seq_len
            result[head] = (fb, sec, flops)
            print(f"{name:<6} {head:<9} {cfg.model.seq_len:>5} {cfg.parallel.micro_batch:>5} "
                  f"{timer.n_params / 1e6:>8.2f}M {flops / 1e9:>10.4f} {fb:>10.4f} {sec:>9.4f} {tokens / sec:>9.0f} "
                  f"{flops * tokens / fb / 1e9:>8.2f}", flush=True)
        del timers
        f, b = result["FWL"], result["baseline"]
        summary.append((name, f[0] / b[0], f[1] / b[1], f[2] / b[2]))
    print("(GFLOP/s: analytic FLOPs over the forward+backward time; the step adds the optimizer, whose cost\n"
          " grows with the parameter count, not with tokens)")
    print()
    for name, fb, step, analytic in summary:
        print(f"{name}: FWL / baseline  forward+backward {fb:.2f}x, whole step {step:.2f}x measured; "
              f"{analytic:.2f}x analytic FLOPs")


if __name__ == "__main__":
    main()
