"""Training options: everything that decides a student's weights, checked when built.

    microdistill train --help
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from microdistill.core.options import Options
from microdistill.core.errors import UserError
from microdistill.students import KINDS
from microdistill.students.decoder.config import DEFAULT_PRESET, PRESET_ALIASES, PRESETS

# the names of train/losses.py's divergences and curricula (that module needs torch; this one must not)
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "taid")
CURRICULA = ("cosine", "linear", "constant", "step")
EMBED_INITS = ("teacher", "random")
INPUT_VOCABS = ("full", "corpus")
STUDENTS = (*KINDS, "auto")  # auto: the first kind that serves the task (students.kind_for)


class TrainError(UserError):
    """A training option, shard folder or checkpoint that cannot be used; one line for the user."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; the message says how to resume."""


@dataclass(frozen=True)
class TrainConfig(Options):
    """Everything that decides the trained weights (eval_limit aside); stored in every checkpoint."""

    # the kind: "decoder" (any output), "heads" (enum fields; a pretrained encoder) or "auto"
    # (heads when the task's fields are all enums, else the decoder)
    student: str = "decoder"
    preset: str = DEFAULT_PRESET  # decoder size: nano, micro, small, large
    encoder: str = "minilm"  # the heads student's pretrained encoder: a preset or a folder (students/encoder.py)
    # "teacher" cuts the body from the teacher's first blocks instead (students/teacher_body.py)
    encoder_layers: int | None = None  # keep only the body's first N layers (faster; a teacher body: 2 when unset)
    mlp_width: int | None = None  # a teacher body's MLP width after pruning by activation importance (1024 when unset)
    # a pretrained encoder's input vocabulary: "full" keeps every piece it learnt to read; "corpus" keeps
    # the pieces the training inputs use (a smaller file, but new words reach it as unfamiliar fragments)
    input_vocab: str = "full"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 2e-3  # peak; tiny models tolerate (and need) more than LLM-scale rates
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_frac: float = 0.05  # fraction of all steps with a linear warm-up
    weight_decay: float = 0.1  # on matrices and embeddings, not on norm gains
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    pretrained_lr_ratio: float = 0.05  # a pretrained encoder's weights learn at lr x this
    dropout: float = 0.0  # on the student's residual branches while training (its `dropout`)
    seed: int = 0
    divergence: str = "forward_kl"  # see DIVERGENCES (losses.py)
    temperature: float = 1.0
    beta: float = 0.5  # jsd
    alpha: float = 0.1  # skew_kl
    curriculum: str = "cosine"  # schedule of the divergence's weight, see CURRICULA
    divergence_start: float = 0.9  # the divergence's weight at the start; CE gets the rest
    divergence_end: float = 0.1
    tail: bool = False  # one extra output class for the teacher's mass outside the kept set
    signal: str = "auto"  # "logits", "text" (CE only), or "auto": logits when the shards have them
    # "teacher": input embeddings start from the teacher's vectors (PCA to d_model) when the shards hold
    # them, else random; "random": N(0, 0.02) like every other weight
    embed_init: str = "teacher"
    # Weight of the hidden-state loss when the shards hold the teacher's input hidden states and
    # teacher logits are used (text-only training has no teacher internals); 0 turns it off.
    hidden_weight: float = 1.0
    max_steps: int | None = None  # a fixed step budget instead of `epochs` (the last epoch may be partial)
    limit_train: int | None = None  # use only the first N training examples
    eval_limit: int | None = None  # evaluate on at most N held-out examples

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise TrainError(f"training option {name}={getattr(self, name)!r}: {what}")

        need(self.student in STUDENTS, "student", f"choose {' or '.join(STUDENTS)}")
        need(self.preset in PRESETS, "preset", f"choose one of {', '.join(PRESETS)}")
        need(self.divergence in DIVERGENCES, "divergence", f"choose one of {', '.join(DIVERGENCES)}")
        need(self.curriculum in CURRICULA, "curriculum", f"choose one of {', '.join(CURRICULA)}")
        need(self.signal in ("auto", "logits", "text"), "signal", "choose auto, logits or text")
        need(self.embed_init in EMBED_INITS, "embed_init", f"choose {' or '.join(EMBED_INITS)}")
        need(self.input_vocab in INPUT_VOCABS, "input_vocab", f"choose {' or '.join(INPUT_VOCABS)}")
        for name in ("epochs", "batch_size"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be a positive integer")
        for name in ("max_steps", "limit_train", "eval_limit", "encoder_layers", "mlp_width"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, int) and v >= 1), name, "must be a positive integer or unset")
        need(0 < self.lr < 1, "lr", "must be in (0, 1)")
        for name in ("min_lr_ratio", "divergence_start", "divergence_end", "beta", "pretrained_lr_ratio"):
            need(0.0 <= getattr(self, name) <= 1.0, name, "must be in [0, 1]")
        need(0.0 <= self.warmup_frac < 1.0, "warmup_frac", "must be in [0, 1)")
        need(0.0 <= self.alpha < 1.0, "alpha", "must be in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", "must not be negative")
        need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        need(self.grad_clip >= 0, "grad_clip", "must not be negative (0 disables clipping)")
        need(0 < self.temperature <= 100, "temperature", "must be in (0, 100]")
        need(isinstance(self.hidden_weight, (int, float)) and self.hidden_weight >= 0, "hidden_weight",
             "must not be negative (0 disables the hidden-state loss)")

    # Folders written before the divergence's weight was named for what it weighs.
    renamed: ClassVar[dict[str, str]] = {"kl_start": "divergence_start", "kl_end": "divergence_end"}

    @classmethod
    def from_dict(cls, d: dict[str, Any], legacy: dict[str, Any] | None = None) -> TrainConfig:
        preset = d.get("preset")
        return super().from_dict({**d, "preset": PRESET_ALIASES.get(preset, preset)} if preset else d, legacy)
