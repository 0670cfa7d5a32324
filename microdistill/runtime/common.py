"""What every export folder shares, whatever its kind: the manifest, file checks, sessions, tokenizers.

This module imports onnxruntime, tokenizers, numpy and the package's pure-Python parts only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from microdistill.core.errors import UserError
from microdistill.core.files import file_sha256, read_format
from microdistill.core.task import Task
from microdistill.data.vocab import tokenizer_from_json

FORMAT, VERSION = "microdistill.export", 1
MANIFEST = "export.json"


class ExportError(UserError):
    """An export folder that cannot be written, read or run; one line for the user."""


def is_export(path: Path) -> bool:
    """Whether `path` is meant to be an export folder (it has export.json)."""
    return (Path(path) / MANIFEST).is_file()


def session_options(threads: int | None = None):
    """onnxruntime options for a small CPU: every graph optimisation (BERT attention and
    layer-norm fusions), one op at a time, and as many intra-op threads as cores (up to 4:
    a 6-layer, 384-wide encoder gains nothing from more)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # onnxruntime's own warnings say nothing a user can act on
    return so


def softmax(z: np.ndarray) -> np.ndarray:
    """Row softmax of logits [N, V] in float32."""
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def read_manifest(path: Path) -> dict[str, Any]:
    """export.json of folder `path`, checked for format and version; one-line errors otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"export folder {path}: not found")
    file = path / MANIFEST
    if not file.is_file():
        hint = " (a PyTorch student folder: export it with microdistill export)" if (path / "config.json").is_file() else ""
        raise ExportError(f"{path}: not an exported student, {MANIFEST} is missing{hint}")
    m = read_format(file, FORMAT, "manifest", ExportError)
    if m.get("version") != VERSION:
        raise ExportError(f"{file}: export format version {m.get('version')!r}, this microdistill reads version {VERSION}; "
                          "export the student again with this version, or install the version that wrote it")
    return m


def check_files(path: Path, manifest: dict[str, Any], required: Sequence[str]) -> None:
    """Every file export.json lists is present with its recorded size and sha256, `required` among them."""
    files = manifest.get("files")
    missing = [n for n in required if not isinstance(files, dict) or n not in files]
    if missing:
        raise ExportError(f"{path / MANIFEST}: lists no {', '.join(missing)} (a damaged manifest); export the student again")
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise ExportError(f"export folder {path}: {name} is missing; export the student again")
        if f.stat().st_size != meta.get("bytes") or file_sha256(f) != meta.get("sha256"):
            raise ExportError(f"{f}: does not match its sha256 in {MANIFEST} (damaged or replaced); export the student again")


def expect_task(task: Task, expected: str | None, where: Path) -> None:
    """A one-line error when a caller asked for task `expected` and the student does another."""
    if expected is not None and task.name != expected:
        raise ExportError(f"student {where} does the task {task.name!r}, not {expected!r}")


def session(file: Path, m: dict[str, Any], threads: int | None):
    """An onnxruntime session of the graph `file`, or a one-line error saying why it cannot run."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(file), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for bad graphs and unknown opsets
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ExportError(f"{file}: onnxruntime {ort.__version__} cannot run it (opset {m.get('opset')}, "
                          f"exported with onnxruntime {m.get('onnxruntime')}): {reason}; install a newer onnxruntime "
                          "or export again") from None


def load_tokenizer(path: Path):
    """The folder's tokenizer.json as a `tokenizers.Tokenizer` (no padding or truncation)."""
    try:
        return tokenizer_from_json(json.loads((path / "tokenizer.json").read_text()))
    except Exception as e:  # tokenizers raises its own types for damaged files
        raise ExportError(f"{path / 'tokenizer.json'}: cannot be loaded ({type(e).__name__})") from None
