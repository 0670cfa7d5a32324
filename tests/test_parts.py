"""Extraction by several workers (parts.py): the parts together hold exactly what one process
writes, each input labelled once; a worker resumes; a folder that does not fit is refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import label, make_texts

from microdistill.extract import ExtractConfig, extract
from microdistill.teachers.decoding import Decoder
from microdistill.extract.parts import Part, PartError, from_env
from microdistill.data.shards import ShardSet, ShardWriter, StoreError
from microdistill.core.task import load_task
from microdistill.teachers import load_teacher

TASK = load_task("reddit-comment")
# One input per batch: a batch's composition changes the float rounding of its rows (by a float16
# step at most), so only unbatched decoding can be compared bit for bit; see the batched test below.
ARGS = dict(batch_size=1, vocab_size=200, calibration=6, field="body", labels={"toxicity": "tox"}, embeddings=True)


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_teacher(str(tiny_teacher_dir))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "comments.jsonl"
    path.write_text("".join(json.dumps({"body": t, "tox": label(t)["toxicity"]}) + "\n" for t in make_texts(30, seed=5)))
    return path


def _extract(corpus, teacher, out, part=None, task=TASK, **kw):
    return extract(corpus, out, ExtractConfig(**{**ARGS, **kw}), task=task, teacher=teacher, progress=False,
                   part=part, wait_s=0)


@pytest.fixture(scope="module")
def single(corpus, teacher, tmp_path_factory):
    return ShardSet(_extract(corpus, teacher, tmp_path_factory.mktemp("one") / "shards"))


@pytest.fixture(scope="module")
def two(corpus, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "shards"
    for i in (0, 1):
        _extract(corpus, teacher, out, Part(i, 2))
    return out


def assert_same_records(a: ShardSet, b: ShardSet, exact: bool = True) -> None:
    """The same examples, bit for bit (or the teacher's numbers within float16 rounding), whatever
    order they are stored in."""
    ra, rb = {r.id: r for r in a.load()}, {r.id: r for r in b.load()}
    assert len(ra) == len(a) and len(rb) == len(b)  # no example stored twice
    assert set(ra) == set(rb)
    for eid, r in ra.items():
        s = rb[eid]
        assert (r.text, r.output_text, r.fields, r.split, r.labels) == (s.text, s.output_text, s.fields, s.split, s.labels)
        assert np.array_equal(r.input_ids, s.input_ids) and np.array_equal(r.output_ids, s.output_ids)
        if not exact:
            assert np.allclose(r.logits.astype(np.float32), s.logits.astype(np.float32), rtol=2e-3, atol=2e-3)
            assert np.allclose(r.lse, s.lse, atol=1e-4) and np.allclose(r.hidden, s.hidden, rtol=2e-3, atol=2e-3)
            continue
        assert r.logits.tobytes() == s.logits.tobytes() and r.lse.tobytes() == s.lse.tobytes()
        assert r.hidden.tobytes() == s.hidden.tobytes()
        assert all(r.decisions[k].tobytes() == s.decisions[k].tobytes() for k in r.decisions)


def test_two_workers_write_what_one_does(single, two):
    parted = ShardSet(two, verify=True)
    assert_same_records(single, parted)
    m = parted.manifest
    assert m["complete"] and m["parts"] == 2 and m["vocab"] == single.manifest["vocab"]
    assert m["counts"] == single.manifest["counts"]
    # the calibration answers sit in the root, every other example in the part its id hashes to
    root = json.loads((two / "manifest.json").read_text())
    assert root["shards"] and all(s["file"].startswith("parts/") for s in m["shards"][len(root["shards"]):])
    for i in (0, 1):
        part = ShardSet.ids_in(two / "parts" / f"{i}-of-2", json.loads((two / f"parts/{i}-of-2/manifest.json").read_text()))
        assert part and all(Part(i, 2).owns(eid) for eid in part)
    # a student reads it as any folder
    assert len(parted.input_embeddings()) == len(parted.input_vocab) and parted.tokenizer() is not None


def test_batched_workers_agree_within_rounding(corpus, teacher, tmp_path):
    """In batches, each worker's batches hold other neighbours than one process's: the same
    answers, the numbers within float16 rounding (as after a resumed single process)."""
    one = ShardSet(_extract(corpus, teacher, tmp_path / "one", batch_size=5))
    for i in (0, 1):
        _extract(corpus, teacher, tmp_path / "two", Part(i, 2), batch_size=5)
    assert_same_records(one, ShardSet(tmp_path / "two"), exact=False)


def test_a_worker_resumes_and_nothing_is_labelled_twice(corpus, teacher, single, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    _extract(corpus, teacher, out, Part(0, 2))
    monkeypatch.setattr(ShardWriter.__init__, "__defaults__", (2,))  # shards of 2 examples
    real, calls = Decoder.generate, {"n": 0}

    def killed(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Decoder, "generate", killed)
    with pytest.raises(KeyboardInterrupt):
        _extract(corpus, teacher, out, Part(1, 2))
    half = ShardSet(out, verify=True)
    assert not half.manifest["complete"] and 0 < len(half) < len(single)
    monkeypatch.setattr(Decoder, "generate", real)
    labelled = []
    monkeypatch.setattr(Decoder, "generate", lambda self, rests, *a, **k: labelled.extend(rests) or real(self, rests, *a, **k))
    _extract(corpus, teacher, out, Part(1, 2))
    _extract(corpus, teacher, out, Part(0, 2))  # finished: labels nothing
    assert len(labelled) == len(single) - len(half)  # only what the killed run had not written
    assert_same_records(single, ShardSet(out, verify=True))


def test_folders_that_do_not_fit_are_refused(corpus, teacher, two, tmp_path, tiny_teacher_dir):
    with pytest.raises(PartError, match=r"is part 0/2 of the shard folder .*; give that folder as --out"):
        _extract(corpus, teacher, two / "parts" / "0-of-2", Part(1, 2))
    with pytest.raises(PartError, match="is extracted in 2 parts; run each worker with --part I/2"):
        _extract(corpus, teacher, two)
    with pytest.raises(PartError, match="is extracted in 2 parts, not 3"):
        _extract(corpus, teacher, two, Part(0, 3))
    with pytest.raises(StoreError, match="--vocab-size 200"):
        _extract(corpus, teacher, two, Part(1, 2), vocab_size=300)
    with pytest.raises(StoreError, match="different task fingerprint"):
        _extract(corpus, teacher, two, Part(1, 2), task=load_task("support-ticket"), labels=None)
    other = load_teacher(str(tiny_teacher_dir))
    other.sha256 = "0" * 64
    with pytest.raises(StoreError, match="different teacher"):
        _extract(corpus, other, two, Part(1, 2))
    with pytest.raises(PartError, match="extracted by one process; continue it without --part"):
        one = tmp_path / "one"
        _extract(corpus, teacher, one, limit=3)
        _extract(corpus, teacher, one, Part(0, 2))
    with pytest.raises(StoreError, match="is part 1 of 2 of the shard folder"):
        ShardSet(two / "parts" / "1-of-2")
    # nobody has calibrated: a worker other than 0 does not, and says who must
    with pytest.raises(PartError, match=r"not calibrated after 0 s; run worker 0 \(--part 0/2\) first"):
        _extract(corpus, teacher, tmp_path / "empty", Part(1, 2))
    # a part from another calibration of the same corpus is refused by the reader and by its worker
    again = tmp_path / "again"
    _extract(corpus, teacher, again, Part(0, 2))
    shutil.copytree(two / "parts" / "1-of-2", again / "parts" / "1-of-2")
    with pytest.raises(StoreError, match=r"1-of-2: not part 1 of 2 of this folder's calibration"):
        ShardSet(again)
    with pytest.raises(StoreError, match=r"1-of-2: not part 1 of 2 of this folder's calibration"):
        _extract(corpus, teacher, again, Part(1, 2))


def test_part_spec_and_torchrun_environment():
    assert Part.parse("1/4") == Part(1, 4) and str(Part(1, 4)) == "1/4"
    for bad in ("4/4", "x", "1/2/3", "-1/2"):
        with pytest.raises(PartError, match="--part"):
            Part.parse(bad)
    assert from_env({"RANK": "3", "WORLD_SIZE": "4"}) == Part(3, 4)
    assert from_env({}) is None and from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None
    ids = [f"{i:016x}" for i in range(0, 2**20, 4099)]
    assert sorted(sum(([e for e in ids if Part(i, 3).owns(e)] for i in range(3)), [])) == sorted(ids)


def test_concurrent_worker_processes_from_the_environment(corpus, tiny_teacher_dir, single, tmp_path):
    """Two `python -m microdistill extract` processes started together, as torchrun starts them
    (RANK / WORLD_SIZE): worker 1 waits for worker 0's calibration, then both label their parts."""
    out = tmp_path / "shards"
    argv = [sys.executable, "-m", "microdistill", "extract", "--input", str(corpus), "--teacher", str(tiny_teacher_dir),
            "--out", str(out), "--batch-size", "1", "--vocab-size", "200", "--calibration", "6", "--embeddings", "--field", "body",
            "--label", "toxicity=tox", "--quiet"]
    root = Path(__file__).resolve().parents[1]
    # as many threads as the in-process run that made `single`: a matrix product summed by another
    # number of threads may round differently, and the comparison below is bit for bit
    threads = str(torch.get_num_threads())
    procs = [subprocess.Popen(argv, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "OMP_NUM_THREADS": threads})
             for r in (1, 0)]
    for p in procs:
        out_, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    assert_same_records(single, ShardSet(out, verify=True))
