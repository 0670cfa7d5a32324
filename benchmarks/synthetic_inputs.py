"""Students trained on inputs the teacher wrote, on as many real ones, and on both, all scored on
real held-out inputs.

    python benchmarks/tweeteval_corpus.py --out runs/tweeteval.jsonl
    microdistill synthesize --task reddit-comment --n 300 --out runs/synth/written.jsonl
    python benchmarks/synthetic_inputs.py --written runs/synth/written.jsonl --real runs/tweeteval.jsonl \
        --n 300 --held-out 300 --out runs/synth [--seeds 0,1,2] [--student heads] [--epochs 20]

The real corpus is split in two by a hash of each text: the first --n inputs of one half that
pass the task's filters are the real training inputs, the first --held-out of the other half the
held-out set (so no held-out input is a training input, and both halves mix the corpus' sources).
The teacher labels four shard folders: written (the first --n written inputs), real, both (a copy
of real to which the written inputs are added, so none is labelled twice) and held-out. Each arm
trains one student per seed on its folder's train split and is scored by exact match of the whole
answer on every held-out input; mean over seeds with a 95% interval, and each arm's share of the
real arm's agreement. Finished shards and students are reused, so an interrupted run continues.
Writes results.json and results.md in --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

from generalisation import exact, summary, write_results

from microdistill.data.shards import ShardSet
from microdistill.extract import ExtractConfig, extract
from microdistill.students import load_student
from microdistill.train import TrainConfig, train_once


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": r["text"]}, ensure_ascii=False) + "\n" for r in rows))
    return path


def half(text: str) -> int:
    return hashlib.sha256(text.encode()).digest()[0] % 2


def label(corpus: Path, folder: Path, cfg: ExtractConfig) -> float:
    """Extract `corpus` into `folder` (continuing what is there); the seconds it took."""
    t0 = time.perf_counter()
    extract(corpus, folder, cfg, progress=False)
    return time.perf_counter() - t0


def folders(args, cfg: ExtractConfig) -> dict[str, Path]:
    """The four shard folders (labelled here unless done already)."""
    written = lines(args.written)[: args.n]
    if len(written) < args.n:
        raise SystemExit(f"{args.written}: {len(written)} inputs, fewer than --n {args.n}")
    real = lines(args.real)
    corpora = args.out / "corpora"
    paths = {"written": write(corpora / "written.jsonl", written),
             "real": write(corpora / "real.jsonl", [r for r in real if half(r["text"]) == 0]),
             "held-out": write(corpora / "held-out.jsonl", [r for r in real if half(r["text"]) == 1])}
    shards = {name: args.out / "shards" / name for name in ("written", "real", "both", "held-out")}
    def limited(n: int) -> ExtractConfig:
        return ExtractConfig.from_dict({**cfg.to_dict(), "limit": n})

    walls = {"held-out": label(paths["held-out"], shards["held-out"], limited(args.held_out)),
             "real": label(paths["real"], shards["real"], limited(args.n)),
             "written": label(paths["written"], shards["written"], cfg)}
    if not (shards["both"] / "manifest.json").exists():
        shutil.copytree(shards["real"], shards["both"], ignore=shutil.ignore_patterns("*.lock"))
    real_texts = [r.text for r in ShardSet(shards["real"]).records()]
    both = write(corpora / "both.jsonl", [{"text": t} for t in real_texts] + written)
    walls["both"] = label(both, shards["both"], cfg)
    print("labelling: " + ", ".join(f"{k} {len(ShardSet(shards[k]))} inputs {v:.0f} s" for k, v in walls.items()),
          flush=True)
    return shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--written", type=Path, required=True, help="microdistill synthesize's output")
    ap.add_argument("--real", type=Path, required=True, help="a real corpus (JSONL with a text field)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--task", default="reddit-comment")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--held-out", type=int, default=300)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--student", default="heads")
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    shards = folders(args, ExtractConfig(task=args.task))
    held_out = ShardSet(shards["held-out"]).load()
    rows = []
    for arm in ("written", "real", "both"):
        train = ShardSet(shards[arm])
        overlap = {r.id for r in train.records()} & {r.id for r in held_out}
        if overlap:
            raise SystemExit(f"{shards[arm]}: {len(overlap)} inputs are also held-out inputs")
        counts = []
        for seed in (int(s) for s in args.seeds.split(",")):
            folder = args.out / "students" / f"{arm}-seed{seed}"
            cfg = TrainConfig(student=args.student, epochs=args.epochs, dropout=0.1, seed=seed)
            train_once(shards[arm], folder, cfg, progress=False)
            answers = [p["fields"] for p in load_student(folder).predict([r.text for r in held_out])]
            counts.append(exact(answers, held_out))
            print(f"{arm} seed {seed}: {counts[-1][0]}/{counts[-1][1]}", flush=True)
        rows.append({"arm": arm, "n_train": len(list(train.records("train"))), **summary(counts)})
    real = next(r["mean"] for r in rows if r["arm"] == "real")
    out = ["| trained on | training inputs | exact agreement on real held-out (95% CI) | share of real's |",
           "|---|---:|---:|---:|"]
    for r in rows:
        lo, hi = r["ci95_seeds"] or r["pooled_wilson"]
        out.append(f"| {r['arm']} | {r['n_train']} | {100 * r['mean']:.1f}% ({100 * lo:.1f}–{100 * hi:.1f}) | "
                   f"{r['mean'] / real:.2f} |")
    text = (f"Task {args.task}, {args.student} student, {args.epochs} epochs, seeds {args.seeds}; "
            f"{len(held_out)} real held-out inputs.\n\n" + "\n".join(out) + "\n")
    write_results(args.out, args, rows, text)


if __name__ == "__main__":
    main()
