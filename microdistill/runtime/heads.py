"""An exported classifier-head student, answered by onnxruntime without torch.

An export folder of kind "heads" holds, beside export.json (runtime/__init__.py),

    model.onnx       inputs input_ids, attention_mask int64 [B, L]; one raw logits output [B, n_values]
                     per field, in the task's field order (float32 weights, or int8 ones)
    tokenizer.json   the student's WordPiece tokenizer
    calibration.json optional: {"method": "temperature", "temperatures": {field: T}}; each field's
                     logits are divided by its T before the softmax (absent: T = 1)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from microdistill.core.task import EnumField, Task
from microdistill.core.temperatures import read_temperatures
from microdistill.data.corpus import by_length, clean_inputs
from microdistill.runtime.common import ExportError, load_tokenizer, softmax

REQUIRED = ("model.onnx",)  # the graphs, which load() opens in this order


@dataclass
class Exported:
    """A heads export folder ready to answer: predict() gives the same results as the PyTorch student's."""

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
        out = [np.zeros((len(ids), len(f.values)), np.float32) for f in self.fields]
        for chunk in by_length([len(x) for x in ids], batch_size):
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

    def predict(self, texts: Sequence[str], batch_size: int = 64, *, constrain: bool = True) -> list[dict[str, Any]]:
        """One result per text, as predict.predict gives for the PyTorch student: {text, output
        (canonical JSON), fields, valid, truncated, confidence}; texts are cleaned as the corpus was. An export always answers under the task's
        schema, so `constrain` is accepted for the common interface and changes nothing."""
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


def load(path: Path, m: dict[str, Any], task: Task, sessions: list) -> Exported:
    """The heads export of folder `path` (manifest `m`), its graph already open."""
    fields = list(task.output.fields)
    temperatures = read_temperatures(path, [f.name for f in fields], ExportError) or {}
    tokenizer = load_tokenizer(path)
    outputs = [o.name for o in sessions[0].get_outputs()]
    if len(outputs) != len(fields):
        raise ExportError(f"{path / 'model.onnx'}: {len(outputs)} outputs for {len(fields)} fields; export the student again")
    return Exported(sessions[0], tokenizer, task, fields, int(m["max_length"]), temperatures, m, path)
