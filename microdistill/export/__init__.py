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
from microdistill.data.samples import probe_texts
from microdistill.data.shards import ShardSet, StoreError
from microdistill.export import decoder, heads
from microdistill.export.heads import OPSET  # one opset for every graph
from microdistill.runtime import load_exported
from microdistill.runtime.common import FORMAT, MANIFEST, VERSION, ExportError

# Every exportable kind; each module has check(student), write_graphs(student, folder) -> graph
# names, manifest(student) -> its export.json entries, parity(student, exported, texts).
EXPORTERS = {"heads": heads, "decoder": decoder}
PRECISIONS = ("float32", "int8")
MIN_INT8_PARITY = 0.995  # the share of held-out answers an int8 graph must keep to be written
MIN_INT8_PROBE = 0.99  # and of the probe texts' (text unlike the training inputs)


def export(student_dir: Path, out: Path, quantize: str | None = None, data: Path | None = None,
           progress: bool = True, int8_anyway: bool = False) -> Path:
    """Write the export folder `out` (replaced as a whole: new, empty, or an earlier export) of the
    student in `student_dir` (a heads student, or a decoder of an enum-only task);
    `data`: the shard folder whose held-out split checks parity (default: the one it was trained on).
    int8 is written only when it keeps the student's answers (MIN_INT8_PARITY on the held-out
    split, MIN_INT8_PROBE on the probe texts), else float32, unless `int8_anyway`."""
    from microdistill.students import load_student

    precision = quantize or "float32"
    if precision not in PRECISIONS:
        raise ExportError(f"--quantize {quantize!r}: expected int8 (or nothing, for float32)")
    check_output_folder(out, "--out", MANIFEST, FORMAT, "an export folder",
                        {"student": student_dir, "shard": data or trained_on(Path(student_dir))}, ExportError)
    student = load_student(Path(student_dir))
    kind = EXPORTERS[student.kind]
    kind.check(student)
    sets = {"held-out": parity_texts(student, data, progress), "probe": probe_texts()}
    out, why = Path(out), None
    with atomic_dir(out) as tmp:
        graphs = kind.write_graphs(student, tmp)
        checks = {"float32": measure(kind, student, tmp, "float32", sets)}
        if checks["float32"]["same"] < checks["float32"]["n"]:
            first = checks["float32"]["differ"][0]
            raise ExportError(f"the float32 ONNX graph answers {checks['float32']['n'] - checks['float32']['same']} of "
                              f"{checks['float32']['n']} held-out inputs differently from PyTorch (first: "
                              f"{first['text'][:80]!r}); nothing was written")
        if precision == "int8":
            float32 = {name: (tmp / name).read_bytes() for name in graphs}
            for name in graphs:
                quantize_int8(tmp / name)
            checks["int8"] = measure(kind, student, tmp, "int8", sets)
            why = unfaithful(checks["int8"])
            if why and not int8_anyway:  # the float32 graphs go back in
                for name, raw in float32.items():
                    atomic_write_bytes(tmp / name, raw)
                precision = "float32"
        atomic_write_bytes(tmp / "parity.md", parity_markdown(checks).encode())
        write_manifest(tmp, student, precision, {k: strip(c) for k, c in checks.items()})
    if why:
        say(f"warning: the int8 graph kept {why}; see {out / 'parity.md'}. "
            + ("Wrote it anyway (--int8-anyway)." if int8_anyway else "Wrote float32 instead, which keeps every answer "
               "(--int8-anyway writes int8 regardless)."))
    c = checks[precision]
    say(f"exported {precision} to {out}: {c['same']}/{c['n']} held-out and {c['probe']['same']}/{c['probe']['n']} "
        "probe answers as PyTorch's", progress)
    return out


def measure(kind, student, folder: Path, precision: str, sets: dict[str, list[str]]) -> dict[str, Any]:
    """The folder's parity with PyTorch on the held-out texts, with the probe texts' under `probe`."""
    write_manifest(folder, student, precision, {})
    exported = load_exported(folder)
    return {**kind.parity(student, exported, sets["held-out"]), "probe": kind.parity(student, exported, sets["probe"])}


def unfaithful(c: dict[str, Any]) -> str | None:
    """Why an int8 graph's answers are not the student's (held-out, probe), or None when they are."""
    if c["rate"] >= MIN_INT8_PARITY and c["probe"]["rate"] >= MIN_INT8_PROBE:
        return None
    return (f"{c['same']}/{c['n']} held-out answers (needs {MIN_INT8_PARITY:.1%}) and {c['probe']['same']}/"
            f"{c['probe']['n']} probe answers (needs {MIN_INT8_PROBE:.0%}) as PyTorch's")


def strip(c: dict[str, Any]) -> dict[str, Any]:
    """A parity result without its list of differing texts (parity.md has them)."""
    return {k: strip(v) if isinstance(v, dict) else v for k, v in c.items() if k != "differ"}


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
    lines = ["# Parity with PyTorch", "",
             "On the held-out inputs of the student's shards, and on the packaged probe texts (text unlike any "
             "training inputs).", ""]
    for precision, c in checks.items():
        for name, part in (("held-out", c), ("probe", c["probe"])):
            lines += [f"## {precision}, {name}: {part['same']}/{part['n']} answers the same ({part['rate']:.2%}), "
                      f"largest probability difference {part['max_prob_diff']:.2e}", ""]
            if part["differ"]:
                lines += ["| text | PyTorch | ONNX |", "|---|---|---|"]
                cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
                lines += [f"| {cell(d['text'])} | {cell(d['torch'])} | {cell(d['onnx'])} |" for d in part["differ"]]
                lines.append("")
    return "\n".join(lines) + "\n"
