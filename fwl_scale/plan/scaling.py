"""Scaling studies through the one study machinery (fwl_scale/study/):

    fwl scaling grid GRID.yaml            writes the study spec of sizes × token budgets × lrs (OUT.study.yaml)
    fwl study OUT.study.yaml              trains and evaluates its runs (locally, or --slurm as a job array)
    fwl scaling fit OUT.study.yaml        fits per arm, the frontier, the FWL's gain: scaling.md/.json/.png

A grid file:

    name: mini_ladder
    arms: {fwl: configs/tiny.yaml, baseline: configs/base_tiny.yaml}
    common: ["data.train=[../shared/corpus/train.txt]"]   # overrides for every run
    sizes: {s1: ["model.d_model=32", "model.n_layers=1"], s2: [...]}
    tokens_per_param: [5, 20]     # each size's token budgets, as multiples of its parameter count N
    # or  tokens: [250000, 1000000]   the same budgets for every size, in tokens (one of the two keys)
    lrs: [3.0e-3]                 # train.lr values (optional: the configs' own)
    seeds: [1]
    eval_batches: 20
    out_dir: runs/mini_ladder

N is the non-embedding parameter count (body + FWL; Kaplan et al. 2020), of the baseline arm when the
grid has one (both arms train the same steps, so they see the same data); steps = round(ratio·N /
(micro_batch·grad_accum·seq_len)), warm-up at most a fifth of them, a validation and a checkpoint
every quarter. Variants are `<size>-t<ratio>-lr<lr>` (`<size>-d<tokens>-lr<lr>` with `tokens`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fwl_scale.config import ConfigError, load_config, read_yaml
from fwl_scale.plan import fits
from fwl_scale.plan.memory import param_split
from fwl_scale.study import store
from fwl_scale.study.spec import StudyError, StudySpec
from fwl_scale.model.flops import train_flops_per_token

GRID_KEYS = ("name", "arms", "common", "sizes", "tokens_per_param", "tokens", "lrs", "seeds", "eval_batches",
             "out_dir")
LADDER = ["125m", "350m", "760m", "1b", "3b", "7b", "13b"]


def non_embedding_params(cfg) -> int:
    split = param_split(cfg)
    return split.body + split.fwl


def tokens_per_step(cfg) -> int:
    p = cfg.parallel
    return p.micro_batch * p.grad_accum * (p.dp or 1) * cfg.model.seq_len


def grid_to_study(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The study spec (a dict, as YAML would hold it) of a grid file, and where to write it."""
    src = Path(path)
    data = read_yaml(src, "scaling grid", StudyError) or {}
    if not isinstance(data, dict):
        raise StudyError(f"{src}: expected a mapping with keys {', '.join(GRID_KEYS)}")
    for key in data:
        if key not in GRID_KEYS:
            raise StudyError(f"{src}: unknown key {key!r} (known: {', '.join(GRID_KEYS)})")
    for key in ("name", "arms", "sizes", "out_dir"):
        if key not in data:
            raise StudyError(f"{src}: missing key {key!r}")
    if ("tokens_per_param" in data) == ("tokens" in data):
        raise StudyError(f"{src}: give the token budgets as exactly one of tokens_per_param (multiples of each "
                         f"size's N) or tokens (the same for every size)")
    budget_key = "tokens" if "tokens" in data else "tokens_per_param"
    sizes, budgets, lrs = data["sizes"], data[budget_key], data.get("lrs") or [None]
    if not isinstance(sizes, dict) or not sizes:
        raise StudyError(f"{src}: sizes: expected a mapping of size name -> list of overrides")
    if not isinstance(budgets, list) or not budgets or not all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in budgets):
        raise StudyError(f"{src}: {budget_key}: expected a list of positive numbers, got {budgets!r}")
    arms = data["arms"]
    if not isinstance(arms, dict) or not arms:
        raise StudyError(f"{src}: arms: expected a mapping like {{fwl: CONFIG, baseline: CONFIG}}")
    counted = arms.get("baseline", next(iter(arms.values())))
    common = list(data.get("common") or [])
    variants: dict[str, list[str]] = {}
    for size, overrides in sizes.items():
        if not isinstance(overrides, list):
            raise StudyError(f"{src}: sizes: {size}: expected a list of overrides, got {overrides!r}")
        try:
            cfg = load_config(counted, common + overrides)
        except ConfigError as e:
            raise StudyError(f"{src}: sizes: {size}: {e}") from None
        n = non_embedding_params(cfg)
        for budget in budgets:
            tokens, tag = (budget, f"d{budget:g}") if budget_key == "tokens" else (budget * n, f"t{budget:g}")
            steps = max(1, round(tokens / tokens_per_step(cfg)))
            warmup = min(cfg.train.warmup_steps, steps // 5)
            for lr in lrs:
                name = f"{size}-{tag}" + (f"-lr{lr:g}" if lr is not None else "")
                # Four validations per run: the intermediate losses of scaling.json's curves.
                every = max(1, steps // 4)
                variants[name] = list(overrides) + [f"train.steps={steps}", f"train.warmup_steps={warmup}",
                                                    f"train.eval_every={every}", f"train.save_every={every}"]
                if lr is not None:
                    variants[name].append(f"train.lr={lr}")
    spec = {"name": data["name"], "arms": arms, "common": common, "variants": variants,
            "seeds": data.get("seeds", [1]), "out_dir": data["out_dir"]}
    if "eval_batches" in data:
        spec["eval_batches"] = data["eval_batches"]
    return spec, src.with_suffix(".study.yaml")


def collect_points(spec: StudySpec) -> list[dict[str, Any]]:
    """One point per finished run: arm, N, D (tokens trained), F (FLOPs per token), C = F·D, the final
    validation loss, and the trainer's intermediate validation losses (step, D, loss)."""
    # Function-level: the metrics reader lives with the trainer (torch); collection needs it only here.
    from fwl_scale.train.metrics import read_metrics

    points = []
    for run in spec.runs:
        path = store.result_path(spec, run)
        result = store.read_json(path)
        if result is None:
            continue
        run_dir = Path(result.get("run_dir", ""))
        if result.get("run") != run.name or run_dir.resolve() != spec.run_dir(run).resolve():
            raise StudyError(f"{path}: the result of run {result.get('run')!r} in {str(run_dir)!r}, not of this "
                             f"study's run {run.name!r} in {str(spec.run_dir(run))!r}: a run directory from another "
                             f"study; move it away")
        cfg = spec.run_config(run)
        per_step = tokens_per_step(cfg)
        flops = train_flops_per_token(cfg.model).total
        metrics = spec.run_dir(run) / "metrics.jsonl"
        curve = [{"step": r["step"], "tokens": r["step"] * per_step, "loss": r["loss"]}
                 for r in (read_metrics(metrics, "valid") if metrics.exists() else []) if "loss" in r]
        d = result["step"] * per_step
        points.append({"run": run.name, "variant": run.variant, "arm": run.arm, "seed": run.seed,
                       "lr": cfg.train.lr, "n": non_embedding_params(cfg), "d": d, "flops_per_token": flops,
                       "compute": flops * d, "loss": result["valid"]["loss"], "curve": curve})
    return points


def best_per_size_budget(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lr sweep's best run of each (arm, N, D), seeds averaged."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((p["arm"], p["n"], p["d"], p["lr"]), []).append(p)
    best: dict[tuple, dict[str, Any]] = {}
    for (arm, n, d, lr), ps in groups.items():
        mean = {**ps[0], "loss": float(np.mean([p["loss"] for p in ps])), "seeds": len(ps)}
        if (arm, n, d) not in best or mean["loss"] < best[(arm, n, d)]["loss"]:
            best[(arm, n, d)] = mean
    return sorted(best.values(), key=lambda p: (p["arm"], p["n"], p["d"]))


def ladder_sizes() -> dict[str, dict[str, int]]:
    """Non-embedding parameters of the ladder's configs, per arm (configs/fwl_*.yaml, base_*.yaml)."""
    root = Path(__file__).resolve().parents[2] / "configs"
    out: dict[str, dict[str, int]] = {"fwl": {}, "baseline": {}}
    for size in LADDER:
        for arm, prefix in (("fwl", "fwl"), ("baseline", "base")):
            path = root / f"{prefix}_{size}.yaml"
            if path.exists():
                out[arm][size] = non_embedding_params(load_config(path))
    return out


PLAUSIBLE_EXPONENTS = (0.05, 1.0)  # published LM fits: Kaplan et al. α_N 0.076, Chinchilla α 0.34 / β 0.28


def fit_warnings(ps: list[dict[str, Any]], entry: dict[str, Any]) -> list[str]:
    """What makes an arm's fits unfit for extrapolation: exponents outside the range language models
    show, and losses that rise with N at a fixed budget (seed noise, or an lr that suits some sizes only)."""
    warnings = []
    lo, hi = PLAUSIBLE_EXPONENTS
    for name, keys in (("L(N)", ("alpha",)), ("L(N,D)", ("alpha", "beta"))):
        law = entry.get(name, {})
        for key in keys:
            if key in law and not lo <= law[key] <= hi:
                warnings.append(f"{name}: {key} = {law[key]:.3f} is outside {lo}-{hi}, the range of published "
                                f"language-model fits: the points do not pin the law down, so its extrapolation is "
                                f"not evidence")
    rising = total = 0
    for d in sorted({p["d"] for p in ps}):
        losses = [p["loss"] for p in sorted((p for p in ps if p["d"] == d), key=lambda p: p["n"])]
        total += max(0, len(losses) - 1)
        rising += sum(b > a for a, b in zip(losses, losses[1:]))
    if rising:
        warnings.append(f"the loss rises with N at the same budget in {rising} of {total} neighbouring sizes "
                        f"(seed noise, or an lr that does not suit every size): more seeds or an lr per size")
    return warnings


def fit_study(points: list[dict[str, Any]], ladder: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Per arm: L(N) at the largest budget ratio, L(N, D), F(N), the frontier; then the FWL's gain."""
    best = best_per_size_budget(points)
    report: dict[str, Any] = {"runs": len(points), "points": best, "arms": {}}
    for arm in sorted({p["arm"] for p in best}):
        ps = [p for p in best if p["arm"] == arm]
        n, d, loss = (np.array([p[k] for p in ps], dtype=float) for k in ("n", "d", "loss"))
        entry: dict[str, Any] = {}
        # L(N) from each size's largest budget (the same tokens per parameter in a tokens_per_param grid)
        top = np.array([dd == d[n == nn].max() for nn, dd in zip(n, d)])
        try:
            entry["L(N)"] = fits.to_json(fits.fit_power_law(n[top], loss[top]))
        except ValueError as e:
            entry["L(N)"] = {"error": str(e)}
        try:
            law = fits.fit_chinchilla(n, d, loss)
            flops = fits.fit_flops(n, [p["flops_per_token"] for p in ps])
            entry["L(N,D)"] = fits.to_json(law)
            entry["flops"] = fits.to_json(flops)
            compute = np.logspace(math.log10(min(p["compute"] for p in ps)), 24, 13)
            front = fits.frontier(law, flops, compute)
            entry["frontier"] = {k: v.tolist() for k, v in front.items()}
        except ValueError as e:
            entry["L(N,D)"] = {"error": str(e)}
        entry["ladder"] = {size: {"n": nn, **({"loss_20tpp": float(law(nn, 20 * nn))} if "L(N,D)" in entry and
                                              "error" not in entry["L(N,D)"] else {})}
                           for size, nn in ladder.get(arm, {}).items()}
        entry["warnings"] = fit_warnings(ps, entry)
        report["arms"][arm] = entry
    arms = report["arms"]
    if {"fwl", "baseline"} <= set(arms) and all("frontier" in arms[a] for a in ("fwl", "baseline")):
        f, b = arms["fwl"], arms["baseline"]
        report["gain"] = {
            "by_compute": {"compute": f["frontier"]["compute"],
                           "baseline_minus_fwl": (np.array(b["frontier"]["loss"]) -
                                                  np.array(f["frontier"]["loss"])).tolist()},
            "by_ladder_size": {size: b["ladder"][size]["loss_20tpp"] - f["ladder"][size]["loss_20tpp"]
                               for size in f["ladder"] if size in b["ladder"]},
        }
    return report
