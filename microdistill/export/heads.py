"""A classifier-head student as one ONNX graph, and its parity with PyTorch.

`model.onnx` (torch.onnx.export, opset 17): input_ids and attention_mask int64 [B, L] with
dynamic batch and length, one raw logits output per field, in the task's field order; beside it
the student's tokenizer.json, task.yaml and calibration.json (runtime/heads.py reads them).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from microdistill.core.temperatures import CALIBRATION
from microdistill.data.corpus import clean_inputs
from microdistill.runtime.common import ExportError
from microdistill.runtime.heads import Exported
from microdistill.students.heads.model import MAX_LENGTH
from microdistill.students.heads.teacher_body import TeacherTokens

OPSET = 17


def check(student) -> None:
    """A one-line error for a heads student this version cannot export."""
    if isinstance(student.tokenizer, TeacherTokens):
        raise ExportError(f"student folder {student.path}: its body is cut from the teacher, which this version does not "
                          "export (it exports heads students on a pretrained encoder); serve the folder with PyTorch")


def write_graphs(student, folder: Path) -> list[str]:
    """model.onnx (float32) and the files the runtime reads beside it; the graphs' names."""
    to_onnx(student, folder / "model.onnx")
    for name in ("tokenizer.json", "task.yaml", CALIBRATION):
        if (student.path / name).is_file():
            shutil.copyfile(student.path / name, folder / name)
    return ["model.onnx"]


def manifest(student) -> dict[str, Any]:
    """export.json's entries particular to a heads export."""
    return {"max_length": MAX_LENGTH, "inputs": ["input_ids", "attention_mask"],
            "outputs": [f"logits_{k}" for k in range(len(student.fields))],
            "fields": [{"name": f.name, "values": f.values} for f in student.fields]}


def to_onnx(student, path: Path) -> None:
    """Write the float32 graph of a heads student to `path`."""
    import torch

    class Graph(torch.nn.Module):
        """The student as the graph sees it: a tuple of per-field logits."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return tuple(self.model(input_ids, attention_mask))

    ids = torch.ones(2, 8, dtype=torch.long)
    names = [f"logits_{k}" for k in range(len(student.fields))]
    axes = {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
            **{n: {0: "batch"} for n in names}}
    with warnings.catch_warnings(), torch.no_grad():
        # the tracer warns about Python branches on shapes; parity below checks the graph on real lengths
        warnings.simplefilter("ignore")
        torch.onnx.export(Graph(student.model).eval(), (ids, torch.ones_like(ids)), str(path), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=names, dynamic_axes=axes,
                          opset_version=OPSET)


def parity(student, exported: Exported, texts: list[str]) -> dict[str, Any]:
    """How often the export answers the (cleaned) texts as PyTorch does: {n, same, rate,
    max_prob_diff (both calibrated alike), differ: [{text, torch, onnx}]}."""
    cleaned = clean_inputs(student.task, texts)
    ref = student.probabilities(cleaned)
    got = exported.probabilities(cleaned)
    answer = lambda probs, i: {f.name: f.values[int(p[i].argmax())] for f, p in zip(student.fields, probs)}  # noqa: E731
    differ = [{"text": t, "torch": answer(ref, i), "onnx": answer(got, i)} for i, t in enumerate(texts)
              if answer(ref, i) != answer(got, i)]
    n = len(texts)
    return {"n": n, "same": n - len(differ), "rate": (n - len(differ)) / n if n else 1.0,
            "max_prob_diff": float(max(np.abs(a - b).max() for a, b in zip(ref, got))) if n else 0.0,
            "differ": differ}
