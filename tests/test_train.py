"""The training loop: it learns, checkpoints, resumes bit for bit, and refuses bad input in one line."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from synthetic import make_shards

from microdistill.saved import load_student
from microdistill.store import ShardSet, ShardWriter, StoreError
from microdistill.train import TrainConfig, TrainError, TrainingInterrupted, evaluate_epoch, load_split, lr_at, train


@pytest.fixture(autouse=True)
def one_thread():
    # Two OpenMP threads on a busy 2-core machine spin-wait each other into 10-30x slowdowns.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_tokenizer):
    return make_shards(tmp_path_factory.mktemp("shards"), tiny_tokenizer, n=64)


def steps(path) -> list[dict]:
    return [r for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_tiny_run_learns_its_training_data(shards, tmp_path):
    cfg = TrainConfig(preset="nano", epochs=24, batch_size=16, lr=5e-3, eval_limit=4)
    out = train(shards, tmp_path / "student", cfg, progress=False)
    student = load_student(out)
    examples, records = load_split(ShardSet(shards), "train", True, None)
    m = evaluate_epoch(student, examples, records, batch_size=64)
    assert m["val_token_acc"] >= 0.98
    assert m["val_exact_match"] >= 0.9
    rows = steps(out)
    assert rows[-1]["loss"] < rows[0]["loss"] / 5
    # The KL weight follows the cosine curriculum from 0.9 towards 0.1 over all steps.
    assert rows[0]["w_kl"] == pytest.approx(0.9) and rows[-1]["w_kl"] < 0.11
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("eval")]
    assert len(evals) == 24 and evals[-1]["val_examples"] == 4
    stats = json.loads((out / "training.json").read_text())
    assert stats["steps"] == len(rows) == 24 * 4 and stats["epochs"] == 24
    assert stats["tokens"] > 0 and stats["tokens_per_s"] > 0 and stats["wall_s"] >= stats["train_s"] > 0


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(shards, tmp_path):
    cfg = TrainConfig(preset="nano", epochs=3, batch_size=16, eval_limit=2)  # 4 batches per epoch
    whole = train(shards, tmp_path / "whole", cfg, progress=False)

    def interrupt(step: int) -> None:
        if step == 6:  # mid-epoch 1: the checkpoint must carry the data position inside the epoch
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="step 6/12"):
        train(shards, tmp_path / "split", cfg, progress=False, on_step=interrupt)
    meta = json.loads((tmp_path / "split" / "checkpoint" / "meta.json").read_text())
    assert (meta["epoch"], meta["batch"], meta["step"]) == (1, 2, 6)
    assert not (tmp_path / "split" / "model.safetensors").exists()
    train(shards, tmp_path / "split", cfg, resume=True, progress=False)

    a, b = load_file(str(whole / "model.safetensors")), load_file(str(tmp_path / "split" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if k != "ms"} for r in rows]  # noqa: E731
    assert strip(steps(whole)) == strip(steps(tmp_path / "split"))  # same losses, step for step, logged once


def test_resume_refuses_shards_of_another_teacher_and_changed_options(shards, tmp_path, tiny_tokenizer):
    cfg = TrainConfig(preset="nano", max_steps=2, batch_size=16, eval_limit=1)
    out = train(shards, tmp_path / "s", cfg, progress=False)
    other = make_shards(tmp_path / "other", tiny_tokenizer, n=64, teacher_sha256="1" * 64)
    with pytest.raises(TrainError, match=r"checkpoint/state.pt: trained on shards with a different teacher") as e:
        train(other, out, cfg, resume=True, progress=False)
    assert "\n" not in str(e.value)
    grown = make_shards(tmp_path / "grown", tiny_tokenizer, n=80)
    with pytest.raises(TrainError, match="different number of training examples"):
        train(grown, out, cfg, resume=True, progress=False)
    with pytest.raises(TrainError, match=r"other training options \(lr=0.002\)"):
        train(shards, out, TrainConfig(preset="nano", max_steps=2, batch_size=16, lr=1e-3), resume=True, progress=False)
    with pytest.raises(TrainError, match="already holds a training run; pass --resume"):
        train(shards, out, cfg, progress=False)
    with pytest.raises(TrainError, match="no checkpoint to resume from"):
        train(shards, tmp_path / "fresh", cfg, resume=True, progress=False)


def test_text_only_shards_train_with_cross_entropy_alone(tmp_path, tiny_tokenizer):
    text = make_shards(tmp_path / "text", tiny_tokenizer, n=32, with_logits=False)
    assert not ShardSet(text).has_logits
    with pytest.raises(TrainError, match="text-only shards have no teacher logits"):
        train(text, tmp_path / "a", TrainConfig(preset="nano", signal="logits"), progress=False)
    out = train(text, tmp_path / "b", TrainConfig(preset="nano", max_steps=3, batch_size=8, eval_limit=1), progress=False)
    rows = steps(out)
    assert [r["kl"] for r in rows] == [0.0] * 3 and all(r["w_kl"] == 0.0 for r in rows)
    assert all(r["loss"] == pytest.approx(r["ce"], rel=1e-5) for r in rows)
    assert json.loads((out / "training.json").read_text())["signal"] == "text"


def test_tail_class_and_other_divergences_train(shards, tmp_path):
    out = train(shards, tmp_path / "t", TrainConfig(preset="nano", max_steps=2, batch_size=8, tail=True, eval_limit=2,
                                                    divergence="taid"), progress=False)
    student = load_student(out)
    assert student.config.output_vocab == len(ShardSet(shards).kept_vocab) + 1
    assert all(np.isfinite(r["loss"]) for r in steps(out))


def test_step_budget_and_train_limit(shards, tmp_path):
    out = train(shards, tmp_path / "s", TrainConfig(preset="nano", max_steps=5, batch_size=4, limit_train=12, eval_limit=1),
                progress=False)
    rows = steps(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["epoch"] for r in rows] == [0, 0, 0, 1, 1]  # 12 examples / 4 = 3 batches per epoch
    assert json.loads((out / "training.json").read_text())["examples"] == 12


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(lr=1e-2, warmup_frac=0.1, min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-3, rel=0.01)


@pytest.mark.parametrize("kwargs, message", [
    ({"preset": "huge"}, "preset='huge': choose one of nano, micro"),
    ({"lr": 0.0}, "lr=0.0: must be in"),
    ({"divergence": "kl"}, "divergence='kl'"),
    ({"curriculum": "sine"}, "curriculum='sine'"),
    ({"max_steps": 0}, "max_steps=0"),
])
def test_bad_options_are_one_line_errors(kwargs, message):
    with pytest.raises(TrainError, match=message) as e:
        TrainConfig(**kwargs)
    assert isinstance(e.value, StoreError) and "\n" not in str(e.value)


def test_empty_and_corrupted_shard_folders_are_one_line_errors(shards, tmp_path, tiny_tokenizer):
    empty = tmp_path / "empty"
    ShardWriter(empty, dict(ShardSet(shards).manifest, shards=[])).close()
    with pytest.raises(TrainError, match="holds no examples yet"):
        train(empty, tmp_path / "a", TrainConfig(preset="nano"), progress=False)
    broken = make_shards(tmp_path / "broken", tiny_tokenizer, n=40)
    shard = next(broken.glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(StoreError, match="manifest says .* \\(corrupted\\)"):
        train(broken, tmp_path / "b", TrainConfig(preset="nano"), progress=False)
    with pytest.raises(StoreError, match="no manifest.json"):
        train(tmp_path, tmp_path / "c", TrainConfig(preset="nano"), progress=False)
