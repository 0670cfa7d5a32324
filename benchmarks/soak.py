"""Kill extraction and training with SIGKILL at random moments; the finished folders must equal runs never killed.

    python benchmarks/soak.py --out runs/soak [--kills 20] [--limit 96] [--seed 0]

Each stage runs once straight through, then again from scratch with SIGKILL sent at a random
moment `--kills` times, each time followed by the same command (which resumes), until it
finishes. Extraction: the default teacher on the first `--limit` sample comments (batches of
8); the records of the two shard folders are compared bit for bit, and every kill's loss is
the inputs it had decoded but not yet journaled (at most one batch). Training: the heads
student on those shards with a checkpoint every 2 steps; the weights are compared bit for bit.
Writes `soak.json` and prints one line per stage.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from safetensors.numpy import load_file

from microdistill.data.samples import sample_corpus
from microdistill.data.shards import ShardSet

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "microdistill", *args]


def soak(command: list[str], kills: int, rng: random.Random, window_s: tuple[float, float], done) -> dict:
    """Run `command` again and again, SIGKILLed after a random time in `window_s` the first `kills`
    times, then to the end; returns what it took."""
    started, killed, runs = time.perf_counter(), 0, 0
    while True:
        runs += 1
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if killed < kills:
            try:
                proc.wait(timeout=rng.uniform(*window_s))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                killed += 1
                continue
        else:
            proc.wait()
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed after {killed} kills: {proc.stderr.read()[-2000:]}")
        if done():
            return {"kills": killed, "runs": runs, "wall_s": round(time.perf_counter() - started, 1)}


def same_records(a: Path, b: Path) -> bool:
    ra, rb = ({r.id: r for r in ShardSet(p).records()} for p in (a, b))
    fields = ("input_ids", "output_ids", "logits", "lse", "hidden")
    return ra.keys() == rb.keys() and all(
        all((getattr(ra[k], f) is None and getattr(rb[k], f) is None) or getattr(ra[k], f).tobytes() == getattr(rb[k], f).tobytes()
            for f in fields) and ra[k].decisions.keys() == rb[k].decisions.keys() and
        all(ra[k].decisions[d].tobytes() == rb[k].decisions[d].tobytes() for d in ra[k].decisions) for k in ra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--limit", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=40, help="training epochs: long enough for --kills kills")
    args = ap.parse_args()
    rng, out = random.Random(args.seed), args.out.resolve()
    extract = ["extract", "--input", str(sample_corpus()), "--limit", str(args.limit), "--batch-size", "8",
               "--calibration", "16", "--quiet"]
    result = {}
    subprocess.run(cli(*extract, "--out", str(out / "shards-whole")), cwd=ROOT, check=True)
    complete = lambda p: (p / "manifest.json").is_file() and ShardSet(p).manifest.get("complete")  # noqa: E731
    result["extract"] = soak(cli(*extract, "--out", str(out / "shards-killed")), args.kills, rng, (5.0, 60.0),
                             lambda: complete(out / "shards-killed"))
    result["extract"]["same"] = same_records(out / "shards-whole", out / "shards-killed")
    print(f"extract: {result['extract']}", flush=True)
    train = ["train", "--data", str(out / "shards-whole"), "--student", "heads", "--epochs", str(args.epochs),
             "--batch-size", "8", "--checkpoint-every", "2", "--quiet"]
    subprocess.run(cli(*train, "--out", str(out / "student-whole")), cwd=ROOT, check=True)
    killed = out / "student-killed"
    first = cli(*train, "--out", str(killed))
    resume = [*first, "--resume"]
    result["train"] = soak_train(first, resume, args.kills, rng, killed)
    a, b = (load_file(str(p / "model.safetensors")) for p in (out / "student-whole", killed))
    result["train"]["same"] = a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    print(f"train: {result['train']}", flush=True)
    (out / "soak.json").write_text(json.dumps(result, indent=1))


def soak_train(first: list[str], resume: list[str], kills: int, rng: random.Random, folder: Path) -> dict:
    """Training is started once, then resumed (--resume) after every kill; a kill before its first
    checkpoint starts it again from scratch."""
    started, killed, runs = time.perf_counter(), 0, 0
    while True:
        runs += 1
        command = resume if (folder / "checkpoint" / "meta.json").is_file() else first
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=rng.uniform(5.0, 20.0) if killed < kills else None)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            killed += 1
            continue
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed after {killed} kills: {proc.stderr.read()[-2000:]}")
        if (folder / "model.safetensors").is_file():
            return {"kills": killed, "runs": runs, "wall_s": round(time.perf_counter() - started, 1)}


if __name__ == "__main__":
    main()
