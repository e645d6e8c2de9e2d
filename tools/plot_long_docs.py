"""Plots the loss by document position far past the training length (PNG) from the JSON files of
`fwl eval CONFIG CKPT --stream ... --json FILE`: each file's curves ('state carried', 'windows
alone'), labelled with the name given before the file.

    python tools/plot_long_docs.py --out long_docs.png FWL=runs/fwl_stream.json baseline=runs/base_stream.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("curves", nargs="+", metavar="NAME=JSON")
    ap.add_argument("--out", required=True, help="the PNG to write")
    ap.add_argument("--title", default="Loss by document position, FWL state carried vs reset at each window")
    args = ap.parse_args(argv)
    fig, ax = plt.subplots(figsize=(9, 5))
    for spec in args.curves:
        name, sep, path = spec.partition("=")
        if not sep:
            print(f"plot_long_docs: {spec!r}: expected NAME=JSON", file=sys.stderr)
            return 2
        try:
            results = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"plot_long_docs: {path}: {e}", file=sys.stderr)
            return 2
        for kind, res in results.items():
            mids = [(a + b) / 2 for a, b in res["edges"]]
            style = "-" if res["carry_state"] else "--"
            label = name if len(results) == 1 else f"{name}, {kind}"
            ax.plot(mids, res["loss"], style, marker=".", label=label)
        window = next(iter(results.values()))["window"]
    ax.axvline(window, color="grey", lw=0.8, ls=":")
    ax.set_xlabel(f"document position (tokens; training length {window} at the dotted line)")
    ax.set_ylabel("loss (nats)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
