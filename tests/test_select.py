"""Choosing what the teacher labels: the strategies against hand computations, and `extract
--select` end to end with the tiny teacher and a classifier-head student, round after round."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from synthetic import make_shards, make_texts

from microdistill.data.select import choose, entropy, k_centre, margin
from microdistill.data.shards import ShardSet
from microdistill.students import load_student
from microdistill.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def test_the_strategies_against_a_hand_computation():
    probs = [np.array([[0.9, 0.1], [0.55, 0.45], [0.6, 0.4], [0.99, 0.01]]),
             np.array([[0.5, 0.3, 0.2], [0.98, 0.01, 0.01], [0.34, 0.33, 0.33], [0.9, 0.05, 0.05]])]
    # least sure field per input: gaps 0.2, 0.1, 0.01, 0.85
    np.testing.assert_allclose(margin(probs), [0.2, 0.1, 0.01, 0.85])
    assert choose(4, 2, "margin", probs) == [2, 1]
    h = entropy(probs)
    assert h.argmax() == 2 and h.argmin() == 3
    assert choose(4, 3, "first") == [0, 1, 2]
    assert sorted(choose(4, 4, "random", seed=3)) == [0, 1, 2, 3] and choose(4, 2, "random", seed=3) == choose(4, 2, "random", seed=3)
    with pytest.raises(ValueError, match="needs the student's probabilities"):
        choose(4, 2, "entropy")


def test_diverse_spreads_a_batch_over_the_uncertain_inputs():
    """Ten near-copies of one hard case and two other hard cases: margin takes copies, diverse
    takes one copy and the others."""
    rng = np.random.default_rng(0)
    copies = np.tile([1.0, 0.0, 0.0], (10, 1)) + rng.normal(0, 1e-3, (10, 3))
    vectors = np.vstack([copies, [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], rng.normal(0, 1, (20, 3))])
    sure = np.full(32, 0.95)
    sure[:10] = 0.51 + np.arange(10) * 0.0005  # the copies are the least sure of all
    sure[10:12] = 0.54  # then the two other hard cases
    probs = [np.stack([sure, 1 - sure], 1)]
    assert set(choose(32, 3, "margin", probs)) <= set(range(10))
    picked = choose(32, 3, "diverse", probs, vectors)
    assert len(set(picked) & set(range(10))) == 1 and {10, 11} <= set(picked)
    assert k_centre(vectors[:3], 5) == [0, 1, 2]


@pytest.fixture(scope="module")
def student(tmp_path_factory, tiny_tokenizer):
    shards = make_shards(tmp_path_factory.mktemp("sel") / "shards", tiny_tokenizer, n=40)
    return train(shards, tmp_path_factory.mktemp("sel") / "student",
                 TrainConfig(student="heads", max_steps=3, batch_size=8), progress=False)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "microdistill", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def test_extract_labels_what_the_student_doubts_round_after_round(student, tiny_teacher_dir, tmp_path):
    pool = tmp_path / "pool.txt"
    texts = make_texts(30, seed=21)
    pool.write_text("\n".join(texts) + "\n")
    out = tmp_path / "shards"
    common = ["--input", str(pool), "--out", str(out), "--teacher", str(tiny_teacher_dir), "--vocab-size", "200",
              "--calibration", "4", "--quiet"]
    r = cli("extract", *common, "--select", "margin", "--student", str(student), "--budget", "6")
    assert r.returncode == 0, r.stderr
    probs = load_student(student).probabilities(texts)
    least_sure = [texts[i] for i in np.argsort(margin(probs), kind="stable")[:6]]
    first = ShardSet(out)
    assert sorted(r.text for r in first.records()) == sorted(least_sure)
    rounds = first.manifest["rounds"]
    assert len(rounds) == 1 and rounds[0]["strategy"] == "margin" and rounds[0]["pool"] == 30 and len(rounds[0]["ids"]) == 6
    r = cli("extract", *common, "--select", "random", "--budget", "4")
    assert r.returncode == 0, r.stderr
    second = ShardSet(out)
    assert len(second) == 10 and [x["strategy"] for x in second.manifest["rounds"]] == ["margin", "random"]
    assert second.manifest["rounds"][1]["pool"] == 24  # what the first round labelled is no longer in the pool


def test_selection_errors_are_one_line(student, tiny_teacher_dir, tmp_path):
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(make_texts(5, seed=2)) + "\n")
    common = ["--input", str(pool), "--out", str(tmp_path / "s"), "--teacher", str(tiny_teacher_dir), "--quiet"]
    cases = [(["--select", "margin", "--budget", "9", "--student", str(student)], "--budget 9: the pool holds 5 inputs"),
             (["--select", "margin", "--budget", "2"], "--select margin chooses by the student's confidence"),
             (["--select", "loudest", "--budget", "2"], "--select 'loudest': choose one of"),
             (["--select", "margin", "--budget", "2", "--student", str(student), "--task", "support-ticket"],
              "does the task 'reddit-comment', not 'support-ticket'"),
             (["--budget", "2"], "--select and --budget go together")]
    for args, message in cases:
        r = cli("extract", *common, *args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, (args, r.stderr)
    empty = tmp_path / "empty.txt"
    empty.write_text("ok\n")  # too short for the task's filters
    r = cli("extract", "--input", str(empty), "--out", str(tmp_path / "e"), "--teacher", str(tiny_teacher_dir),
            "--select", "random", "--budget", "1", "--quiet")
    assert r.returncode == 2 and "were filtered out" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists() and not (tmp_path / "e").exists()
