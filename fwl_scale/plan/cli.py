"""`fwl plan`: the layouts of a config that fit an allocation, fastest first (plan/planner.py)."""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import yaml

from fwl_scale.atomic import atomic_write_bytes
from fwl_scale.config import ConfigError, load_config
from fwl_scale.plan.planner import GIB, Hardware, parse_bytes, plan


def _row(v) -> str:
    lay, mem = v.layout, v.memory
    return (f"{lay.tp:>3} {lay.cp:>3} {lay.pp:>3} {lay.dp:>4} {lay.zero_stage:>5} {lay.micro_batch:>4} "
            f"{lay.grad_accum:>4} {'yes' if lay.checkpointing else 'no':>5} {mem.total / GIB:>8.1f} "
            f"{mem.state / GIB:>7.1f} {mem.activations / GIB:>7.1f} {v.step_s:>9.3f}")


def cmd_plan(ns: argparse.Namespace) -> int:
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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="layouts of a config that fit N GPUs, ranked by predicted step time",
                       description=sys.modules[__name__].__doc__)
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
