"""Agreement against teacher labels, per selection strategy: how many labels active selection saves.

    python benchmarks/tweeteval_corpus.py --out runs/tweeteval.jsonl
    microdistill extract --input runs/tweeteval.jsonl --out runs/le/pool --limit 2000
    microdistill extract --input held-out-tweets.jsonl --out runs/le/test --limit 300
    python benchmarks/label_efficiency.py --pool runs/le/pool --test runs/le/test --out runs/bench/label-efficiency \
        --start 100 --sizes 200,400,800 [--strategies first,random,margin,entropy,diverse] [--seeds 0,1,2]

`--random-to 800` carries random on to more labels than the others, for the agreement they must
reach. The pool is labelled once; each strategy is then simulated by revealing the stored labels of the
inputs it chooses, as `extract --select` would have had the teacher label them. Every strategy
starts from the same labels (the pool's first --start training inputs) and the same student per
seed; at each size in --sizes the current student reads the inputs not labelled yet, the strategy
(data/select.py, the code `extract --select` runs) chooses enough of them to reach that size, and
a student is trained from its pretrained start on all labels so far (as `update` trains). The
pool's held-out split calibrates each student's confidences (what margin, entropy and diverse
read); --test, labelled by the same teacher and sharing no input with the pool, is scored.

Writes results.json, results.md (agreement per strategy and size, mean of seeds with a 95%
interval, and the labels each strategy needs to reach random's agreement at the largest size)
and label_efficiency.png in --out. Students are kept under --out/students and reused, so an
interrupted run continues.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from dataclasses import replace
from pathlib import Path

from generalisation import exact, mean_lines, summary, write_results

from microdistill.core.files import save_figure
from microdistill.data.select import STRATEGIES, choose
from microdistill.data.shards import ShardSet, ShardWriter
from microdistill.students import load_student
from microdistill.train import TrainConfig, train_once

HEADER_SKIP = ("shards", "complete", "counts", "created", "parts", "rounds")


def labelled_folder(pool: ShardSet, train, val, folder: Path) -> Path:
    """A shard folder holding `train` (all in the training split) and the pool's held-out `val`."""
    if (folder / "manifest.json").is_file() and ShardSet(folder).manifest.get("complete"):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    writer = ShardWriter(folder, {k: v for k, v in pool.manifest.items() if k not in HEADER_SKIP})
    for r in train:
        writer.add(replace(r, split="train"))
    for r in val:
        writer.add(replace(r, split="val"))
    writer.close()
    for extra in ("tokenizer", "input_embeddings.safetensors"):
        src = pool.dir / extra
        if src.is_dir():
            shutil.copytree(src, folder / extra)
        elif src.is_file():
            shutil.copy2(src, folder / extra)
    return folder


def student_for(args, pool: ShardSet, labelled: list, val: list, seed: int):
    """The student trained on `labelled` with `seed` (trained once, then reused by every strategy)."""
    key = hashlib.sha256(("\n".join(sorted(r.id for r in labelled)) + f"/{seed}").encode()).hexdigest()[:12]
    home = args.out / "students" / f"{len(labelled)}-{key}"
    folder = home / "student"
    if not (folder / "config.json").is_file():
        data = labelled_folder(pool, labelled, val, home / "shards")
        cfg = TrainConfig(student="heads", epochs=args.epochs, dropout=0.1, seed=seed)
        train_once(data, folder, cfg, progress=False)
        shutil.rmtree(home / "shards")  # the pool holds the same records
    return load_student(folder)


def run_strategy(args, pool: ShardSet, train: list, val: list, test: list, strategy: str, seed: int) -> list:
    """[(labels, (agreeing, n))] for one strategy and seed, at --start and every --sizes."""
    labelled, rest = train[: args.start], train[args.start:]
    points, student = [], None
    sizes = args.sizes + ([n for n in args.random_to if n > args.sizes[-1]] if strategy == "random" else [])
    for size in [args.start] + sizes:
        if size > len(labelled):
            need = min(size - len(labelled), len(rest))
            texts = [r.text for r in rest]
            probs = student.probabilities(texts) if strategy in ("margin", "entropy", "diverse") else None
            vectors = student.vectors(texts) if strategy == "diverse" else None
            picked = set(choose(len(rest), need, strategy, probs, vectors, seed))
            labelled = labelled + [rest[i] for i in sorted(picked)]
            rest = [r for i, r in enumerate(rest) if i not in picked]
        student = student_for(args, pool, labelled, val, seed)
        agreeing = exact([a["fields"] for a in student.predict([r.text for r in test])], test)
        points.append((len(labelled), agreeing))
        print(f"{strategy} seed {seed}: {len(labelled)} labels -> {agreeing[0]}/{agreeing[1]} on the test set",
              flush=True)
    return points


def labels_to_reach(curve: list[tuple[int, float]], goal: float) -> float | None:
    """The labels at which a mean curve first reaches `goal` (linear between sizes); None if never."""
    for (n0, a0), (n1, a1) in zip([(0, float("-inf"))] + curve, curve):
        if a1 >= goal:
            return n1 if a0 == float("-inf") or a1 == a0 else n0 + (goal - a0) / (a1 - a0) * (n1 - n0)
    return None


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    mean_lines(ax, {row["strategy"]: [(p["labels"], p) for p in row["points"]] for row in rows})
    ax.set_xscale("log")
    ax.set_xticks(sorted({p["labels"] for row in rows for p in row["points"]}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("teacher labels")
    ax.set_ylabel("exact match with the teacher on the test set (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=Path, required=True, help="the labelled pool (a shard folder)")
    ap.add_argument("--test", type=Path, required=True, help="a shard folder of the same teacher to score on")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--strategies", default="first,random,margin,entropy,diverse")
    ap.add_argument("--start", type=int, default=100)
    ap.add_argument("--sizes", default="200,400,800")
    ap.add_argument("--random-to", default="", help="more sizes for random only: the agreement the others must reach")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    args.sizes = sorted(int(s) for s in args.sizes.split(","))
    args.random_to = sorted(int(s) for s in args.random_to.split(",") if s)
    strategies = [s for s in args.strategies.split(",") if s]
    if unknown := [s for s in strategies if s not in STRATEGIES]:
        raise SystemExit(f"--strategies: {unknown} unknown; choose among {', '.join(STRATEGIES)}")
    pool, test_set = ShardSet(args.pool), ShardSet(args.test)
    if pool.task().fingerprint() != test_set.task().fingerprint() or \
            pool.manifest.get("teacher") != test_set.manifest.get("teacher"):
        raise SystemExit(f"{args.test}: another task or teacher than the pool {args.pool}")
    train, val, test = list(pool.records("train")), list(pool.records("val")), list(test_set.records())
    if shared := {r.id for r in train + val} & {r.id for r in test}:  # texts equal once cleaned
        test = [r for r in test if r.id not in shared]
        print(f"{args.test}: {len(shared)} of its inputs are also in the pool; scoring on the other {len(test)}")
    if max(args.sizes + args.random_to) > len(train):
        raise SystemExit(f"--sizes {max(args.sizes + args.random_to)}: the pool's training split holds {len(train)} inputs")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for strategy in strategies:
        runs = [run_strategy(args, pool, train, val, test, strategy, seed) for seed in seeds]
        points = [{"labels": runs[0][i][0], **summary([run[i][1] for run in runs])} for i in range(len(runs[0]))]
        rows.append({"strategy": strategy, "points": points})
    args.out.mkdir(parents=True, exist_ok=True)
    plot(rows, args.out / "label_efficiency.png")
    by_name = {r["strategy"]: r for r in rows}
    goal_row = by_name.get("random")
    goal = goal_row["points"][-1]["mean"] if goal_row else None
    columns = sorted({p["labels"] for row in rows for p in row["points"]})
    lines = [f"Pool `{args.pool}`: {len(train)} labelled training inputs (+{len(val)} held out for calibration); "
             f"scored on `{args.test}` (n={len(test)}); heads students, {args.epochs} epochs, seeds {args.seeds}; "
             "exact match of the whole answer against the teacher, mean of seeds (95% interval).", "",
             "| strategy | " + " | ".join(f"{n} labels" for n in columns) +
             (f" | labels to reach random's {100 * goal:.1f}% |" if goal is not None else " |"),
             "|---|" + "---:|" * (len(columns) + (goal is not None))]
    for row in rows:
        cells = []
        at = {p["labels"]: p for p in row["points"]}
        for p in (at.get(n) for n in columns):
            if p is None:
                cells.append("")
                continue
            ci = p["ci95_seeds"]
            ci = ci and (max(ci[0], 0.0), min(ci[1], 1.0))  # a share stays within 0-100%
            cells.append(f"{100 * p['mean']:.1f}%" + (f" ({100 * ci[0]:.1f}–{100 * ci[1]:.1f})" if ci else ""))
        if goal is not None:
            n = labels_to_reach([(p["labels"], p["mean"]) for p in row["points"]], goal)
            row["labels_to_reach_random"] = n
            cells.append(f"{n:.0f}" if n is not None else f"not within {row['points'][-1]['labels']}")
        lines.append(f"| {row['strategy']} | " + " | ".join(cells) + " |")
    write_results(args.out, args, rows, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
