"""Turn the TweetEval subset beside the checkout into one JSONL corpus with human labels.

    python benchmarks/tweeteval_corpus.py --out runs/tweeteval.jsonl

Lines: {"text", "toxicity", "sentiment"}: toxicity from `offensive` (offensive -> toxic,
not-offensive -> respectful), sentiment from `sentiment`; the other label is null. The
reddit-comment task's own filters (3-25 tokens, no URLs, `@user` stripped) then choose the
short tweets at extraction time. The two sources alternate, so a `--limit` keeps both labels.
Usage with the CLI: `--label toxicity=toxicity --label sentiment=sentiment`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tweeteval"
OFFENSIVE = {"0": "respectful", "1": "toxic"}
SENTIMENT = {"0": "negative", "1": "neutral", "2": "positive"}


def rows(folder: Path, split: str, field: str, mapping: dict[str, str]):
    texts = (folder / f"{split}_text.txt").read_text(encoding="utf-8").splitlines()
    labels = (folder / f"{split}_labels.txt").read_text(encoding="utf-8").split()
    for text, label in zip(texts, labels, strict=True):
        # both label keys on every line (null where this source has none): a corpus reader
        # treats a missing column as an error, a null as "no label for this input"
        yield {"text": text.strip(), "toxicity": None, "sentiment": None, field: mapping[label]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--root", type=Path, default=ROOT)
    args = ap.parse_args()
    offensive = [r for split in ("train", "val") for r in rows(args.root / "offensive", split, "toxicity", OFFENSIVE)]
    sentiment = list(rows(args.root / "sentiment", "val", "sentiment", SENTIMENT))
    # Alternate the two sources while both last, so that any --limit keeps both kinds of label.
    out = [r for pair in zip(offensive, sentiment) for r in pair]
    out += offensive[len(sentiment):] + sentiment[len(offensive):]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for r in out:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{len(out)} tweets -> {args.out}")


if __name__ == "__main__":
    main()
