"""Sizing a run before it starts.

    fwl plan CONFIG [key=value ...] --gpus N ...      the layouts that fit N GPUs, fastest first (plan/planner.py)
    fwl layout CONFIG [key=value ...] --nodes N --tasks-per-node M [--gpus-per-node G] [--global-batch B]
                                                      dp and grad_accum of a Slurm allocation (plan/allocation.py)
    fwl params CONFIG [key=value ...]                 a model's parameters and training FLOPs per token
    fwl scaling grid|fit FILE                         a study grid, then the fits

`params` is here rather than with the model: like `fwl plan` it answers how big a config is before anything
runs, and the model package stays free of command wiring.

The planner, the model and the fits are imported inside the commands: they load torch (through the model
package), which `fwl` must not while it builds every parser (`fwl train` installs its stop handler first)."""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import yaml

from fwl_scale.atomic import atomic_write_bytes
from fwl_scale.cli_support import load_config_args
from fwl_scale.config import ConfigError, load_config
from fwl_scale.plan.allocation import LayoutError, plan_allocation

GIB = 2**30


def _row(v) -> str:
    lay, mem = v.layout, v.memory
    return (f"{lay.tp:>3} {lay.cp:>3} {lay.pp:>3} {lay.dp:>4} {lay.zero_stage:>5} {lay.micro_batch:>4} "
            f"{lay.grad_accum:>4} {'yes' if lay.checkpointing else 'no':>5} {mem.total / GIB:>8.1f} "
            f"{mem.state / GIB:>7.1f} {mem.activations / GIB:>7.1f} {v.step_s:>9.3f}")


def cmd_plan(ns: argparse.Namespace) -> int:
    from fwl_scale.plan.planner import Hardware, parse_bytes, plan  # (torch): see the module's docstring

    cfg = load_config(ns.config, ns.overrides)
    hw = Hardware(gpus=ns.gpus, gpu_memory=parse_bytes(ns.gpu_memory), gpus_per_node=ns.gpus_per_node,
                  peak_tflops=ns.peak_tflops, efficiency=ns.efficiency, headroom=ns.headroom)
    p = cfg.parallel
    batch = ns.global_batch or p.micro_batch * p.grad_accum * (p.dp or 1)
    verdicts = plan(cfg, hw, batch)
    fits = [v for v in verdicts if v.reason is None]
    refused = [v for v in verdicts if v.reason is not None]
    print(f"{cfg.name} on {hw.gpus} GPU(s) of {hw.gpu_memory / GIB:.0f} GiB ({hw.headroom:.0%} kept free), "
          f"global batch {batch} sequences x {cfg.model.seq_len} tokens, bf16={cfg.train.bf16}")
    if not fits:
        best = min((v for v in refused if v.memory is not None), key=lambda v: v.memory.total, default=None)
        why = (f"the smallest layout (fwl train ... {' '.join(best.layout.overrides())}) {best.reason}"
               if best else f"every layout is refused by the layout rules, e.g. {refused[0].reason}")
        raise ConfigError(f"{ns.config}: {cfg.name} does not fit {hw.gpus} GPU(s) of {ns.gpu_memory}: {why}; "
                          f"add GPUs or lower the global batch / sequence length")
    print(f"{len(fits)} layout(s) fit, {len(refused)} refused; predicted step time ranks them (fastest first)")
    print(" tp  cp  pp   dp  zero   mb   ga  ckpt  mem GiB   state    acts    step s")
    for v in fits[:ns.top]:
        print(_row(v))
    print(f"best: fwl train {ns.config} {' '.join(fits[0].layout.overrides())}")
    reasons = Counter(v.reason.split(":")[0] if v.memory is None else "memory" for v in refused)
    if reasons:
        print("refused: " + ", ".join(f"{n} by {r}" for r, n in reasons.most_common()))
    if ns.show_refused:
        for v in refused:
            print(f"  refused {' '.join(v.layout.overrides())}: {v.reason}")
    return 0


def _fmt(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def cmd_params(ns: argparse.Namespace) -> int:
    from fwl_scale.model import build_model  # (torch): see the module's docstring
    from fwl_scale.model.flops import train_flops_per_token

    cfg = load_config_args(ns.args, need_config=True)
    # The meta device: shapes without memory, so the 13B config counts in a second.
    model = build_model(cfg.model, device="meta")
    counts = model.param_counts()
    flops = train_flops_per_token(cfg.model)
    print(f"{cfg.name}: parameters")
    for key in ("body", "fwl", "embeddings", "total"):
        print(f"  {key:<11}{counts[key]:>16,}  ({_fmt(counts[key])})")
    print(f"  training FLOPs per token: {flops.total:.4g} (body {flops.body:.4g}, "
          f"{'FWL' if cfg.model.fwl.enabled else 'unembedding'} {flops.head:.4g})")
    return 0


def register_params(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("params", help="parameter count (body, FWL, embeddings, total) on the meta device")
    q.add_argument("args", nargs="+", metavar="CONFIG_OR_OVERRIDE")
    q.set_defaults(func=cmd_params)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="layouts of a config that fit N GPUs, ranked by predicted step time",
                       description="The layouts (tp, cp, pp, dp, ZeRO stage, micro batch, activation "
                                   "checkpointing) of a config that fit N GPUs, ranked by predicted step time.")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-memory", default="80GiB", help="memory per GPU (80GiB, 141GB, ...)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=None,
                   help="sequences per optimizer step (default: the config's micro_batch x grad_accum x dp)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per GPU, dense bf16 (default: H100 SXM)")
    p.add_argument("--efficiency", type=float, default=0.45, help="fraction of peak assumed reachable")
    p.add_argument("--headroom", type=float, default=0.10, help="fraction of GPU memory kept free")
    p.add_argument("--top", type=int, default=10, help="how many fitting layouts to print")
    p.add_argument("--show-refused", action="store_true", help="list every refused layout with its reason")
    p.set_defaults(func=cmd_plan)


def cmd_layout(ns: argparse.Namespace) -> int:
    """What launchers/common.sh runs before any rank starts: the overrides pinning the layout on stdout, one
    per line, a summary on stderr; exit 2 with one message when the layout does not fit."""
    try:
        layout, summary = plan_allocation(ns.config, ns.overrides, ns.nodes, ns.tasks_per_node, ns.gpus_per_node,
                                          ns.global_batch)
    except (LayoutError, ConfigError) as e:
        print(f"fwl launcher: layout does not fit the allocation: {e}", file=sys.stderr)
        return 2
    print(summary, file=sys.stderr)
    print("\n".join(layout))
    return 0


def register_layout(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("layout", help="dp and grad_accum of a config for a Slurm allocation, checked (no torch)",
                       description="Derives dp = world / (tp*cp*pp) and grad_accum = global batch / (micro_batch * "
                                   "dp) for NODES x TASKS_PER_NODE ranks, validates the config for that world, and "
                                   "prints the overrides that pin the layout, one per line (a summary on stderr). "
                                   "Exit 2 with one message when it cannot fit.")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, as given to `fwl train`")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--tasks-per-node", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--global-batch", type=int, default=None,
                   help="sequences per optimizer step; omitted: keep the config's grad_accum")
    p.set_defaults(func=cmd_layout)


def cmd_scaling(ns: argparse.Namespace) -> int:
    # Function-level: the fits and the study machinery are not needed by `fwl plan`.
    from fwl_scale.plan import scaling, scaling_report
    from fwl_scale.study.spec import StudyError, load_spec

    try:
        if ns.action == "grid":
            spec, out = scaling.grid_to_study(ns.file)
            out = Path(ns.out) if ns.out else out
            atomic_write_bytes(out, yaml.safe_dump(spec, sort_keys=False).encode())
            print(f"wrote {out}: {len(spec['variants'])} variants x {len(spec['arms'])} arm(s) x "
                  f"{len(spec['seeds'])} seed(s); next: fwl study {out}, then fwl scaling fit {out}")
            return 0
        spec = load_spec(ns.file, validate=False)
        points = scaling.collect_points(spec)
        if not points:
            raise StudyError(f"{ns.file}: no finished runs under {spec.out_dir}/results yet; run fwl study {ns.file}")
        report = scaling.fit_study(points, scaling.ladder_sizes())
        paths = scaling_report.write(report, spec.out_dir, spec.name)
    except (StudyError, ValueError) as e:
        print(f"fwl scaling: error: {e}", file=sys.stderr)
        return 2
    print(scaling_report.markdown(report, spec.name))
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def register_scaling(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scaling", help="sizes x token budgets x lrs: a study spec from a grid, then the fits",
                       description="grid GRID.yaml: write the study spec (run it with fwl study); "
                                   "fit SPEC.yaml: fit L(N), L(N, D), the frontier and the FWL's gain from its results")
    p.add_argument("action", choices=["grid", "fit"])
    p.add_argument("file", help="the grid file (grid) or the study spec it wrote (fit)")
    p.add_argument("--out", default=None, help="grid: where to write the spec (default: GRID.study.yaml)")
    p.set_defaults(func=cmd_scaling)
