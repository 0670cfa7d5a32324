"""The whole pipeline in one command: corpus -> shards -> student -> evaluation report.

    microdistill run                      # sample comments, reddit-comment, default teacher, heads student
    microdistill run --task agent-tool    # its packaged requests, a decoder student (a string field)
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
from pathlib import Path
from typing import Any, Callable

from microdistill.core.console import say
from microdistill.core.errors import UserError
from microdistill.extract import ExtractConfig, extract
from microdistill.core.files import atomic_write_json
from microdistill.core.task import load_task
from microdistill.data.samples import SAMPLES
from microdistill.students import KINDS, kind_for
from microdistill.flows.config import RunConfig, SynthesizeConfig, saved_identity
from microdistill.flows.synthesize import synthesize
from microdistill.flows.eval import make_report
from microdistill.train import train_once

class RunError(UserError):
    """A run folder or argument that cannot be used; one line for the user."""


def _flat(identity: dict[str, Any]) -> dict[str, Any]:
    """{"input": ..., "extract.limit": ..., "train.epochs": ...}: one key per option."""
    return {"input": identity["input"], "synthesize": identity["synthesize"],
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


def _corpus(cfg: RunConfig) -> tuple[Path, ExtractConfig]:
    """--input, or the task preset's packaged corpus (with its human labels, unless --label names others)."""
    if cfg.input is not None:
        return Path(cfg.input), cfg.extract
    if cfg.synthesize is not None:
        return cfg.folder / "inputs.jsonl", cfg.extract
    if cfg.extract.task not in SAMPLES:
        raise RunError(f"task {cfg.extract.task!r} has no packaged sample corpus (the presets with one: "
                       f"{', '.join(SAMPLES)}); give --input, or --synthesize N to have the teacher write N inputs "
                       "first")
    path, labels = SAMPLES[cfg.extract.task]
    if cfg.extract.labels is None and labels:
        return path, ExtractConfig.from_dict({**cfg.extract.to_dict(), "labels": labels})
    return path, cfg.extract


def run(cfg: RunConfig) -> Path:
    corpus, ecfg = _corpus(cfg)
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

    if "input_embeddings" in KINDS[kind_for(cfg.train.student, load_task(ecfg.task))].reads:
        ecfg = ExtractConfig.from_dict({**ecfg.to_dict(), "embeddings": True})  # while the teacher is loaded anyway
    shards, student, report = folder / "shards", folder / "student", folder / "eval"
    t0 = time.perf_counter()
    if cfg.synthesize is not None:
        write = SynthesizeConfig(task=ecfg.task, teacher=ecfg.teacher, teacher_url=ecfg.teacher_url, n=cfg.synthesize)
        _stage(state, "synthesize", corpus, lambda: synthesize(write, corpus), path)
    _stage(state, "extract", shards, lambda: extract(corpus, shards, ecfg), path)
    _stage(state, "train", student, lambda: train_once(shards, student, cfg.train), path)
    _stage(state, "eval", report, lambda: make_report(student, shards, report, cfg.eval), path)
    say(f"run {cfg.name}: {time.perf_counter() - t0:.1f} s this invocation; "
        + ", ".join(f"{k} {v['wall_s']:.1f} s" for k, v in state["stages"].items()))
    say(f"report: {report / 'report.md'}")
    return folder
