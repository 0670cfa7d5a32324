"""The lean runtime: an exported student answered by onnxruntime, without torch.

    microdistill predict --student runs/demo/export "thanks, that fixed it!"
    from microdistill.runtime.load import load_exported   # load_exported("runs/demo/export").predict([...])

An export folder (written by export.py) holds, for a classifier-head student ("kind": "heads"),

    model.onnx       inputs input_ids, attention_mask int64 [B, L]; one raw logits output [B, n_values]
                     per field, in the task's field order (float32 weights, or int8 ones)
    tokenizer.json   the student's WordPiece tokenizer
    calibration.json optional: {"method": "temperature", "temperatures": {field: T}}; each field's
                     logits are divided by its T before the softmax (absent: T = 1)

and for a decoder student of an enum-only task ("kind": "decoder", runtime_decode.py)

    prefill.onnx     input ids -> the first output token's logits and the KV cache (export_decoder.py)
    decode.onnx      one output token and the cache -> the next token's logits and the grown cache
    automaton.json   per state of the task's finite output language, the kept output tokens the
                     grammar allows and where each leads: xgrammar's masks, without xgrammar
    tokenizer.json   the teacher's tokenizer (inputs are its ids inside the student's input vocabulary)

and, whatever the kind,

    task.yaml        the task, for people to read (export.json's copy is the one loaded)
    export.json      format and version, kind, fields and values, task, opset, the onnxruntime that
                     exported it, each file's size and sha256, precision, parity with PyTorch
    parity.md        every held-out input where the export answers differently from PyTorch

Both kinds answer through the same interface: kind, task, fields, path, tokenizer and
predict(texts) -> one result dict per text with a confidence per field. This module imports
onnxruntime, tokenizers, numpy and the package's pure-Python parts only, so `pip install
microdistill` (no torch) can load and answer with an export.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from microdistill.data.corpus import by_length, clean_inputs
from microdistill.core.errors import UserError
from microdistill.core.files import file_sha256, read_format
from microdistill.runtime.decoder import AUTOMATON, ExportedDecoder, TokenAutomaton
from microdistill.students import read_temperatures
from microdistill.students.heads.encoder import tokenizer_from_json
from microdistill.core.task import EnumField, Task, TaskError, task_from_dict

FORMAT, VERSION = "microdistill.export", 1
MANIFEST = "export.json"
# the files each kind cannot run without, graphs first (export.json lists every file it wrote)
REQUIRED = {"heads": ("model.onnx",), "decoder": ("prefill.onnx", "decode.onnx", AUTOMATON)}


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
    missing = [n for n in REQUIRED.get(manifest.get("kind"), ()) if not isinstance(files, dict) or n not in files]
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


def load_exported(path: Path, task: str | None = None, threads: int | None = None) -> Exported | ExportedDecoder:
    """The export folder `path`, verified (format, version, file hashes) and ready to predict.

    task: the task name the caller expects (an error when the student does another).
    threads: onnxruntime intra-op threads (default: the cores, up to 4).
    """
    path = Path(path)
    m = read_manifest(path)
    if m.get("kind") not in REQUIRED:
        raise ExportError(f"{path / MANIFEST}: a {m.get('kind')!r} export, which this version cannot run "
                          f"(it runs {' and '.join(map(repr, REQUIRED))})")
    check_files(path, m)
    try:
        t = task_from_dict(m["task"], f"in {path / MANIFEST}")
        fields = list(t.output.fields)
        if [[f.name, getattr(f, "values", None)] for f in fields] != [[f["name"], f["values"]] for f in m["fields"]]:
            raise ExportError(f"{path / MANIFEST}: its fields do not match its task; export the student again")
        expect_task(t, task, path)
        sessions = [session(path / name, m, threads) for name in REQUIRED[m["kind"]] if name.endswith(".onnx")]
        if m["kind"] == "decoder":
            return load_decoder(path, m, t, sessions)
        max_length = int(m["max_length"])
    except TaskError as e:
        raise ExportError(str(e)) from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ExportError(f"{path / MANIFEST}: missing or bad entry ({type(e).__name__}: {e})") from None
    temperatures = read_temperatures(path, [f.name for f in fields]) or {}
    tokenizer = load_tokenizer(path)
    outputs = [o.name for o in sessions[0].get_outputs()]
    if len(outputs) != len(fields):
        raise ExportError(f"{path / 'model.onnx'}: {len(outputs)} outputs for {len(fields)} fields; export the student again")
    return Exported(sessions[0], tokenizer, t, fields, max_length, temperatures, m, path)


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


def load_decoder(path: Path, m: dict[str, Any], task: Task, sessions: list) -> ExportedDecoder:
    """The decoder export of folder `path` (manifest `m`), its graphs already open."""
    v = m["vocab"]
    try:
        automaton = TokenAutomaton.from_dict(json.loads((path / AUTOMATON).read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, IndexError) as e:
        raise ExportError(f"{path / AUTOMATON}: unreadable ({type(e).__name__}: {e}); export the student again") from None
    kept = np.asarray(v["kept"], dtype=np.int64)
    top = max((k for e in automaton.edges for k in e), default=0)
    if int(v["eos"]) not in kept.tolist() or automaton.eos != kept.tolist().index(int(v["eos"])) or top >= len(kept):
        raise ExportError(f"{path / AUTOMATON}: does not fit the kept vocabulary of {MANIFEST}; export the student again")
    return ExportedDecoder(*sessions, load_tokenizer(path), task, automaton, kept, [int(i) for i in v["input"]],
                           int(v["input_offset"]), int(v["pad"]), int(m["max_input"]), int(m["budget"]), m, path)
