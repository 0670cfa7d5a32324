"""Held-out agreement with the teacher of each student kind and each peer, over seeds, side by side.

    python benchmarks/generalisation.py --data runs/default/shards --out runs/bench/default \
        [--also runs/tweets/shards] [--seeds 0,1,2] [--students decoder,heads] [--epochs 20] \
        [--variant "heads-3-layers:student=heads,encoder_layers=3"] [--consistency]

Every student trains on the train split of `--data` with the run's options (20 epochs, dropout
0.1) and one seed at a time; the peers (peers.py) learn from the same teacher answers. Each is
scored on the held-out split of `--data` and, with `--also`, on every example of other shard
folders labelled by the same teacher: text from elsewhere, none of it seen in training (the
generalisation that matters). `--held-out` scores on another folder's held-out split, so runs on
nested corpora compare on one set. A `--variant LABEL:OPTION=VALUE,...` adds a student trained with those
training options (TrainConfig's names) on top of the same defaults. Exact match of the whole answer; mean over seeds with a 95% interval (t-distribution
over the seeds' scores) and the Wilson interval of the pooled count (of one count, for a learner
that answers alike for every seed: the peers). Finished students are
reused, so an interrupted benchmark continues. `--consistency` also measures each student's own
self-consistency on every scored set: the share of inputs whose answer survives every edit that
the teacher's consistency is measured with (evaluate/consistency.py). Writes `results.json` and
`results.md` in `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import fields
from pathlib import Path

from microdistill.evaluate.agreement import wilson_interval
from microdistill.evaluate.consistency import self_consistency
from microdistill.evaluate.peers import fit_predict
from microdistill.data.shards import ShardSet
from microdistill.students import load_student
from microdistill.train import TrainConfig, train_once

T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57}  # two-sided 95% t quantiles by degrees of freedom


def exact(answers: list[dict | None], records) -> tuple[int, int]:
    return sum(a == r.fields for a, r in zip(answers, records)), len(records)


def answers_of(student):
    """The student's answers to a batch of texts, as comparable strings."""
    return lambda texts: [json.dumps(p["fields"], sort_keys=True) for p in student.predict(texts)]


def t_interval(values: list[float]) -> tuple[float, float | None]:
    """The mean over seeds and the half-width of its 95% interval (t-distribution; None for one seed)."""
    mean = statistics.fmean(values)
    half = T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return mean, half


def write_results(out: Path, args, rows: list[dict], text: str) -> None:
    """results.json (the arguments and the rows) and results.md (`text`) in `out`, and `text` printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                                 indent=1))
    (out / "results.md").write_text(text)
    print(text)


def summary(counts: list[tuple[int, int]]) -> dict:
    rates = [k / n for k, n in counts]
    mean, half = t_interval(rates)
    # a learner that gives the same answers for every seed (the peers) has the interval of one count
    k, n = counts[0] if len(set(counts)) == 1 else (sum(c[0] for c in counts), sum(c[1] for c in counts))
    return {"per_seed": rates, "mean": mean, "ci95_seeds": [mean - half, mean + half] if half is not None else None,
            "pooled_wilson": list(wilson_interval(k, n)), "n": counts[0][1]}


def mean_lines(ax, series: dict[str, list[tuple[float, dict]]]) -> None:
    """One line per name through the means of summary() dicts, with the seeds' 95% band (kept within 0-100%)."""
    for name, points in series.items():
        xs = [x for x, _ in points]
        ax.plot(xs, [100 * s["mean"] for _, s in points], marker="o", label=name)
        if all(s["ci95_seeds"] for _, s in points):
            ax.fill_between(xs, [100 * max(s["ci95_seeds"][0], 0.0) for _, s in points],
                            [100 * min(s["ci95_seeds"][1], 1.0) for _, s in points], alpha=0.13)


def parse_variant(text: str) -> tuple[str, dict]:
    """"LABEL:key=value,key=value" -> (LABEL, options typed like TrainConfig's defaults)."""
    label, _, rest = text.partition(":")
    types = {f.name: type(f.default) for f in fields(TrainConfig)}
    options = {}
    for pair in filter(None, rest.split(",")):
        key, _, value = pair.partition("=")
        kind = types[key]
        options[key] = (value.lower() == "true") if kind is bool else int(value) if kind is int or value.isdigit() \
            else float(value) if kind is float else value
    return label, options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--also", type=Path, action="append", default=[],
                    help="more shard folders to score on (all their examples: none is in --data's training split)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--students", default="decoder,heads")
    ap.add_argument("--variant", action="append", default=[], help="LABEL:OPTION=VALUE,... (repeatable)")
    ap.add_argument("--peers", default="tfidf,encoder")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--consistency", action="store_true", help="each student's self-consistency on every scored set")
    ap.add_argument("--held-out", type=Path, default=None,
                    help="score on the held-out split of this shard folder instead (e.g. a larger one by the same "
                         "teacher: split by input hash, its held-out inputs are never in --data's training split)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    home = ShardSet(args.data)
    task = home.task()
    train_records = list(home.records("train"))[: args.limit_train]
    seen = {r.id for r in train_records}
    held_out = list((ShardSet(args.held_out) if args.held_out else home).records("val"))
    if seen & {r.id for r in held_out}:
        raise SystemExit(f"{args.held_out}: its held-out split shares inputs with the training split of {args.data}")
    targets = {"held-out": held_out}
    targets |= {str(p): [r for r in ShardSet(p).records() if r.id not in seen] for p in args.also}
    rows = []
    variants = [(kind, {"student": kind}) for kind in args.students.split(",") if kind]
    variants += [parse_variant(v) for v in args.variant]
    for kind, options in variants:
        counts: dict[str, list] = {t: [] for t in targets}
        consistent: dict[str, list] = {t: [] for t in targets}
        wall = []
        for seed in seeds:
            cfg = TrainConfig(**{"epochs": args.epochs, "dropout": 0.1, "limit_train": args.limit_train, **options,
                                 "seed": seed})
            folder = args.out / f"{kind}-seed{seed}"
            t0 = time.perf_counter()
            train_once(args.data, folder, cfg, progress=False)
            wall.append(json.loads((folder / "training.json").read_text())["wall_s"])
            student = load_student(folder)
            for name, records in targets.items():
                texts = [r.text for r in records]
                answers = [p["fields"] for p in student.predict(texts)]
                counts[name].append(exact(answers, records))
                if args.consistency:
                    said = [json.dumps(a, sort_keys=True) for a in answers]
                    consistent[name].append(self_consistency(answers_of(student), texts, said, 64)["consistent"])
            print(f"{kind} seed {seed}: " + ", ".join(f"{t} {k}/{n}" for t, (k, n) in
                                                     ((t, c[-1]) for t, c in counts.items()))
                  + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
        params = json.loads((args.out / f"{kind}-seed{seeds[0]}" / "training.json").read_text())["parameters"]
        rows.append({"name": kind, "parameters": params, "train_s": statistics.fmean(wall),
                     **{t: summary(c) for t, c in counts.items()},
                     **({"consistency": {t: dict(zip(("mean", "half"), t_interval(c))) for t, c in consistent.items()}}
                        if args.consistency else {})})
    for name in [p for p in args.peers.split(",") if p]:
        counts = {t: [] for t in targets}
        for seed in seeds:
            for t, records in targets.items():
                counts[t].append(exact(fit_predict(name, train_records, records, task, seed), records))
        rows.append({"name": f"peer: {name}", **{t: summary(c) for t, c in counts.items()}})
        print(f"peer {name}: " + ", ".join(f"{t} {summary(c)['mean']:.1%}" for t, c in counts.items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"data": str(args.data), "seeds": seeds, "epochs": args.epochs,
                                                       "n_train": len(train_records), "rows": rows}, indent=1))
    lines = [f"Trained on {len(train_records)} teacher answers from `{args.data}`; seeds {args.seeds}; "
             f"exact match of the whole answer against the teacher.", "",
             "| | " + " | ".join(f"{t} (n={len(r)})" for t, r in targets.items()) + " |",
             "|---|" + "---:|" * len(targets)]
    for r in rows:
        cells = []
        for t in targets:
            s = r[t]
            lo, hi = s["ci95_seeds"] if s["ci95_seeds"] and s["ci95_seeds"][1] > s["ci95_seeds"][0] else s["pooled_wilson"]
            ci = f" ({100 * lo:.1f}–{100 * hi:.1f})"
            cells.append(f"{100 * s['mean']:.1f}%{ci}")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    if args.consistency:
        lines += ["", "Each student's self-consistency (its answer unchanged under every meaning-keeping edit), mean "
                  "of the seeds ± the 95% half-width:", "",
                  "| | " + " | ".join(targets) + " |", "|---|" + "---:|" * len(targets)]
        lines += [f"| {r['name']} | " + " | ".join(f"{100 * c['mean']:.1f}% ± {100 * (c['half'] or 0):.1f}"
                                                  for c in r["consistency"].values()) + " |"
                  for r in rows if "consistency" in r]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
