"""Evaluation options: what an evaluation scores and times, checked before anything loads.

    microdistill eval --help

No torch here: the command line builds its flags from `EvalConfig` (evaluation.py runs it).
"""

from __future__ import annotations

from dataclasses import dataclass

from microdistill.core.errors import UserError
from microdistill.core.options import Options, option
from microdistill.extract.config import TEACHER_URL_HELP
from microdistill.teachers import is_served_spec


@dataclass(frozen=True)
class EvalConfig(Options):
    """What an evaluation scores and times."""

    teacher: str | None = option(None, help=(
        "Teacher to time beside the student: preset, HF folder, .gguf or openai:MODEL (default: the shards' "
        "teacher, if it loads)."))
    teacher_url: str | None = option(None, help=TEACHER_URL_HELP + " Default: the shards' server.")
    time_teacher: bool = option(True, help="Time a teacher beside the student (switched off: load none).")
    limit: int | None = option(None, help="Score at most N held-out examples.")
    timing_inputs: int = option(16, help=(
        "Inputs both models are timed on (the teacher is slow on a CPU; a few inputs give a stable median)."))
    batch_size: int = option(64, help="Student batch size while scoring.")
    peers: bool = option(True, help=(
        "Also train and score the peer baselines (TF-IDF and frozen-encoder logistic regressions, peers.py) on the "
        "same teacher answers."))
    consistency_inputs: int = option(100, help=(
        "Held-out inputs the timed teacher answers again under meaning-preserving edits: its self-consistency, the "
        "ceiling; the student answers the same edits beside it (0: off)."))

    def __post_init__(self) -> None:
        if not isinstance(self.consistency_inputs, int) or self.consistency_inputs < 0:
            raise EvalError(f"--consistency-inputs must be a non-negative integer, got {self.consistency_inputs!r}")
        for name in ("limit", "timing_inputs", "batch_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise EvalError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.teacher is not None and not self.time_teacher:
            raise EvalError("--teacher and --no-teacher contradict each other; give one")
        if self.teacher_url is not None and self.teacher is not None and not is_served_spec(self.teacher):
            raise EvalError(f"--teacher-url is for a served teacher (openai:MODEL), not {self.teacher!r}")


class EvalError(UserError):
    """An evaluation input that cannot be used; the message is one line for the user."""
