"""On-policy against off-policy distillation of a decoder student, over seeds, on one shard folder.

    python benchmarks/on_policy.py --data runs/agent/shards --out runs/bench/on-policy \
        [--seeds 0,1,2] [--epochs 20] [--preset micro] [--configs curriculum,on_policy] [--fraction 0.25]

One `microdistill compare` per seed (the same shards, preset, seed and epochs for every
configuration: the same teacher labels, on-policy only adds the teacher's scoring of the
student's own answers), each with its learning curves (curves.png) and compare.md. Then, per
configuration: held-out exact match of the whole answer and chrF of each free-text field against
the teacher's text, mean over the seeds with a 95% interval (t-distribution), and the training
time. Finished compares are reused, so an interrupted benchmark continues. Writes results.json
and results.md in --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from generalisation import t_interval, write_results

from microdistill.flows.compare import compare
from microdistill.flows.config import CompareConfig


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% interval over seeds (0 for one seed)."""
    mean, half = t_interval(values)
    return mean, half or 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--preset", default="micro")
    ap.add_argument("--configs", default="curriculum,on_policy")
    ap.add_argument("--fraction", type=float, default=None, help="the on_policy configuration's share of batches")
    args = ap.parse_args()
    configs = args.configs.split(",")
    runs = [{"name": c, "on_policy": args.fraction} if c == "on_policy" and args.fraction is not None else c
            for c in configs]
    per_seed = []
    for seed in (int(s) for s in args.seeds.split(",")):
        folder = args.out / f"seed{seed}"
        done = folder / "compare.json"
        result = json.loads(done.read_text()) if done.is_file() else compare(
            args.data, folder, runs, CompareConfig(preset=args.preset, epochs=args.epochs, seed=seed), progress=False)
        per_seed.append({r["name"]: r for r in result["runs"]})
        print(f"seed {seed}: " + ", ".join(f"{n} exact {r['exact_match']:.1%} chrF {r.get('chrf')} ({r['wall_s']:.0f} s)"
                                           for n, r in per_seed[-1].items()), flush=True)
    texts = list(per_seed[0][configs[0]].get("chrf") or {})
    rows = []
    for name in configs:
        runs = [s[name] for s in per_seed]
        row = {"name": name, "exact_match": interval([r["exact_match"] for r in runs]),
               "wall_s": statistics.fmean(r["wall_s"] for r in runs), "val_examples": runs[0]["val_examples"]}
        row["chrf"] = {t: interval([r["chrf"][t] for r in runs]) for t in texts}
        rows.append(row)
    lines = [f"`{args.data}`, {args.preset} decoder, {args.epochs} epochs, seeds {args.seeds}; "
             f"{rows[0]['val_examples']} held-out inputs. Mean over the seeds ± 95% interval.", "",
             "| configuration | exact match | " + " | ".join(f"chrF {t}" for t in texts) + " | training time |",
             "|---|---:|" + "---:|" * len(texts) + "---:|"]
    for r in rows:
        m, h = r["exact_match"]
        lines.append(f"| {r['name']} | {100 * m:.1f}% ± {100 * h:.1f} | "
                     + " | ".join(f"{r['chrf'][t][0]:.1f} ± {r['chrf'][t][1]:.1f}" for t in texts)
                     + f" | {r['wall_s']:.0f} s |")
    write_results(args.out, args, rows, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
