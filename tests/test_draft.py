"""`extract --draft STUDENT`: a decoder student proposes the teacher's next tokens; the shards are
those of extraction without it, and the manifest says how many of its tokens the teacher kept.
A student that cannot draft for this teacher and task is refused in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from microdistill.cli import app
from microdistill.data.shards import ShardSet
from microdistill.extract import ExtractConfig, ExtractError, extract
from microdistill.students.decoder.draft import draft_loader
from microdistill.train import TrainConfig, train_once

TEXTS = ["I was charged twice this month", "the app crashes when I open it", "where is my parcel, it is late",
         "please reset my password", "can I change my delivery address", "the invoice shows the wrong amount",
         "my account was locked after the update", "refund for the broken headphones please",
         "the login page shows an error", "how do I cancel my plan", "my order arrived damaged",
         "two factor codes never arrive"] * 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("draft") / "tickets.jsonl"
    path.write_text("".join(json.dumps({"text": f"{t} ({i})"}) + "\n" for i, t in enumerate(TEXTS)))
    return path


def config(teacher, **kw) -> ExtractConfig:
    return ExtractConfig(task="support-ticket", teacher=str(teacher), batch_size=8, calibration=8, **kw)


@pytest.fixture(scope="module")
def plain(corpus, tiny_teacher_dir, tmp_path_factory):
    return extract(corpus, tmp_path_factory.mktemp("draft") / "plain", config(tiny_teacher_dir), progress=False)


@pytest.fixture(scope="module")
def student(plain, tmp_path_factory):
    return train_once(plain, tmp_path_factory.mktemp("draft") / "student",
                      TrainConfig(student="decoder", preset="nano", epochs=12, lr=5e-3), progress=False)


def test_drafted_extraction_writes_the_shards_of_plain_extraction(corpus, tiny_teacher_dir, plain, student, tmp_path):
    out = tmp_path / "drafted"
    result = CliRunner().invoke(app, ["extract", "--task", "support-ticket", "--input", str(corpus), "--out", str(out),
                                      "--teacher", str(tiny_teacher_dir), "--batch-size", "8", "--calibration", "8",
                                      "--draft", str(student), "--draft-tokens", "3"])
    assert result.exit_code == 0, result.output
    a, b = ShardSet(plain), ShardSet(out)
    assert a.manifest["vocab"] == b.manifest["vocab"]
    ra, rb = sorted(a.records(), key=lambda r: r.id), sorted(b.records(), key=lambda r: r.id)
    assert [r.id for r in ra] == [r.id for r in rb] and len(ra) == len(TEXTS)
    for x, y in zip(ra, rb):
        assert x.output_text == y.output_text and x.fields == y.fields
        assert np.array_equal(x.output_ids, y.output_ids)
        np.testing.assert_allclose(x.logits.astype(np.float32), y.logits.astype(np.float32), atol=2e-2, rtol=0)
        np.testing.assert_allclose(x.lse, y.lse, atol=1e-4, rtol=0)
        for field in x.decisions:
            np.testing.assert_allclose(x.decisions[field], y.decisions[field], atol=1e-4)
    draft = b.manifest["draft"]
    assert draft["student"] == str(student) and draft["tokens"] == 3
    assert draft["proposed"] > 0 and 0 <= draft["accepted"] <= draft["proposed"]
    assert draft["acceptance"] == round(draft["accepted"] / draft["proposed"], 4)
    assert b.manifest["timings"]["teacher_passes"] == draft["teacher_passes"] < draft["answer_tokens"]
    assert draft["answer_tokens"] <= sum(len(r.output_ids) for r in rb) and "draft" not in a.manifest  # calibration answers reused


def test_a_draft_of_another_task_is_refused(corpus, tiny_teacher_dir, student, tmp_path):
    with pytest.raises(ExtractError, match=r"a student of task 'support-ticket', not of the task extracted \('reddit-comment'\)"):
        cfg = ExtractConfig(teacher=str(tiny_teacher_dir), calibration=8, draft=str(student))
        extract(corpus, tmp_path / "out", cfg, progress=False, drafter_for=draft_loader(cfg))


def test_a_draft_with_another_tokenizer_is_refused_and_writes_nothing(corpus, tiny_teacher_dir, student, plain, tmp_path):
    other = tmp_path / "student"
    shutil.copytree(student, other)
    spec = json.loads((other / "tokenizer" / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens trade ids: the same strings, other ids
    (other / "tokenizer" / "tokenizer.json").write_text(json.dumps(spec))
    before = (plain / "manifest.json").read_bytes()
    with pytest.raises(ExtractError, match=rf"--draft {other}: its tokenizer is not the teacher's"):
        cfg = config(tiny_teacher_dir, draft=str(other))
        extract(corpus, plain, cfg, progress=False, drafter_for=draft_loader(cfg))
    assert (plain / "manifest.json").read_bytes() == before


def test_a_draft_whose_kept_vocabulary_is_not_the_teachers_is_refused(corpus, tiny_teacher_dir, student, tmp_path):
    other = tmp_path / "student"
    shutil.copytree(student, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab"]["kept"][-1] = 10**6  # an id past the teacher's vocabulary
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExtractError, match="its kept vocabulary holds ids the teacher .* does not have"):
        cfg = config(tiny_teacher_dir, draft=str(other))
        extract(corpus, tmp_path / "out", cfg, progress=False, drafter_for=draft_loader(cfg))


def test_draft_options_are_checked_before_any_work(corpus, tiny_teacher_dir, tmp_path):
    with pytest.raises(ExtractError, match="--draft-tokens must be at least 1"):
        ExtractConfig(draft_tokens=0)
    with pytest.raises(ExtractError, match="--draft needs a local teacher"):
        ExtractConfig(teacher="openai:m", draft=str(tmp_path))
    result = CliRunner().invoke(app, ["extract", "--task", "support-ticket", "--input", str(corpus), "--out",
                                      str(tmp_path / "o"), "--teacher", str(tiny_teacher_dir), "--draft",
                                      str(tmp_path / "nothing")])
    assert result.exit_code != 0 and isinstance(result.exception, ExtractError)
    assert str(result.exception).startswith(f"--draft {tmp_path / 'nothing'}: ")
    assert not (tmp_path / "o").exists()


def test_the_cascade_drafts_its_local_teachers_answers_with_a_decoder_student(tiny_teacher_dir, student):
    from microdistill.serve.cascade import teacher_for
    from microdistill.students import load_student
    from microdistill.teachers.labeller import TeacherAnswers

    loaded = load_student(student)
    drafted = teacher_for(str(tiny_teacher_dir), loaded)
    assert drafted.draft is not None and drafted.draft.student is loaded
    plain = TeacherAnswers(drafted.teacher, loaded.task, loaded.meta["shards"]["teacher"])
    texts = [t.upper() for t in TEXTS[:8]]  # inputs the student never saw
    assert drafted(texts) == plain(texts)
    assert drafted.draft.proposed > 0
