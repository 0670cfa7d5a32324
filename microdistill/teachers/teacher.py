"""The teacher interface: what every teacher offers, and how two teacher records are told apart.

Shard folders record a teacher by `describe()`; `same_teacher` compares two such records (the
weights, or a served model's name, and the tokenizer), so every verb agrees on whether a teacher
is the one that labelled a folder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

from microdistill.teachers.presets import TeacherError

if TYPE_CHECKING:
    from microdistill.core.task import Task

SERVED_PREFIX = "openai:"


class Teacher(Protocol):
    """What every teacher offers: its identity (recorded in each shard folder's manifest), its
    tokenizer and end-of-answer token, the prompt it is asked with, whether it is a white box
    (`access`: "white", full logits) or a black box ("black": answers, maybe top-k), and a
    labeller: texts -> its answers, decoded or asked as extraction does; and `write`: free text,
    sampled, for chat conversations (the inputs `synthesize` asks it to write)."""

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

    def labeller(self, task: Task, kept: list[int] | None = None, draft=None) -> Callable[[list[str]], list[str]]: ...

    def write(self, conversations: list[list[dict[str, str]]], max_tokens: int, temperature: float,
              seed: int) -> list[str]: ...


def is_served_spec(spec) -> bool:
    """Whether `spec` names a served teacher (it needs a URL, and labels through calls)."""
    return str(spec).startswith(SERVED_PREFIX)


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
