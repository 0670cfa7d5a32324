"""A classifier-head student's folder: save it, load it, and the loaded student every verb uses.

    from microdistill.students import load_student
    student = load_student("runs/demo/heads")      # a LoadedHeads for a heads folder
    student.predict(["some text"])                  # each answer with a confidence per field

Beside what every student folder holds (students/folder.py), a heads config.json has `encoder`
(the body's config and source), `inputs` ({tokenizer: "wordpiece"}, or {tokenizer: "teacher",
vocab: [the teacher id of each input row]} for a body cut from the teacher) and `fields` (their
values); `tokenizer.json` is the WordPiece tokenizer (whole or pruned), or `tokenizer/` the
teacher's. calibration.json, when present (students/confidence.py), holds one temperature per
field that divides that field's logits before the softmax, so the confidences are calibrated
(the answers never change: T > 0 keeps the argmax).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from microdistill.core.files import atomic_write_bytes, copy_tree_atomic
from microdistill.core.task import EnumField, Task, task_from_dict
from microdistill.core.temperatures import read_temperatures
from microdistill.data.corpus import clean_inputs
from microdistill.data.shards import Record, ShardSet
from microdistill.students.folder import StudentFolderError, check_files, save_folder, shards_summary
from microdistill.students.heads.fields import enum_fields
from microdistill.students.heads.model import (MAX_LENGTH, HeadsExample, HeadsStudent, collate_heads, encode_texts,
                                               examples_of, held_out, token_ids)
from microdistill.students.heads.teacher_body import TeacherTokens

KIND = "heads"


@dataclass
class LoadedHeads:
    """A classifier-head student ready to predict."""

    model: HeadsStudent
    task: Task
    tokenizer: Any  # tokenizers.Tokenizer (WordPiece), or TeacherTokens for a body cut from the teacher
    fields: list[EnumField]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    kind: str = KIND
    temperatures: dict[str, float] | None = None  # from calibration.json; None: the raw softmax

    def logits(self, texts: Sequence[str], batch_size: int = 64) -> list[np.ndarray]:
        """Per field, the raw (uncalibrated) logits [N, n_values] of each text as given (not cleaned)."""
        return self._logits(encode_texts(self.tokenizer, texts), batch_size)

    def probabilities(self, texts: Sequence[str], batch_size: int = 64) -> list[np.ndarray]:
        """Per field, P(value) [N, n_values] for each text as given (calibrated when the folder has temperatures)."""
        return self._probabilities(encode_texts(self.tokenizer, texts), batch_size)

    @torch.no_grad()
    def vectors(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """[N, D]: the encoder's pooled reading of each text as given (what selection spreads over)."""
        self.model.eval()
        ids = encode_texts(self.tokenizer, texts)
        chunks = []
        for i in range(0, len(ids), batch_size):
            b = collate_heads([HeadsExample(x, [0] * len(self.fields), None) for x in ids[i:i + batch_size]])
            chunks.append(self.model.pooled(b.ids, b.mask))
        return torch.cat(chunks).numpy() if chunks else np.zeros((0, self.model.encoder.config.hidden_size), np.float32)

    @torch.no_grad()
    def _logits(self, ids: list[list[int]], batch_size: int) -> list[np.ndarray]:
        self.model.eval()
        chunks: list[list[Tensor]] = []
        for i in range(0, len(ids), batch_size):
            b = collate_heads([HeadsExample(x, [0] * len(self.fields), None) for x in ids[i:i + batch_size]])
            chunks.append(self.model(b.ids, b.mask))
        return [torch.cat([c[k] for c in chunks]).numpy() for k in range(len(self.fields))]

    def _probabilities(self, ids: list[list[int]], batch_size: int) -> list[np.ndarray]:
        temps = self.temperatures or {}
        return [F.softmax(torch.from_numpy(z) / temps.get(f.name, 1.0), -1).numpy()
                for f, z in zip(self.fields, self._logits(ids, batch_size))]

    def predict(self, texts: Sequence[str], batch_size: int = 64, *, constrain: bool = True) -> list[dict[str, Any]]:
        """One result per text (cleaned as the corpus was): {text, output (canonical JSON), fields,
        valid, truncated, confidence}. The answer is assembled from allowed values, so it is
        valid with or without `constrain`."""
        if not texts:
            return []
        full = token_ids(self.tokenizer, clean_inputs(self.task, texts))  # tokenised once, on the hot path
        probs = self._probabilities([x[:MAX_LENGTH] for x in full], batch_size)
        results = []
        for i, text in enumerate(texts):
            picks = {f.name: f.values[int(p[i].argmax())] for f, p in zip(self.fields, probs)}
            results.append({"text": text, "output": self.task.serialize(picks), "fields": picks, "valid": True,
                            "truncated": len(full[i]) > MAX_LENGTH,
                            "confidence": {f.name: float(p[i].max()) for f, p in zip(self.fields, probs)}})
        return results

    def held_out(self, records: Sequence[Record], batch_size: int = 64) -> dict[str, Any]:
        """The trainer's held-out metrics on `records` (model.held_out)."""
        return held_out(self.model, self.fields, examples_of(records, self.tokenizer, self.fields, False), batch_size)

    def check_shards(self, shards: ShardSet) -> None:
        """Nothing to check: it reads text with its own tokenizer, no vocabulary is shared."""

    def describe(self) -> dict[str, Any]:
        return self.meta.get("training")


def save_heads(model: HeadsStudent, tokens: dict | TeacherTokens, shards: ShardSet, path: Path, encoder_source: str,
               extra: dict[str, Any] | None = None) -> Path:
    """Write the student folder `path` (see the module docstring); config.json last. `tokens`: the
    WordPiece tokenizer.json, or the TeacherTokens of a body cut from the teacher."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    task = shards.task()
    if isinstance(tokens, TeacherTokens):
        copy_tree_atomic(shards.dir / "tokenizer", path / "tokenizer")
        inputs = {"tokenizer": "teacher", "vocab": [int(i) for i in tokens.input_vocab]}
    else:
        atomic_write_bytes(path / "tokenizer.json", json.dumps(tokens, ensure_ascii=False).encode())
        inputs = {"tokenizer": "wordpiece"}
    entries = {"encoder": {"source": encoder_source, "config": model.encoder.config.to_dict(), "dropout": model.drop.p},
               "inputs": inputs, "fields": [{"name": f.name, "values": f.values} for f in enum_fields(task, str(path))]}
    return save_folder(path, KIND, model, task, entries, shards_summary(shards), extra)


def load_heads(path: Path, cfg: dict[str, Any]) -> LoadedHeads:
    """A heads folder whose config.json (`cfg`) students.load_student has read."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from microdistill.data.vocab import tokenizer_from_json

    teacher_inputs = (cfg.get("inputs") or {}).get("tokenizer") == "teacher"
    weights = check_files(path, ("model.safetensors", "tokenizer" if teacher_inputs else "tokenizer.json", "task.yaml"), cfg)
    try:
        enc = cfg["encoder"]
        config = AutoConfig.for_model(**{k: v for k, v in enc["config"].items() if k != "model_type"},
                                      model_type=enc["config"]["model_type"])
        task = task_from_dict(cfg["task"], f"in {path / 'config.json'}")
        sizes = [len(f["values"]) for f in cfg["fields"]]
        dropout = float(enc.get("dropout", 0.0))
    except (KeyError, TypeError, ValueError) as e:
        raise StudentFolderError(f"{path / 'config.json'}: missing or bad entry ({type(e).__name__}: {e})") from None
    model = HeadsStudent(AutoModel.from_config(config), sizes, dropout)
    try:
        model.load_state_dict(load_file(str(weights)))
        if teacher_inputs:
            tokenizer = TeacherTokens(AutoTokenizer.from_pretrained(str(path / "tokenizer")),
                                      [int(i) for i in cfg["inputs"]["vocab"]])
        else:
            tokenizer = tokenizer_from_json(json.loads((path / "tokenizer.json").read_text()))
    except Exception as e:  # safetensors, torch and tokenizers raise several types for damaged files
        raise StudentFolderError(f"student folder {path}: cannot be loaded ({type(e).__name__})") from None
    model.eval()
    meta = {k: v for k, v in cfg.items() if k not in ("encoder", "fields", "task")}
    fields = enum_fields(task, str(path))
    temperatures = read_temperatures(path, [f.name for f in fields], StudentFolderError)
    return LoadedHeads(model, task, tokenizer, fields, meta, path, temperatures=temperatures)
