"""The whole pipeline in one command: corpus -> shards -> student -> evaluation report.

    microdistill run                      # sample corpus, reddit-comment, default teacher, micro
    microdistill run --input my.csv --field body --task my_task.yaml --name mine

Everything lands in `runs/<name>/` (`shards/`, `student/`, `eval/`, `run.json`). Each stage is
resumable on its own and a finished stage is skipped, so re-running the same command after an
interruption continues where it stopped. The arguments that shape the artefacts are recorded
in `run.json`; re-running with different ones in the same folder is refused instead of mixing
two runs' state.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from dataclasses import field as dc_field
from importlib import resources
from pathlib import Path

from microdistill.store import atomic_write_json

SAMPLE_LABELS = {"tone": "tone", "sentiment": "sentiment", "toxicity": "toxicity"}


class RunError(ValueError):
    """A run folder or argument that cannot be used; one line for the user."""


def sample_corpus() -> Path:
    """The comments shipped with the package (written for it; see microdistill/data/README.md)."""
    return Path(str(resources.files("microdistill").joinpath("data/sample_comments.jsonl")))


@dataclass
class RunConfig:
    name: str = "default"
    root: str = "runs"
    input: str | None = None  # None: the packaged sample corpus with its human labels
    field: str = "text"
    labels: dict[str, str] | None = None
    task: str = "reddit-comment"
    teacher: str = "qwen2.5-coder-0.5b-instruct"
    limit: int | None = None
    batch_size: int = 16
    vocab_size: int = 512
    calibration: int = 64
    hidden_layer: str = "last"
    preset: str = "micro"
    epochs: int = 20
    dropout: float = 0.1
    hidden_weight: float = 1.0
    max_steps: int | None = None
    seed: int = 0
    eval_teacher: bool = True
    extra_train: dict = dc_field(default_factory=dict)

    # Arguments that change what a stage produces; the others (root, name) only say where.
    def identity(self) -> dict:
        d = asdict(self)
        for k in ("root", "name", "eval_teacher"):
            d.pop(k)
        return d


def _stage(state: dict, name: str, folder: Path, fn, path: Path) -> None:
    stages = state.setdefault("stages", {})
    if stages.get(name, {}).get("done"):
        print(f"[{name}] done already ({stages[name]['wall_s']:.1f} s) -> {folder}", flush=True)
        return
    print(f"[{name}] -> {folder}", flush=True)
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0 + stages.get(name, {}).get("wall_s", 0.0)
    stages[name] = {"wall_s": round(wall, 2), "done": True}
    atomic_write_json(path, state)
    print(f"[{name}] finished in {wall:.1f} s", flush=True)


def run(cfg: RunConfig) -> Path:
    from microdistill.evaluate import evaluate
    from microdistill.extract import extract
    from microdistill.train import TrainConfig, train

    # a bad training option fails now, not after the extraction it would have waited for
    tcfg = TrainConfig(preset=cfg.preset, epochs=cfg.epochs, max_steps=cfg.max_steps, seed=cfg.seed,
                       dropout=cfg.dropout, hidden_weight=cfg.hidden_weight, **cfg.extra_train)
    folder = Path(cfg.root) / cfg.name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.json"
    state = json.loads(path.read_text()) if path.exists() else {}
    # arguments newer than a run folder read as their defaults: it was made before they existed
    saved = {**RunConfig().identity(), **state.get("config", {})}
    if state and saved != cfg.identity():
        changed = sorted(k for k, v in cfg.identity().items() if saved.get(k) != v)
        raise RunError(f"{folder} holds a run with other arguments ({', '.join(changed)}); use --name to start another")
    if cfg.input is not None and not Path(cfg.input).exists():
        raise RunError(f"input {cfg.input}: not found")
    state["config"] = cfg.identity()
    atomic_write_json(path, state)

    corpus = Path(cfg.input) if cfg.input else sample_corpus()
    labels = cfg.labels if cfg.labels is not None else (SAMPLE_LABELS if cfg.input is None else None)
    shards, student, report = folder / "shards", folder / "student", folder / "eval"
    t0 = time.perf_counter()

    _stage(state, "extract", shards, lambda: extract(
        cfg.task, corpus, cfg.teacher, shards, limit=cfg.limit, batch_size=cfg.batch_size,
        vocab_size=cfg.vocab_size, calibration=cfg.calibration, field=cfg.field, labels=labels,
        hidden_layer=cfg.hidden_layer), path)
    _stage(state, "train", student, lambda: train(shards, student, tcfg, resume=(student / "checkpoint").exists()), path)
    _stage(state, "eval", report, lambda: evaluate(
        student, shards, report, teacher=cfg.teacher if cfg.eval_teacher else None), path)

    print(f"run {cfg.name}: {time.perf_counter() - t0:.1f} s this invocation; "
          + ", ".join(f"{k} {v['wall_s']:.1f} s" for k, v in state["stages"].items()), flush=True)
    print(f"report: {report / 'report.md'}", flush=True)
    return folder
