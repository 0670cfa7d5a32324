"""The options of the flows: a whole run (`RunConfig`, and how older run.json files read) and a
comparison (`CompareConfig`).

    microdistill run --help
    microdistill compare --help

No torch here: the command line builds its flags from these classes, and run.py and compare.py
(which train) run them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microdistill.core.errors import UserError
from microdistill.core.options import Options, option
from microdistill.evaluate.config import EvalConfig
from microdistill.extract.config import ExtractConfig
from microdistill.students.decoder.config import DEFAULT_PRESET
from microdistill.train.config import TrainConfig


@dataclass(frozen=True)
class RunConfig(Options):
    """A run: where it lives, what it reads, and each stage's options.

    The run's own defaults differ from the stages' where a whole run is better served: the
    teacher in bfloat16 where that is fast and answers as float32 does (extract --dtype auto),
    the student kind that fits the task (heads for all-enum tasks), 10 epochs with dropout 0.1
    (BENCHMARKS.md: on the 3,100 sample comments 10 epochs fit the quick start's time; the
    agent-tool preset's 336 requests were measured with --epochs 20)."""

    name: str = option("default", help="Run folder name under --root.")
    root: str = option("runs", help="Where run folders live.", path=True)
    input: str | None = option(None, help=(
        "Corpus file or HF datasets folder (default: the task preset's packaged corpus: reddit-comment's sample "
        "comments with their human labels, agent-tool's teacher-written requests)."),
        path=True)
    synthesize: int | None = option(None, help=(
        "No corpus at all: the teacher first writes N inputs for the task (as microdistill synthesize does) into "
        "runs/NAME/inputs.jsonl, and the run distils those."))
    extract: ExtractConfig = option(default_factory=lambda: ExtractConfig(dtype="auto"), help="The extraction's options.")
    train: TrainConfig = option(default_factory=lambda: TrainConfig(student="auto", epochs=10, dropout=0.1),
                                help="The training's options.")
    eval: EvalConfig = option(default_factory=lambda: EvalConfig(teacher=None), help="The evaluation's options.")

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.name

    def identity(self) -> dict[str, Any]:
        """What decides the artefacts (not where they live, nor how the report times the teacher)."""
        return {"input": self.input, "synthesize": self.synthesize, "extract": self.extract.to_dict(),
                "train": self.train.to_dict()}

    def __post_init__(self) -> None:
        if self.synthesize is not None and self.synthesize < 1:
            raise UserError(f"--synthesize must be at least 1 (got {self.synthesize})")
        if self.synthesize is not None and self.input is not None:
            raise UserError("give --input (a corpus) or --synthesize N (inputs the teacher writes), not both")


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
    return {"input": saved.get("input"), "synthesize": saved.get("synthesize"),
            "extract": ExtractConfig.from_dict({**defaults.extract.to_dict(), **LEGACY_EXTRACT,
                                                **saved["extract"]}).to_dict(),
            "train": TrainConfig.from_dict({**defaults.train.to_dict(), **LEGACY_TRAIN, **saved["train"]}).to_dict()}


# ---- a comparison ------------------------------------------------------------------------------------
class CompareError(UserError):
    """A comparison that cannot run as asked (unknown configuration, bad plan file); one line."""


@dataclass(frozen=True)
class CompareConfig(Options):
    """The options of one comparison; field names are the `compare` flags (`_` -> `-`).

    preset, seed, the budget (max_steps, or epochs) and limit_train are the same for every run;
    batch_size, lr and eval_limit (None: TrainConfig's) go under each run's own options. Their
    ranges are TrainConfig's, checked as each run is built so the error names the configuration.
    """

    preset: str = option(DEFAULT_PRESET, help="Student size preset for every run.")
    max_steps: int | None = option(None, help="The same step budget for every run.")
    epochs: int | None = option(None, help=(
        f"Epochs for every run instead of a step budget (default {TrainConfig.epochs}, train's)."))
    seed: int = option(0, help="Random seed for every run.")
    limit_train: int | None = option(None, help="Use only the first N training examples.")
    sizes: tuple[int, ...] | None = option(None, help=(
        "Also train on the first N examples for each N, e.g. 100,200,400 (accuracy vs data)."))
    sizes_for: tuple[str, ...] | None = option(None, help=(
        "Only these configurations get the --sizes curve (default: all)."))
    batch_size: int | None = option(None, help="Batch size for every run (default: train's).")
    lr: float | None = option(None, help="Peak learning rate for every run (default: train's).")
    eval_limit: int | None = option(None, help="Evaluate on at most N held-out examples per epoch.")

    def __post_init__(self) -> None:
        if self.max_steps is not None and self.epochs is not None:
            raise CompareError("give a step budget (--max-steps) or --epochs, not both")
        if self.sizes and any(not isinstance(n, int) or n < 1 for n in self.sizes):
            raise CompareError(f"sizes {list(self.sizes)}: expected positive numbers of training examples")

    def shared(self) -> dict[str, Any]:
        """The TrainConfig fields every run gets, whatever its own options say."""
        budget = ({"max_steps": self.max_steps} if self.max_steps is not None
                  else {"epochs": self.epochs or TrainConfig.epochs})
        return {"preset": self.preset, "seed": self.seed, "limit_train": self.limit_train, **budget}

    def common(self) -> dict[str, Any]:
        """The TrainConfig fields set for every run, under each run's own."""
        return {k: v for k, v in (("batch_size", self.batch_size), ("lr", self.lr), ("eval_limit", self.eval_limit))
                if v is not None}


class UpdateError(UserError):
    """An update that cannot run, or whose new student the gate refuses; one line for the user."""


@dataclass(frozen=True)
class UpdateConfig(Options):
    """One `update`: how many inputs the teacher labels per round, chosen how, and the gate."""

    select: str = option("margin", help=(
        "How each round chooses the inputs the teacher labels: first, random, margin, entropy or diverse."))
    budget: int = option(200, help="Inputs the teacher labels per round (its cost).")
    rounds: int = option(1, help="Rounds of select, label, train and gate.")
    tolerance: float = option(0.0, help=(
        "The gate: a new student may agree with the teacher this much less than the old one on the fixed "
        "held-out set (0: never worse)."))
    seed: int = option(0, help="Seed of --select random.")
    warm_epochs: int = option(0, help=(
        "Train each round's student from the current one's weights for this many epochs (heads students; 0: from "
        "the pretrained body for the old student's epochs). Cheaper per round; BENCHMARKS.md compares the two."))

    def __post_init__(self) -> None:
        if self.warm_epochs < 0:
            raise UpdateError(f"--warm-epochs must be 0 or more (got {self.warm_epochs})")
        for name in ("budget", "rounds"):
            if getattr(self, name) < 1:
                raise UpdateError(f"--{name} must be at least 1 (got {getattr(self, name)})")
        if not 0.0 <= self.tolerance < 1.0:
            raise UpdateError(f"--tolerance must be in [0, 1) (got {self.tolerance})")


class SynthesizeError(UserError):
    """Inputs the teacher cannot write for a task; one line for the user."""


@dataclass(frozen=True)
class SynthesizeConfig(Options):
    """One `synthesize`: the task, the teacher that writes its inputs, how many, how varied."""

    task: str = option("reddit-comment", help="Task preset name or YAML file whose inputs the teacher writes.")
    teacher: str = option(ExtractConfig.teacher, help="The teacher that writes them (any spec extract takes).")
    teacher_url: str | None = option(None, help="The served teacher's OpenAI base URL (with --teacher openai:MODEL).")
    n: int = option(200, help="How many inputs to write (after filtering and removing near-duplicates).")
    batch_size: int = option(16, help="Inputs asked of the teacher at once.")
    temperature: float = option(1.0, help="Sampling temperature: higher writes more varied inputs.")
    max_tokens: int = option(64, help="Tokens the teacher may write per input.")
    similarity: float = option(0.7, help=(
        "Drop an input whose character 4-grams overlap a kept one's (or an example's) this much (Jaccard)."))
    seed: int = option(0, help="Sampling seed.")

    def __post_init__(self) -> None:
        for name in ("n", "batch_size", "max_tokens"):
            if getattr(self, name) < 1:
                raise SynthesizeError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if not 0.0 < self.temperature <= 2.0:
            raise SynthesizeError(f"--temperature must be in (0, 2] (got {self.temperature})")
        if not 0.0 < self.similarity <= 1.0:
            raise SynthesizeError(f"--similarity must be in (0, 1] (got {self.similarity})")
