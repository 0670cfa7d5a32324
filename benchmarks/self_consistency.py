"""The teacher's consistency with itself on more held-out inputs than a report asks it (the ceiling).

    python benchmarks/self_consistency.py --data runs/tweets/shards --n 240 [--out runs/bench/tweets-consistency.json]

The teacher that labelled `--data`, in the dtype it labelled in, answers the first `--n` held-out
inputs again under each meaning-keeping edit of consistency.py; the share whose answer survived
every edit is the ceiling beside which a student's agreement is read.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from microdistill.evaluate.consistency import self_consistency
from microdistill.data.shards import ShardSet
from microdistill.teachers import load_teacher, recorded_spec
from microdistill.teachers.labeller import TeacherAnswers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    shards = ShardSet(args.data)
    records = list(shards.records("val"))[: args.n]
    labelled_by = shards.manifest["teacher"]
    teacher = load_teacher(recorded_spec(labelled_by))
    run = TeacherAnswers(teacher, shards.task(), labelled_by, [int(i) for i in shards.kept_vocab]).texts
    t0 = time.perf_counter()
    result = self_consistency(run, [r.text for r in records], [r.output_text for r in records])
    result |= {"data": str(args.data), "teacher": labelled_by["name"], "dtype": teacher.dtype,
               "wall_s": round(time.perf_counter() - t0, 1)}
    lo, hi = result["consistent_ci95"]
    print(f"{labelled_by['name']} ({teacher.dtype}) on {result['n']} held-out inputs of {args.data}: answer unchanged "
          f"under every edit on {result['consistent']:.1%} (95% Wilson {lo:.1%}–{hi:.1%}); per edit: "
          + ", ".join(f"{k} changed {v['changed']:.1%} of {v['n']}" for k, v in result["edits"].items() if v["n"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
