"""What a run measured, read from its own files: where they are, how long its stages took,
tokens per teacher call, and the throughput of extraction and training.

    microdistill cost runs/demo   # reads runs/demo/run.json, shards/, student/ and eval/report.json

The cost model (cost.py) prices these figures; nothing here assumes a price. A file or key
that is missing or not a positive number is a one-line CostError naming the file and the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microdistill.core.errors import UserError
from microdistill.core.files import read_json as _read_json

TOKEN_SAMPLE = 200  # examples whose prompts are tokenised to measure tokens per call


class CostError(UserError):
    """A price, rate or run log that cannot be used; the message is one line for the user."""


def read_json(path: Path, what: str) -> dict:
    data = _read_json(path, what, CostError)
    if not isinstance(data, dict):
        raise CostError(f"{path}: expected a JSON object ({what})")
    return data


def need(data: dict, key: str, path: Path) -> float:
    """The positive number at dotted `key` of `data` (read from `path`), or a one-line error."""
    v: Any = data
    for part in key.split("."):
        if not isinstance(v, dict) or part not in v:
            raise CostError(f"{path}: missing key '{key}'")
        v = v[part]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise CostError(f"{path}: '{key}' must be a positive number, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class RunFiles:
    """Where the artefacts are: a run folder's, or explicit paths (which win)."""

    shards: Path | None = None
    student: Path | None = None
    report: Path | None = None
    run_json: Path | None = None

    @classmethod
    def resolve(cls, run: Path | None = None, shards: Path | None = None, student: Path | None = None,
                report: Path | None = None) -> "RunFiles":
        run_json = None
        if run is not None:
            run = Path(run)
            if not run.is_dir():
                raise CostError(f"run folder {run}: not found")
            run_json = run / "run.json"
            if not run_json.is_file():
                raise CostError(f"run folder {run}: no run.json (not a microdistill run folder)")
            shards = shards or run / "shards"
            student = student or run / "student"
            if report is None and (run / "eval" / "report.json").is_file():
                report = run / "eval" / "report.json"
        if report is not None and Path(report).is_dir():
            report = Path(report) / "report.json"
        return cls(shards=shards and Path(shards), student=student and Path(student), report=report, run_json=run_json)

    def manifest(self) -> tuple[dict, Path]:
        if self.shards is None:
            raise CostError("no shard folder: pass a run folder or --shards")
        path = self.shards / "manifest.json"
        return read_json(path, "the shard folder's manifest"), path

    def training(self) -> tuple[dict, Path]:
        if self.student is None:
            raise CostError("no student folder: pass a run folder or --student")
        path = self.student / "training.json"
        return read_json(path, "the student's training log"), path

    def speed(self) -> tuple[dict, Path] | None:
        if self.report is None:
            return None
        path = Path(self.report)
        data = read_json(path, "the evaluation report")
        if "speed" not in data:
            raise CostError(f"{path}: missing key 'speed'")
        return data["speed"], path

    def stage_seconds(self) -> tuple[float, float, str]:
        """(extraction s, training s, where they were read) of a finished run: the run log's
        stage times when it has them, else the shard manifest's and the training log's own."""
        run = read_json(self.run_json, "the run log") if self.run_json else {}
        if run.get("stages", {}).get("extract", {}).get("wall_s") is not None:
            return (need(run, "stages.extract.wall_s", self.run_json), need(run, "stages.train.wall_s", self.run_json),
                    f"run log {self.run_json}")
        manifest, mpath = self.manifest()
        training, tpath = self.training()
        calibrate_s = manifest.get("timings", {}).get("calibrate_s") or 0.0
        return (need(manifest, "timings.extract_s", mpath) + float(calibrate_s), need(training, "wall_s", tpath),
                "shard manifest and training log")


# ---- tokens per call -------------------------------------------------------------------------
def measure_call_tokens(shards: Path, sample: int = TOKEN_SAMPLE) -> tuple[float, float]:
    """Mean (prompt, output) teacher tokens per call over the first `sample` shard examples.

    Prompt tokens are the chat-templated task messages (system, few-shot, the input), as an
    API would bill them; output tokens are what the teacher generated, end token included.
    An API model's own tokenizer may count a little differently.
    """
    from microdistill.data.shards import ShardSet, StoreError

    try:
        shard_set = ShardSet(shards)
        task, tok = shard_set.task(), shard_set.tokenizer()
    except StoreError as e:
        raise CostError(f"{e}; pass --input-tokens and --output-tokens instead") from None
    n_in = n_out = n = 0
    for r in shard_set.records():
        prompt = tok.apply_chat_template(task.messages(r.text), tokenize=False, add_generation_prompt=True)
        n_in += len(tok(prompt, add_special_tokens=False)["input_ids"])
        n_out += len(r.output_ids)
        n += 1
        if n >= sample:
            break
    if n == 0:
        raise CostError(f"shard folder {shards}: no examples to measure tokens per call")
    return n_in / n, n_out / n


def api_call_tokens(shards: Path) -> tuple[float, float] | None:
    """Mean (prompt, output) tokens per call as an API teacher's server counted and billed them
    (the shard manifest's `api_usage`, extract/served.py), or None for a local teacher's shards."""
    path = Path(shards) / "manifest.json"
    usage = read_json(path, "the shard folder's manifest").get("api_usage") if path.is_file() else None
    if not usage or not usage.get("calls"):
        return None
    return float(usage["prompt_tokens_per_call"]), float(usage["completion_tokens_per_call"])


# ---- throughput: what scales with the corpus ----------------------------------------------------
@dataclass(frozen=True)
class Throughput:
    """Measured speeds that scale with corpus size."""

    extract_examples_per_s: float  # teacher-labelled examples per second
    train_examples_per_s: float  # training examples x epochs per second
    epochs: float  # epochs of the measured training

    def __post_init__(self) -> None:
        for name in ("extract_examples_per_s", "train_examples_per_s", "epochs"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise CostError(f"throughput {name} must be a positive number, got {v}")


def example_epochs(training: dict, tpath: Path, manifest: dict, mpath: Path) -> float:
    """Training examples processed, repeats counted: full epochs plus a partial last one.

    A run cut short by a step budget still logs its last epoch as a whole one, so the steps
    and batch size (when logged) say how far it really got.
    """
    # Training may have used a subset of the train split (limit_train); its log says so.
    n = need(training, "examples", tpath) if "examples" in training else need(manifest, "counts.train", mpath)
    batch, steps = training.get("config", {}).get("batch_size"), training.get("steps")
    if batch and steps:
        full, rest = divmod(int(steps), math.ceil(n / batch))
        return full * n + min(rest * batch, n)
    return n * need(training, "epochs", tpath)


def throughput_from_logs(shards: Path, student: Path) -> Throughput:
    """Steady-state throughput of a finished extraction and training, from their own logs.

    Extraction: the manifest's examples/s (no model loading or calibration). Training: the
    optimiser steps' own time (`train_s`; `wall_s` when absent), so the held-out evaluation
    after each epoch, which a short measurement over-weights, is left out.
    """
    files = RunFiles(shards=Path(shards), student=Path(student))
    manifest, mpath = files.manifest()
    training, tpath = files.training()
    extract_per_s = need(manifest, "timings.examples_per_s", mpath)
    seconds = need(training, "train_s" if "train_s" in training else "wall_s", tpath)
    # The configured epochs, not the logged count: a step-budget measurement runs part of one.
    epochs = training.get("config", {}).get("epochs") or need(training, "epochs", tpath)
    return Throughput(extract_per_s, example_epochs(training, tpath, manifest, mpath) / seconds, float(epochs))
