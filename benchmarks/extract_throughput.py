"""Extraction throughput with the real default teacher: batch 16 vs batch 1 on the same inputs.

    python benchmarks/extract_throughput.py                    # 32 sample comments
    python benchmarks/extract_throughput.py --n 16 --ablate-drafts

Each configuration decodes the same inputs into its own shard folder through the extraction
loop (`extract.decode_into`: prompt-cached constrained decoding, decision points, checked
records, shard writes), with one kept vocabulary calibrated beforehand, so only the decoding
strategy differs. Prints examples/s per configuration and the ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from microdistill.core.grammar import Grammar
from microdistill.data.corpus import filter_inputs, read_corpus
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
    args = ap.parse_args()

    task = load_task(args.task)
    t0 = time.perf_counter()
    teacher = load_teacher(args.teacher)
    print(f"teacher {teacher.name} loaded in {time.perf_counter() - t0:.1f} s")
    items, _ = filter_inputs(read_corpus(sample_corpus()), task, teacher.tokenizer)
    items = items[: args.n]
    t0 = time.perf_counter()
    vocab = build_vocab(teacher, task, items, 512, calibrate(teacher, task, items[:16], args.batch, False), False)
    print(f"calibrated on 16 inputs in {time.perf_counter() - t0:.1f} s, coverage {vocab['coverage']:.4f}")
    grammar = Grammar(task, teacher.tokenizer, teacher.vocab_size, teacher.eos_id, allowed=vocab["kept"])
    header = {"task": task.model_dump(mode="json"), "task_fingerprint": task.fingerprint(),
              "teacher": teacher.describe(), "signal": "logits", "vocab": vocab}

    configs = [(f"batch {args.batch}", args.batch, True), ("batch 1", 1, True)]
    if args.ablate_drafts:
        configs.append((f"batch {args.batch}, no drafts", args.batch, False))
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, batch, drafts) in enumerate(configs):
            writer = ShardWriter(Path(tmp) / str(i), header)
            decoder = Decoder(teacher, task, grammar, keep_ids=vocab["kept"], use_drafts=drafts)
            stats = decode_into(writer, decoder, task, items, batch, progress=False)
            writer.close()
            rates[name] = stats["written"] / stats["seconds"]
            print(f"{name:24s} {stats['written']:4d} examples in {stats['seconds']:7.1f} s: "
                  f"{rates[name]:.3f} examples/s, {stats['tokens'] / stats['seconds']:.1f} answer tokens/s", flush=True)
    base = rates[configs[0][0]]
    for name, _, _ in configs[1:]:
        print(f"{configs[0][0]} vs {name}: {base / rates[name]:.2f}x")


if __name__ == "__main__":
    main()
