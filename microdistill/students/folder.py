"""What every student folder shares, whatever its kind: the format, config.json, the weights.

A folder holds model.safetensors (float32 weights), config.json (`format`, `kind`, the kind's own
entries, the task, a summary of the shards it was trained on, the weights' size and sha256, and
the training options), task.yaml (the task, for people to read; config.json's copy is the one
loaded) and whatever its kind reads text with (a tokenizer). Each file is replaced atomically,
the weights before config.json; config.json records the size of the weights it belongs to, so
a save cut short between the two is detected on load.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import yaml

from microdistill.core.errors import UserError
from microdistill.core.files import atomic_write_bytes, atomic_write_json, read_format

FORMAT = "microdistill.student/1"  # config.json's "format" in every student folder, whatever its kind


class StudentFolderError(UserError):
    """A student folder that cannot be read or written; the message is one line for the user."""


def read_config(path: Path) -> dict[str, Any]:
    """config.json of the student folder `path`, checked for its format."""
    path = Path(path)
    if not path.is_dir():
        raise StudentFolderError(f"student folder {path}: not found")
    if not (path / "config.json").is_file():
        raise StudentFolderError(f"student folder {path}: config.json is missing (not a complete student folder)")
    return read_format(path / "config.json", FORMAT, "config", StudentFolderError)


def check_files(path: Path, names: Sequence[str], config: dict[str, Any]) -> Path:
    """The folder's weights file, once every one of `names` is there and the weights are the size
    config.json recorded."""
    for name in names:
        if not (path / name).exists():
            raise StudentFolderError(f"student folder {path}: {name} is missing (not a complete student folder)")
    weights = path / "model.safetensors"
    if weights.stat().st_size != config.get("model_bytes", weights.stat().st_size):
        raise StudentFolderError(f"{weights}: does not match config.json (an interrupted save?); save the student again")
    return weights


def shards_summary(shards, **more: Any) -> dict[str, Any]:
    """What a student records about the shards it learnt from."""
    m = shards.manifest
    return {"path": str(shards.dir), "task_fingerprint": m.get("task_fingerprint"), "teacher": m.get("teacher"),
            "signal": m.get("signal", "logits"), "counts": m.get("counts"), **more}


def save_folder(path: Path, kind: str, model, task, entries: dict[str, Any], shards: dict[str, Any],
                extra: dict[str, Any] | None = None) -> Path:
    """Write task.yaml, model.safetensors and then config.json ({format, kind, **entries, task,
    shards, the weights' size and sha256, **extra}) into `path`; the kind has written its tokenizer."""
    from safetensors.torch import save

    weights = save({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, metadata={"format": FORMAT})
    atomic_write_bytes(path / "task.yaml", yaml.safe_dump(task.model_dump(), sort_keys=False, allow_unicode=True).encode())
    atomic_write_bytes(path / "model.safetensors", weights)
    atomic_write_json(path / "config.json", {
        "format": FORMAT, "kind": kind, **entries, "task": task.model_dump(), "shards": shards,
        "model_bytes": len(weights), "model_sha256": hashlib.sha256(weights).hexdigest(), **(extra or {}),
    })
    return path
