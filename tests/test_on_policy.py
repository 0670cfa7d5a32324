"""`train --on-policy F`: a share of a decoder's batches are its own answers, scored along every
token by the teacher in process; the options that cannot work are refused in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from test_draft import TEXTS

from microdistill.data.shards import ShardSet
from microdistill.extract import ExtractConfig, extract
from microdistill.students.decoder.config import N_SPECIAL
from microdistill.students.decoder.data import collate, load_split
from microdistill.train import TrainConfig, TrainError, train_once
from microdistill.train.decoder import set_up_decoder
from microdistill.train.on_policy import OnPolicy


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_teacher_dir):
    path = tmp_path_factory.mktemp("on_policy") / "tickets.jsonl"
    path.write_text("".join(json.dumps({"text": f"{t} [{i}]"}) + "\n" for i, t in enumerate(TEXTS)))
    return extract(path, path.parent / "shards", ExtractConfig(task="support-ticket", teacher=str(tiny_teacher_dir),
                                                               batch_size=8, calibration=8), progress=False)


def on_policy(shards, fraction: float) -> tuple[OnPolicy, list]:
    data = ShardSet(shards)
    setup = set_up_decoder(data, TrainConfig(preset="nano", on_policy=fraction), True, False)
    return setup.collate, setup.train_set


def test_a_batch_of_the_teachers_own_answers_scores_as_the_shards_hold_them(shards, monkeypatch):
    """Where the student's answer is the teacher's, the batch built from it is the shards' batch:
    the prompt, the teacher's logits along the answer and the indices all line up."""
    data = ShardSet(shards)
    examples, records = load_split(data, "train", True, None)
    policy, _ = on_policy(shards, 1.0)
    answers = {tuple(e.inp): [int(t) for t in r.output_ids[:-1]] for e, r in zip(examples, records)}
    monkeypatch.setattr("microdistill.train.on_policy.generate",
                        lambda student, inputs, constrain: [answers[tuple(policy.student.input_index[i] for i in x)]
                                                            for x in inputs])
    own, shards_batch = policy(examples[:6]), collate(examples[:6], len(data.kept_vocab))
    assert torch.equal(own.out_in, shards_batch.out_in) and torch.equal(own.mask, shards_batch.mask)
    m = shards_batch.mask
    np.testing.assert_allclose(own.teacher[m].numpy(), shards_batch.teacher[m].numpy(), atol=3e-2, rtol=0)
    np.testing.assert_allclose(own.lse[m].numpy(), shards_batch.lse[m].numpy(), atol=1e-3, rtol=0)
    # the CE term aims at the teacher's choice among the kept ids, which along its own answer is its answer
    assert torch.equal(own.target[m], shards_batch.teacher[m].argmax(-1))


def test_the_students_own_answers_are_what_it_writes_and_target_the_teachers_choice(shards):
    from microdistill.students.decoder.predict import generate

    policy, train_set = on_policy(shards, 1.0)
    examples = train_set[:5]
    batch = policy(examples)
    inputs = [[int(policy.input_ids[i - N_SPECIAL]) for i in e.inp] for e in examples]
    for b, answer in enumerate(generate(policy.student, inputs, constrain=True)):
        out = [policy.out_index[t] for t in (answer + [policy.teacher.eos_id])[:policy.student.config.max_output]]
        assert int(batch.mask[b].sum()) == len(out) and batch.out_in[b, :len(out) - 1].tolist() == out[:-1]
    m = batch.mask
    assert torch.equal(batch.target[m], batch.teacher[m].argmax(-1))


def test_the_share_of_batches_follows_the_fraction_and_the_inputs(shards):
    half, train_set = on_policy(shards, 0.5)
    batches = [train_set[i:i + 2] for i in range(0, len(train_set) - 1)]
    picks = [half.chosen(b) for b in batches]
    assert picks == [half.chosen(b) for b in batches]  # a resumed run decides alike
    assert 0.2 < sum(picks) / len(picks) < 0.8
    never, _ = on_policy(shards, 0.0)
    assert not isinstance(never, OnPolicy)


def test_train_on_policy_end_to_end(shards, tmp_path):
    out = train_once(shards, tmp_path / "student", TrainConfig(preset="nano", epochs=2, batch_size=4, on_policy=0.5),
                     progress=False)
    summary = json.loads((out / "training.json").read_text())
    assert summary["on_policy"] == 0.5 and summary["config"]["on_policy"] == 0.5
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_on_policy_without_the_teacher_in_process_is_refused(shards, tmp_path):
    with pytest.raises(TrainError, match="on_policy is for the decoder student"):
        train_once(shards, tmp_path / "h", TrainConfig(student="heads", on_policy=0.5), progress=False)
    with pytest.raises(TrainError, match="on_policy=1.5.*must be in \\[0, 1\\]"):
        TrainConfig(on_policy=1.5)
    moved = tmp_path / "shards"
    shutil.copytree(shards, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["teacher"]["source"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainError, match=r"--on-policy needs the teacher of .*shards"):
        train_once(moved, tmp_path / "s", TrainConfig(preset="nano", on_policy=0.5), progress=False)
    assert not (tmp_path / "s" / "model.safetensors").exists()


def test_compare_sets_on_policy_beside_off_policy_with_the_free_text_metric(shards, tmp_path):
    from typer.testing import CliRunner

    from microdistill.cli import app

    out = tmp_path / "compare"
    result = CliRunner().invoke(app, ["compare", "--data", str(shards), "--out", str(out), "--configs",
                                      "curriculum,on_policy", "--preset", "nano", "--max-steps", "4"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "compare.json").read_text())
    runs = {r["name"]: r for r in report["runs"]}
    assert runs["on_policy"]["config"]["on_policy"] == 0.5 and runs["curriculum"]["config"]["on_policy"] == 0.0
    for r in runs.values():
        assert set(r["chrf"]) == {"summary"} and 0.0 <= r["chrf"]["summary"] <= 100.0
    md = (out / "compare.md").read_text()
    assert "| configuration | chrF summary |" in md and f"| on_policy | {runs['on_policy']['chrf']['summary']:.1f} |" in md
