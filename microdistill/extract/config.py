"""Extraction options: what an extraction asks of which teacher, checked before anything loads.

    microdistill extract --help
"""

from __future__ import annotations

from dataclasses import dataclass

from microdistill.core.errors import UserError
from microdistill.core.options import Options, option
from microdistill.teachers import DEFAULT_TEACHER, PRESETS, TeacherError, hidden_layer_spec, is_served_spec


TEACHER_URL_HELP = "OpenAI base URL of an openai:MODEL teacher (key: $MICRODISTILL_API_KEY)."


class ExtractError(UserError):
    """An extraction argument that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class ExtractConfig(Options):
    """What an extraction asks of which teacher; recorded in the run that made the shards."""

    task: str = option("reddit-comment", help="Task preset name or YAML file.")
    teacher: str = option(DEFAULT_TEACHER, help=(
        f"Teacher preset ({', '.join(PRESETS)}), HF model folder, .gguf file or openai:MODEL."))
    field: str = option("text", help="Text field/column of the corpus.")
    labels: dict[str, str] | None = option(None, help=(
        "Human label column for a task field, FIELD=COLUMN (repeatable)."))
    limit: int | None = option(None, help=(
        "Extract only the first N inputs that pass the filters (a later run continues)."))
    batch_size: int = option(16, help="Inputs decoded together by the teacher.")
    vocab_size: int = option(512, help="Size of the kept output vocabulary.")
    calibration: int = option(64, help="Inputs decoded to choose the kept vocabulary (first run only).")
    hidden_layer: str | int | None = option("last", help=(
        "Teacher layer whose hidden state of each input is stored for hidden-state distillation (first run only): "
        "last, middle, a number, or none."))
    dtype: str = option("float32", help=(
        "Teacher dtype (first run only): float32, bfloat16, or auto (bfloat16 where this CPU runs it natively and "
        "it answers the calibration inputs as float32 does)."))
    embeddings: bool = option(False, help=(
        "Also store the teacher's input embeddings in context (a decoder student's starting rows: one teacher pass "
        "over the corpus); without it, train --student decoder computes them once from the teacher when needed."))
    teacher_url: str | None = option(None, help=TEACHER_URL_HELP)
    teacher_tokenizer: str | None = option(None, help=(
        "That model's tokenizer: preset, folder or .gguf (default: found)."))
    concurrency: int = option(8, help="Calls in flight to an API teacher.")
    draft: str | None = option(None, help=(
        "A decoder student of this task and teacher that proposes the teacher's next tokens (speculative decoding): "
        "the same answers in fewer teacher passes."), path=True)
    draft_tokens: int = option(4, help="Tokens the --draft student proposes per step.")

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ExtractError(f"--limit must be at least 1 (got {self.limit})")
        if self.batch_size < 1:
            raise ExtractError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.vocab_size < 2:
            raise ExtractError(f"--vocab-size must be at least 2 (got {self.vocab_size})")
        if self.calibration < 0:
            raise ExtractError(f"--calibration must not be negative (got {self.calibration})")
        if self.concurrency < 1:
            raise ExtractError(f"--concurrency must be at least 1 (got {self.concurrency})")
        if (self.teacher_url is not None or self.teacher_tokenizer is not None) and not is_served_spec(self.teacher):
            raise ExtractError(f"--teacher-url and --teacher-tokenizer are for an API teacher (openai:MODEL), not {self.teacher!r}")
        if self.draft_tokens < 1:
            raise ExtractError(f"--draft-tokens must be at least 1 (got {self.draft_tokens})")
        if self.draft is not None and is_served_spec(self.teacher):
            raise ExtractError(f"--draft needs a local teacher, whose every forward pass it shortens; {self.teacher!r} "
                               "is served")
        if self.dtype not in ("float32", "bfloat16", "auto"):
            raise ExtractError(f"--dtype {self.dtype!r}: choose float32, bfloat16 or auto")
        try:
            hidden_layer_spec(self.hidden_layer)  # a typo fails before the teacher loads
        except TeacherError as e:
            raise ExtractError(str(e)) from None
