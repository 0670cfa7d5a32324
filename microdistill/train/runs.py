"""Training runs that other stages ask for: train unless already done, and one curve of
held-out agreement against the number of training examples (compare's efficiency curve,
cost's learning-curve pilot)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from microdistill.core.console import say
from microdistill.train.checkpoint import has_run
from microdistill.train.config import TrainConfig, TrainError
from microdistill.train.loop import train

EXACT_KEY = "val_exact_match"  # evaluate_epoch's free-running exact match on the val split


def train_once(data_dir: Path, run_dir: Path, cfg: TrainConfig, progress: bool = True) -> Path:
    """Train into run_dir unless a finished run with these options is already there; an
    interrupted run is resumed. A finished run with other options is refused."""
    done = Path(run_dir) / "training.json"
    if done.is_file():
        # Options newer than the run read as their defaults: an older run could not have used them.
        diff = cfg.differences(json.loads(done.read_text()).get("config", {}))
        if diff:
            raise TrainError(f"{run_dir}: holds a finished run with other options ({', '.join(diff)}); "
                             "delete it or choose another folder")
        return Path(run_dir)
    return train(data_dir, run_dir, cfg, resume=has_run(Path(run_dir)), progress=progress)


def held_out_exact(student: Path, key: str = EXACT_KEY) -> float:
    """The last held-out evaluation's exact match in a student's metrics.jsonl."""
    path = Path(student) / "metrics.jsonl"
    if not path.is_file():
        raise TrainError(f"{path}: not found (the student's training metrics)")
    value = None
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if key in record:
            value = record[key]
    if value is None:
        raise TrainError(f"{path}: no held-out evaluation recorded (key '{key}')")
    return float(value)


def train_sizes(data_dir: Path, cfg: TrainConfig, sizes: list[int], folder, progress: bool = True) -> list[dict]:
    """Train `cfg` on the first n training examples for each n in `sizes` (each into
    `folder(n)`, reused when finished); returns [{examples, dir}] in order of n."""
    points = []
    for n in sorted(set(sizes)):
        run_dir = Path(folder(n))
        if not (run_dir / "training.json").is_file():
            say(f"training on the first {n} examples -> {run_dir}", progress)
        train_once(data_dir, run_dir, replace(cfg, limit_train=n), progress)
        points.append({"examples": n, "dir": str(run_dir)})
    return points
