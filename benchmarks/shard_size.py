"""Shard size: bytes per example in shards vs the same examples as JSON lines of raw logits.

    python benchmarks/shard_size.py --shards runs/default/shards    # an existing shard folder
    python benchmarks/shard_size.py                                # extracts 32 sample comments first

The JSON baseline is the seed's format: one JSON object per line with the text, the answer,
its token ids and the teacher's raw logits at the kept ids per step, as lists of Python floats
(`json.dumps`). Shards hold float16 logits, so the teacher's float32 logits are recomputed with
one plain forward pass per example (teacher forcing on its own answer); the JSON of the float16
values, upcast, is printed too as a lower bound.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from microdistill.data.shards import ShardSet
from microdistill.teachers import DEFAULT_TEACHER, load_teacher
from microdistill.teachers.hf import HFTeacher


def json_line(r, logits: np.ndarray) -> str:
    return json.dumps({"text": r.text, "output": r.output_text, "input_ids": r.input_ids.tolist(),
                       "output_ids": r.output_ids.tolist(), "logits": [[float(x) for x in row] for row in logits]})


@torch.inference_mode()
def float32_logits(teacher: HFTeacher, task, r, kept: np.ndarray) -> np.ndarray:
    """The teacher's float32 logits at the kept ids for each answer step: [n_out, K]."""
    prompt = teacher.tokenizer(teacher.prompt_text(task, r.text), add_special_tokens=False).input_ids
    ids = torch.tensor([prompt + r.output_ids[:-1].tolist()])
    logits = teacher.model(input_ids=ids, logits_to_keep=len(r.output_ids)).logits[0]
    return logits[:, torch.from_numpy(kept)].float().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=Path, help="shard folder (default: extract --n sample comments)")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--teacher", default=DEFAULT_TEACHER, help="teacher used to extract when --shards is not given")
    args = ap.parse_args()

    teacher = None
    with tempfile.TemporaryDirectory() as tmp:
        path = args.shards
        if path is None:
            from microdistill.extract import ExtractConfig, extract
            from microdistill.data.samples import sample_corpus

            teacher = load_teacher(args.teacher)
            path = extract(sample_corpus(), Path(tmp) / "shards", ExtractConfig(limit=args.n, calibration=min(args.n, 64)),
                           teacher=teacher, progress=False)
        shards = ShardSet(path, verify=True)
        records = shards.load()[: args.n]
        m = shards.manifest
        if teacher is None:
            source = m["teacher"]["source"]
            teacher = load_teacher(m["teacher"]["name"] if source.startswith("preset:") else source)
        task, kept = shards.task(), shards.kept_vocab
        shard_bytes = sum(s["bytes"] for s in m["shards"]) / len(shards)
        f16_json = np.mean([len(json_line(r, r.logits.astype(np.float32)).encode()) + 1 for r in records])
        f32_json = np.mean([len(json_line(r, float32_logits(teacher, task, r, kept)).encode()) + 1 for r in records])

    n_out = np.mean([len(r.output_ids) for r in records])
    print(f"{len(records)} examples, {n_out:.1f} answer tokens each, {len(kept)} kept logits per token")
    print(f"shards (float16 safetensors):      {shard_bytes:10,.0f} bytes/example")
    print(f"JSON lines, float32 logits (seed): {f32_json:10,.0f} bytes/example  -> {f32_json / shard_bytes:.1f}x larger")
    print(f"JSON lines, float16 values:        {f16_json:10,.0f} bytes/example  -> {f16_json / shard_bytes:.1f}x larger")


if __name__ == "__main__":
    main()
