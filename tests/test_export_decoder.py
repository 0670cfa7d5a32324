"""ONNX export of a decoder student: greedy constrained answers equal to PyTorch's on every input,
the token automaton equal to xgrammar's masks, int8, the CLI and the server without torch, and
the tasks it refuses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from synthetic import make_shards, make_texts
from test_export import LONG, cli, float32, int8, served_without_torch, student, val_texts  # noqa: F401, F811 (fixtures)

from microdistill.data.samples import probe_texts
from microdistill.export import export
from microdistill.core.files import file_sha256
from microdistill.students.decoder.predict import _allowed, _pad, predict
from microdistill.runtime import ExportError, load_exported
from microdistill.runtime.decoder import DONE, TokenAutomaton
from microdistill.train import TrainConfig, train

TEXTS = make_texts(24, seed=7) + [LONG, "  you   are\tan idiot  ", ""]
FILES = {"prefill.onnx", "decode.onnx", "automaton.json", "tokenizer.json", "task.yaml"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_tokenizer):
    return make_shards(tmp_path_factory.mktemp("dexport") / "shards", tiny_tokenizer, n=64)


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """A nano decoder whose weights are redrawn at 5x the init scale: a student this small and this
    briefly trained answers every input alike, and an export that ignored its input would pass."""
    from safetensors.torch import load_file, save_file

    folder = train(shards, tmp_path_factory.mktemp("dexport") / "student",
                   TrainConfig(student="decoder", preset="nano", max_steps=1), progress=False)
    g = torch.Generator().manual_seed(0)
    weights = {k: v if "norm" in k else torch.randn(v.shape, generator=g) * 0.1
               for k, v in load_file(str(folder / "model.safetensors")).items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "microdistill.student/1"})
    return folder


def same(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in ("text", "output", "fields", "valid", "truncated"))


def test_float32_answers_equal_pytorch_on_every_input(float32, student, shards):
    exported = load_exported(float32)
    assert exported.kind == "decoder" and exported.task == student.task
    texts = val_texts(shards) + TEXTS
    ours, ref = exported.predict(texts, batch_size=5), predict(student, texts)  # several padded batches
    assert all(same(a, b) for a, b in zip(ours, ref))
    assert len({r["output"] for r in ref}) >= 5  # inputs really get different answers
    assert all(r["valid"] for r in ours) and ours[texts.index(LONG)]["truncated"] and not ours[0]["truncated"]
    for r in ours:  # the probability of the tokens that spelled each value, under the grammar
        assert set(r["confidence"]) == set(student.task.field_names) and all(0 < p <= 1 for p in r["confidence"].values())
    m = json.loads((float32 / "export.json").read_text())
    assert m["kind"] == "decoder" and m["precision"] == "float32" and m["opset"] == 17
    assert m["vocab"]["kept"] == student.kept.tolist() and m["max_input"] == student.config.max_input
    n_val = len(val_texts(shards))
    f32 = m["parity"]["float32"]
    assert set(m["parity"]) == {"float32"} and (f32["n"], f32["same"], f32["rate"]) == (n_val, n_val, 1.0)
    assert f32["max_prob_diff"] == pytest.approx(0, abs=1e-4) and f32["probe"]["n"] == len(probe_texts())
    assert set(m["files"]) == FILES
    for name, f in m["files"].items():
        assert f == {"bytes": (float32 / name).stat().st_size, "sha256": file_sha256(float32 / name)}
    assert f"float32, held-out: {n_val}/{n_val}" in (float32 / "parity.md").read_text()


def test_int8_exports_loads_and_its_parity_is_what_it_says(int8, float32, student, shards):
    for name in ("prefill.onnx", "decode.onnx"):
        assert (int8 / name).stat().st_size < (float32 / name).stat().st_size / 2
    m = json.loads((int8 / "export.json").read_text())
    assert m["precision"] == "int8" and set(m["parity"]) == {"float32", "int8"}
    texts = val_texts(shards)
    ours, ref = load_exported(int8).predict(texts), predict(student, texts)
    differ = [a["text"] for a, b in zip(ours, ref) if not same(a, b)]
    assert m["parity"]["int8"]["same"] == len(texts) - len(differ) and m["parity"]["int8"]["n"] == len(texts)
    assert all(f"| {t} |" in (int8 / "parity.md").read_text() for t in differ)
    assert all(a["valid"] and a["output"] == student.task.serialize(a["fields"]) for a in ours)


def test_the_automaton_masks_equal_xgrammars_at_every_step(float32, student):
    """Walk decodings with xgrammar beside the exported automaton: greedy ones (the student's
    choices) and random ones (any allowed token, so long spellings and rare tokens are met too)."""
    a = load_exported(float32).automaton
    kept = torch.as_tensor(student.kept, dtype=torch.long)
    rng = np.random.default_rng(0)
    rows = [[student.input_index[i] for i in student.encoder.encode(t)] for t in make_texts(4, seed=11)]
    steps = 0
    for walk in range(12):
        batch, state = student.grammar.batch(1), a.start
        logits, cache = student.model.prefill(_pad([rows[walk % len(rows)]]))
        while state != DONE:
            want = np.flatnonzero(_allowed(batch, [0], kept)[0].numpy())
            assert a.allowed[state].tolist() == want.tolist(), f"walk {walk}, step {steps}"
            if walk < len(rows):
                k = int(want[int(logits[0, torch.as_tensor(want)].argmax())])
            else:
                k = int(rng.choice(want))
            batch.accept(0, int(kept[k]))
            state = a.step(state, k)[0]
            logits, cache = student.model.decode_step(torch.tensor([k]), cache)
            steps += 1
        assert batch.matchers[0].is_terminated()
    assert steps > 12 * 8


def test_an_automaton_that_disagrees_with_xgrammar_is_refused(trained, tmp_path, monkeypatch):
    build = TokenAutomaton.build

    def lossy(task, token_bytes, eos):
        a = build(task, token_bytes, eos)
        a.edges[a.start] = dict(list(a.edges[a.start].items())[1:])  # one allowed first token forgotten
        return a

    monkeypatch.setattr(TokenAutomaton, "build", staticmethod(lossy))
    with pytest.raises(ExportError, match=r"allow different tokens after b'' \(output indices \[\d+\]\); this task cannot be exported"):
        export(trained, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_task_with_free_fields_is_refused_in_one_line(trained, tmp_path):
    folder = tmp_path / "free"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("checkpoint"))
    cfg = json.loads((folder / "config.json").read_text())
    extra = [{"name": "note", "type": "string", "max_length": 20}, {"name": "score", "type": "integer"}]
    cfg["task"]["output"]["fields"] += extra
    cfg["task"]["prompt"]["examples"] = []  # they would lack the new fields
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError) as e:
        export(folder, tmp_path / "out", progress=False)
    assert str(e.value) == (f"student folder {folder}: the task 'reddit-comment' has free field(s) note (string), "
                            "score (integer); the torch-free runtime decodes enum-only tasks, so use predict with the "
                            "PyTorch student folder instead")
    assert not (tmp_path / "out").exists()


def test_cli_predicts_with_an_exported_decoder_without_torch(float32, student):
    texts = ["you are an idiot", "thanks so much, lovely day", "the update is fine"]
    r = cli("predict", "--student", str(float32), "--task", "reddit-comment", *texts, no_torch=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "exit 0 heavy []"  # torch was never imported, nor needed
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [{k: x[k] for k in ("text", "output", "fields", "valid", "truncated")} for x in lines] == \
           [{k: x[k] for k in ("text", "output", "fields", "valid", "truncated")} for x in predict(student, texts)]
    assert all(set(x["confidence"]) == set(student.task.field_names) for x in lines)


def test_an_exported_decoder_is_served_without_torch(float32):
    served_without_torch(float32)


def test_damaged_decoder_folders_are_one_line_errors(float32, tmp_path):
    d = tmp_path / "edited"
    shutil.copytree(float32, d)
    a = json.loads((d / "automaton.json").read_text())
    a["edges"] = a["edges"][1:]
    (d / "automaton.json").write_text(json.dumps(a))
    with pytest.raises(ExportError, match=r"automaton.json: does not match its sha256 in export.json"):
        load_exported(d)
    m = json.loads((d / "export.json").read_text())
    del m["files"]["automaton.json"]
    (d / "export.json").write_text(json.dumps(m))
    with pytest.raises(ExportError, match=r"export.json: lists no automaton.json \(a damaged manifest\)"):
        load_exported(d)
    (d / "automaton.json").write_text("{}")
    m["files"]["automaton.json"] = {"bytes": 2, "sha256": file_sha256(d / "automaton.json")}
    (d / "export.json").write_text(json.dumps(m))
    with pytest.raises(ExportError, match=r"automaton.json: unreadable \(ValueError: format None"):
        load_exported(d)
