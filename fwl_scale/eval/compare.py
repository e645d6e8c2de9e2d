"""`fwl eval --compare RESULT_DIR... --out DIR`: several checkpoints' method results (fwl_scale/eval/docrun.py) on
the same documents in one Markdown table (compare.md), one JSON (compare.json) and PNG plots: loss by
document position, and the gains over the reference by training frequency and by repetition.

The reference is the first method of the first directory (put the baseline first: its `plain`); the cost
reference is the first directory's `dynamic` when it has one, so "× dynamic" reads as the cost that matters
(an FWL's evaluation wall time against dynamic evaluation of the baseline on the same hardware).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fwl_scale.atomic import atomic_write, atomic_write_json, atomic_write_text
from fwl_scale.config import ConfigError
from fwl_scale.eval.names import RESULTS
from fwl_scale.eval.perplexity import perplexity_of


def load_results(d: str | Path) -> dict[str, Any]:
    path = Path(d) / RESULTS
    try:
        r = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--compare: {path}: no such file (run `fwl eval CONFIG CKPT --out {d}` first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--compare: {path}: not valid JSON ({e})") from None
    if not isinstance(r, dict) or "methods" not in r or "documents_id" not in r:
        raise ConfigError(f"--compare: {path}: not the results of `fwl eval --out`")
    return r


def build_comparison(dirs: list[str | Path]) -> dict[str, Any]:
    if len(dirs) < 1:
        raise ConfigError("--compare: give at least one results directory")
    runs = [(Path(d).name or str(d), load_results(d)) for d in dirs]
    first_id = runs[0][1]["documents_id"]
    for (name, r), d in zip(runs, dirs):
        if r["documents_id"] != first_id:
            raise ConfigError(f"--compare: {Path(d) / RESULTS} was evaluated on other documents than "
                              f"{Path(dirs[0]) / RESULTS} (documents_id differs); compare runs on the same documents")
    ref = runs[0][1]["methods"][0]
    dyn_ref = next((m for m in runs[0][1]["methods"] if m["method"] == "dynamic"), None)
    rows = []
    for name, r in runs:
        for m in r["methods"]:
            row = {"run": name, "checkpoint": r["checkpoint"], "method": m["method"], "loss": m["loss"],
                   "perplexity": perplexity_of(m["loss"]), "tokens": m["tokens"], "wall_s": m["wall_s"],
                   "tokens_per_s": m["tokens_per_s"], "flops_per_token": m["flops_per_token"],
                   "gain": ref["loss"] - m["loss"],
                   "wall_vs_dynamic": m["wall_s"] / dyn_ref["wall_s"] if dyn_ref and dyn_ref["wall_s"] > 0 else None}
            for axis in ("by_position", "by_frequency", "by_repetition"):
                row[axis] = m[axis]
                row[f"gain_{axis}"] = [
                    (a["loss"] - b["loss"]) if a["tokens"] and b["tokens"] else None
                    for a, b in zip(ref[axis], m[axis])]
            rows.append(row)
    return {"reference": f"{runs[0][0]}:{ref['method']}", "cost_reference": f"{runs[0][0]}:dynamic" if dyn_ref else None,
            "documents": runs[0][1]["documents"], "documents_id": first_id, "rows": rows}


def format_comparison(c: dict[str, Any]) -> str:
    lines = [f"Same {c['documents']} documents; gain = loss of {c['reference']} minus the row's"
             + (f"; × dynamic = wall time over {c['cost_reference']}'s" if c["cost_reference"] else ""), "",
             "| run | method | loss | ppl | gain | tokens | wall s | tokens/s | GFLOPs/token | × dynamic |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in c["rows"]:
        vs = f"{r['wall_vs_dynamic']:.3f}" if r["wall_vs_dynamic"] is not None else "-"
        lines.append(f"| {r['run']} | {r['method']} | {r['loss']:.4f} | {r['perplexity']:.2f} | {r['gain']:+.4f} | "
                     f"{r['tokens']} | {r['wall_s']:.2f} | {r['tokens_per_s'] or 0:,.0f} | "
                     f"{r['flops_per_token'] / 1e9:.4f} | {vs} |")
    for axis, label, key in (("by_frequency", "training-frequency rank", "ranks"), ("by_repetition", "repetition", "name")):
        buckets = c["rows"][0][axis]
        if not buckets:
            continue
        heads = [f"{b[key][0]}-{b[key][1]}" if key == "ranks" else b[key] for b in buckets]
        lines += ["", f"Gain by {label} (tokens: {', '.join(str(b['tokens']) for b in buckets)}):", "",
                  "| run | method | " + " | ".join(heads) + " |", "|---" * (len(heads) + 2) + "|"]
        for r in c["rows"]:
            lines.append(f"| {r['run']} | {r['method']} | " + " | ".join(
                f"{g:+.4f}" if g is not None else "-" for g in r[f"gain_{axis}"]) + " |")
    return "\n".join(lines) + "\n"


def _plots(c: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib  # heavy, and only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str) -> None:
        path = out / name
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in c["rows"]:
        pts = [((b["start"] + b["end"]) / 2, b["loss"]) for b in r["by_position"] if b["tokens"]]
        ax.plot([p for p, _ in pts], [v for _, v in pts], marker="o", label=f"{r['run']}: {r['method']}")
    ax.set_xscale("log")
    ax.set_xlabel("position in the document (bucket middle)")
    ax.set_ylabel("loss")
    ax.set_title("loss by document position")
    ax.legend(fontsize=7)
    save(fig, "loss_by_position.png")
    for axis, label, key in (("by_frequency", "training-frequency rank", "ranks"), ("by_repetition", "repetition", "name")):
        buckets = c["rows"][0][axis]
        if not buckets:
            continue
        heads = [f"{b[key][0]}-{b[key][1]}" if key == "ranks" else b[key] for b in buckets]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        n = len(c["rows"])
        width = 0.8 / max(1, n)
        for i, r in enumerate(c["rows"]):
            gains = [g if g is not None else 0.0 for g in r[f"gain_{axis}"]]
            ax.bar([j + i * width for j in range(len(heads))], gains, width, label=f"{r['run']}: {r['method']}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(heads))], heads, fontsize=8)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_ylabel(f"loss gain over {c['reference']}")
        ax.set_title(f"gain by {label}")
        ax.legend(fontsize=7)
        save(fig, f"gains_{axis}.png")
    return written


def compare_runs(dirs: list[str | Path], out: str | Path) -> dict[str, Any]:
    c = build_comparison(dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = format_comparison(c)
    atomic_write_text(out / "compare.md", text)
    atomic_write_json(out / "compare.json", c)
    c["plots"] = [str(p) for p in _plots(c, out)]
    print(text)
    print("plots: " + ", ".join(c["plots"]))
    return c
