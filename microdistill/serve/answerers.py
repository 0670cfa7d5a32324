"""What answers a call: a student folder (PyTorch) or an export folder (onnxruntime, no torch).

    from microdistill.serve.answerers import load_answerer
    answerer = load_answerer("runs/demo/export")     # or a student folder; .predict(texts)

Each runtime is one entry of RUNTIMES: whether a folder is its kind, and how to load it. An export
folder is tried first, so a machine with only the base install (no torch) answers with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple

from microdistill.runtime import is_export, load_exported
from microdistill.runtime.common import expect_task


class Runtime(NamedTuple):
    name: str
    claims: Callable[[Path], bool]
    load: Callable[[Path, str | None, int | None], Any]


def _load_pytorch(path: Path, task: str | None, threads: int | None):
    import torch

    from microdistill.students import load_student

    if threads is not None:
        torch.set_num_threads(threads)  # a tiny model on a shared CPU can lose more to waking threads than it gains
    student = load_student(path)
    expect_task(student.task, task, path)
    return student


RUNTIMES = [
    Runtime("onnxruntime", is_export, lambda path, task, threads: load_exported(path, task, threads)),
    Runtime("pytorch", lambda path: True, _load_pytorch),  # anything else is read as a student folder
]


def load_answerer(path: Path, task: str | None = None, threads: int | None = None):
    """The student or export in `path`, ready to `predict(texts, batch_size)`; `task`: refuse one
    that does another task; `threads`: the runtime's intra-op threads."""
    path = Path(path)
    runtime = next(r for r in RUNTIMES if r.claims(path))
    return runtime.load(path, task, threads)
