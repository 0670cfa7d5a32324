"""Every registered student kind honours the interface (students/kind.py), end to end: trained
through the CLI, loaded, answering, scoring itself as its trainer did, saved and loaded again,
exported and answered by the torch-free runtime. A new kind gets this test by registering."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from synthetic import make_shards, make_texts
from test_export import cli

from microdistill.data.shards import ShardSet
from microdistill.export import EXPORTERS
from microdistill.runtime import READERS, load_exported
from microdistill.students import KINDS, PerField, kind_for, load_student
from microdistill.train.kinds import SETUPS

RESULT_KEYS = {"text", "output", "fields", "valid", "truncated"}
TEXTS = make_texts(10, seed=11) + ["  you   are\tan IDIOT  "]


def test_every_stage_registers_every_kind():
    assert list(KINDS) and set(SETUPS) == set(KINDS) == set(EXPORTERS) == set(READERS)
    for name, kind in KINDS.items():
        assert kind.name == name and kind.summary


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_tokenizer):
    return make_shards(tmp_path_factory.mktemp("kinds") / "shards", tiny_tokenizer, n=48)


@pytest.mark.parametrize("kind", list(KINDS))
def test_kind_honours_the_interface(kind, shards, tmp_path):
    data = ShardSet(shards)
    assert KINDS[kind].serves(data.task()) is None  # the synthetic task is enum-only: every kind serves it
    out = tmp_path / "student"
    r = cli("train", "--data", str(shards), "--out", str(out), "--student", kind, "--preset", "nano",
            "--max-steps", "3", "--batch-size", "8", "--quiet")
    assert r.returncode == 0, r.stderr
    student = load_student(out)
    assert student.kind == kind and student.task == data.task() and student.path == out
    assert json.loads((out / "training.json").read_text())["student"] == kind

    results = student.predict(TEXTS, batch_size=4)
    assert len(results) == len(TEXTS) and [x["text"] for x in results] == TEXTS
    for x in results:
        assert RESULT_KEYS <= set(x)
        if x["valid"]:  # under the schema an answer is the task's canonical JSON of its fields
            assert x["output"] == student.task.serialize(x["fields"])
    if isinstance(student, PerField):
        probs = student.probabilities(TEXTS)
        for f, p in zip(student.fields, probs):
            assert p.shape == (len(TEXTS), len(f.values)) and np.allclose(p.sum(-1), 1, atol=1e-5)
        assert all(set(x["confidence"]) == {f.name for f in student.fields} for x in results)

    # the trainer's last held-out evaluation is what the loaded student scores on the same records
    last = [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if row.get("eval")][-1]
    mine = student.held_out(list(data.records("val")))
    assert mine == {k: last[k] for k in mine}
    student.check_shards(data)
    assert isinstance(student.describe(), dict)

    copy = tmp_path / "copy"  # a folder moved elsewhere loads and answers the same
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoint"))
    assert load_student(copy).predict(TEXTS, batch_size=4) == results

    exported = tmp_path / "export"
    r = cli("export", "--student", str(out), "--out", str(exported))
    assert r.returncode == 0, r.stderr
    runtime = load_exported(exported)
    assert runtime.kind == kind and runtime.task == student.task
    assert [x["fields"] for x in runtime.predict(TEXTS)] == [x["fields"] for x in student.predict(TEXTS)]


def test_auto_is_the_first_kind_that_serves_the_task(shards):
    task = ShardSet(shards).task()
    assert kind_for("auto", task) == next(k for k, v in KINDS.items() if v.serves(task) is None)
    for name in KINDS:
        assert kind_for(name, task) == name
