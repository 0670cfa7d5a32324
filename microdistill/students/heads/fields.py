"""The task's fields a classifier head can produce: enums, each a softmax over its values."""

from __future__ import annotations

from microdistill.core.errors import UserError
from microdistill.core.task import EnumField, Task


class HeadsError(UserError):
    """A task or folder the classifier-head student cannot serve; one line for the user."""


def free_fields(task: Task) -> list[str]:
    """The task's fields a classifier head cannot produce (free text, numbers)."""
    return [f.name for f in task.output.fields if not isinstance(f, EnumField)]


def enum_fields(task: Task, where: str) -> list[EnumField]:
    """The task's fields, which must all be enums for this student."""
    free = free_fields(task)
    if free:
        raise HeadsError(f"{where}: task {task.name!r} has free-text or number fields ({', '.join(free)}), which a "
                         "classifier-head student cannot produce; use --student decoder")
    return list(task.output.fields)
