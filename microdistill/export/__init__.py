"""Export a student to ONNX for the torch-free runtime (runtime/), checked for parity.

    microdistill export --student runs/demo/student --out runs/demo/export [--quantize int8]

Each kind's exporter (heads.py, decoder.py) writes its float32 graphs and the files its runtime
reads. `--quantize int8` then quantises the weights of every graph (onnxruntime's dynamic
quantisation: int8 weights, activations quantised per call). Before the folder appears, the
export answers the held-out split of the student's shards beside PyTorch: the float32 graphs
must give the same answer on every input (else nothing is written), the int8 ones are written
whatever they score, with a warning below 99.5%. export.json records both, and parity.md lists
every input answered differently. `--out` must be new, empty or an earlier export folder: a
folder this verb did not write is never replaced.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from microdistill.core.console import say
from microdistill.core.files import atomic_dir, atomic_write_bytes, atomic_write_json, check_output_folder, file_sha256
from microdistill.data.shards import ShardSet, StoreError
from microdistill.export import decoder, heads
from microdistill.export.heads import OPSET  # one opset for every graph
from microdistill.runtime import load_exported
from microdistill.runtime.common import FORMAT, MANIFEST, VERSION, ExportError

# Every exportable kind; each module has check(student), write_graphs(student, folder) -> graph
# names, manifest(student) -> its export.json entries, parity(student, exported, texts).
EXPORTERS = {"heads": heads, "decoder": decoder}
PRECISIONS = ("float32", "int8")
MIN_INT8_PARITY = 0.995  # the share of held-out answers an int8 export must keep to pass without a warning


def export(student_dir: Path, out: Path, quantize: str | None = None, data: Path | None = None,
           progress: bool = True) -> Path:
    """Write the export folder `out` (replaced as a whole: new, empty, or an earlier export) of the
    student in `student_dir` (a heads student, or a decoder of an enum-only task);
    `data`: the shard folder whose held-out split checks parity (default: the one it was trained on)."""
    from microdistill.students import load_student

    precision = quantize or "float32"
    if precision not in PRECISIONS:
        raise ExportError(f"--quantize {quantize!r}: expected int8 (or nothing, for float32)")
    check_output_folder(out, "--out", MANIFEST, FORMAT, "an export folder",
                        {"student": student_dir, "shard": data or trained_on(Path(student_dir))}, ExportError)
    student = load_student(Path(student_dir))
    kind = EXPORTERS[student.kind]
    kind.check(student)
    texts = parity_texts(student, data, progress)
    check = kind.parity
    out = Path(out)
    with atomic_dir(out) as tmp:
        graphs = kind.write_graphs(student, tmp)
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
    kind = EXPORTERS[student.kind].manifest(student)
    atomic_write_json(folder / MANIFEST, {
        "format": FORMAT, "version": VERSION, "kind": student.kind, "precision": precision, "opset": OPSET,
        "onnxruntime": ort.__version__, **kind, "task": student.task.model_dump(mode="json"),
        "student": {"path": str(student.path), "model_sha256": student.meta.get("model_sha256"),
                    "shards": student.meta.get("shards")},
        "files": files, "parity": checks,
    })


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
