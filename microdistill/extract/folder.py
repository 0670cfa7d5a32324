"""A shard folder as extraction opens it, whatever the teacher: its manifest's header, the checks
that it was made by the same task and teacher, and the teacher's tokenizer beside the shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from microdistill.core.files import atomic_dir
from microdistill.core.task import Task
from microdistill.data.shards import ShardSet, StoreError


def header(task: Task, teacher_record: dict[str, Any], **more: Any) -> dict[str, Any]:
    """The manifest entries every extraction writes first: the task, its fingerprint, the teacher."""
    return {"task": task.model_dump(mode="json"), "task_fingerprint": task.fingerprint(), "teacher": teacher_record,
            **more}


def existing(out_dir: Path) -> dict[str, Any] | None:
    """The manifest of the folder `out_dir` (its parts read as one), or None when it is new."""
    if not (Path(out_dir) / "manifest.json").exists():
        return None
    return ShardSet(out_dir).manifest


def check_same(out_dir: Path, manifest: dict[str, Any] | None, wanted: dict[str, Any], keys: Sequence[str]) -> None:
    """A folder that already holds shards must have been made with the same `keys` (task
    fingerprint, teacher, signal, ...) as this run; checked before any teacher work."""
    for key in keys if manifest else ():
        if manifest.get(key) != wanted[key]:
            raise StoreError(f"{out_dir} holds shards made with a different {key.replace('_', ' ')}; "
                             "use another --out folder or delete this one")


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """out_dir/tokenizer/: the teacher's tokenizer, so training and prediction never need the teacher."""
    dest = Path(out_dir) / "tokenizer"
    if dest.is_dir():
        return
    with atomic_dir(dest) as tmp:
        tokenizer.save_pretrained(str(tmp))
