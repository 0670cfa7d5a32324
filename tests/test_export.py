"""ONNX export of a heads student and the torch-free runtime: the same answers as PyTorch, the
int8 trade, the CLI end to end, no torch on the runtime path, and one-line errors (a decoder
student's export: test_export_decoder.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import make_shards, make_texts

from microdistill.export import export
from microdistill.export.heads import to_onnx
from microdistill.core.files import file_sha256
from microdistill.runtime import ExportError, load_exported
from microdistill.data.samples import probe_texts
from microdistill.data.shards import ShardSet
from microdistill.students import load_student
from microdistill.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
CFG = TrainConfig(student="heads", max_steps=4, batch_size=8, eval_limit=8, lr=2e-3)
LONG = " ".join(["thanks"] + ["beach"] * 200)  # past the student's 128 input tokens
TEXTS = make_texts(24, seed=7) + [LONG, "  you   are\tan idiot  ", ""]

# Run in a subprocess: hide torch and friends as a runtime-only install would, run the CLI,
# then report its exit code and whatever heavy module got imported anyway.
NO_TORCH = """
import importlib.abc, sys
HIDDEN = ("torch", "transformers", "safetensors", "onnx", "xgrammar", "accelerate")
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
sys.argv = ["microdistill", *sys.argv[1:]]
from microdistill.cli import main
try:
    main()
    code = 0
except SystemExit as e:
    code = e.code
sys.stderr.write(f"\\nexit {code} heavy {sorted(m for m in sys.modules if m.split('.')[0] in HIDDEN)}\\n")
"""


def cli(*args, no_torch: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", NO_TORCH, *args] if no_torch else [sys.executable, "-m", "microdistill.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_tokenizer):
    return make_shards(tmp_path_factory.mktemp("export") / "shards", tiny_tokenizer, n=64)


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    return train(shards, tmp_path_factory.mktemp("export") / "student", CFG, progress=False)


@pytest.fixture(scope="module")
def student(trained):
    return load_student(trained)


@pytest.fixture(scope="module")
def float32(trained, tmp_path_factory):
    return export(trained, tmp_path_factory.mktemp("export") / "f32", progress=False)


@pytest.fixture(scope="module")
def int8(trained, tmp_path_factory):
    return export(trained, tmp_path_factory.mktemp("export") / "i8", quantize="int8", progress=False, int8_anyway=True)


def val_texts(shards) -> list[str]:
    return [r.text for r in ShardSet(shards).records("val")]


def test_float32_answers_and_probabilities_equal_pytorch(float32, student, shards):
    exported = load_exported(float32)
    assert exported.kind == "heads" and exported.task == student.task
    assert [f.name for f in exported.fields] == student.task.field_names
    ours, ref = exported.predict(TEXTS, batch_size=5), student.predict(TEXTS)  # several padded batches
    for a, b in zip(ours, ref):
        assert {k: a[k] for k in ("text", "output", "fields", "valid", "truncated")} == \
               {k: b[k] for k in ("text", "output", "fields", "valid", "truncated")}
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-4)
    assert ours[TEXTS.index(LONG)]["truncated"] and not ours[0]["truncated"]
    for p, q in zip(exported.probabilities(TEXTS), student.probabilities(TEXTS)):
        np.testing.assert_allclose(p, q, atol=1e-4)
    # the manifest: what it holds, parity measured on every held-out input, hashes that verify
    m = json.loads((float32 / "export.json").read_text())
    assert m["precision"] == "float32" and m["kind"] == "heads" and m["opset"] == 17
    assert m["fields"] == [{"name": f.name, "values": f.values} for f in student.fields]
    n_val = len(val_texts(shards))
    assert set(m["parity"]) == {"float32"}
    n_probe = len(probe_texts())
    assert m["parity"]["float32"] == {"n": n_val, "same": n_val, "rate": 1.0, "max_prob_diff": pytest.approx(0, abs=1e-4),
                                      "probe": {"n": n_probe, "same": n_probe, "rate": 1.0,
                                                "max_prob_diff": pytest.approx(0, abs=1e-4)}}
    assert set(m["files"]) == {"model.onnx", "tokenizer.json", "task.yaml", "calibration.json"}  # training calibrates
    for name, f in m["files"].items():
        assert f == {"bytes": (float32 / name).stat().st_size, "sha256": file_sha256(float32 / name)}
    assert (float32 / "tokenizer.json").read_bytes() == (student.path / "tokenizer.json").read_bytes()
    assert f"float32, held-out: {n_val}/{n_val}" in (float32 / "parity.md").read_text()
    assert f"float32, probe: {n_probe}/{n_probe}" in (float32 / "parity.md").read_text()


def test_int8_is_a_quarter_of_the_size_and_its_parity_is_what_it_says(int8, float32, student, shards):
    ratio = (int8 / "model.onnx").stat().st_size / (float32 / "model.onnx").stat().st_size
    assert ratio < 1 / 3  # the encoder's matrices hold nearly all the weights, now one byte each
    m = json.loads((int8 / "export.json").read_text())
    assert m["precision"] == "int8" and set(m["parity"]) == {"float32", "int8"}
    texts = val_texts(shards)
    ours, ref = load_exported(int8).predict(texts), student.predict(texts)
    differ = [a["text"] for a, b in zip(ours, ref) if a["fields"] != b["fields"]]
    assert m["parity"]["int8"]["n"] == len(texts) and m["parity"]["int8"]["same"] == len(texts) - len(differ)
    assert m["parity"]["int8"]["rate"] == pytest.approx(1 - len(differ) / len(texts))
    report = (int8 / "parity.md").read_text()
    assert f"int8, held-out: {len(texts) - len(differ)}/{len(texts)}" in report
    assert all(f"| {t} |" in report for t in differ)
    assert all(a["valid"] and a["output"] == student.task.serialize(a["fields"]) for a in ours)


def test_calibration_temperatures_divide_the_logits(trained, student, tmp_path):
    folder = tmp_path / "calibrated"
    shutil.copytree(trained, folder)
    (folder / "calibration.json").write_text(json.dumps({"method": "temperature", "temperatures": {"tone": 2.5}}))
    out = export(folder, tmp_path / "out", progress=False)
    assert "calibration.json" in json.loads((out / "export.json").read_text())["files"]
    exported = load_exported(out)
    texts = make_texts(8, seed=3)
    for f, p, logits in zip(student.fields, exported.probabilities(texts), student.logits(texts)):
        z = logits / (2.5 if f.name == "tone" else 1.0)  # a field calibration.json does not name keeps T = 1
        np.testing.assert_allclose(p, np.exp(z) / np.exp(z).sum(-1, keepdims=True), atol=1e-4)
    (out / "calibration.json").write_text(json.dumps({"temperatures": {"tone": 2.5}}))
    with pytest.raises(ExportError, match="does not match its sha256"):
        load_exported(out)


def test_cli_exports_then_predicts_without_torch(trained, student, tmp_path):
    out = tmp_path / "cli"
    r = cli("export", "--student", str(trained), "--out", str(out), "--quantize", "int8", "--int8-anyway")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "export.json").read_text())["precision"] == "int8"
    texts = ["you are an idiot", "thanks so much, lovely day"]
    r = cli("predict", "--student", str(out), "--task", "reddit-comment", *texts, no_torch=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "exit 0 heavy []"  # torch was never imported, nor needed
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["text"] for x in lines] == texts and all(x["valid"] and set(x["confidence"]) == set(student.task.field_names)
                                                        for x in lines)
    assert [x["fields"] for x in lines] == [x["fields"] for x in load_exported(out).predict(texts)]
    # another task than asked for, and a verb that needs torch when torch is missing: one line each
    r = cli("predict", "--student", str(out), "--task", "support-ticket", "hello", no_torch=True)
    assert r.stderr.splitlines()[0] == f"error: student {out} does the task 'reddit-comment', not 'support-ticket'"
    assert "exit 2" in r.stderr and "Traceback" not in r.stderr
    r = cli("train", "--data", str(tmp_path), "--out", str(tmp_path / "t"), no_torch=True)
    assert r.stderr.splitlines()[0] == ("error: this command needs torch, which the runtime-only install leaves out; "
                                        "run pip install 'microdistill[train]'")
    assert "exit 2" in r.stderr and "Traceback" not in r.stderr


def test_an_exported_student_is_served_without_torch(float32):
    served_without_torch(float32)


def served_without_torch(folder: Path) -> None:
    """`serve` given an export folder answers over HTTP from onnxruntime, as load_exported does,
    and the process never imports torch (nor the other training-side packages)."""
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", NO_TORCH, "serve", "--student", str(folder), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    url, texts = f"http://127.0.0.1:{port}", make_texts(6, seed=3)
    try:
        for _ in range(600):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(f"{url}/v1/predict", json={"texts": texts}, timeout=60)
        assert r.status_code == 200, r.text
        want = load_exported(folder).predict(texts)
        for got, w in zip(r.json()["results"], want):
            assert got["fields"] == w["fields"] and got["answered_by"] == "student"
            assert got["confidence"] == pytest.approx(w["confidence"], abs=1e-6)
        # importing torch would have failed (NO_TORCH hides it); its libraries were never loaded either
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "onnxruntime" in maps and "libtorch" not in maps
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def test_damaged_and_foreign_folders_are_one_line_errors(float32, trained, tmp_path):
    import onnx

    def damaged(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(float32, d)
        return d

    d = damaged("flipped")
    blob = bytearray((d / "model.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (d / "model.onnx").write_bytes(bytes(blob))
    with pytest.raises(ExportError, match=r"model.onnx: does not match its sha256 in export.json"):
        load_exported(d)
    d = damaged("garbage")  # a broken graph whose manifest was rewritten to match it
    (d / "model.onnx").write_bytes(b"not a graph" * 100)
    m = json.loads((d / "export.json").read_text())
    m["files"]["model.onnx"] = {"bytes": 1100, "sha256": file_sha256(d / "model.onnx")}
    (d / "export.json").write_text(json.dumps(m))
    with pytest.raises(ExportError, match=r"onnxruntime .* cannot run it"):
        load_exported(d)
    d = damaged("future_opset")  # a graph from a newer exporter than this onnxruntime knows
    graph = onnx.load(str(d / "model.onnx"))
    graph.opset_import[0].version = 99
    onnx.save(graph, str(d / "model.onnx"))
    m = json.loads((d / "export.json").read_text())
    m["opset"] = 99
    m["files"]["model.onnx"] = {"bytes": (d / "model.onnx").stat().st_size, "sha256": file_sha256(d / "model.onnx")}
    (d / "export.json").write_text(json.dumps(m))
    with pytest.raises(ExportError, match=r"cannot run it \(opset 99, exported with onnxruntime .*install a newer onnxruntime"):
        load_exported(d)
    d = damaged("version")
    m = json.loads((d / "export.json").read_text())
    (d / "export.json").write_text(json.dumps({**m, "version": 2}))
    with pytest.raises(ExportError, match="export format version 2, this microdistill reads version 1"):
        load_exported(d)
    d = damaged("no_manifest")
    (d / "export.json").unlink()
    with pytest.raises(ExportError, match="not an exported student, export.json is missing$"):
        load_exported(d)
    with pytest.raises(ExportError, match="a PyTorch student folder: export it with microdistill export"):
        load_exported(trained)
    with pytest.raises(ExportError, match="does the task 'reddit-comment', not 'support-ticket'"):
        load_exported(float32, task="support-ticket")
    for broken in ("flipped", "garbage", "future_opset"):  # through the CLI: one line, no traceback
        r = cli("predict", "--student", str(tmp_path / broken), "hello")
        assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_failed_parity_writes_nothing_and_keeps_the_old_export(trained, float32, shards, tmp_path, monkeypatch):
    import microdistill.export.heads as export_mod

    def flipped(student, path):
        """The real export of a student whose first head is negated: every 'tone' answer flips."""
        head = student.model.heads[0]
        with torch.no_grad():
            head.weight.neg_()
            head.bias.neg_()
        try:
            to_onnx(student, path)
        finally:
            with torch.no_grad():
                head.weight.neg_()
                head.bias.neg_()

    monkeypatch.setattr(export_mod, "to_onnx", flipped)
    n = len(val_texts(shards))
    with pytest.raises(ExportError, match=rf"answers {n} of {n} held-out inputs differently from PyTorch .*nothing was written"):
        export(trained, tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists() and [p.name for p in tmp_path.iterdir()] == []
    old = tmp_path / "old"
    shutil.copytree(float32, old)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    with pytest.raises(ExportError):
        export(trained, old, progress=False)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before and len(list(tmp_path.iterdir())) == 1


def test_what_cannot_be_exported_is_a_one_line_error(trained, shards, tmp_path):
    moved = tmp_path / "moved"  # a student whose shards are not where training left them
    shutil.copytree(trained, moved, ignore=shutil.ignore_patterns("checkpoint"))
    cfg = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**cfg, "shards": {**cfg["shards"], "path": str(tmp_path / "gone")}}))
    with pytest.raises(ExportError, match=r"are not found here; give them with --data SHARDS"):
        export(moved, tmp_path / "m", progress=False)
    other = tmp_path / "other"
    shutil.copytree(shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "task_fingerprint": "0" * 16}))
    with pytest.raises(ExportError, match="made for another task than the student's"):
        export(moved, tmp_path / "m", data=other, progress=False)
    with pytest.raises(ExportError, match="--quantize 'int4': expected int8"):
        export(trained, tmp_path / "m", quantize="int4", progress=False)
    assert not (tmp_path / "m").exists()


def test_export_never_replaces_a_folder_it_did_not_write(trained, shards, float32, tmp_path):
    """--out pointing at the student, at its shards, at a folder holding them or at any folder with
    other files is refused in one line before any work, and nothing in it changes; an earlier
    export folder is replaced."""
    def snapshot(folder):
        return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "todo.txt").write_text("not an export")
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = {trained: "is the student folder", shards: "is the shard folder", trained.parent: "holds the student folder",
             keep: "not an export folder", afile: "is a file"}
    for out, message in cases.items():
        before = snapshot(out) if out.is_dir() else out.read_bytes()
        r = cli("export", "--student", str(trained), "--out", str(out))
        assert r.returncode == 2 and r.stderr.startswith("error: --out ") and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert (snapshot(out) if out.is_dir() else out.read_bytes()) == before
    again = tmp_path / "again"
    shutil.copytree(float32, again)
    export(trained, again, quantize="int8", progress=False, int8_anyway=True)  # an export folder is what it replaces
    assert json.loads((again / "export.json").read_text())["precision"] == "int8"


def test_int8_is_written_only_where_it_keeps_the_answers(trained, tmp_path, monkeypatch):
    """An int8 graph that changes answers on the held-out split or the probe texts is not what
    export writes: float32 goes out instead, with a warning that says by how much; one that keeps
    them is written as int8."""
    import microdistill.export as export_mod

    said = []
    monkeypatch.setattr(export_mod, "say", lambda message, enabled=True: said.append(message))
    monkeypatch.setattr(export_mod, "MIN_INT8_PROBE", 1.01)  # no graph can keep more than every answer
    out = export(trained, tmp_path / "strict", quantize="int8", progress=False)
    m = json.loads((out / "export.json").read_text())
    assert m["precision"] == "float32" and set(m["parity"]) == {"float32", "int8"}  # both measured, float32 written
    assert load_exported(out).manifest["precision"] == "float32"
    assert any("Wrote float32 instead" in s and "probe answers (needs 101%)" in s for s in said)
    monkeypatch.setattr(export_mod, "MIN_INT8_PROBE", 0.0)
    monkeypatch.setattr(export_mod, "MIN_INT8_PARITY", 0.0)
    out = export(trained, tmp_path / "lenient", quantize="int8", progress=False)
    assert json.loads((out / "export.json").read_text())["precision"] == "int8"
