"""The lean runtime: an exported classifier-head student answered by onnxruntime, without torch.

    microdistill predict --student runs/demo/export "thanks, that fixed it!"
    from microdistill.runtime import load_exported   # load_exported("runs/demo/export").predict([...])

An export folder (written by export.py) holds

    model.onnx       inputs input_ids, attention_mask int64 [B, L]; one raw logits output [B, n_values]
                     per field, in the task's field order (float32 weights, or int8 ones)
    tokenizer.json   the student's WordPiece tokenizer
    task.yaml        the task, for people to read (export.json's copy is the one loaded)
    export.json      format and version, kind, fields and values, task, opset, the onnxruntime that
                     exported it, each file's size and sha256, precision, parity with PyTorch
    parity.md        every held-out input where the export answers differently from PyTorch
    calibration.json optional: {"method": "temperature", "temperatures": {field: T}}; each field's
                     logits are divided by its T before the softmax (absent: T = 1)

This module imports onnxruntime, tokenizers, numpy and the package's pure-Python parts only, so
`pip install microdistill` (no torch) can load and answer with an export.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from microdistill.corpus import clean_inputs
from microdistill.errors import UserError
from microdistill.files import file_sha256, read_format
from microdistill.students import read_temperatures
from microdistill.students.encoder import tokenizer_from_json
from microdistill.task import EnumField, Task, TaskError, task_from_dict

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


@dataclass
class Exported:
    """An export folder ready to answer: predict() gives the same results as the PyTorch student's."""

    session: Any  # onnxruntime.InferenceSession
    tokenizer: Any  # tokenizers.Tokenizer
    task: Task
    fields: list[EnumField]
    max_length: int
    temperatures: dict[str, float] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    kind: str = "heads"

    def logits(self, ids: list[list[int]], batch_size: int = 64) -> list[np.ndarray]:
        """Per field, raw logits [N, n_values] for token ids (already truncated). Inputs are run
        shortest first and each batch is padded only to its own longest row; padding never changes
        a row's answer (the mask keeps it out of attention and the mean)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = [np.zeros((len(ids), len(f.values)), np.float32) for f in self.fields]
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(ids[i]) for i in chunk)
            x = np.zeros((len(chunk), width), np.int64)
            mask = np.zeros((len(chunk), width), np.int64)
            for row, i in enumerate(chunk):
                x[row, :len(ids[i])] = ids[i]
                mask[row, :len(ids[i])] = 1
            for k, z in enumerate(self.session.run(None, {"input_ids": x, "attention_mask": mask})):
                out[k][chunk] = z
        return out

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, untruncated (the student's tokenizer, special tokens included)."""
        return [enc.ids for enc in self.tokenizer.encode_batch(list(texts))]

    def probabilities(self, texts: Sequence[str], batch_size: int = 64) -> list[np.ndarray]:
        """Per field, P(value) [N, n_values] of each text as given (not cleaned), calibrated when the
        folder holds temperatures."""
        ids = [x[:self.max_length] for x in self.encode(texts)]
        return self._calibrated(self.logits(ids, batch_size))

    def _calibrated(self, logits: list[np.ndarray]) -> list[np.ndarray]:
        return [softmax(z / np.float32(self.temperatures.get(f.name, 1.0))) for f, z in zip(self.fields, logits)]

    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list[dict[str, Any]]:
        """One result per text, as predict.predict gives for the PyTorch student: {text, output
        (canonical JSON), fields, valid, truncated, confidence}; texts are cleaned as the corpus was."""
        if not texts:
            return []
        full = self.encode(clean_inputs(self.task, texts))
        probs = self._calibrated(self.logits([x[:self.max_length] for x in full], batch_size))
        results = []
        for i, text in enumerate(texts):
            picks = {f.name: f.values[int(p[i].argmax())] for f, p in zip(self.fields, probs)}
            results.append({"text": text, "output": self.task.serialize(picks), "fields": picks, "valid": True,
                            "truncated": len(full[i]) > self.max_length,
                            "confidence": {f.name: float(p[i].max()) for f, p in zip(self.fields, probs)}})
        return results


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


def check_files(path: Path, manifest: dict[str, Any]) -> None:
    """Every file export.json lists is present with its recorded size and sha256."""
    files = manifest.get("files")
    if not isinstance(files, dict) or "model.onnx" not in files:
        raise ExportError(f"{path / MANIFEST}: lists no model.onnx (a damaged manifest); export the student again")
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


def load_exported(path: Path, task: str | None = None, threads: int | None = None) -> Exported:
    """The export folder `path`, verified (format, version, file hashes) and ready to predict.

    task: the task name the caller expects (an error when the student does another).
    threads: onnxruntime intra-op threads (default: the cores, up to 4).
    """
    import onnxruntime as ort

    path = Path(path)
    m = read_manifest(path)
    if m.get("kind") != "heads":
        raise ExportError(f"{path / MANIFEST}: a {m.get('kind')!r} export, which this version cannot run (it runs 'heads')")
    check_files(path, m)
    try:
        t = task_from_dict(m["task"], f"in {path / MANIFEST}")
        fields = list(t.output.fields)
        if [[f.name, f.values] for f in fields] != [[f["name"], f["values"]] for f in m["fields"]]:
            raise ExportError(f"{path / MANIFEST}: its fields do not match its task; export the student again")
        max_length = int(m["max_length"])
    except TaskError as e:
        raise ExportError(str(e)) from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ExportError(f"{path / MANIFEST}: missing or bad entry ({type(e).__name__}: {e})") from None
    expect_task(t, task, path)
    temperatures = read_temperatures(path, [f.name for f in fields]) or {}
    try:
        session = ort.InferenceSession(str(path / "model.onnx"), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for bad graphs and unknown opsets
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ExportError(f"{path / 'model.onnx'}: onnxruntime {ort.__version__} cannot run it (opset {m.get('opset')}, "
                          f"exported with onnxruntime {m.get('onnxruntime')}): {reason}; install a newer onnxruntime "
                          "or export again") from None
    try:
        tokenizer = tokenizer_from_json(json.loads((path / "tokenizer.json").read_text()))
    except Exception as e:  # tokenizers raises its own types for damaged files
        raise ExportError(f"{path / 'tokenizer.json'}: cannot be loaded ({type(e).__name__})") from None
    outputs = [o.name for o in session.get_outputs()]
    if len(outputs) != len(fields):
        raise ExportError(f"{path / 'model.onnx'}: {len(outputs)} outputs for {len(fields)} fields; export the student again")
    return Exported(session, tokenizer, t, fields, max_length, temperatures, m, path)
