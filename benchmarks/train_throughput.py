"""Training throughput of each student preset, measured side by side in one run.

    python benchmarks/train_throughput.py [--steps 8] [--batch-size 32] [--threads N]

Each preset runs the real training step (students.data.collate, then train.train_step: the
schedule, forward, loss, backward, clipping and AdamW) on random examples shaped like the reddit-comment task with a real teacher's
vocabulary: 512 kept output classes, 5,000 input rows, inputs of 8-25 tokens, outputs of 18
tokens, float16 teacher logits. Two warm-up steps are not timed. Tokens are the positions
through the model (BOS, input, SEP, outputs), as training.json counts them.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from microdistill.students.decoder.data import Example, collate
from microdistill.students.decoder.config import N_SPECIAL, config_for
from microdistill.students.decoder.model import Student
from microdistill.students.kind import count_parameters
from microdistill.train import TrainConfig, train_step
from microdistill.train.setup import make_optimizer

KEPT, INPUT_ROWS, OUT_LEN, MAX_IN, MAX_OUT = 512, 5000, 18, 25, 50


def examples(n: int, rng: np.random.Generator) -> list[Example]:
    out = []
    for _ in range(n):
        inp = rng.integers(N_SPECIAL, INPUT_ROWS, size=int(rng.integers(8, MAX_IN + 1))).tolist()
        target = rng.integers(0, KEPT, size=OUT_LEN).tolist()
        logits = rng.normal(size=(OUT_LEN, KEPT)).astype(np.float16)
        out.append(Example(inp, target, logits, np.full(OUT_LEN, 8.0, dtype=np.float32)))
    return out


def measure(preset: str, steps: int, batch_size: int, rng: np.random.Generator) -> dict:
    torch.manual_seed(0)
    model = Student(config_for(preset, INPUT_ROWS, KEPT, MAX_IN, MAX_OUT)).train()
    cfg = TrainConfig(preset=preset, batch_size=batch_size)
    opt = make_optimizer(model, cfg)
    batches = [collate(examples(batch_size, rng), KEPT) for _ in range(steps + 2)]
    tokens, elapsed = 0, 0.0
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        train_step(model, opt, b, cfg, step=i, total=len(batches), use_logits=True)
        if i >= 2:
            elapsed += time.perf_counter() - t0
            tokens += b.n_tokens
    return {"preset": preset, "params": count_parameters(model), "ms_per_step": 1e3 * elapsed / steps,
            "tokens_per_s": tokens / elapsed, "examples_per_s": steps * batch_size / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--presets", default="nano,micro,small")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = [measure(p, args.steps, args.batch_size, rng) for p in args.presets.split(",")]
    print(f"batch {args.batch_size}, {args.steps} timed steps, {torch.get_num_threads()} thread(s)")
    print(f"{'preset':8s} {'params':>9s} {'ms/step':>9s} {'tokens/s':>10s} {'examples/s':>11s} {'vs nano':>8s}")
    base = rows[0]["tokens_per_s"]
    for r in rows:
        print(f"{r['preset']:8s} {r['params'] / 1e6:8.2f}M {r['ms_per_step']:9.1f} {r['tokens_per_s']:10.0f} "
              f"{r['examples_per_s']:11.1f} {r['tokens_per_s'] / base:7.2f}x")


if __name__ == "__main__":
    main()
