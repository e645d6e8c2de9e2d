"""Collects a study's run results into one table: OUT/study.md, OUT/study.json, OUT/loss_by_position.png
(and, with the spec's long_docs, OUT/long_docs.png).

Per variant and arm, mean ± sample std over the seeds that finished: validation perplexity and loss, loss
by position bucket, the slow head alone (step sizes at zero) and its gap to the same variant's baseline,
the learned step sizes, tokens/s, the loss per window over streamed whole documents; and per variant the
FWL-vs-baseline perplexity ratio and the long-document verdict (long_doc_verdict); per ruler (the spec's
rulers: `fwl eval --out` on named documents), each arm's methods and their gain over the baseline's plain
loss paired by seed (ruler_summary). Works on partial results (it lists the missing and failed runs, and
the finished runs whose measurements failed) and refuses to replace a collection that holds a finished
run which has no result now.
"""
from __future__ import annotations

import io
import math
import statistics
from dataclasses import dataclass
from typing import Any

from fwl_scale.study import store
from fwl_scale.study.spec import Ruler, StudyError, StudySpec


@dataclass
class Collection:
    summary: dict[str, Any]
    complete: list[str]
    failed: list[dict[str, Any]]
    missing: list[str]


def stats(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _group(spec: StudySpec, variant: str, arm: str, results: list[dict[str, Any]],
           failed: list[dict[str, Any]]) -> dict[str, Any]:
    n_buckets = len(results[0]["valid"]["bucket_loss"]) if results else 0
    group: dict[str, Any] = {
        "variant": variant, "arm": arm, "runs": len(spec.variant_seeds[variant]), "seeds": [r["seed"] for r in results],
        "failed": [f["run"] for f in failed],
        "val_ppl": stats([r["valid"]["perplexity"] for r in results]),
        "val_loss": stats([r["valid"]["loss"] for r in results]),
        "bucket_edges": results[0]["valid"]["bucket_edges"] if results else [],
        "bucket_loss": [stats([r["valid"]["bucket_loss"][b] for r in results]) for b in range(n_buckets)],
        "tokens_per_s": stats([r["tokens_per_s"] for r in results if r["tokens_per_s"] is not None]),
        "slow_head_loss": None, "slow_head_gap": None, "step_sizes": None,
    }
    streamed = [r["long_docs"] for r in results if r.get("long_docs")]
    group["long_docs"] = None
    if streamed:
        # fwl eval --stream's modes ("state carried", "windows alone"); one bucket per window.
        group["long_docs"] = {
            "runs": len(streamed), "edges": next(iter(streamed[0]["modes"].values()))["edges"],
            "documents": [next(iter(m["modes"].values()))["documents"] for m in streamed],
            "loss": {mode: [stats([m["modes"][mode]["loss"][w] for m in streamed]) for w in range(len(res["loss"]))]
                     for mode, res in streamed[0]["modes"].items()}}
    if arm == "fwl" and results:
        group["slow_head_loss"] = stats([r["slow_head"]["loss"] for r in results])
        # In the order of model.fwl.FAST_TENSORS, as the checkpoint's step_size_dict() wrote them.
        group["step_sizes"] = {name: stats([r["step_sizes"][name] for r in results])
                               for name in results[0]["step_sizes"]}
    return group


CARRIED, RESET = "state carried", "windows alone"


def long_doc_verdict(fwl: dict[str, Any] | None, base: dict[str, Any] | None) -> dict[str, Any] | None:
    """The test past the training length, on the means over seeds: in how many windows the FWL
    with its state carried is no worse than with the state reset at each window, and below the
    baseline; with the worst window of each (carried − reset, carried − baseline)."""
    if not (fwl and base and fwl["long_docs"] and base["long_docs"]):
        return None
    carried = [s["mean"] for s in fwl["long_docs"]["loss"][CARRIED]]
    reset = [s["mean"] for s in fwl["long_docs"]["loss"][RESET]]
    baseline = [s["mean"] for s in base["long_docs"]["loss"][RESET]]
    if not len(carried) == len(reset) == len(baseline):
        return None
    mean = {"carried": statistics.fmean(carried), "reset": statistics.fmean(reset),
            "baseline": statistics.fmean(baseline)}
    vs_reset = [c - r for c, r in zip(carried, reset)]
    vs_base = [c - b for c, b in zip(carried, baseline)]
    return {"windows": len(carried), "carried_le_reset": sum(d <= 0 for d in vs_reset),
            "carried_lt_baseline": sum(d < 0 for d in vs_base), "worst_vs_reset": max(vs_reset),
            "worst_vs_baseline": max(vs_base), "mean": mean,
            # Every window holds the same tokens (the documents are at least that long): the mean of the
            # window losses is the loss over all of them, and this its perplexity over the baseline's.
            "ppl_ratio": {"carried": math.exp(mean["carried"] - mean["baseline"]),
                          "reset": math.exp(mean["reset"] - mean["baseline"])}}


# The FWL's own measurement and the baseline's, whose perplexity spreads over seeds are compared
# (issue 22: the FWL arm's std of perplexity over seeds at most 1.5 times the baseline's).
SPREAD_METHODS = {"fwl": "fwl_carried", "baseline": "plain"}


def _ruler_records(spec: StudySpec, ruler: Ruler, variant: str, arm: str,
                   results: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Seed -> the record the run's result keeps of this ruler (runner.ruler_record)."""
    records = {}
    for run in spec.members[(variant, arm)]:
        rec = results.get(run.name, {}).get("rulers", {}).get(ruler.name)
        # One measured with other methods or options (the spec changed since) is not this ruler's.
        if rec is not None and rec["spec"] == ruler.measures(arm):
            records[run.seed] = rec
    return records


def _paired_gains(ruler: Ruler, records: dict[str, dict[int, dict[str, Any]]]) -> tuple[dict[str, Any], list[str]]:
    """Arm -> method -> the baseline's plain loss − the method's, paired by seed where both scored the same
    documents, mean ± std over the pairs; and the runs left unpaired for scoring other documents."""
    plain = {seed: rec for seed, rec in records.get("baseline", {}).items() if "plain" in rec["methods"]}
    gains: dict[str, dict[str, Any]] = {}
    unpaired: set[str] = set()
    for arm, methods in ruler.methods.items():
        for method in methods:
            if (arm, method) == ("baseline", "plain"):
                continue
            values, seeds = [], []
            for seed, rec in records[arm].items():
                if seed not in plain:
                    continue
                if rec["documents_id"] != plain[seed]["documents_id"]:
                    unpaired.add(f"{arm} s{seed}")
                    continue
                values.append(plain[seed]["methods"]["plain"]["loss"] - rec["methods"][method]["loss"])
                seeds.append(seed)
            if values:
                gains.setdefault(arm, {})[method] = {**stats(values), "seeds": seeds}
    return gains, sorted(unpaired)


def ruler_summary(spec: StudySpec, ruler: Ruler, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per variant, each arm's methods on the ruler over the seeds measured (loss, perplexity, GFLOPs/token,
    wall s), and each method's gain over the baseline's plain loss (_paired_gains); its share of the
    baseline's dynamic evaluation's gain; the FWL's perplexity spread over seeds over the baseline's."""
    variants: dict[str, Any] = {}
    for variant in spec.variants:
        records = {arm: _ruler_records(spec, ruler, variant, arm, results) for arm in ruler.methods}
        arms: dict[str, Any] = {}
        for arm, methods in ruler.methods.items():
            runs = spec.members[(variant, arm)]
            measured = list(records[arm].values())
            arms[arm] = {"runs": len(runs), "seeds": list(records[arm]),
                         "same_runs_as": runs[0].variant if runs[0].variant != variant else None,
                         "methods": {method: {
                             "loss": stats([r["methods"][method]["loss"] for r in measured]),
                             "ppl": stats([math.exp(r["methods"][method]["loss"]) for r in measured]),
                             "gflops_per_token": stats([r["methods"][method]["gflops_per_token"] for r in measured]),
                             "wall_s": stats([r["methods"][method]["wall_s"] for r in measured])}
                             for method in methods}}
        gains, unpaired = _paired_gains(ruler, records)
        dynamic = gains.get("baseline", {}).get("dynamic")
        share = {arm: {method: g["mean"] / dynamic["mean"] for method, g in per.items()}
                 for arm, per in gains.items()} if dynamic and dynamic["mean"] != 0 else {}
        spread: dict[str, float | None] = {}
        for arm, method in SPREAD_METHODS.items():
            ppl = arms[arm]["methods"][method]["ppl"] if method in arms.get(arm, {}).get("methods", {}) else None
            spread[arm] = ppl["std"] if ppl and ppl["n"] > 1 else None
        variants[variant] = {
            "arms": arms, "gains": gains, "share_of_dynamic": share, "unpaired": unpaired, "ppl_std": spread,
            "ppl_std_ratio": spread["fwl"] / spread["baseline"] if spread["fwl"] is not None and spread["baseline"]
            else None}
    return {"methods": {arm: list(m) for arm, m in ruler.methods.items()}, "args": list(ruler.args),
            "variants": variants}


def summarize(spec: StudySpec) -> Collection:
    results: dict[str, dict[str, Any]] = {}
    failures: dict[str, dict[str, Any]] = {}
    failed_measurements: list[dict[str, Any]] = []
    for run in spec.runs:
        r = store.read_json(store.result_path(spec, run))
        f = store.read_json(store.failure_path(spec, run))
        if r is not None:
            results[run.name] = r
            if f is not None:  # a finished run whose long documents or a ruler failed
                failed_measurements.append(f)
        elif f is not None:
            failures[run.name] = f
    groups = []
    for variant in spec.variants:
        for arm in spec.arms:
            runs = spec.members[(variant, arm)]
            names = [run.name for run in runs]
            group = _group(spec, variant, arm, [results[n] for n in names if n in results],
                           [failures[n] for n in names if n in failures])
            group["same_runs_as"] = runs[0].variant if runs[0].variant != variant else None
            groups.append(group)
    by_key = {(g["variant"], g["arm"]): g for g in groups}
    ratios: dict[str, float | None] = {}
    for variant in spec.variants:
        fwl, base = by_key.get((variant, "fwl")), by_key.get((variant, "baseline"))
        if fwl is None or base is None:
            continue
        if fwl["slow_head_loss"] and base["val_loss"]:
            fwl["slow_head_gap"] = fwl["slow_head_loss"]["mean"] - base["val_loss"]["mean"]
        ratios[variant] = (fwl["val_ppl"]["mean"] / base["val_ppl"]["mean"]
                           if fwl["val_ppl"] and base["val_ppl"] else None)
    long_docs = {variant: v for variant in spec.variants
                 if (v := long_doc_verdict(by_key.get((variant, "fwl")), by_key.get((variant, "baseline"))))}
    complete = [run.name for run in spec.runs if run.name in results]
    missing = [run.name for run in spec.runs if run.name not in results and run.name not in failures]
    failed = list(failures.values())
    summary = {"name": spec.name, "spec": str(spec.path), "out_dir": str(spec.out_dir),
               "runs_total": len(spec.runs), "complete": complete, "failed": failed, "missing": missing,
               "failed_measurements": failed_measurements, "groups": groups, "fwl_vs_baseline_ppl": ratios,
               "long_docs": long_docs,
               "rulers": {name: ruler_summary(spec, ruler, results) for name, ruler in spec.rulers.items()},
               "results": results}
    return Collection(summary, complete, failed, missing)


def _pm(s: dict[str, Any] | None, fmt: str) -> str:
    if s is None:
        return "–"
    return f"{s['mean']:{fmt}} ± {s['std']:{fmt}}" if s["n"] > 1 else f"{s['mean']:{fmt}}"


def _mean(s: dict[str, Any] | None, fmt: str) -> str:
    return "–" if s is None else f"{s['mean']:{fmt}}"


def _status(g: dict[str, Any]) -> str:
    text = f"{len(g['seeds'])}/{g['runs']}" + (f" (= {g['same_runs_as']})" if g["same_runs_as"] else "")
    return text + (f", **failed**: {', '.join(g['failed'])}" if g["failed"] else "")


def _step_names(groups: list[dict[str, Any]]) -> list[str]:
    return next((list(g["step_sizes"]) for g in groups if g["step_sizes"]), [])


def markdown(c: Collection) -> str:
    s = c.summary
    lines = [f"# Study `{s['name']}`", "",
             f"Spec `{s['spec']}`; {len(c.complete)} of {s['runs_total']} runs finished, {len(c.failed)} failed, "
             f"{len(c.missing)} not run yet. Mean ± sample std over the seeds that finished.", "",
             "| variant | arm | runs | val ppl | val loss | slow-head loss | slow − baseline loss | "
             f"step sizes ({' '.join(_step_names(s['groups']))}) | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for g in s["groups"]:
        steps = " ".join(f"{v['mean']:.3g}" for v in g["step_sizes"].values()) if g["step_sizes"] else "–"
        gap = f"{g['slow_head_gap']:+.4f}" if g["slow_head_gap"] is not None else "–"
        lines.append(f"| {g['variant']} | {g['arm']} | {_status(g)} | {_pm(g['val_ppl'], '.3f')} | "
                     f"{_pm(g['val_loss'], '.4f')} | {_pm(g['slow_head_loss'], '.4f')} | {gap} | {steps} | "
                     f"{_pm(g['tokens_per_s'], '.0f')} |")
    edges = next((g["bucket_edges"] for g in s["groups"] if g["bucket_edges"]), [])
    if edges:
        lines += ["", "Validation loss by position bucket (nats):", "",
                  "| variant | arm | " + " | ".join(f"{a}–{b - 1}" for a, b in edges) + " |",
                  "|---|---|" + "---|" * len(edges)]
        for g in s["groups"]:
            if g["bucket_loss"]:
                lines.append(f"| {g['variant']} | {g['arm']} | "
                             + " | ".join(_pm(b, ".4f") for b in g["bucket_loss"]) + " |")
    if s["fwl_vs_baseline_ppl"]:
        lines += ["", "| variant | FWL ppl / baseline ppl |", "|---|---|"]
        for variant, ratio in s["fwl_vs_baseline_ppl"].items():
            lines.append(f"| {variant} | {'–' if ratio is None else f'{ratio:.4f}'} |")
    if s["long_docs"]:
        lines += ["", "Whole validation documents streamed window after window past the training length "
                  "(loss per window, means over seeds): FWL state carried vs reset at each window vs baseline.",
                  "", "| variant | windows | carried ≤ reset | carried < baseline | worst carried − reset | "
                  "worst carried − baseline | mean carried / reset / baseline | ppl / baseline's, carried / reset |",
                  "|---|---|---|---|---|---|---|---|"]
        for variant, v in s["long_docs"].items():
            m = v["mean"]
            lines.append(f"| {variant} | {v['windows']} | {v['carried_le_reset']}/{v['windows']} | "
                         f"{v['carried_lt_baseline']}/{v['windows']} | {v['worst_vs_reset']:+.4f} | "
                         f"{v['worst_vs_baseline']:+.4f} | {m['carried']:.4f} / {m['reset']:.4f} / "
                         f"{m['baseline']:.4f} | {v['ppl_ratio']['carried']:.4f} / {v['ppl_ratio']['reset']:.4f} |")
    for name, r in s["rulers"].items():
        lines += ruler_markdown(name, r)
    if c.failed:
        lines += ["", "Failed runs:", ""]
        lines += [f"- `{f['run']}` (variant {f['variant']}): {f['stage']}: {f['detail']}; log `{f['log']}`"
                  for f in c.failed]
    if s["failed_measurements"]:
        lines += ["", "Finished runs whose measurement failed (run the study again to retry it):", ""]
        lines += [f"- `{f['run']}` (variant {f['variant']}): {f['stage']}: {f['detail']}; log `{f['log']}`"
                  for f in s["failed_measurements"]]
    if c.missing:
        lines += ["", "Not run yet: " + ", ".join(f"`{m}`" for m in c.missing)]
    return "\n".join(lines) + "\n"


def ruler_markdown(name: str, r: dict[str, Any]) -> list[str]:
    args = " ".join(r["args"])
    lines = ["", f"### Ruler `{name}`", "",
             f"`fwl eval --out` {'with `' + args + '`' if args else 'on the validation documents'}, "
             "mean ± sample std over seeds. Gain: the baseline's plain loss − the method's, paired by seed "
             "(nats, > 0 better than the plain baseline); share: of the baseline's dynamic evaluation's gain; "
             "ppl std: the perplexity's std over seeds.", "",
             "| variant | arm | method | seeds | loss | ppl std | gain over baseline plain | share of dynamic's "
             "gain | GFLOPs/token | wall s (mean) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for variant, v in r["variants"].items():
        for arm, a in v["arms"].items():
            seeds = f"{len(a['seeds'])}/{a['runs']}" + (f" (= {a['same_runs_as']})" if a["same_runs_as"] else "")
            for method, m in a["methods"].items():
                gain = v["gains"].get(arm, {}).get(method)
                share = v["share_of_dynamic"].get(arm, {}).get(method)
                ppl_std = f"{m['ppl']['std']:.3f}" if m["ppl"] and m["ppl"]["n"] > 1 else "–"
                lines.append(f"| {variant} | {arm} | {method} | {seeds} | {_pm(m['loss'], '.4f')} | {ppl_std} | "
                             + (f"{gain['mean']:+.4f} ± {gain['std']:.4f} (n {gain['n']})" if gain else "–") + " | "
                             + (f"{share:.3f}" if share is not None else "–") + " | "
                             f"{_mean(m['gflops_per_token'], '.4g')} | {_mean(m['wall_s'], '.2f')} |")
    if "fwl" in r["methods"] and "baseline" in r["methods"]:
        fwl_m, base_m = SPREAD_METHODS["fwl"], SPREAD_METHODS["baseline"]
        lines += ["", f"| variant | FWL {fwl_m} ppl std | baseline {base_m} ppl std | FWL / baseline |",
                  "|---|---|---|---|"]
        for variant, v in r["variants"].items():
            f, b, ratio = v["ppl_std"]["fwl"], v["ppl_std"]["baseline"], v["ppl_std_ratio"]
            lines.append(f"| {variant} | {'–' if f is None else f'{f:.3f}'} | {'–' if b is None else f'{b:.3f}'} | "
                         f"{'–' if ratio is None else f'{ratio:.3f}'} |")
    if "plain" not in r["methods"].get("baseline", ()):
        lines += ["", "No gains: the baseline arm is not measured with plain on this ruler."]
    unpaired = [f"{variant}: {', '.join(v['unpaired'])}" for variant, v in r["variants"].items() if v["unpaired"]]
    if unpaired:
        lines += ["", "Not paired with the baseline's plain (scored other documents, documents_id differs): "
                  + "; ".join(unpaired)]
    return lines


def _axes() -> tuple[Any, Any]:
    # matplotlib is imported only to draw (seconds of import); the object API needs no backend or pyplot.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _png(fig: Any, ax: Any) -> bytes:
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def plot_long_docs_png(c: Collection) -> bytes | None:
    """Loss per window of the streamed documents: FWL state carried solid, reset dotted, baseline dashed."""
    groups = [g for g in c.summary["groups"] if g["long_docs"] and not g["same_runs_as"]]
    if not groups:
        return None
    fig, ax = _axes()
    variants = list(dict.fromkeys(g["variant"] for g in c.summary["groups"]))
    for g in groups:
        x = [(a + b - 1) / 2 for a, b in g["long_docs"]["edges"]]
        for mode, losses in g["long_docs"]["loss"].items():
            style = ("-" if mode == CARRIED else ":") if g["arm"] == "fwl" else "--"
            ax.plot(x, [s["mean"] for s in losses], linestyle=style, color=f"C{variants.index(g['variant']) % 10}",
                    label=f"{g['variant']} {g['arm']}" + (f", {mode}" if g["arm"] == "fwl" else ""))
    ax.set_xlabel("document position (window centre)")
    ax.set_ylabel("validation loss (nats)")
    ax.set_title(f"study {c.summary['name']}: FWL state carried solid, reset dotted, baseline dashed")
    return _png(fig, ax)


def plot_png(c: Collection) -> bytes | None:
    """Loss by position bucket, FWL solid and baseline dashed, one colour per variant."""
    # A group that shares another variant's runs (same config and overrides) would hide that one's line.
    groups = [g for g in c.summary["groups"] if g["bucket_loss"] and not g["same_runs_as"]]
    if not groups:
        return None
    sharing: dict[tuple[str, str], list[str]] = {}
    for g in c.summary["groups"]:
        if g["same_runs_as"]:
            sharing.setdefault((g["same_runs_as"], g["arm"]), []).append(g["variant"])
    fig, ax = _axes()
    variants = list(dict.fromkeys(g["variant"] for g in c.summary["groups"]))
    for g in groups:
        x = [(a + b - 1) / 2 for a, b in g["bucket_edges"]]
        y = [b["mean"] for b in g["bucket_loss"]]
        ax.plot(x, y, linestyle="-" if g["arm"] == "fwl" else "--", marker="o", markersize=3,
                color=f"C{variants.index(g['variant']) % 10}", label=f"{g['variant']} {g['arm']}"
                + (f" (= {', '.join(also)})" if (also := sharing.get((g["variant"], g["arm"]))) else ""))
    ax.set_xlabel("position in the window (bucket centre)")
    ax.set_ylabel("validation loss (nats)")
    ax.set_title(f"study {c.summary['name']}: FWL solid, baseline dashed")
    return _png(fig, ax)


def collect(spec: StudySpec) -> Collection:
    """Writes study.md, study.json and loss_by_position.png; refuses (StudyError) to replace a collection
    that has a finished run which has no result now."""
    c = summarize(spec)
    out = spec.out_dir / "study.json"
    previous = store.read_json(out)
    if previous is not None:
        # A run dropped from the spec keeps its result file: only a result gone from the disk is lost.
        lost = [name for name in previous.get("complete", [])
                if name not in c.complete and not store.result_file(spec.out_dir, name).is_file()]
        if lost:
            raise StudyError(f"{out} holds {len(previous.get('complete', []))} finished runs, and "
                             f"{', '.join(lost[:5])} ha{'s' if len(lost) == 1 else 've'} no result in "
                             f"{spec.out_dir / 'results'} now: not replacing it with fewer. Move it away to "
                             f"collect anew.")
    png = plot_png(c)
    if png is not None:
        store.write_bytes(spec.out_dir / "loss_by_position.png", png)
    long_png = plot_long_docs_png(c)
    if long_png is not None:
        store.write_bytes(spec.out_dir / "long_docs.png", long_png)
    store.write_bytes(spec.out_dir / "study.md", markdown(c).encode())
    store.write_json(out, c.summary)
    return c
