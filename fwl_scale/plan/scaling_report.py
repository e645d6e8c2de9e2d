"""The scaling study's collection on disk: OUT/scaling.json, scaling.md and scaling.png."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fwl_scale.atomic import atomic_write, atomic_write_bytes
from fwl_scale.plan.fits import Chinchilla, PowerLaw


def _law_line(entry: dict[str, Any]) -> str:
    if "error" in entry:
        return f"not fitted: {entry['error']}"
    if entry["law"] == "PowerLaw":
        return f"L(N) = {entry['E']:.3f} + {entry['A']:.4g}·N^-{entry['alpha']:.3f}"
    return (f"L(N, D) = {entry['E']:.3f} + {entry['A']:.4g}/N^{entry['alpha']:.3f} + "
            f"{entry['B']:.4g}/D^{entry['beta']:.3f}")


def markdown(report: dict[str, Any], title: str) -> str:
    lines = [f"# Scaling study {title}", "", "| arm | N (non-emb.) | tokens D | C (FLOPs) | lr | seeds | val loss |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for p in report["points"]:
        lines.append(f"| {p['arm']} | {p['n']:,} | {p['d']:,} | {p['compute']:.3g} | {p['lr']:g} | {p['seeds']} "
                     f"| {p['loss']:.4f} |")
    for arm, entry in report["arms"].items():
        lines += ["", f"## {arm}", "", f"- {_law_line(entry['L(N)'])} (each size at its largest budget)",
                  f"- {_law_line(entry['L(N,D)'])}"]
        if "flops" in entry:
            lines.append(f"- FLOPs per token F(N) = {entry['flops']['k']:.4g}·N^{entry['flops']['gamma']:.3f} "
                         f"(model/flops.py, FWL's extra work included)")
        lines += [f"- **warning**: {w}" for w in entry.get("warnings", [])]
        if entry["ladder"]:
            lines.append("- extrapolated to the ladder at 20 tokens/parameter: " + ", ".join(
                f"{s} (N={v['n'] / 1e6:.0f}M) {v['loss_20tpp']:.3f}" if "loss_20tpp" in v else f"{s} not fitted"
                for s, v in entry["ladder"].items()))
    gain = report.get("gain")
    if gain:
        lines += ["", "## FWL gain (baseline loss − FWL loss; > 0: the FWL pays)", ""]
        if any(entry.get("warnings") for entry in report["arms"].values()):
            lines += ["Extrapolated from fits with the warnings above: read it as what those fits say, not as a "
                      "prediction.", ""]
        lines += ["| ladder size | gain at 20 tokens/param |", "|---|---:|"]
        lines += [f"| {s} | {g:+.4f} |" for s, g in gain["by_ladder_size"].items()]
        lines += ["", "| compute (FLOPs) | gain on the compute-optimal frontier |", "|---:|---:|"]
        lines += [f"| {c:.3g} | {g:+.4f} |" for c, g in zip(gain["by_compute"]["compute"],
                                                            gain["by_compute"]["baseline_minus_fwl"])]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    # Function-level: matplotlib is slow to import and only the plot needs it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colours = {"fwl": "tab:red", "baseline": "tab:blue"}
    for arm, entry in report["arms"].items():
        ps = [p for p in report["points"] if p["arm"] == arm]
        c = colours.get(arm, "k")
        axes[0].scatter([p["n"] for p in ps], [p["loss"] for p in ps], color=c, label=f"{arm} runs")
        axes[1].scatter([p["compute"] for p in ps], [p["loss"] for p in ps], color=c, label=f"{arm} runs")
        ladder_n = [v["n"] for v in entry["ladder"].values()]
        grid = np.logspace(np.log10(min(p["n"] for p in ps)), np.log10(max([p["n"] for p in ps] + ladder_n)), 100)
        if "error" not in entry["L(N)"]:
            law = PowerLaw(**{k: v for k, v in entry["L(N)"].items() if k != "law"})
            axes[0].plot(grid, law(grid), color=c, label=f"{arm} L(N)")
        if "frontier" in entry:
            f = entry["frontier"]
            axes[1].plot(f["compute"], f["loss"], color=c, label=f"{arm} frontier")
            law2 = Chinchilla(**{k: v for k, v in entry["L(N,D)"].items() if k != "law"})
            axes[0].plot(grid, law2(grid, 20 * grid), color=c, ls="--", label=f"{arm} L(N, 20N)")
    gain = report.get("gain")
    if gain:
        axes[2].plot(gain["by_compute"]["compute"], gain["by_compute"]["baseline_minus_fwl"], color="k")
        axes[2].axhline(0, color="grey", lw=0.5)
    axes[0].set(xscale="log", xlabel="non-embedding parameters N", ylabel="validation loss")
    axes[1].set(xscale="log", xlabel="training FLOPs C", ylabel="validation loss")
    axes[2].set(xscale="log", xlabel="training FLOPs C", ylabel="baseline − FWL loss (frontier)")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write(report: dict[str, Any], out_dir: Path, title: str) -> list[Path]:
    """Writes the three files, unless a collection with more points is there (a partial rerun never
    replaces a fuller collection); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "scaling.json", out_dir / "scaling.md", out_dir / "scaling.png"]
    if paths[0].exists():
        before = json.loads(paths[0].read_text())
        if before.get("runs", 0) > report["runs"]:
            raise ValueError(f"{paths[0]}: collects {before['runs']} finished runs, this collection only "
                             f"{report['runs']}: not replaced (move it away to force)")
    atomic_write_bytes(paths[0], (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(paths[1], markdown(report, title).encode())
    plot(report, paths[2])
    return paths
