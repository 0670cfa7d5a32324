"""Training options: everything that decides a student's weights, checked when built.

    microdistill train --help
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from microdistill.core.options import Options, option
from microdistill.core.errors import UserError
from microdistill.students import KINDS
from microdistill.students.decoder.config import DEFAULT_PRESET, PRESET_ALIASES, PRESETS

# the names of train/losses.py's divergences and curricula (that module needs torch; this one must not)
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "taid")
CURRICULA = ("cosine", "linear", "constant", "step")
# How often a run checkpoints besides each epoch's end ("N" steps, "Ns" seconds): a killed run loses at most
# this much, and a checkpoint takes about a second. Not a training option: it never changes the weights.
CHECKPOINT_EVERY = "300s"
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

    student: str = option("decoder", help=(
        "Student kind: decoder (any output), heads (enum fields: a pretrained encoder with one softmax per field), "
        "or auto (heads when every field is an enum, else the decoder)."))
    preset: str = option(DEFAULT_PRESET, help=f"Decoder size preset: {', '.join(PRESETS)}.")
    encoder: str = option("minilm", help=(
        "Body of a heads student: minilm, a model folder, or teacher (the teacher's first blocks, pruned; "
        "teacher:SPEC for another copy of it)."))
    encoder_layers: int | None = option(None, help="Keep only the body's first N layers (faster; teacher: 2).")
    mlp_width: int | None = option(None, help="A teacher body's MLP width, pruned by activation importance (1024).")
    input_vocab: str = option("full", help=(
        "A pretrained encoder's input vocabulary: full (every piece it learnt to read) or corpus (the pieces the "
        "training inputs use: a smaller file, but new words reach it as unfamiliar fragments)."))
    epochs: int = option(10, help="Passes over the training split.")
    batch_size: int = option(32, help="Examples per optimiser step.")
    lr: float = option(2e-3, help=(
        "Peak learning rate (linear warm-up, then cosine); tiny models tolerate, and need, more than LLM-scale rates."))
    min_lr_ratio: float = option(0.1, help="Final learning rate as a fraction of --lr.")
    warmup_frac: float = option(0.05, help="Fraction of the steps spent warming up.")
    weight_decay: float = option(0.1, help="AdamW weight decay on matrices and embeddings (not on norm gains).")
    grad_clip: float = option(1.0, help="Max global gradient norm (0: no clipping).")
    pretrained_lr_ratio: float = option(0.05, help="A pretrained encoder learns at --lr times this.")
    dropout: float = option(0.0, help="Dropout on the student's residual branches while training.")
    augment: float = option(0.0, help=(
        "A heads student also learns this share of its training inputs edited without changing their meaning (case, "
        "a final full stop, a trailing emoji or link), with the teacher's answer to the original: it learns not to "
        "change its answer for them."))
    seed: int = option(0, help="Random seed (initialisation and data order).")
    divergence: str = option("forward_kl", help=f"{', '.join(DIVERGENCES[:-1])} or {DIVERGENCES[-1]}.")
    temperature: float = option(1.0, help="Distillation temperature T.")
    beta: float = option(0.5, help="JSD mixing weight (--divergence jsd).")
    alpha: float = option(0.1, help="Skew (--divergence skew_kl).")
    curriculum: str = option("cosine", help=(
        f"Schedule of the divergence's weight: {', '.join(CURRICULA[:-1])} or {CURRICULA[-1]}."))
    divergence_start: float = option(0.9, help="The divergence's weight at the start (CE gets 1 - it).")
    divergence_end: float = option(0.1, help="The divergence's weight at the end.")
    tail: bool = option(False, help="Add an output class for the teacher's mass outside the kept vocabulary.")
    signal: str = option("auto", help="Teacher signal: logits, text (CE only), or auto (logits when the shards have them).")
    embed_init: str = option("teacher", help=(
        "Input embeddings: teacher (the teacher's rows, PCA to the student's width, when the shards hold them; "
        "else random) or random (N(0, 0.02) like every other weight)."))
    hidden_weight: float = option(1.0, help=(
        "Weight of the decoder student's hidden-state loss when the shards hold the teacher's input hidden states "
        "and its logits are used (text-only training has no teacher internals); 0: off."))
    max_steps: int | None = option(None, help="A fixed step budget instead of --epochs (the last epoch may be partial).")
    limit_train: int | None = option(None, help="Use only the first N training examples.")
    eval_limit: int | None = option(None, help="Evaluate on at most N held-out examples per epoch.")
    init_from: str = option("", help=(
        "A heads student folder of the same task and body whose weights start this run (a warm start, e.g. from the "
        "student being updated); empty: from the pretrained encoder."))
    on_policy: float = option(0.0, help=(
        "Share of the batches made of the decoder student's own answers, scored by the teacher in process "
        "(on-policy distillation, GKD)."))

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
        need(0.0 <= self.augment <= 1.0, "augment", "must be in [0, 1]")
        need(0.0 <= self.on_policy <= 1.0, "on_policy", "must be in [0, 1]")
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
