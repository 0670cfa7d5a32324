"""Held-out agreement against the number of teacher-labelled training examples, from several
runs of generalisation.py on the same shards with different --limit-train.

    for n in 250 500 1000; do python benchmarks/generalisation.py --data runs/tweets/shards \
        --out runs/bench/tweets-$n --limit-train $n --students heads; done
    python benchmarks/curve.py runs/bench/tweets-250 runs/bench/tweets-500 runs/bench/tweets-1000 \
        runs/bench/tweets --out runs/bench/tweets-curve [--ceiling runs/bench/tweets-consistency.json]

Writes curve.png and curve.md in --out: one line per student or peer (mean over seeds, with the
seeds' 95% interval), and the teacher's self-consistency as a horizontal band when given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from generalisation import mean_lines

from microdistill.core.files import save_figure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+", help="generalisation.py output folders (results.json)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--target", default="held-out", help="which scored set to plot")
    ap.add_argument("--ceiling", type=Path, default=None, help="self_consistency.py's JSON output")
    args = ap.parse_args()
    results = sorted((json.loads((r / "results.json").read_text()) for r in args.runs), key=lambda r: r["n_train"])
    names = list(dict.fromkeys(row["name"] for r in results for row in r["rows"]))
    series = {name: [(r["n_train"], row[args.target]) for r in results for row in r["rows"] if row["name"] == name]
              for name in names}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    mean_lines(ax, series)
    ceiling = json.loads(args.ceiling.read_text()) if args.ceiling else None
    if ceiling:
        lo, hi = ceiling["consistent_ci95"]
        ax.axhspan(100 * lo, 100 * hi, color="grey", alpha=0.15)
        ax.axhline(100 * ceiling["consistent"], color="grey", ls="--",
                   label=f"teacher's self-consistency (n={ceiling['n']})")
    ax.set_xscale("log")
    ax.set_xlabel("teacher-labelled training examples")
    ax.set_ylabel(f"exact match with the teacher, {args.target} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    args.out.mkdir(parents=True, exist_ok=True)
    save_figure(fig, args.out / "curve.png")

    sizes = [r["n_train"] for r in results]
    lines = ["| | " + " | ".join(f"{n} examples" for n in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for name, points in series.items():
        by_n = {n: s for n, s in points}
        lines.append(f"| {name} | " + " | ".join(f"{100 * by_n[n]['mean']:.1f}%" if n in by_n else "" for n in sizes) + " |")
    if ceiling:
        lines += ["", f"The teacher's self-consistency: {100 * ceiling['consistent']:.1f}% on {ceiling['n']} held-out inputs."]
    (args.out / "curve.md").write_text("\n".join(lines + ["", "![agreement vs examples](curve.png)", ""]))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
