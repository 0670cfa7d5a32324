"""The classifier-head student: a pretrained encoder read once, one softmax per enum field.

    microdistill train --data runs/demo/shards --out runs/demo/heads --student heads

For a task whose fields are all enums, the teacher's whole answer is a few decisions; its
shards keep, for each, the teacher's probability of every allowed value (the decision points).
This student reads the input with a pretrained encoder, mean-pools the final states over the
real tokens, and has one linear head per field. Its answer is the most probable value of each
field, assembled into the task's canonical JSON, so it is always valid; each field's softmax
probability is its confidence.

    fields.py        the task's fields a classifier head can produce
    model.py         the model, its examples, batches and held-out metrics
    folder.py        save / load its folder; LoadedHeads, the loaded student
    encoder.py       a pretrained encoder from PyPI (whole or pruned vocabulary, fewer layers)
    teacher_body.py  a body cut from the teacher instead
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from microdistill.core.task import Task
from microdistill.students.heads.fields import HeadsError, enum_fields, free_fields
from microdistill.students.kind import Kind

__all__ = ["HeadsError", "KIND", "enum_fields", "free_fields"]


def _serves(task: Task) -> str | None:
    free = free_fields(task)
    return f"fields {', '.join(free)} are not enums" if free else None


def _load(path: Path, config: dict[str, Any]):
    from microdistill.students.heads.folder import load_heads

    return load_heads(path, config)


KIND = Kind(name="heads", summary="enum fields: a pretrained encoder with one softmax per field, confidences included",
            serves=_serves, load=_load, warm_starts=True)
