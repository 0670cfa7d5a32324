"""Do student and export folders written by one version of the code answer alike under another?

    PYTHONPATH=OLD_CHECKOUT python benchmarks/folders_answer_alike.py --record answers.json --texts T.jsonl DIR...
    python benchmarks/folders_answer_alike.py --check answers.json

`--record` (run with the older code first on the path) answers the texts of a JSONL file
(its "text" field, the first --n lines, plus two untidy ones) with every folder given: student
folders (any kind) and export folders. `--check` loads the same folders with the code that runs
it and prints, per folder, whether every answer (output, fields, confidences) is the same. It
reads the folders through each version's public loaders, so the older version may be any that
had `students.saved.load_student` and `predict.predict` or `students.load_student`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def answer(folder: Path, texts: list[str]) -> list[dict]:
    if (folder / "export.json").is_file():
        from microdistill.runtime import load_exported

        return load_exported(folder).predict(texts)
    try:
        from microdistill.students import load_student
    except ImportError:  # the version before student kinds had a registry
        from microdistill.predict import predict
        from microdistill.students.saved import load_student

        return predict(load_student(folder), texts)
    return load_student(folder).predict(texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", type=Path, nargs="*")
    ap.add_argument("--record", type=Path)
    ap.add_argument("--check", type=Path)
    ap.add_argument("--texts", type=Path)
    ap.add_argument("--n", type=int, default=40)
    args = ap.parse_args()
    if args.record:
        texts = [json.loads(line)["text"] for line in args.texts.read_text().splitlines()[: args.n]]
        texts += ["  you   are\tan IDIOT  ", "thanks!"]
        answers = {str(f): answer(f, texts) for f in args.folders}
        args.record.write_text(json.dumps({"texts": texts, "answers": answers}))
        print(f"{len(texts)} answers of {len(answers)} folders -> {args.record}")
        return
    recorded = json.loads(args.check.read_text())
    differ = 0
    for folder, old in recorded["answers"].items():
        new = answer(Path(folder), recorded["texts"])
        same = sum(a == b for a, b in zip(old, new))
        differ += same != len(old)
        print(f"{folder}: {same}/{len(old)} answers the same")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
