"""The whole pipeline in one command: corpus -> shards -> student -> evaluation report.

    microdistill run                      # sample corpus, reddit-comment, default teacher, micro
    microdistill run --input my.csv --field body --task my_task.yaml --name mine

Everything lands in `runs/<name>/` (`shards/`, `student/`, `eval/`, `run.json`). Each stage is
resumable on its own and a finished stage is skipped, so re-running the same command after an
interruption continues where it stopped. The options that shape the artefacts are recorded in
`run.json`; re-running with different ones in the same folder is refused instead of mixing two
runs' state.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from microdistill.core.options import Options
from microdistill.core.console import say
from microdistill.core.errors import UserError
from microdistill.evaluate.evaluation import EvalConfig
from microdistill.extract import ExtractConfig, extract
from microdistill.core.files import atomic_write_json
from microdistill.flows.eval import make_report
from microdistill.train import TrainConfig, train_once

SAMPLE_LABELS = {"tone": "tone", "sentiment": "sentiment", "toxicity": "toxicity"}


class RunError(UserError):
    """A run folder or argument that cannot be used; one line for the user."""


def sample_corpus() -> Path:
    """The comments shipped with the package (written for it; see microdistill/data/README.md)."""
    return Path(str(resources.files("microdistill").joinpath("data/sample_comments.jsonl")))


@dataclass(frozen=True)
class RunConfig(Options):
    """A run: where it lives, what it reads, and each stage's options.

    The run's own defaults differ from the stages' where a whole run is better served: the
    teacher in bfloat16 where that is fast and answers as float32 does (extract --dtype auto),
    the student kind that fits the task (heads for all-enum tasks), 20 epochs with dropout 0.1
    (BENCHMARKS.md)."""

    name: str = "default"
    root: str = "runs"
    input: str | None = None  # None: the packaged sample corpus with its human labels
    extract: ExtractConfig = field(default_factory=lambda: ExtractConfig(dtype="auto"))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(student="auto", epochs=20, dropout=0.1))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(teacher=None))

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.name

    def identity(self) -> dict[str, Any]:
        """What decides the artefacts (not where they live, nor how the report times the teacher)."""
        return {"input": self.input, "extract": self.extract.to_dict(), "train": self.train.to_dict()}


# The flat run.json "config" of folders written before the stages had configs of their own.
FLAT_EXTRACT = ("field", "labels", "task", "teacher", "limit", "batch_size", "vocab_size", "calibration", "hidden_layer")
FLAT_TRAIN = ("preset", "epochs", "dropout", "hidden_weight", "max_steps", "seed")


# What folders written before these options existed were made with.
LEGACY_EXTRACT = {"dtype": "float32"}
LEGACY_TRAIN = {"student": "decoder"}


def saved_identity(saved: dict[str, Any]) -> dict[str, Any]:
    """A run.json "config" read as RunConfig.identity(); the flat form of older folders is
    converted, and options newer than the folder read as what it was made with (LEGACY_*),
    else as the run's defaults."""
    if "extract" not in saved:
        saved = {"input": saved.get("input"),
                 "extract": {k: saved[k] for k in FLAT_EXTRACT if k in saved},
                 "train": {**saved.get("extra_train", {}), **{k: saved[k] for k in FLAT_TRAIN if k in saved}}}
    defaults = RunConfig()
    return {"input": saved.get("input"),
            "extract": ExtractConfig.from_dict({**defaults.extract.to_dict(), **LEGACY_EXTRACT,
                                                **saved["extract"]}).to_dict(),
            "train": TrainConfig.from_dict({**defaults.train.to_dict(), **LEGACY_TRAIN, **saved["train"]}).to_dict()}


def _flat(identity: dict[str, Any]) -> dict[str, Any]:
    """{"input": ..., "extract.limit": ..., "train.epochs": ...}: one key per option."""
    return {"input": identity["input"],
            **{f"{stage}.{k}": v for stage in ("extract", "train") for k, v in identity[stage].items()}}


def _stage(state: dict, name: str, folder: Path, fn: Callable[[], Any], path: Path) -> None:
    stages = state.setdefault("stages", {})
    if stages.get(name, {}).get("done"):
        say(f"[{name}] done already ({stages[name]['wall_s']:.1f} s) -> {folder}")
        return
    say(f"[{name}] -> {folder}")
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0 + stages.get(name, {}).get("wall_s", 0.0)
    stages[name] = {"wall_s": round(wall, 2), "done": True}
    atomic_write_json(path, state)
    say(f"[{name}] finished in {wall:.1f} s")


def run(cfg: RunConfig) -> Path:
    folder = cfg.folder
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.json"
    state = json.loads(path.read_text()) if path.exists() else {}
    if state:
        saved = saved_identity(state.get("config", {}))
        old, new = _flat(saved), _flat(cfg.identity())
        changed = sorted(k for k, v in new.items() if old.get(k) != v)
        if changed:
            raise RunError(f"{folder} holds a run with other arguments ({', '.join(changed)}); use --name to start another")
    if cfg.input is not None and not Path(cfg.input).exists():
        raise RunError(f"input {cfg.input}: not found")
    state["config"] = cfg.identity()
    atomic_write_json(path, state)

    corpus = Path(cfg.input) if cfg.input else sample_corpus()
    ecfg = cfg.extract
    if ecfg.labels is None and cfg.input is None:
        ecfg = ExtractConfig.from_dict({**ecfg.to_dict(), "labels": SAMPLE_LABELS})
    shards, student, report = folder / "shards", folder / "student", folder / "eval"
    t0 = time.perf_counter()
    _stage(state, "extract", shards, lambda: extract(corpus, shards, ecfg), path)
    _stage(state, "train", student, lambda: train_once(shards, student, cfg.train), path)
    _stage(state, "eval", report, lambda: make_report(student, shards, report, cfg.eval), path)
    say(f"run {cfg.name}: {time.perf_counter() - t0:.1f} s this invocation; "
        + ", ".join(f"{k} {v['wall_s']:.1f} s" for k, v in state["stages"].items()))
    say(f"report: {report / 'report.md'}")
    return folder
