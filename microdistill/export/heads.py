"""Export a student to ONNX for the torch-free runtime (runtime.py), checked for parity.

    microdistill export --student runs/demo/student --out runs/demo/export [--quantize int8]

A classifier-head student is one graph (torch.onnx.export, opset 17): input_ids and
attention_mask int64 [B, L] with dynamic batch and length, one raw logits output per field. A
decoder student of an enum-only task is two graphs, prefill and decode, and the automaton of the
task's outputs that replaces xgrammar at run time (export_decoder.py). `--quantize int8` then
quantises the weights of every graph (onnxruntime's dynamic quantisation: int8 weights,
activations quantised per call). Before the folder appears, the export answers the held-out
split of the student's shards beside PyTorch: the float32 graphs must give the same answer on
every input (else nothing is written), the int8 ones are written whatever they score, with a
warning below 99.5%. export.json records both, and parity.md lists every input answered differently.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from microdistill.export import decoder as export_decoder
from microdistill.core.console import say
from microdistill.data.corpus import clean_inputs
from microdistill.export.decoder import OPSET  # one opset for every graph
from microdistill.core.files import atomic_dir, check_output_folder, atomic_write_bytes, atomic_write_json, file_sha256
from microdistill.runtime.load import FORMAT, MANIFEST, VERSION, Exported, ExportError, load_exported
from microdistill.runtime.decoder import AUTOMATON
from microdistill.data.shards import ShardSet, StoreError
from microdistill.students import CALIBRATION
from microdistill.students.heads.teacher_body import TeacherTokens

PRECISIONS = ("float32", "int8")
MIN_INT8_PARITY = 0.995  # the share of held-out answers an int8 export must keep to pass without a warning


def export(student_dir: Path, out: Path, quantize: str | None = None, data: Path | None = None,
           progress: bool = True) -> Path:
    """Write the export folder `out` (replaced as a whole: new, empty, or an earlier export) of the
    student in `student_dir` (a heads student, or a decoder of an enum-only task);
    `data`: the shard folder whose held-out split checks parity (default: the one it was trained on)."""
    from microdistill.students.decoder.folder import load_student

    precision = quantize or "float32"
    if precision not in PRECISIONS:
        raise ExportError(f"--quantize {quantize!r}: expected int8 (or nothing, for float32)")
    check_output_folder(out, "--out", MANIFEST, FORMAT, "an export folder",
                        {"student": student_dir, "shard": data or trained_on(Path(student_dir))}, ExportError)
    student = load_student(Path(student_dir))
    if student.kind == "decoder":
        export_decoder.check_exportable(student)
    elif isinstance(student.tokenizer, TeacherTokens):
        raise ExportError(f"student folder {student_dir}: its body is cut from the teacher, which this version does not "
                          "export (it exports heads students on a pretrained encoder); serve the folder with PyTorch")
    texts = parity_texts(student, data, progress)
    check = export_decoder.parity if student.kind == "decoder" else parity
    out = Path(out)
    with atomic_dir(out) as tmp:
        graphs = write_graphs(student, tmp)
        write_manifest(tmp, student, "float32", {})
        checks = {"float32": check(student, load_exported(tmp), texts)}
        if checks["float32"]["same"] < checks["float32"]["n"]:
            first = checks["float32"]["differ"][0]
            raise ExportError(f"the float32 ONNX graph answers {checks['float32']['n'] - checks['float32']['same']} of "
                              f"{checks['float32']['n']} held-out inputs differently from PyTorch (first: "
                              f"{first['text'][:80]!r}); nothing was written")
        if precision == "int8":
            for name in graphs:
                quantize_int8(tmp / name)
            write_manifest(tmp, student, "int8", {})
            checks["int8"] = check(student, load_exported(tmp), texts)
        atomic_write_bytes(tmp / "parity.md", parity_markdown(checks).encode())
        write_manifest(tmp, student, precision, {k: {x: v for x, v in c.items() if x != "differ"} for k, c in checks.items()})
    if precision == "int8" and checks["int8"]["rate"] < MIN_INT8_PARITY:
        say(f"warning: the int8 export answers {checks['int8']['rate']:.2%} of {checks['int8']['n']} held-out inputs as "
            f"PyTorch does, under {MIN_INT8_PARITY:.1%}; see {out / 'parity.md'} (the float32 export keeps 100%)")
    c = checks[precision]
    say(f"exported {precision} to {out}: {c['same']}/{c['n']} held-out answers as PyTorch's", progress)
    return out


def trained_on(student_dir: Path) -> Path | None:
    """The shard folder a student folder records (read before the student loads), if any."""
    try:
        return Path(json.loads((student_dir / "config.json").read_text())["shards"]["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # load_student says what is wrong with the folder


def parity_texts(student, data: Path | None, progress: bool) -> list[str]:
    """The held-out texts of `data`, or of the shards the student was trained on."""
    recorded = (student.meta.get("shards") or {}).get("path")
    if data is None and (recorded is None or not Path(recorded).is_dir()):
        raise ExportError(f"student folder {student.path}: the shards it was trained on ({recorded}) are not found "
                          "here; give them with --data SHARDS")
    data = Path(data or recorded)
    try:
        shards = ShardSet(data)
    except StoreError as e:
        raise ExportError(f"--data: {e}") from None
    want = (student.meta.get("shards") or {}).get("task_fingerprint")
    if want and shards.manifest.get("task_fingerprint") != want:
        raise ExportError(f"shard folder {data}: made for another task than the student's ({student.task.name!r}); "
                          "give the shards it was trained on with --data")
    texts = [r.text for r in shards.records("val")]
    if not texts:
        say(f"warning: shard folder {data} holds no held-out examples; parity is checked on its training split", progress)
        texts = [r.text for r in shards.records("train")]
    return texts


def write_graphs(student, folder: Path) -> list[str]:
    """The float32 graphs and the files the runtime reads beside them; the graphs' names."""
    if student.kind == "decoder":
        graphs = export_decoder.to_onnx(student, folder)
        atomic_write_json(folder / AUTOMATON, export_decoder.automaton(student).to_dict())
        copies = {"tokenizer.json": student.path / "tokenizer" / "tokenizer.json", "task.yaml": student.path / "task.yaml"}
        if not copies["tokenizer.json"].is_file():
            raise ExportError(f"{copies['tokenizer.json']}: not found; the runtime reads the teacher's fast tokenizer "
                              "from it (a tokenizer without tokenizer.json cannot be exported)")
    else:
        to_onnx(student, folder / "model.onnx")
        graphs = ["model.onnx"]
        copies = {name: student.path / name for name in ("tokenizer.json", "task.yaml", CALIBRATION)}
    for name, src in copies.items():
        if src.is_file():
            shutil.copyfile(src, folder / name)
    return graphs


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


def quantize_int8(path: Path) -> None:
    """Replace the float32 graph at `path` by one with int8 weights (dynamic quantisation).

    One scale per output channel and 7-bit weight range: on the default run's 999 comments they kept
    99.9% of PyTorch's answers against 99.6% with one scale per matrix and the full range (7 bits also
    keep CPUs without VNNI from overflowing their 16-bit accumulators)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # its advice is for image models
    with tempfile.TemporaryDirectory() as scratch:
        q = Path(scratch) / "int8.onnx"
        quantize_dynamic(str(path), str(q), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
        shutil.move(str(q), str(path))


def write_manifest(folder: Path, student, precision: str, checks: dict[str, Any]) -> None:
    import onnxruntime as ort

    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.iterdir()) if p.name not in (MANIFEST, "parity.md")}
    if student.kind == "decoder":
        kind = export_decoder.manifest(student)
    else:
        from microdistill.students.heads.model import MAX_LENGTH

        kind = {"max_length": MAX_LENGTH, "inputs": ["input_ids", "attention_mask"],
                "outputs": [f"logits_{k}" for k in range(len(student.fields))],
                "fields": [{"name": f.name, "values": f.values} for f in student.fields]}
    atomic_write_json(folder / MANIFEST, {
        "format": FORMAT, "version": VERSION, "kind": student.kind, "precision": precision, "opset": OPSET,
        "onnxruntime": ort.__version__, **kind, "task": student.task.model_dump(mode="json"),
        "student": {"path": str(student.path), "model_sha256": student.meta.get("model_sha256"),
                    "shards": student.meta.get("shards")},
        "files": files, "parity": checks,
    })


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


def parity_markdown(checks: dict[str, dict[str, Any]]) -> str:
    lines = ["# Parity with PyTorch on the held-out inputs", ""]
    for precision, c in checks.items():
        lines += [f"## {precision}: {c['same']}/{c['n']} answers the same ({c['rate']:.2%}), "
                  f"largest probability difference {c['max_prob_diff']:.2e}", ""]
        if c["differ"]:
            lines += ["| text | PyTorch | ONNX |", "|---|---|---|"]
            cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            lines += [f"| {cell(d['text'])} | {cell(d['torch'])} | {cell(d['onnx'])} |" for d in c["differ"]]
            lines.append("")
    return "\n".join(lines) + "\n"
