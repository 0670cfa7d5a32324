"""Two run folders made by two versions of the code: are the shards, the student and the report the same?

    python benchmarks/same_run.py runs/before/default runs/after/default

For a change that must not move any number (a refactor): every shard record bit for bit
(inputs, answers, logits, log-sum-exp, decision points, hidden states), the manifest without its
timings, the student's weights (sha256) and its metrics.jsonl without the step times, and every
number of report.json except the measured times, sizes in memory and the folder paths. It also
loads the first folder's student and shards with the code that runs this script, so a folder
written by the older version is shown to still load and answer as it did. Prints one line per
check and exits 1 when any differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from microdistill.data.shards import ShardSet
from microdistill.students import load_student

# measured, not computed: they differ between any two runs of the same code
VOLATILE = {"timings", "wall_s", "train_s", "ms", "p50_ms", "p95_ms", "per_s", "speed", "memory", "fit_s",
            "predict_ms_per_input", "path", "corpus", "tokens_per_s", "examples_per_s", "extract_s", "calibrate_s",
            "plots", "plot", "dir", "student_rss_bytes", "teacher_rss_bytes", "created"}


def scrub(x):
    """`x` without the measured or path-like entries, at any depth."""
    if isinstance(x, dict):
        return {k: scrub(v) for k, v in x.items() if k not in VOLATILE}
    if isinstance(x, list):
        return [scrub(v) for v in x]
    return x


def first_difference(a, b, where: str = "") -> str | None:
    if type(a) is not type(b):
        return f"{where}: {a!r} vs {b!r}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}.{k}: only in {'the second' if k in b else 'the first'}"
            d = first_difference(a[k], b[k], f"{where}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} vs {len(b)} items"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := first_difference(x, y, f"{where}[{i}]"))), None)
    return None if a == b else f"{where}: {a!r} vs {b!r}"


def record_bytes(r) -> bytes:
    parts = [r.text, r.output_text, json.dumps(r.fields, sort_keys=True), r.split, json.dumps(r.labels, sort_keys=True)]
    arrays = [r.input_ids, r.output_ids, r.logits, r.lse, r.hidden, *(r.decisions[k] for k in sorted(r.decisions or {}))]
    return "\x00".join(parts).encode() + b"".join(a.tobytes() for a in arrays if a is not None)


def without_file_hashes(manifest: dict) -> dict:
    """The manifest without each shard file's sha256: safetensors writes a file's metadata map in the
    order of a hash map seeded per process, so two files of identical records can differ in bytes."""
    return {**manifest, "shards": [{k: v for k, v in s.items() if k != "sha256"} for s in manifest["shards"]]}


def same_shards(a: Path, b: Path) -> str | None:
    sa, sb = ShardSet(a), ShardSet(b)
    ra, rb = {r.id: record_bytes(r) for r in sa.records()}, {r.id: record_bytes(r) for r in sb.records()}
    if ra.keys() != rb.keys():
        return f"{len(ra)} vs {len(rb)} examples, {len(ra.keys() ^ rb.keys())} not in both"
    differ = [k for k in ra if ra[k] != rb[k]]
    if differ:
        return f"{len(differ)} of {len(ra)} records differ (first: {differ[0]})"
    return first_difference(scrub(without_file_hashes(sa.manifest)), scrub(without_file_hashes(sb.manifest)), "manifest")


def same_student(a: Path, b: Path) -> str | None:
    digest = [hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() for d in (a, b)]
    if digest[0] != digest[1]:
        return "model.safetensors differs"
    rows = [[scrub(json.loads(line)) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    return first_difference(rows[0], rows[1], "metrics.jsonl")


def same_report(a: Path, b: Path) -> str | None:
    ra, rb = (scrub(json.loads((d / "report.json").read_text())) for d in (a, b))
    ra["notes"] = rb["notes"] = None  # sentences, not numbers (a note may name a teacher another way)
    return first_difference(ra, rb, "report")


def still_loads(run: Path) -> str | None:
    """The first run's student, loaded by this code, answers its held-out inputs as its report says."""
    shards = ShardSet(run / "shards")
    records = list(shards.records("val"))
    student = load_student(run / "student")
    answers = student.predict([r.text for r in records])
    exact = sum(x["fields"] == r.fields for x, r in zip(answers, records)) / len(records)
    reported = json.loads((run / "eval" / "report.json").read_text())["student_only_exact"]
    return None if abs(exact - reported) < 1e-12 else f"exact match {exact:.4%} here, {reported:.4%} in its report"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first", type=Path)
    ap.add_argument("second", type=Path)
    args = ap.parse_args()
    checks = {"shards": lambda: same_shards(args.first / "shards", args.second / "shards"),
              "student": lambda: same_student(args.first / "student", args.second / "student"),
              "report": lambda: same_report(args.first / "eval", args.second / "eval"),
              "the first run's student loads and answers here": lambda: still_loads(args.first)}
    failed = False
    for name, check in checks.items():
        problem = check()
        failed |= problem is not None
        print(f"{name}: {'same' if problem is None else 'DIFFERENT: ' + problem}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
