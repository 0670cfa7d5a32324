"""Evaluation: metric functions against hand-computed values, and the report end to end on a tiny
student trained on synthetic shards, timed beside a tiny random teacher."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import make_shards

from microdistill.evaluate.agreement import (
    INVALID, agreement, confusion, exact_by_certainty, chrf, field_agreement, human_accuracy, teacher_certainty,
    wilson_interval,
)
from microdistill.evaluate.config import EvalConfig, EvalError
from microdistill.evaluate.evaluation import eval_split
from microdistill.evaluate.speed import PeakMemory, timing
from microdistill.flows.eval import make_report
from microdistill.data.shards import Record, ShardSet, ShardWriter
from microdistill.core.task import load_task

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def evaluate(student, shards, out, teacher=None, teacher_from_manifest=False, limit=None, timing_n=16, progress=False):
    """An evaluation and its report, as `microdistill eval` makes them."""
    cfg = EvalConfig(teacher=teacher, time_teacher=teacher is not None or teacher_from_manifest, limit=limit,
                     timing_inputs=timing_n)
    return make_report(student, shards, out, cfg, progress)


# ---- metric functions ----------------------------------------------------------------------------
def test_confusion_counts_pairs_with_rows_teacher_and_columns_student():
    teacher = ["neg", "neg", "pos", "neu", "pos", "pos"]
    student = ["neg", "pos", "pos", "neu", "neg", "pos"]
    c = confusion(teacher, student, ["neg", "neu", "pos"])
    assert c["columns"] == ["neg", "neu", "pos"]
    assert c["matrix"] == [[1, 0, 1], [0, 1, 0], [1, 0, 2]]


def test_confusion_adds_an_invalid_column_only_when_needed():
    c = confusion(["a", "b", "b"], ["a", None, "zz"], ["a", "b"])
    assert c["columns"] == ["a", "b", INVALID]
    assert c["matrix"] == [[1, 0, 0], [0, 0, 2]]
    with pytest.raises(ValueError, match="not one of the labels"):
        confusion(["c"], ["a"], ["a", "b"])


def test_agreement_and_field_agreement_on_hand_made_predictions():
    assert agreement([1, 2, 3, 4], [1, 0, 3, 0]) == 0.5
    task = load_task("support-ticket")
    teacher = [
        {"team": "billing", "urgency": "low", "summary": "double charge"},
        {"team": "technical", "urgency": "high", "summary": "app crash"},
        {"team": "billing", "urgency": "high", "summary": "refund"},
        {"team": "other", "urgency": "low", "summary": "hello"},
    ]
    student = [
        {"team": "billing", "urgency": "low", "summary": "double charge"},
        {"team": "billing", "urgency": "high", "summary": "crash"},
        None,  # an invalid output disagrees on every field
        {"team": "other", "urgency": "medium", "summary": "hello"},
    ]
    f = field_agreement(task, teacher, student)
    assert f["team"]["agreement"] == 0.5
    assert f["urgency"]["agreement"] == 0.5
    assert f["summary"]["agreement"] == 0.5
    assert f["summary"]["confusion"] is None  # free strings have no confusion matrix
    team = f["team"]["confusion"]
    assert team["columns"] == ["billing", "technical", "account", "shipping", "other", INVALID]
    assert team["matrix"][0] == [1, 0, 0, 0, 0, 1]  # billing: once right, once invalid
    assert team["matrix"][1] == [1, 0, 0, 0, 0, 0]  # technical taken for billing
    urgency = f["urgency"]["confusion"]
    assert sum(urgency["matrix"][i][i] for i in range(3)) / 4 == f["urgency"]["agreement"]
    # chrF of the free text: near-misses earn credit that exact match denies, and only text fields get it
    assert "chrf" not in f["team"] and 0 < f["summary"]["chrf"] < 100
    assert chrf(["double charge"], ["double charge"]) == 100.0 and chrf(["double charge"], [None]) == 0.0
    assert chrf(["app crash on start"], ["app crash"]) > chrf(["app crash on start"], ["refund"])
    assert chrf([], []) is None
    from microdistill.report.evaluation import _quality_md

    md = _quality_md({"student_only_exact": 0.25, "teacher_forced_token_acc": 0.5, "valid_json_constrained": 1.0,
                      "valid_json_unconstrained": 0.75, "fields": f, "plots": {}, "human": {}})
    assert f"| summary | 50.00% | {f['summary']['chrf']:.1f} |" in md and "| team | 50.00% | — |" in md


def _record(text: str, fields: dict, labels: dict | None) -> Record:
    return Record(text=text, input_ids=[1], output_ids=[2], output_text="", fields=fields, labels=labels)


def test_human_accuracy_per_labelled_field():
    records = [
        _record("a", {"tone": "neutral", "sentiment": "positive"}, {"sentiment": "Positive "}),
        _record("b", {"tone": "aggressive", "sentiment": "negative"}, {"sentiment": "negative", "tone": "neutral"}),
        _record("c", {"tone": "neutral", "sentiment": "neutral"}, {"sentiment": ""}),  # empty label: not counted
        _record("d", {"tone": "neutral", "sentiment": "neutral"}, None),
    ]
    student = [
        {"tone": "neutral", "sentiment": "neutral"},
        {"tone": "neutral", "sentiment": "negative"},
        {"tone": "neutral", "sentiment": "neutral"},
        None,
    ]
    h = human_accuracy(records, student)
    assert h == {
        "sentiment": {"teacher_acc": 1.0, "student_acc": 0.5, "n": 2},
        "tone": {"teacher_acc": 0.0, "student_acc": 1.0, "n": 1},
    }


def test_wilson_interval_against_known_values():
    # 77 of 93 (the default run's held-out size): 82.8%, interval 73.9%..89.1%
    lo, hi = wilson_interval(77, 93)
    assert lo == pytest.approx(0.7387, abs=1e-4) and hi == pytest.approx(0.8912, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    narrow, wide = wilson_interval(800, 1000), wilson_interval(8, 10)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_exact_match_split_by_how_sure_the_teacher_was():
    task = load_task("reddit-comment")
    answer = {"tone": "neutral", "sentiment": "positive", "safety": "safe", "toxicity": "respectful"}

    def record(sentiment_probs):
        r = _record("x", dict(answer), None)
        r.decisions = {"tone": np.array([0.05, 0.95]), "sentiment": np.array(sentiment_probs),
                       "safety": np.array([0.0, 1.0]), "toxicity": np.array([0.1, 0.9])}
        return r

    records = [record([0.0, 0.1, 0.9]), record([0.0, 0.05, 0.95]), record([0.3, 0.1, 0.6]), record([0.4, 0.2, 0.4])]
    # certainty: the teacher's probability of its own value, least sure field
    assert [teacher_certainty(task, r) for r in records] == pytest.approx([0.9, 0.9, 0.6, 0.4])
    wrong = {**answer, "sentiment": "negative"}
    groups = exact_by_certainty(task, records, [answer, wrong, answer, None])
    assert [(g["n"], g["exact"]) for g in groups] == [(2, 0.5), (2, 0.5)]
    assert "sure" in groups[0]["group"] and "unsure" in groups[1]["group"]
    assert exact_by_certainty(task, records, [answer, answer, wrong, wrong], threshold=0.5) == [
        {"group": "teacher sure (every field ≥ 50%)", "n": 3, "exact": 2 / 3},
        {"group": "teacher unsure (some field < 50%)", "n": 1, "exact": 0.0}]
    records[0].decisions = {}  # shards without decision points: no split
    assert teacher_certainty(task, records[0]) is None
    assert exact_by_certainty(task, records, [answer] * 4) is None


def test_timing_measures_per_input_latency_and_batched_throughput():
    calls = []

    def fn(texts):
        calls.append(len(texts))
        time.sleep(0.01 * len(texts) if len(texts) > 1 else 0.02)
        return [t.upper() for t in texts]

    t, out = timing(fn, ["a", "b", "c", "d"])
    assert out == ["A", "B", "C", "D"]  # what the batched call returned
    assert calls == [1, 1, 1, 1, 1, 4]  # warm-up, four single calls, one batch
    assert 19 <= t["p50_ms"] <= t["p95_ms"] < 200
    assert t["per_s"] < 4 / 0.04 * 1.01
    assert t["n"] == t["batch"] == 4


def test_peak_memory_sees_an_allocation_made_and_freed_inside():
    import mmap

    with PeakMemory() as mem:
        # 64 MiB of fresh pages from the kernel, touched so they are resident (a malloc'ed block may
        # reuse memory an earlier test freed, which never left the process)
        block = mmap.mmap(-1, 64 * 2**20)
        block.write(b"\x01" * (64 * 2**20))
        # hold it until the sampling thread has run (a loaded machine may not schedule it for a while)
        deadline = time.monotonic() + 10
        while mem.peak - mem.start < 48 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.01)
        block.close()
    assert mem.growth >= 48 * 2**20


# ---- end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer):
    from microdistill.train import TrainConfig, train

    root = tmp_path_factory.mktemp("evaluate")
    shards = make_shards(root / "shards", tiny_tokenizer, n=64, labels=True)
    student = train(shards, root / "student", TrainConfig(preset="nano", epochs=2, batch_size=16), progress=False)
    return root, shards, student


@pytest.fixture(scope="module")
def evaluated(trained, tiny_teacher_dir):
    root, shards, student = trained
    report = evaluate(student, shards, root / "eval", teacher=str(tiny_teacher_dir), timing_n=4, progress=False)
    return root / "eval", report


def _by_hand(student_dir, shards_dir):
    """Exact match and teacher-forced token accuracy on the val split, one example at a time."""
    from microdistill.students.decoder.predict import predict
    from microdistill.students import load_student

    s = load_student(student_dir)
    records = list(ShardSet(shards_dir).records("val"))
    preds = predict(s, [r.text for r in records])
    exact = sum(p["fields"] == r.fields for p, r in zip(preds, records)) / len(records)
    index_in = {int(t): 3 + p for p, t in enumerate(s.input_vocab)}
    index_out = {int(t): k for k, t in enumerate(s.kept)}
    right = total = 0
    with torch.no_grad():
        for r in records:
            out = torch.tensor([[index_out[int(i)] for i in r.output_ids]])
            logits = s.model(torch.tensor([[index_in[int(i)] for i in r.input_ids]]), out[:, :-1])
            right += int((logits[..., : len(s.kept)].argmax(-1) == out).sum())
            total += out.shape[1]
    return records, preds, exact, right / total


def test_report_numbers_match_a_hand_computation(trained, evaluated):
    _, shards, student = trained
    _, report = evaluated
    records, preds, exact, token_acc = _by_hand(student, shards)
    assert report["split"] == "val" and report["n_eval"] == len(records) > 0
    assert report["student_only_exact"] == pytest.approx(exact)
    assert report["teacher_forced_token_acc"] == pytest.approx(token_acc)
    assert report["valid_json_constrained"] == 1.0
    assert 0.0 <= report["valid_json_unconstrained"] <= 1.0
    for name, f in report["fields"].items():
        by_hand = sum(p["fields"][name] == r.fields[name] for p, r in zip(preds, records)) / len(records)
        assert f["agreement"] == pytest.approx(by_hand)
        m = np.array(f["confusion"]["matrix"])
        assert m.sum() == len(records)
        assert np.trace(m) / len(records) == pytest.approx(by_hand)
    lo, hi = report["student_only_exact_ci95"]
    assert lo <= report["student_only_exact"] <= hi and (lo, hi) == pytest.approx(wilson_interval(exact * len(records), len(records)))
    groups = report["exact_by_teacher_certainty"]
    assert sum(g["n"] for g in groups) == len(records)
    assert sum(g["n"] * (g["exact"] or 0) for g in groups) == pytest.approx(exact * len(records))
    # The synthetic shards' labels are the teacher's own answers.
    assert set(report["human"]) == {"tone", "sentiment", "safety", "toxicity"}
    for name, h in report["human"].items():
        assert h["n"] == len(records) and h["teacher_acc"] == 1.0
        assert h["student_acc"] == pytest.approx(report["fields"][name]["agreement"])


def test_report_times_teacher_and_student_and_measures_sizes(trained, evaluated):
    _, _, student = trained
    _, r = evaluated
    s, t = r["speed"]["student"], r["speed"]["teacher"]
    for side in (s, t):
        assert 0 < side["p50_ms"] <= side["p95_ms"] and side["per_s"] > 0 and side["n"] == 4
    assert r["speed"]["speedup_p50"] == pytest.approx(t["p50_ms"] / s["p50_ms"])
    assert r["speed"]["speedup_throughput"] == pytest.approx(s["per_s"] / t["per_s"])
    assert 0.0 <= t["same_output_as_shards"] <= 1.0
    z = r["size"]
    assert z["student_bytes"] == (student / "model.safetensors").stat().st_size
    assert z["student_params"] == r["memory"]["student_weights_bytes"] // 4  # float32
    assert z["teacher_params"] > 0 and z["teacher_bytes"] > 0
    assert z["ratio"] == pytest.approx(z["teacher_bytes"] / z["student_bytes"])
    assert r["memory"]["student_rss_bytes"] >= 0 and r["memory"]["teacher_rss_bytes"] >= 0


def test_report_files(evaluated):
    out, report = evaluated
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    for key in ("student_only_exact", "teacher_forced_token_acc", "valid_json_unconstrained", "valid_json_constrained",
                "fields", "human", "speed", "size", "memory", "n_eval"):
        assert key in report
    md = (out / "report.md").read_text()
    for section in ("## Agreement with the teacher", "### Per field", "## Against human labels",
                    "### Where the teacher hesitates", "## Teacher vs student", "## Learning curves", "## Notes"):
        assert section in md
    lo, hi = report["student_only_exact_ci95"]
    assert f"(95% interval {100 * lo:.2f}%–{100 * hi:.2f}%)" in md
    # Synthetic shards record no extraction time: no cost section, and the report says why.
    assert "## Cost" not in md and any("no cost section" in n and "extract_s" in n for n in report["notes"])
    pngs = ["learning_curves.png"] + [f"confusion_{n}.png" for n in ("tone", "sentiment", "safety", "toxicity")]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in md  # every plot is shown in the report
    from matplotlib.image import imread

    assert imread(out / "learning_curves.png").shape[0] > 400


def test_shards_from_a_real_extraction_time_their_own_teacher(tmp_path, tiny_teacher_dir):
    """With no --teacher the shards' teacher is loaded from the manifest, timed on the kept
    vocabulary exactly as extraction ran it (so it reproduces the shards), and priced."""
    from synthetic import make_texts

    from microdistill.extract import ExtractConfig, extract
    from microdistill.train import TrainConfig, train

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(40, seed=3)))
    shards = extract(corpus, tmp_path / "shards", ExtractConfig(teacher=str(tiny_teacher_dir), batch_size=8, vocab_size=64,
                                                                calibration=8), progress=False)
    student = train(shards, tmp_path / "student", TrainConfig(preset="nano", max_steps=2), progress=False)
    r = evaluate(student, shards, tmp_path / "eval", teacher_from_manifest=True, timing_n=4, progress=False)
    assert r["teacher"]["spec"] == str(Path(tiny_teacher_dir).resolve())
    assert r["speed"]["teacher"]["same_output_as_shards"] == 1.0
    assert r["valid_json_constrained"] == 1.0
    assert not any("tokenizer" in n for n in r["notes"])  # same tokenizer: timed on the kept vocabulary
    # the ceiling: the teacher asked the held-out inputs again, edited; and the peers beside the student
    from microdistill.evaluate.consistency import EDITS

    ceiling = r["teacher_consistency"]
    held_out = list(ShardSet(shards).records("val"))[:32]
    assert ceiling["n"] == len(held_out) == r["n_eval"]
    assert {k: v["n"] for k, v in ceiling["edits"].items()} == {
        k: sum(edit(x.text) != x.text for x in held_out) for k, edit in EDITS.items()}
    assert [p["name"] for p in r["peers"]] == ["tfidf", "encoder"] and all(p["n_val"] == r["n_eval"] for p in r["peers"])
    # the student's own consistency, on the same inputs under the same edits
    from microdistill.evaluate.consistency import self_consistency
    from microdistill.students import load_student

    own = r["student_consistency"]
    again = self_consistency(lambda t: [p["output"] for p in load_student(student).predict(t)], [x.text for x in held_out])
    assert own["n"] == ceiling["n"] and own["edits"].keys() == ceiling["edits"].keys()
    assert own["consistent"] == again["consistent"] and own["edits"] == again["edits"]
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "### Beside the peers and the ceiling" in md and "| peer: tfidf |" in md
    n = len(held_out)
    assert f"| teacher's self-consistency ({n} inputs" in md and f"| student's self-consistency ({n} inputs" in md
    assert "## Cost" in md and "](cost.png)" in md
    assert (tmp_path / "eval" / "cost.png").read_bytes()[:8] == PNG_MAGIC


def test_falls_back_to_the_train_split_with_a_warning(trained, tmp_path):
    _, shards, student = trained
    src = ShardSet(shards)
    header = {k: v for k, v in src.manifest.items() if k not in ("shards", "counts", "complete", "created", "format")}
    writer = ShardWriter(tmp_path / "train_only", header)
    for r in src.records():
        r.split = "train"
        writer.add(r)
    writer.close()
    shutil.copytree(shards / "tokenizer", tmp_path / "train_only" / "tokenizer")
    assert eval_split(ShardSet(tmp_path / "train_only"))[0] == "train"
    r = evaluate(student, tmp_path / "train_only", tmp_path / "eval", limit=5, timing_n=2, progress=False)
    assert r["split"] == "train" and r["n_eval"] == 5
    assert r["warnings"] and "train split" in r["warnings"][0]
    assert r["speed"]["teacher"] is None and r["speed"]["speedup_p50"] is None
    assert "**Warning:**" in (tmp_path / "eval" / "report.md").read_text()


def test_rejects_bad_limits_and_shards_of_another_task(trained, tmp_path, tiny_tokenizer):
    _, shards, student = trained
    with pytest.raises(EvalError, match="--limit must be a positive integer"):
        evaluate(student, shards, tmp_path / "eval", limit=0, progress=False)
    # The same fields under another task name: another task, whose shards this student never saw.
    renamed = load_task("reddit-comment").model_dump() | {"name": "comment-labels"}
    (tmp_path / "task.json").write_text(json.dumps(renamed))  # JSON is YAML
    other = make_shards(tmp_path / "other", tiny_tokenizer, n=16, task_name=str(tmp_path / "task.json"))
    with pytest.raises(EvalError, match="different tasks"):
        evaluate(student, other, tmp_path / "eval", progress=False)


def _cli(monkeypatch, capsys, *args):
    from microdistill import cli

    monkeypatch.setattr(sys, "argv", ["microdistill", "eval", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code or 0
    return code, capsys.readouterr()


def test_cli_json_and_a_one_line_error(trained, tmp_path, monkeypatch, capsys):
    _, shards, student = trained
    # No --teacher: the shards' teacher (here a test file, not a model) is skipped with a note.
    code, io = _cli(monkeypatch, capsys, "--student", str(student), "--data", str(shards), "--out", str(tmp_path / "e"),
                    "--json", "--quiet", "--timing-inputs", "2", "--limit", "4")
    assert code == 0
    r = json.loads(io.out)
    assert r["n_eval"] == 4 and r["speed"]["teacher"] is None
    assert any("teacher not timed" in n for n in r["notes"])
    assert (tmp_path / "e" / "report.md").is_file()
    code, io = _cli(monkeypatch, capsys, "--student", str(tmp_path / "missing"), "--data", str(shards), "--no-teacher")
    assert code == 2
    errors = [line for line in io.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "student folder" in errors[0] and "not found" in errors[0]
    assert "Traceback" not in io.err
