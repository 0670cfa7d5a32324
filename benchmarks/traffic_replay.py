"""Traffic replay: over a stream of inputs unlike the training inputs, the share of calls the student
answers and the agreement of all answers, with an update after every --every teacher calls.

    microdistill extract --input microdistill/data/sample_comments.jsonl --dtype float32 --out runs/comments
    python benchmarks/traffic_replay.py --shards runs/comments --stream runs/le/pool,runs/le/test \
        --out runs/bench/replay [--every 100] [--target 0.97] [--window 300] [--seeds 0,1,2] [--epochs 10] \
        [--warm-epochs 3]

The student starts from --shards (the sample comments). The stream (labelled tweets, each once, none
in the shards, in one shuffled order for every seed) is served through the product's cascade
(serve/cascade.py) at the threshold that reached --target agreement on the student's held-out
curve. The teacher's answers are the stream's stored labels, for speed (the same teacher and dtype
labelled both folders; no teacher runs here): a call the student hands on counts as agreeing, and
its record is what `serve --traffic` keeps for `update` (extract/recording.py). After every
--every handed-on calls comes an update as `microdistill update` makes it from a traffic folder: the
kept records join the shards (each in the split its id hashes to, as merging puts it: a tenth
held out, where the student's confidences are calibrated), a student of the same options is trained from its
pretrained start on all the labels (or, with --warm-epochs, from the serving student: `train
--init-from`), and the gate keeps it only if it agrees with the teacher at
least as often on the held-out inputs the shards held before the update; the cascade then swaps to it and its threshold.
Heads students read the records' decision points, never their kept-vocabulary logits, so records
of the two extractions mix.

Writes in --out/fresh (or --out/warmN) calls.jsonl (per call: seed, position, who answered, agreed, the round of the student in
use), results.json, results.md (the student's share and all answers' agreement over the first and
last --window calls, mean of seeds with a 95% interval; per update: labels and the gate) and
replay.png (both over the stream, in windows). Students are kept under --out/seedS and reused
(the starting student by both modes).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

from generalisation import mean_lines, summary, write_results
from label_efficiency import labelled_folder

from microdistill.core.files import save_figure
from microdistill.data.shards import ShardSet
from microdistill.flows.continual import score
from microdistill.serve.cascade import Cascade, threshold_for
from microdistill.students import load_student
from microdistill.train import TrainConfig, train_once


def stored_teacher(records: dict):
    """The teacher as the cascade calls it, answering from the stream's stored labels."""
    return lambda texts: [{"output": records[t].output_text, "fields": records[t].fields} for t in texts]


def student_at(args, shards: ShardSet, added: list, seed: int, k: int, current=None):
    """Round k's student: trained on the shards' training split plus `added`, from its pretrained
    start, or with --warm-epochs from `current` (the student serving)."""
    home = args.out / f"seed{seed}" / ("start" if k == 0 else f"{args.mode}-update-{k}")
    folder = home / "student"
    if not (folder / "training.json").is_file():
        data = labelled_folder(shards, list(shards.records("train")) + [r for r in added if r.split == "train"],
                               list(shards.records("val")) + [r for r in added if r.split == "val"], home / "shards")
        cfg = TrainConfig(student="heads", epochs=args.epochs, dropout=0.1, seed=seed)
        if args.warm_epochs and current is not None:
            cfg = TrainConfig(**{**cfg.to_dict(), "epochs": args.warm_epochs, "init_from": str(current.path)})
        train_once(data, folder, cfg, progress=False)
        shutil.rmtree(home / "shards")
    return load_student(folder)


def replay(args, shards: ShardSet, stream: list, seed: int) -> tuple[list[dict], list[dict]]:
    """(calls, updates) of one seed's pass over the stream."""
    by_text = {r.text: r for r in stream}
    student = student_at(args, shards, [], seed, 0)
    cascade = Cascade(student, threshold_for(student, target_agreement=args.target), stored_teacher(by_text))
    kept, calls, updates, round_, pending, i = [], [], [], 0, 0, 0
    while i < len(stream):
        chunk = stream[i:i + args.every]  # answered by the current student until --every calls are handed on
        answers = cascade.predict([r.text for r in chunk])
        for r, a in zip(chunk, answers):
            calls.append({"seed": seed, "call": i, "by": a["answered_by"], "agreed": a["fields"] == r.fields,
                          "round": round_})
            i += 1
            if a["answered_by"] == "teacher":
                kept.append(r)
                pending += 1
            if pending == args.every:
                break
        if pending < args.every:
            continue
        pending, k = 0, len(updates) + 1
        # as update gates: on the held-out inputs the shards held before this update
        gate = list(shards.records("val")) + [r for r in kept[:len(kept) - args.every] if r.split == "val"]
        new = student_at(args, shards, kept, seed, k, cascade.student)
        before, after = score(cascade.student, gate), score(new, gate)
        minutes = json.loads((new.path / "training.json").read_text())["wall_s"] / 60
        updates.append({"seed": seed, "update": k, "at_call": i, "labels": len(kept), "gate_n": len(gate), "gate_old": before,
                        "gate_new": after, "kept": after >= before, "train_minutes": minutes})
        print(f"seed {seed}: update {k} at call {i}: {len(kept)} teacher answers kept; held-out agreement "
              f"{before:.1%} -> {after:.1%} ({'kept' if after >= before else 'refused'})", flush=True)
        if after >= before:
            cascade.swap(new, threshold_for(new, target_agreement=args.target))
            round_ = k
    return calls, updates


def windows(calls: list[dict], size: int) -> list[tuple[int, dict, dict]]:
    """Per window of `size` calls: (its last call, {seed: (student answers, n)}, {seed: (agreeing, n)})."""
    seeds = sorted({c["seed"] for c in calls})
    n = max(c["call"] for c in calls) + 1
    rows = []
    for start in range(0, n - size + 1, size):
        own, agree = {}, {}
        for s in seeds:
            part = [c for c in calls if c["seed"] == s and start <= c["call"] < start + size]
            own[s] = (sum(c["by"] == "student" for c in part), len(part))
            agree[s] = (sum(c["agreed"] for c in part), len(part))
        rows.append((start + size, own, agree))
    return rows


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    mean_lines(ax, {"answered by the student": [(end, summary(list(own.values()))) for end, own, _ in rows],
                    "all answers agree with the teacher": [(end, summary(list(agree.values()))) for end, _, agree in rows]})
    ax.set_xlabel("calls served")
    ax.set_ylabel("% of the calls in the window")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=Path, required=True, help="the student's shards (the sample comments)")
    ap.add_argument("--stream", required=True, help="labelled shard folders of the stream, comma-separated")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--every", type=int, default=100, help="an update after this many calls handed to the teacher")
    ap.add_argument("--target", type=float, default=0.97, help="the cascade's target agreement")
    ap.add_argument("--window", type=int, default=300, help="calls per window in the report and plot")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--warm-epochs", type=int, default=0,
                    help="updates train this many epochs from the serving student (train --init-from); 0: from the pretrained start")
    args = ap.parse_args()
    args.mode = f"warm{args.warm_epochs}" if args.warm_epochs else "fresh"
    shards = ShardSet(args.shards)
    own = {r.id for r in shards.records()}
    stream = {}
    for folder in args.stream.split(","):
        s = ShardSet(folder)
        if s.task().fingerprint() != shards.task().fingerprint() or s.manifest["teacher"] != shards.manifest["teacher"]:
            raise SystemExit(f"{folder}: another task or teacher than --shards {args.shards}")
        stream.update({r.id: r for r in s.records() if r.id not in own})
    stream = sorted(stream.values(), key=lambda r: r.id)
    random.Random(0).shuffle(stream)
    print(f"stream: {len(stream)} inputs; the student starts from {len(own)} in {args.shards}", flush=True)
    calls, updates = [], []
    for seed in (int(s) for s in args.seeds.split(",")):
        c, u = replay(args, shards, stream, seed)
        calls += c
        updates += u
    results = args.out / args.mode
    results.mkdir(parents=True, exist_ok=True)
    (results / "calls.jsonl").write_text("".join(json.dumps(c) + "\n" for c in calls))
    rows = windows(calls, args.window)
    plot(rows, results / "replay.png")

    def cell(counts: dict) -> str:
        s = summary(list(counts.values()))
        ci = s["ci95_seeds"]
        return f"{100 * s['mean']:.1f}%" + (f" ({100 * max(ci[0], 0):.1f}–{100 * min(ci[1], 1):.1f})" if ci else "")

    lines = [f"Stream: {len(stream)} inputs from {args.stream}; the student starts from {len(own)} inputs of "
             f"`{args.shards}`; cascade at {args.target:.0%} target agreement; an update after every {args.every} "
             f"teacher answers; heads students, {args.epochs} epochs; seeds {args.seeds}. Teacher calls are "
             "answered from stored labels.", "",
             "| calls | answered by the student | all answers agree with the teacher |", "|---|---:|---:|"]
    for end, own_counts, agree in (rows[0], rows[-1]):
        lines.append(f"| {end - args.window + 1}–{end} | {cell(own_counts)} | {cell(agree)} |")
    lines += ["", "| seed | update | at call | teacher answers kept | training (min) | gate: old | gate: new | kept |",
              "|---:|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {u['seed']} | {u['update']} | {u['at_call']} | {u['labels']} | {u['train_minutes']:.1f} | "
              f"{100 * u['gate_old']:.1f}% | {100 * u['gate_new']:.1f}% | {'yes' if u['kept'] else 'no'} |"
              for u in updates]
    write_results(results, args, [{"window_end": end, "student": summary(list(o.values())),
                                    "agreement": summary(list(a.values()))} for end, o, a in rows] +
                  [{"updates": updates}], "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
