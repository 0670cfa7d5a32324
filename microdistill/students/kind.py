"""The student-kind interface: what every kind offers, whatever its model.

A kind is a folder in students/ whose `__init__.py` defines `KIND` (a `Kind`: its name, which
tasks it serves, how its folder loads) and one line in `students.KINDS`. Its loaded folder is a
`Student`: it predicts, scores itself on held-out records as its trainer does, checks shards
against what it reads and says what it was made with. A kind whose answers carry a calibrated
probability per field (`PerField`) can drive the cascade and fit its confidence.
Training (train/kinds.py), export (export/__init__.py) and the runtime (runtime/__init__.py)
register the same names; tests/test_kinds.py holds every kind to all of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    from microdistill.core.task import EnumField, Task
    from microdistill.data.shards import Record, ShardSet


@dataclass(frozen=True)
class Kind:
    """One student kind, as the registry knows it (importing it imports no torch)."""

    name: str
    summary: str  # one line for --help and the docs
    serves: Callable[["Task"], str | None]  # None when the kind can learn the task, else why it cannot
    load: Callable[[Path, dict[str, Any]], "Student"]  # a folder whose config.json says this kind
    reads: tuple[str, ...] = ()  # what it reads from a shard folder beyond the records ("input_embeddings")
    warm_starts: bool = False  # a run of it may start from another student's weights (train --init-from)


class Student(Protocol):
    """A loaded student folder of any kind."""

    kind: str
    task: Task
    path: Path | None
    meta: dict[str, Any]  # config.json beyond the model: shards summary, training options, sizes
    model: Any  # the torch module

    def predict(self, texts: Sequence[str], batch_size: int = 64, *, constrain: bool = True) -> list[dict[str, Any]]:
        """One result per text (cleaned as the corpus was): {text, output, fields, valid, truncated}
        and, for a `PerField` kind, a confidence per field."""

    def held_out(self, records: Sequence[Record], batch_size: int = 64) -> dict[str, Any]:
        """The trainer's per-epoch metrics on `records`: val_examples, val_token_acc,
        val_exact_match, val_field_agreement."""

    def check_shards(self, shards: ShardSet) -> None:
        """Refuse shards whose vocabulary this student does not read (one-line error)."""

    def describe(self) -> dict[str, Any]:
        """What the student was made with, as the evaluation report records it."""


@runtime_checkable
class PerField(Protocol):
    """A student (PyTorch or exported) whose answer is one softmax per enum field."""

    fields: list[EnumField]

    def logits(self, texts: Sequence[str], batch_size: int = 64) -> list:
        """Per field, raw logits [N, n_values] of each text as given."""

    def probabilities(self, texts: Sequence[str], batch_size: int = 64) -> list:
        """Per field, calibrated P(value) [N, n_values] of each text as given."""

    def vectors(self, texts: Sequence[str], batch_size: int = 64):
        """[N, D]: the student's reading of each text as given (selection spreads its choices over these)."""


def count_parameters(model) -> int:
    """Distinct parameters of a built model (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters())


def compute_parameters(model) -> int:
    """Parameters that take part in compute: all but the input token table, a lookup whose size
    grows with the vocabulary, not with the work per token (a student's speed budget counts these)."""
    return count_parameters(model) - model.get_input_embeddings().weight.numel()
