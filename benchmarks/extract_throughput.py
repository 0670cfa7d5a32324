"""Extraction throughput with the real default teacher: batch 16 vs batch 1 on the same inputs.

    python benchmarks/extract_throughput.py                    # 32 sample comments
    python benchmarks/extract_throughput.py --n 16 --ablate-drafts
    python benchmarks/extract_throughput.py --task agent-tool --input requests.jsonl --draft runs/agent/student

Each configuration decodes the same inputs into its own shard folder through the extraction
loop (`extract.decode_into`: prompt-cached constrained decoding, decision points, checked
records, shard writes), with one kept vocabulary calibrated beforehand, so only the decoding
strategy differs. `--draft STUDENT` adds each batch size with the student proposing
`--draft-tokens` tokens per step (extract --draft). Prints examples/s and teacher passes per
configuration, the draft's acceptance, the ratios, and whether every configuration wrote the
first one's answers (and by how much its stored logits differ).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from microdistill.core.grammar import Grammar
from microdistill.data.corpus import filter_inputs, read_corpus
from microdistill.data.shards import ShardSet
from microdistill.students.decoder.draft import load_draft
from microdistill.extract.prepare import build_vocab, calibrate
from microdistill.extract.local import decode_into
from microdistill.teachers.decoding import Decoder
from microdistill.data.samples import sample_corpus
from microdistill.data.shards import ShardWriter
from microdistill.core.task import load_task
from microdistill.teachers import DEFAULT_TEACHER, load_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="inputs decoded per configuration")
    ap.add_argument("--teacher", default=DEFAULT_TEACHER)
    ap.add_argument("--task", default="reddit-comment")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ablate-drafts", action="store_true", help="also decode one token per pass (no drafts)")
    ap.add_argument("--input", default=None, help="corpus (default: the packaged sample comments)")
    ap.add_argument("--skip", type=int, default=0, help="leave out the corpus' first N inputs (a student's own)")
    ap.add_argument("--draft", default=None, help="a decoder student of the task drafting for the teacher")
    ap.add_argument("--draft-tokens", type=int, default=4)
    args = ap.parse_args()

    task = load_task(args.task)
    t0 = time.perf_counter()
    teacher = load_teacher(args.teacher)
    print(f"teacher {teacher.name} loaded in {time.perf_counter() - t0:.1f} s")
    items, _ = filter_inputs(read_corpus(args.input or sample_corpus()), task, teacher.tokenizer)
    items = items[args.skip: args.skip + args.n]
    t0 = time.perf_counter()
    vocab = build_vocab(teacher, task, items, 512, calibrate(teacher, task, items[:16], args.batch, False), False)
    print(f"calibrated on 16 inputs in {time.perf_counter() - t0:.1f} s, coverage {vocab['coverage']:.4f}")
    grammar = Grammar(task, teacher.tokenizer, teacher.vocab_size, teacher.eos_id, allowed=vocab["kept"])
    header = {"task": task.model_dump(mode="json"), "task_fingerprint": task.fingerprint(),
              "teacher": teacher.describe(), "signal": "logits", "vocab": vocab}

    configs = [(f"batch {args.batch}", args.batch, True, False), ("batch 1", 1, True, False)]
    if args.ablate_drafts:
        configs.append((f"batch {args.batch}, no drafts", args.batch, False, False))
    if args.draft:
        configs += [(f"batch {args.batch}, student draft", args.batch, True, True), ("batch 1, student draft", 1, True, True)]
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, batch, drafts, student) in enumerate(configs):
            writer = ShardWriter(Path(tmp) / str(i), header)
            drafter = load_draft(args.draft, teacher, task, args.draft_tokens) if student else None
            decoder = Decoder(teacher, task, grammar, keep_ids=vocab["kept"], use_drafts=drafts, drafter=drafter)
            stats = decode_into(writer, decoder, task, items, batch, progress=False)
            writer.close()
            rates[name] = stats["written"] / stats["seconds"]
            accepted = f", draft acceptance {drafter.report()['acceptance']:.1%}" if drafter else ""
            print(f"{name:28s} {stats['written']:4d} examples in {stats['seconds']:7.1f} s: "
                  f"{rates[name]:.3f} examples/s, {stats['tokens'] / stats['seconds']:.1f} answer tokens/s, "
                  f"{decoder.passes} teacher passes{accepted}", flush=True)
        first = sorted(ShardSet(Path(tmp) / "0").records(), key=lambda r: r.id)
        for i, (name, *_) in enumerate(configs[1:], 1):
            other = sorted(ShardSet(Path(tmp) / str(i)).records(), key=lambda r: r.id)
            same = sum(a.output_text == b.output_text for a, b in zip(first, other))
            diff = max(float(np.abs(a.logits.astype(np.float32) - b.logits.astype(np.float32)).max())
                       for a, b in zip(first, other) if a.logits.shape == b.logits.shape)
            print(f"{name}: {same}/{len(first)} answers as {configs[0][0]}; stored logits differ by at most {diff:.4f}")
    base = rates[configs[0][0]]
    for name, *_ in configs[1:]:
        print(f"{configs[0][0]} vs {name}: {base / rates[name]:.2f}x")


if __name__ == "__main__":
    main()
