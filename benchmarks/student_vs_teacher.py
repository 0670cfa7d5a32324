"""Student vs teacher per-example latency (batch 1) and batched throughput, side by side.

    python benchmarks/student_vs_teacher.py --run runs/default [--n 16]

Times the trained student of a run and the teacher that made its shards on the same held-out
inputs, both with constrained greedy decoding (the code `microdistill eval` uses), and the
student once more with one torch thread, since a tiny model can lose more to thread wake-ups
than it gains from a second core. Prints the ratios.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from microdistill.evaluate import eval_split, manifest_teacher, time_student, time_teacher
from microdistill.store import ShardSet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a run folder with shards/ and student/")
    ap.add_argument("--n", type=int, default=16, help="inputs to time")
    args = ap.parse_args()
    shards = ShardSet(args.run / "shards")
    split, _ = eval_split(shards)
    texts = [r.text for r in shards.load(split)][: args.n]
    threads = torch.get_num_threads()
    rows = []
    for n_threads in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n_threads)
        _, timed = time_student(args.run / "student", shards, texts)
        rows.append((f"student, {n_threads} thread(s)", timed.speed))
    torch.set_num_threads(threads)
    teacher = time_teacher(manifest_teacher(args.run / "shards"), shards, texts, [])
    rows.append((f"teacher, {threads} thread(s)", teacher.speed))
    t = teacher.speed
    print(f"{len(texts)} inputs | p50 ms | p95 ms | examples/s batched | teacher p50 / this p50 | this / teacher throughput")
    for name, s in rows:
        print(f"{name:22s} | {s['p50_ms']:8.1f} | {s['p95_ms']:8.1f} | {s['per_s']:8.2f} | "
              f"{t['p50_ms'] / s['p50_ms']:6.1f}x | {s['per_s'] / t['per_s']:6.1f}x")


if __name__ == "__main__":
    main()
