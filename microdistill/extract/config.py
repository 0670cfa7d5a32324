"""Extraction options: what an extraction asks of which teacher, checked before anything loads.

    microdistill extract --help
"""

from __future__ import annotations

from dataclasses import dataclass

from microdistill.core.errors import UserError
from microdistill.core.options import Options
from microdistill.teachers import DEFAULT_TEACHER, TeacherError, hidden_layer_spec, is_served_spec


class ExtractError(UserError):
    """An extraction argument that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class ExtractConfig(Options):
    """What an extraction asks of which teacher; recorded in the run that made the shards."""

    task: str = "reddit-comment"  # a preset name or a task YAML file
    teacher: str = DEFAULT_TEACHER  # a preset, a Hugging Face model folder, a .gguf file or openai:MODEL
    field: str = "text"  # the corpus' text field or column
    labels: dict[str, str] | None = None  # task field -> corpus column of human labels
    limit: int | None = None  # only the first N inputs that pass the filters (a later run continues)
    batch_size: int = 16  # inputs the teacher decodes together
    vocab_size: int = 512  # size of the kept output vocabulary
    calibration: int = 64  # inputs decoded to choose the kept vocabulary (first run only)
    # the teacher layer whose hidden state of each input is stored (first run only): last,
    # middle, a layer number, or none
    hidden_layer: str | int | None = "last"
    # the teacher's dtype (first run only): float32, bfloat16, or auto (bfloat16 where the CPU runs
    # it natively and it answers the calibration inputs as float32 does; see choose_dtype)
    dtype: str = "float32"
    teacher_url: str | None = None  # the OpenAI base URL of an `openai:MODEL` teacher (teachers/served.py)
    teacher_tokenizer: str | None = None  # the API model's tokenizer: a preset, model folder or .gguf
    concurrency: int = 8  # calls in flight to an API teacher

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
        if self.dtype not in ("float32", "bfloat16", "auto"):
            raise ExtractError(f"--dtype {self.dtype!r}: choose float32, bfloat16 or auto")
        try:
            hidden_layer_spec(self.hidden_layer)  # a typo fails before the teacher loads
        except TeacherError as e:
            raise ExtractError(str(e)) from None
