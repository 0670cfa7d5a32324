"""`microdistill update`: select, label with the shards' own teacher, train, gate; rounds accumulate,
a refused student changes nothing, and the traffic a server kept is a pool."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from synthetic import make_texts
from test_serve import start_server

from microdistill.core.task import load_task
from microdistill.data.shards import ShardSet
from microdistill.extract import ExtractConfig, extract
from microdistill.flows import continual
from microdistill.flows.config import UpdateConfig, UpdateError
from microdistill.serve.traffic import TrafficLog
from microdistill.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def student(tmp_path_factory, tiny_teacher_dir):
    root = tmp_path_factory.mktemp("update")
    corpus = root / "c.txt"
    corpus.write_text("\n".join(make_texts(40, seed=30)) + "\n")
    shards = extract(corpus, root / "shards", ExtractConfig(teacher=str(tiny_teacher_dir), vocab_size=200, calibration=4),
                     progress=False)
    return train(shards, root / "student", TrainConfig(student="heads", max_steps=3, batch_size=8), progress=False)


def test_rounds_label_train_and_keep_the_new_student(student, tmp_path):
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(make_texts(30, seed=31)) + "\n")
    shards = Path(json.loads((student / "config.json").read_text())["shards"]["path"])
    before = len(ShardSet(shards))
    out = tmp_path / "new"
    r = subprocess.run([sys.executable, "-m", "microdistill", "update", "--student", str(student), "--input", str(pool),
                        "--out", str(out), "--budget", "6", "--rounds", "2", "--tolerance", "0.99", "--quiet"],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "update.json").read_text())
    assert [x["teacher_calls"] for x in report["rounds"]] == [6, 6] and report["teacher_calls"] == 12
    assert len(ShardSet(shards)) == before + 12 and len(ShardSet(shards).manifest["rounds"]) == 2
    assert all(x["kept"] and 0 <= x["new_agreement"] <= 1 for x in report["rounds"])
    assert (out / "model.safetensors").is_file() and not (out / "checkpoint").exists()
    assert "12 teacher calls in 2 round(s)" in r.stdout


def test_a_worse_student_is_refused_and_nothing_changes(student, tmp_path, monkeypatch):
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(make_texts(20, seed=32)) + "\n")
    scores = iter([0.9, 0.5])  # the old student, then the new one
    monkeypatch.setattr(continual, "score", lambda s, records: next(scores))
    before = (student / "model.safetensors").read_bytes()
    with pytest.raises(UpdateError, match=r"round 1: the new student agrees with the teacher on 50.00% .* the old one on "
                                          r"90.00%; kept the old one"):
        continual.update(student, pool, tmp_path / "new", UpdateConfig(budget=4), progress=False)
    assert not (tmp_path / "new").exists() and (student / "model.safetensors").read_bytes() == before


def test_a_warm_update_trains_from_the_current_student_for_its_epochs(student, tmp_path):
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(make_texts(20, seed=41)) + "\n")
    report = continual.update(student, pool, tmp_path / "new", UpdateConfig(budget=4, tolerance=0.99, warm_epochs=1),
                              progress=False)
    training = json.loads((tmp_path / "new" / "training.json").read_text())
    assert training["config"]["init_from"] == str(student) and training["config"]["epochs"] == 1
    assert training["config"]["max_steps"] is None and training["epochs"] == 1
    assert report["rounds"][0]["warm_start"] and report["rounds"][0]["train_s"] > 0
    # without it, a round starts from the pretrained body with the old student's step budget
    fresh = continual.update(student, pool, tmp_path / "fresh", UpdateConfig(budget=4, tolerance=0.99), progress=False)
    training = json.loads((tmp_path / "fresh" / "training.json").read_text())
    assert training["config"]["init_from"] == "" and training["steps"] == 3 and not fresh["rounds"][0]["warm_start"]


def test_a_kind_that_cannot_warm_start_is_refused_before_the_teacher_is_asked(student, tmp_path, monkeypatch):
    import dataclasses

    from microdistill.students import KINDS

    monkeypatch.setitem(KINDS, "heads", dataclasses.replace(KINDS["heads"], warm_starts=False))
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(make_texts(10, seed=42)) + "\n")
    shards = Path(json.loads((student / "config.json").read_text())["shards"]["path"])
    before = len(ShardSet(shards))
    with pytest.raises(UpdateError, match=r"--warm-epochs: student .* is a heads student, which cannot start from"):
        continual.update(student, pool, tmp_path / "new", UpdateConfig(budget=2, warm_epochs=1), progress=False)
    assert len(ShardSet(shards)) == before and not (tmp_path / "new").exists()


def test_the_traffic_a_server_kept_is_a_pool(student, tmp_path):
    traffic = tmp_path / "traffic"
    log = TrafficLog(traffic, load_task("reddit-comment"))
    texts = make_texts(12, seed=33)
    log.record(texts, [{"output": "{}", "fields": {}, "confidence": {"tone": 0.5}, "answered_by": "student"}] * 12)
    log.close()
    report = continual.update(student, traffic, tmp_path / "new", UpdateConfig(budget=3, tolerance=0.99), progress=False)
    assert report["teacher_calls"] == 3
    labelled = {r.text for r in ShardSet(report["shards"]).records()}
    assert len(labelled & set(texts)) >= 3


def test_update_errors_are_one_line(student, tmp_path):
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(make_texts(3, seed=34)) + "\n")
    for args, message in [(["--out", str(student)], "is the student folder"),
                          (["--out", str(tmp_path / "n"), "--budget", "50"], "--budget 50: the pool holds"),
                          (["--out", str(tmp_path / "n"), "--rounds", "0"], "--rounds must be at least 1"),
                          (["--out", str(tmp_path / "n"), "--warm-epochs", "-1"], "--warm-epochs must be 0 or more")]:
        r = subprocess.run([sys.executable, "-m", "microdistill", "update", "--student", str(student), "--input",
                            str(pool), "--quiet", *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, (args, r.stderr)


def test_a_kept_teacher_call_is_the_record_extraction_writes(student, tiny_teacher_dir, tmp_path):
    from microdistill.extract.recording import RecordedAnswers, label_records, recorded
    from microdistill.serve.cascade import teacher_for
    from microdistill.students import load_student

    loaded = load_student(student)
    traffic = tmp_path / "traffic"
    answers = recorded(teacher_for(str(tiny_teacher_dir), loaded), loaded, traffic)
    assert isinstance(answers, RecordedAnswers)
    texts = make_texts(6, seed=35)
    served = answers(texts)
    answers.close()
    kept = {r.text: r for r in label_records(traffic)}
    finished = [(t, a) for t, a in zip(texts, served) if a["fields"] is not None]
    assert finished and set(kept) == {t for t, _ in finished}
    assert all(kept[t].fields == a["fields"] and kept[t].output_text == a["output"] for t, a in finished)
    # the same texts labelled by extraction into a copy of the student's shards
    shards = Path(json.loads((student / "config.json").read_text())["shards"]["path"])
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    corpus = tmp_path / "texts.txt"
    corpus.write_text("\n".join(texts) + "\n")
    extract(corpus, copy, ExtractConfig(teacher=str(tiny_teacher_dir), vocab_size=200, calibration=4), progress=False)
    extracted = {r.text: r for r in ShardSet(copy).records() if r.text in kept}
    for text, record in kept.items():
        other = extracted[text]
        assert record.output_ids.tolist() == other.output_ids.tolist()
        np.testing.assert_allclose(record.logits.astype(np.float32), other.logits.astype(np.float32), atol=0.02)
        np.testing.assert_allclose(record.lse, other.lse, atol=0.02)
        for name, p in record.decisions.items():
            np.testing.assert_allclose(p, other.decisions[name], atol=0.01)
    # answers kept for other shards (here: another kept vocabulary) are refused, and the shards keep what they held
    from microdistill.data.shards import StoreError
    from microdistill.extract.recording import merge_labels

    folder = next(traffic.glob("labels-*"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["vocab"]["kept"] = manifest["vocab"]["kept"][:-1]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    held = len(ShardSet(copy))
    with pytest.raises(StoreError, match=r"labels-.*: teacher answers kept for other shards than .*copy"):
        merge_labels(traffic, copy)
    assert len(ShardSet(copy)) == held


def test_update_learns_the_teacher_calls_a_killed_server_kept_without_asking_again(student, tiny_teacher_dir, tmp_path):
    traffic = tmp_path / "traffic"
    # every answer below full confidence goes to the teacher: all of them
    proc, url = start_server(student, "--teacher", str(tiny_teacher_dir), "--min-confidence", "1.0",
                             "--traffic", str(traffic))
    texts = make_texts(10, seed=36)
    try:
        answered = []
        for i in range(0, len(texts), 5):
            r = httpx.post(f"{url}/v1/predict", json={"texts": texts[i:i + 5]}, timeout=120)
            assert r.status_code == 200
            answered += r.json()["results"]
    finally:
        proc.send_signal(signal.SIGKILL)  # no close: what the teacher answered must be on disk already
        proc.wait(30)
    by_teacher = {t: a["fields"] for t, a in zip(texts, answered) if a["answered_by"] == "teacher"}
    assert len(by_teacher) >= 8
    shards = Path(json.loads((student / "config.json").read_text())["shards"]["path"])
    before = len(ShardSet(shards))
    out = tmp_path / "new"
    r = subprocess.run([sys.executable, "-m", "microdistill", "update", "--student", str(student), "--input",
                        str(traffic), "--out", str(out), "--budget", "1", "--tolerance", "0.99", "--quiet"],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "update.json").read_text())
    assert report["rounds"][0]["reused_labels"] == len(by_teacher)
    assert report["teacher_calls"] <= min(1, len(texts) - len(by_teacher))  # only what the teacher did not answer
    records = {r.text: r for r in ShardSet(shards).records()}
    assert len(records) == before + len(by_teacher) + report["teacher_calls"]
    assert all(records[t].fields == f for t, f in by_teacher.items())
