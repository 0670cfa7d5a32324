"""Students: the small models that learn the teacher's task, one folder per kind.

    from microdistill.students import load_student
    student = load_student("runs/demo/student")      # any kind
    student.predict(["some text"])                   # [{text, output, fields, valid, truncated, ...}]

    kind.py        the interface every kind honours (Kind, Student, PerField) and parameter counts
    folder.py      what every student folder shares: format, config.json, weights
    confidence.py  calibrated confidence per field: temperatures, ECE, the agreement-coverage curve
    heads/         enum fields: a pretrained encoder with one softmax per field
    decoder/       any output: a Gemma-style decoder over the kept vocabulary

A new kind is a folder here and one line in KINDS (importing KINDS imports no torch).
"""

from __future__ import annotations

from pathlib import Path

from microdistill.core.task import Task
from microdistill.students import decoder, heads
from microdistill.students.folder import StudentFolderError, read_config
from microdistill.students.kind import Kind, PerField, Student

# Every kind, in the order `--student auto` tries them: the first that serves the task.
KINDS: dict[str, Kind] = {k.name: k for k in (heads.KIND, decoder.KIND)}
LEGACY_KIND = "decoder"  # folders written before kinds existed hold a decoder

__all__ = ["KINDS", "Kind", "PerField", "Student", "StudentFolderError", "kind_for", "load_student"]


def kind_for(name: str, task: Task) -> str:
    """The kind `name` asks for ("auto": the first kind of KINDS that serves `task`)."""
    if name != "auto":
        return name
    return next(k.name for k in KINDS.values() if k.serves(task) is None)


def load_student(path: Path) -> Student:
    """The student folder `path` (written by training), loaded by its kind."""
    path = Path(path)
    config = read_config(path)
    kind = config.get("kind", LEGACY_KIND)
    if kind not in KINDS:
        raise StudentFolderError(f"student folder {path}: a {kind!r} student, which this version cannot load "
                                 f"(it loads {', '.join(map(repr, KINDS))} students)")
    return KINDS[kind].load(path, config)
