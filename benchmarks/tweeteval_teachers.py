"""Two embedded teachers on real tweets with human labels: agreement per field, speed, float32 vs bfloat16.

    python benchmarks/tweeteval_teachers.py --n 100
    python benchmarks/tweeteval_teachers.py --teachers qwen2.5-coder-0.5b-instruct --dtypes float32

The first N TweetEval tweets that pass the reddit-comment filters (benchmarks/tweeteval_corpus.py:
offensive -> toxicity, sentiment -> sentiment, alternating) are labelled by each teacher in each
dtype through the real extraction, each into its own shard folder (32 calibration inputs, no
hidden states). Prints, per teacher and dtype: agreement with the human labels per field (with
how many tweets carry that label), the share of inputs where every field is sure (decision
point >= 0.8), labelling examples/s (the manifest's, without loading or calibrating), and how
many answers bfloat16 gives as float32 does.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from microdistill.extract import ExtractConfig, extract
from microdistill.data.shards import ShardSet

sys.path.insert(0, str(Path(__file__).parent))
from tweeteval_corpus import OFFENSIVE, ROOT, SENTIMENT, rows  # noqa: E402

FIELDS = ("toxicity", "sentiment")


def corpus(path: Path, root: Path) -> None:
    offensive = list(rows(root / "offensive", "val", "toxicity", OFFENSIVE))
    sentiment = list(rows(root / "sentiment", "val", "sentiment", SENTIMENT))
    mixed = [r for pair in zip(offensive, sentiment) for r in pair]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in mixed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--teachers", default="qwen2.5-coder-0.5b-instruct,qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--root", type=Path, default=ROOT)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tweets.jsonl"
        corpus(path, args.root)
        print(f"{'teacher':30s} {'dtype':9s} {'toxicity':>14s} {'sentiment':>14s} {'all sure':>9s} "
              f"{'ex/s':>6s} {'same as f32':>12s}", flush=True)
        for teacher in args.teachers.split(","):
            answers: dict[str, dict[str, str]] = {}
            for dtype in args.dtypes.split(","):
                cfg = ExtractConfig(teacher=teacher, dtype=dtype, limit=args.n, calibration=32, hidden_layer="none",
                                    labels={f: f for f in FIELDS})
                shards = ShardSet(extract(path, Path(tmp) / f"{teacher}-{dtype}", cfg, progress=False))
                records = list(shards.records())
                cells = []
                for f in FIELDS:
                    labelled = [r for r in records if (r.labels or {}).get(f) is not None]
                    right = sum(r.fields[f] == r.labels[f] for r in labelled)
                    cells.append(f"{right / max(len(labelled), 1):6.1%} of {len(labelled):3d}")
                sure = sum(all(p.max() >= 0.8 for p in r.decisions.values()) for r in records) / len(records)
                answers[dtype] = {r.id: r.output_text for r in records}
                first = answers[args.dtypes.split(",")[0]]
                same = sum(answers[dtype].get(k) == v for k, v in first.items())
                print(f"{teacher:30s} {dtype:9s} {cells[0]:>14s} {cells[1]:>14s} {sure:9.1%} "
                      f"{shards.manifest['timings']['examples_per_s']:6.2f} {same:>5d}/{len(first):<6d}", flush=True)


if __name__ == "__main__":
    main()
