"""The classifier-head student: one encoder pass, one softmax per enum field over its values.

    microdistill train --data runs/demo/shards --out runs/demo/heads --student heads

For a task whose fields are all enums, the teacher's whole answer is a few decisions; its
shards keep, for each, the teacher's probability of every allowed value (the decision points,
see generation.py). This student reads the input with a pretrained encoder (encoder.py),
mean-pools the final states over the real tokens, and has one linear head per field. Its
answer is the most probable value of each field, assembled into the task's canonical JSON, so
it is always valid; each field's softmax probability is its confidence.

The folder (kind "heads") holds model.safetensors, config.json (kind, the encoder's config,
the fields and their values, the task, the shards' summary, the training options),
tokenizer.json (the pruned WordPiece tokenizer) and task.yaml; a body cut from the teacher
(teacher_body.py) has the teacher's tokenizer/ instead, and config.json's "inputs" lists the
teacher id of each input row. calibration.json, when present
(confidence.py), holds one temperature per field that divides that field's logits before the
softmax, so the confidences are calibrated (the answers never change: T > 0 keeps the argmax).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from microdistill.core.errors import UserError
from microdistill.core.files import atomic_write_bytes, atomic_write_json, copy_tree_atomic
from microdistill.data.shards import Record, ShardSet
from microdistill.students import FORMAT, StudentFolderError, read_temperatures
from microdistill.students.heads.teacher_body import TeacherTokens
from microdistill.core.task import EnumField, Task

KIND = "heads"
MAX_LENGTH = 128  # WordPiece tokens per input; the task's inputs are far shorter


class HeadsError(UserError):
    """A task or folder the classifier-head student cannot serve; one line for the user."""


def enum_fields(task: Task, where: str) -> list[EnumField]:
    """The task's fields, which must all be enums for this student."""
    free = [f.name for f in task.output.fields if not isinstance(f, EnumField)]
    if free:
        raise HeadsError(f"{where}: task {task.name!r} has free-text or number fields ({', '.join(free)}), which a "
                         "classifier-head student cannot produce; use --student decoder")
    return list(task.output.fields)


class HeadsStudent(nn.Module):
    """encoder -> mean of the final states over real tokens -> dropout -> one linear head per field."""

    def __init__(self, encoder: nn.Module, sizes: Sequence[int], dropout: float = 0.0):
        super().__init__()
        self.encoder = encoder
        d = encoder.config.hidden_size
        self.drop = nn.Dropout(dropout)
        self.heads = nn.ModuleList(nn.Linear(d, n) for n in sizes)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.get_input_embeddings()

    def pooled(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask [B, L] -> [B, D]: the final hidden states averaged over the real tokens."""
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1)

    def forward(self, ids: Tensor, mask: Tensor) -> list[Tensor]:
        """One logits tensor [B, n_values] per field, in the task's field order."""
        x = self.drop(self.pooled(ids, mask))
        return [head(x) for head in self.heads]


# ---- data ---------------------------------------------------------------------------------------
@dataclass
class HeadsBatch:
    """ids, mask [B, L]; target [B, F] the teacher's value index per field; teacher: per field
    log P_teacher [B, n_values] from the decision points, or None (text-only shards)."""

    ids: Tensor
    mask: Tensor
    target: Tensor
    teacher: list[Tensor] | None
    n_tokens: int


@dataclass
class HeadsExample:
    ids: list[int]
    target: list[int]
    decisions: list[np.ndarray] | None


def token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """The body's input ids of each text, untruncated: from a WordPiece `tokenizers.Tokenizer`
    (special tokens included), or from the teacher's tokenizer for a body cut from the teacher."""
    if isinstance(tokenizer, TeacherTokens):
        return tokenizer.ids(texts)
    return [enc.ids for enc in tokenizer.encode_batch(list(texts))]


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [x[:MAX_LENGTH] for x in token_ids(tokenizer, texts)]


def examples_of(records: Sequence[Record], tokenizer, fields: list[EnumField], use_decisions: bool) -> list[HeadsExample]:
    ids = encode_texts(tokenizer, [r.text for r in records])
    out = []
    for r, x in zip(records, ids):
        target = [f.values.index(r.fields[f.name]) for f in fields]
        dec = [np.asarray(r.decisions[f.name], dtype=np.float32) for f in fields] if use_decisions else None
        out.append(HeadsExample(x, target, dec))
    return out


def collate_heads(examples: list[HeadsExample]) -> HeadsBatch:
    B, L = len(examples), max(len(e.ids) for e in examples)
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
    target = torch.tensor([e.target for e in examples], dtype=torch.long)
    teacher = None
    if examples[0].decisions is not None:
        # log P over the values; a value the teacher gave no mass keeps a finite floor
        teacher = [torch.from_numpy(np.stack([e.decisions[k] for e in examples])).clamp_min(1e-12).log()
                   for k in range(len(examples[0].decisions))]
    return HeadsBatch(ids, mask, target, teacher, int(mask.sum()))


# ---- the saved student -------------------------------------------------------------------------
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
        """Per field, the raw (uncalibrated) logits [N, n_values] of each text."""
        return self._logits(encode_texts(self.tokenizer, texts), batch_size)

    def probabilities(self, texts: Sequence[str], batch_size: int = 64) -> list[np.ndarray]:
        """Per field, P(value) [N, n_values] for each text (calibrated when the folder has temperatures)."""
        return self._probabilities(encode_texts(self.tokenizer, texts), batch_size)

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

    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list[dict[str, Any]]:
        """One result per text: {text, output (canonical JSON), fields, valid, truncated, confidence}."""
        if not texts:
            return []
        full = token_ids(self.tokenizer, texts)  # tokenised once, on the hot path
        probs = self._probabilities([x[:MAX_LENGTH] for x in full], batch_size)
        lengths = [len(x) for x in full]
        results = []
        for i, text in enumerate(texts):
            picks = {f.name: f.values[int(p[i].argmax())] for f, p in zip(self.fields, probs)}
            results.append({"text": text, "output": self.task.serialize(picks), "fields": picks, "valid": True,
                            "truncated": lengths[i] > MAX_LENGTH,
                            "confidence": {f.name: float(p[i].max()) for f, p in zip(self.fields, probs)}})
        return results


def save_heads(model: HeadsStudent, tokens: dict | TeacherTokens, shards: ShardSet, path: Path, encoder_source: str,
               extra: dict[str, Any] | None = None) -> Path:
    """Write the student folder `path` (see the module docstring); config.json last. `tokens`: the
    pruned WordPiece tokenizer.json, or the TeacherTokens of a body cut from the teacher."""
    from safetensors.torch import save

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    task = shards.task()
    weights = save({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, metadata={"format": FORMAT})
    if isinstance(tokens, TeacherTokens):
        copy_tree_atomic(shards.dir / "tokenizer", path / "tokenizer")
        inputs = {"tokenizer": "teacher", "vocab": [int(i) for i in tokens.input_vocab]}
    else:
        atomic_write_bytes(path / "tokenizer.json", json.dumps(tokens, ensure_ascii=False).encode())
        inputs = {"tokenizer": "wordpiece"}
    atomic_write_bytes(path / "task.yaml", yaml.safe_dump(task.model_dump(), sort_keys=False, allow_unicode=True).encode())
    atomic_write_bytes(path / "model.safetensors", weights)
    m = shards.manifest
    atomic_write_json(path / "config.json", {
        "format": FORMAT, "kind": KIND,
        "encoder": {"source": encoder_source, "config": model.encoder.config.to_dict(), "dropout": model.drop.p},
        "inputs": inputs,
        "fields": [{"name": f.name, "values": f.values} for f in enum_fields(task, str(path))],
        "task": task.model_dump(),
        "shards": {"path": str(shards.dir), "task_fingerprint": m.get("task_fingerprint"), "teacher": m.get("teacher"),
                   "signal": m.get("signal", "logits"), "counts": m.get("counts")},
        "model_bytes": len(weights), "model_sha256": hashlib.sha256(weights).hexdigest(),
        **(extra or {}),
    })
    return path


def load_heads(path: Path, cfg: dict[str, Any]) -> LoadedHeads:
    """A heads folder whose config.json (`cfg`) has been read and checked by saved.load_student."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from microdistill.students.heads.encoder import tokenizer_from_json
    from microdistill.core.task import task_from_dict

    teacher_inputs = (cfg.get("inputs") or {}).get("tokenizer") == "teacher"
    for name in ("model.safetensors", "tokenizer" if teacher_inputs else "tokenizer.json", "task.yaml"):
        if not (path / name).exists():
            raise StudentFolderError(f"student folder {path}: {name} is missing (not a complete student folder)")
    try:
        enc = cfg["encoder"]
        config = AutoConfig.for_model(**{k: v for k, v in enc["config"].items() if k != "model_type"},
                                      model_type=enc["config"]["model_type"])
        task = task_from_dict(cfg["task"], f"in {path / 'config.json'}")
        sizes = [len(f["values"]) for f in cfg["fields"]]
        dropout = float(enc.get("dropout", 0.0))
    except (KeyError, TypeError, ValueError) as e:
        raise StudentFolderError(f"{path / 'config.json'}: missing or bad entry ({type(e).__name__}: {e})") from None
    weights = path / "model.safetensors"
    if weights.stat().st_size != cfg.get("model_bytes", weights.stat().st_size):
        raise StudentFolderError(f"{weights}: does not match config.json (an interrupted save?); save the student again")
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
    return LoadedHeads(model, task, tokenizer, fields, meta, path, temperatures=read_temperatures(path, [f.name for f in fields]))
