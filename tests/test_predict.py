"""Prediction and the student folder: KV-cached greedy decoding, the schema constraint, save/load, CLI."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from synthetic import make_shards

from microdistill import cli
from microdistill.students.decoder.predict import _allowed, generate, predict
from microdistill.students import StudentFolderError, load_student
from microdistill.students.decoder.folder import LoadedDecoder, save_student
from microdistill.core.errors import UserError
from microdistill.data.shards import ShardSet
from microdistill.students.decoder.config import N_SPECIAL, config_for
from microdistill.students.decoder.model import Student

ODD_INPUTS = ["", "@user @bob", "you idiot", "héllo 😀 zebra", "great day " * 40]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_tokenizer):
    return ShardSet(make_shards(tmp_path_factory.mktemp("shards"), tiny_tokenizer, n=64))


def untrained(shards: ShardSet, seed: int = 0, tail: bool = False) -> LoadedDecoder:
    task = shards.task()
    cfg = config_for("nano", N_SPECIAL + len(shards.input_vocab), len(shards.kept_vocab) + tail,
                     task.inputs.max_tokens, task.output.max_tokens)
    torch.manual_seed(seed)
    return LoadedDecoder.from_shards(Student(cfg).eval(), shards)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_constrained_output_of_an_untrained_student_is_always_valid(shards, seed):
    student = untrained(shards, seed, tail=seed == 2)
    results = predict(student, ODD_INPUTS, batch_size=2)
    task = shards.task()
    for text, r in zip(ODD_INPUTS, results):
        assert r["text"] == text and r["valid"], r
        assert r["fields"] == task.parse(r["output"])
        assert r["output"] == task.serialize(r["fields"])  # canonical form, no stray whitespace
    assert [r["truncated"] for r in results] == [False, False, False, False, True]


def test_unconstrained_output_is_raw_generation(shards):
    raw = predict(untrained(shards, 0), ODD_INPUTS[:3], constrain=False)
    assert not any(r["valid"] for r in raw)  # a random student does not happen to write valid JSON
    assert all(r["fields"] is None for r in raw)


def test_kv_cached_batched_greedy_equals_recomputing_the_whole_sequence(shards):
    student = untrained(shards, 3)
    inputs = [list(map(int, student.input_vocab[[5, 9, 2]])), [], list(map(int, student.input_vocab[:20:2]))]
    got = generate(student, inputs, constrain=False, batch_size=2)
    kept, eos = student.kept.tolist(), student.eos_id
    with torch.no_grad():
        for ids, out in zip(inputs, got):
            inp = torch.tensor([[student.input_index[i] for i in ids]], dtype=torch.long).view(1, len(ids))
            seq: list[int] = []
            for _ in range(student.config.max_output):
                logits = student.model(inp, torch.tensor([seq], dtype=torch.long).view(1, len(seq)))[0, -1]
                k = int(logits[: len(kept)].argmax())
                if kept[k] == eos:
                    break
                seq.append(k)
            assert out == [kept[k] for k in seq]


def test_kept_bit_reading_equals_the_full_vocabulary_grammar_mask(shards):
    student = untrained(shards)
    kept = torch.as_tensor(student.kept)
    record = next(shards.records())
    batch = student.grammar.batch(1)
    for token in record.output_ids:
        full = torch.zeros(1, student.teacher_vocab_size)
        batch.mask_(full)
        expected = torch.isfinite(full[0, kept])
        assert torch.equal(_allowed(batch, [0], kept)[0], expected)
        assert expected[student.kept.tolist().index(int(token))]  # the teacher's token is allowed
        batch.accept(0, int(token))
    assert batch.done(0)


def test_strip_patterns_apply_to_new_text(shards):
    student = untrained(shards, 4)
    a, b = predict(student, ["@bob you  idiot", "you idiot"], constrain=False)
    assert a["output"] == b["output"]


def test_saved_folder_round_trip(shards, tmp_path):
    student = untrained(shards, 5)
    save_student(student.model, student.config, shards, tmp_path / "s", extra={"training": {"lr": 1.0}})
    loaded = load_student(tmp_path / "s")
    assert loaded.config == student.config and loaded.task == student.task and loaded.eos_id == student.eos_id
    assert loaded.kept.tolist() == student.kept.tolist() and loaded.input_vocab.tolist() == student.input_vocab.tolist()
    assert loaded.meta["training"] == {"lr": 1.0} and loaded.meta["shards"]["teacher"]["name"] == "synthetic"
    for k, v in student.model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k
    assert predict(loaded, ODD_INPUTS) == predict(student, ODD_INPUTS)
    assert (tmp_path / "s" / "task.yaml").read_text().startswith("name: reddit-comment")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer", "task.yaml"])
def test_load_student_names_the_missing_file(shards, tmp_path, name):
    student = untrained(shards)
    folder = save_student(student.model, student.config, shards, tmp_path / "s")
    target = folder / name
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(StudentFolderError, match=f"{name} is missing") as e:
        load_student(folder)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_load_student_detects_damaged_files(shards, tmp_path):
    student = untrained(shards)
    folder = save_student(student.model, student.config, shards, tmp_path / "s")
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[:-4])
    with pytest.raises(StudentFolderError, match="does not match config.json"):
        load_student(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(StudentFolderError, match="config.json: corrupted"):
        load_student(folder)
    with pytest.raises(StudentFolderError, match="not found"):
        load_student(tmp_path / "nowhere")


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["microdistill", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_train_then_predict(shards, tmp_path, monkeypatch, capsys):
    out = tmp_path / "student"
    code, stdout, _ = run_cli(monkeypatch, capsys, "train", "--data", str(shards.dir), "--out", str(out), "--preset", "nano",
                              "--epochs", "24", "--batch-size", "16", "--lr", "5e-3", "--eval-limit", "1", "--quiet")
    assert code == 0 and f"student saved in {out}" in stdout
    records = [r for r in shards.records("train")]
    texts = [r.text for r in records]
    listing = tmp_path / "texts.txt"
    listing.write_text("\n".join(texts[1:]) + "\n")
    code, stdout, _ = run_cli(monkeypatch, capsys, "predict", "--student", str(out), texts[0], "--input", str(listing))
    assert code == 0
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [r["text"] for r in rows] == texts and all(r["valid"] for r in rows)
    # Text -> clean -> input encoder -> student reproduces what training saw as teacher ids.
    agree = sum(r["output"] == rec.output_text for r, rec in zip(rows, records)) / len(rows)
    assert agree >= 0.9

    code, _, err = run_cli(monkeypatch, capsys, "predict", "--student", str(tmp_path / "missing"), "x")
    assert code == 2 and err.strip() == f"error: student folder {tmp_path / 'missing'}: not found"
    code, _, err = run_cli(monkeypatch, capsys, "train", "--data", str(shards.dir), "--out", str(out), "--preset", "nano")
    assert code == 2 and err.strip() == f"error: --out {out}: holds a finished student; choose another --out to train a new one"
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 ok\n".encode("latin-1"))
    code, _, err = run_cli(monkeypatch, capsys, "predict", "--student", str(out), "--input", str(latin))
    assert code == 2 and err.strip() == f"error: input file {latin}: not UTF-8 text (byte 0xe9 at offset 3); convert it to UTF-8"
    code, _, err = run_cli(monkeypatch, capsys, "predict", "--student", str(out), "--batch-size", "0", "x")
    assert code == 2 and err.strip() == "error: --batch-size must be at least 1 (got 0)"



VARIED_INPUTS = ODD_INPUTS + ["thanks, that fixed it!", "no", "what a lovely zebra, truly the best day ever",
                              "bob bob bob", "😀😀", "idiot you are great"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_grammar_drafts_give_exactly_the_step_by_step_outputs(shards, seed, batch_size):
    student = untrained(shards, seed, tail=seed == 2)
    if seed == 3:  # a student with strong preferences: larger weights make confident, varied choices
        with torch.no_grad():
            for p in student.model.parameters():
                p.mul_(8.0)
    calls = {"n": 0}
    decode = student.model.decode_tokens

    def counted(*args, **kwargs):
        calls["n"] += 1
        return decode(*args, **kwargs)

    student.model.decode_tokens = counted
    with_drafts = predict(student, VARIED_INPUTS, batch_size=batch_size)
    drafted_calls, calls["n"] = calls["n"], 0
    without = predict(student, VARIED_INPUTS, batch_size=batch_size, drafts=False)
    assert [r["output"] for r in with_drafts] == [r["output"] for r in without]
    assert with_drafts == without
    assert drafted_calls < calls["n"]
    ids = [student.encoder.encode(t)[: student.config.max_input] for t in VARIED_INPUTS]
    assert generate(student, ids, batch_size=batch_size) == generate(student, ids, batch_size=batch_size, drafts=False)
