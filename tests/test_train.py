"""The training loop: it learns, checkpoints, resumes bit for bit, and refuses bad input in one line."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from synthetic import make_shards, teacher_embeddings, whole_and_resumed

from microdistill.core.errors import UserError
from microdistill.train.losses import output_sums, taid_lambda, total_loss, with_tail
from microdistill.students.decoder.data import collate, load_split
from microdistill.train import decoder as train_mod
from microdistill.students import load_student
from microdistill.data.shards import ShardSet, ShardWriter, StoreError
from microdistill.students.decoder.config import N_SPECIAL
from microdistill.students.decoder.model import Student, init_input_embeddings_pca
from microdistill.train import TrainConfig, TrainError, TrainingInterrupted, train
from microdistill.train.loop import epoch_batches, lr_at, set_up


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_tokenizer):
    return make_shards(tmp_path_factory.mktemp("shards"), tiny_tokenizer, n=64)


def steps(path) -> list[dict]:
    return [r for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_tiny_run_learns_its_training_data(shards, tmp_path):
    cfg = TrainConfig(preset="nano", epochs=24, batch_size=16, lr=5e-3, eval_limit=4)
    out = train(shards, tmp_path / "student", cfg, progress=False)
    student = load_student(out)
    m = student.held_out(list(ShardSet(shards).records("train")), batch_size=64)
    assert m["val_token_acc"] >= 0.98
    assert m["val_exact_match"] >= 0.9
    rows = steps(out)
    assert rows[-1]["loss"] < rows[0]["loss"] / 5
    # The KL weight follows the cosine curriculum from 0.9 towards 0.1 over all steps.
    assert rows[0]["w_div"] == pytest.approx(0.9) and rows[-1]["w_div"] < 0.11
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("eval")]
    assert len(evals) == 24 and evals[-1]["val_examples"] == 4
    stats = json.loads((out / "training.json").read_text())
    assert stats["steps"] == len(rows) == 24 * 4 and stats["epochs"] == 24
    assert stats["tokens"] > 0 and stats["tokens_per_s"] > 0 and stats["wall_s"] >= stats["train_s"] > 0
    # a finished student keeps no checkpoint (3x its size) unless asked, and is not trained over
    assert not (out / "checkpoint").exists() and not (out / ".checkpoint.old").exists()
    with pytest.raises(TrainError, match="holds a finished student; choose another --out"):
        train(shards, out, cfg, resume=True, progress=False)


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
    out = train(shards, tmp_path / "s", cfg, progress=False, keep_checkpoint=True)
    other = make_shards(tmp_path / "other", tiny_tokenizer, n=64, teacher_sha256="1" * 64)
    with pytest.raises(TrainError, match=r"checkpoint/state.pt: trained on shards with a different teacher") as e:
        train(other, out, cfg, resume=True, progress=False)
    assert "\n" not in str(e.value)
    grown = make_shards(tmp_path / "grown", tiny_tokenizer, n=80)
    with pytest.raises(TrainError, match="different number of training examples"):
        train(grown, out, cfg, resume=True, progress=False)
    with pytest.raises(TrainError, match=r"other training options \(lr=0.002\)"):
        train(shards, out, TrainConfig(preset="nano", max_steps=2, batch_size=16, lr=1e-3), resume=True, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(TrainError, match="already holds a training run; pass --resume"):
        train(shards, out, cfg, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # refused before anything is written
    # an --out that would mix a student into other files is refused before anything loads
    before = sorted(p.name for p in Path(shards).iterdir())
    with pytest.raises(TrainError, match="is the shard folder this reads"):
        train(shards, shards, cfg, progress=False)
    with pytest.raises(TrainError, match="holds the shard folder this reads"):
        train(shards, Path(shards).parent, cfg, progress=False)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(TrainError, match="holds other files and no training run"):
        train(shards, notes, cfg, progress=False)
    assert sorted(p.name for p in Path(shards).iterdir()) == before and sorted(p.name for p in notes.iterdir()) == ["todo.txt"]
    with pytest.raises(TrainError, match="no checkpoint to resume from"):
        train(shards, tmp_path / "fresh", cfg, resume=True, progress=False)


def test_text_only_shards_train_with_cross_entropy_alone(tmp_path, tiny_tokenizer):
    text = make_shards(tmp_path / "text", tiny_tokenizer, n=32, with_logits=False)
    assert not ShardSet(text).has_logits
    with pytest.raises(TrainError, match="text-only shards have no teacher logits"):
        train(text, tmp_path / "a", TrainConfig(preset="nano", signal="logits"), progress=False)
    out = train(text, tmp_path / "b", TrainConfig(preset="nano", max_steps=3, batch_size=8, eval_limit=1), progress=False)
    rows = steps(out)
    assert [r["divergence"] for r in rows] == [0.0] * 3 and all(r["w_div"] == 0.0 for r in rows)
    assert all(r["loss"] == pytest.approx(r["ce"], rel=1e-5) for r in rows)
    assert json.loads((out / "training.json").read_text())["signal"] == "text"


def _first_batch_loss(data, cfg: TrainConfig, train_mode: bool) -> float:
    """The loss of the run's first batch, computed here from the definitions in losses.py on a
    student built (and seeded) as the run builds it: what the first logged step must show."""
    run = set_up(data, cfg, progress=False)
    model = run.model.train(train_mode)
    first = epoch_batches(len(run.train_set), cfg.batch_size, cfg.seed, 0)[0]
    b = collate([run.train_set[i] for i in first], len(run.shards.kept_vocab))
    teacher = b.teacher
    if cfg.tail:
        teacher = with_tail(teacher.reshape(-1, teacher.shape[-1]), b.lse.reshape(-1)).view(*b.target.shape, -1)
    with torch.no_grad():
        parts = output_sums(model(b.inp, b.out_in), teacher, b.target, b.mask, divergence=cfg.divergence,
                            lam=taid_lambda(0.0) if cfg.divergence == "taid" else None)
    return total_loss(parts, cfg.divergence_start).item()


def test_tail_class_and_other_divergences_train(shards, tmp_path):
    cfg = TrainConfig(preset="nano", max_steps=2, batch_size=8, tail=True, eval_limit=2, divergence="taid",
                      hidden_weight=0.0)
    out = train(shards, tmp_path / "t", cfg, progress=False)
    student = load_student(out)
    assert student.config.output_vocab == len(ShardSet(shards).kept_vocab) + 1
    # the logged loss is TAID at λ(0) against the teacher with its tail class, weighted 0.9 / 0.1
    assert steps(out)[0]["loss"] == pytest.approx(_first_batch_loss(shards, cfg, train_mode=True), rel=1e-5)
    plain = TrainConfig(**{**cfg.to_dict(), "tail": False, "divergence": "forward_kl"})
    assert steps(out)[0]["loss"] != pytest.approx(_first_batch_loss(shards, plain, train_mode=True), rel=1e-3)


def test_step_budget_and_train_limit(shards, tmp_path):
    out = train(shards, tmp_path / "s", TrainConfig(preset="nano", max_steps=5, batch_size=4, limit_train=12, eval_limit=1),
                progress=False)
    rows = steps(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["epoch"] for r in rows] == [0, 0, 0, 1, 1]  # 12 examples / 4 = 3 batches per epoch
    assert json.loads((out / "training.json").read_text())["examples"] == 12


def _initial_weights(monkeypatch) -> list:
    """Records the model's weights when the optimiser is made, i.e. before any step."""
    seen = []
    real = train_mod.make_optimizer

    def spy(model, cfg, probe=None):
        seen.append((model.config, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return real(model, cfg, probe)

    monkeypatch.setattr(train_mod, "make_optimizer", spy)
    return seen


def test_input_embeddings_start_from_the_teachers_rows(tmp_path, tiny_tokenizer, monkeypatch):
    emb = make_shards(tmp_path / "emb", tiny_tokenizer, n=32, input_embeddings=True)
    s = ShardSet(emb)
    rows = s.input_embeddings()
    assert torch.equal(rows, torch.from_numpy(teacher_embeddings(tiny_tokenizer)[s.input_vocab]).half().float())
    seen = _initial_weights(monkeypatch)
    cfg = TrainConfig(preset="nano", max_steps=1, batch_size=8, eval_limit=1, seed=3)
    teacher_out = train(emb, tmp_path / "teacher", cfg, progress=False)
    random_out = train(emb, tmp_path / "random", TrainConfig(**{**cfg.to_dict(), "embed_init": "random"}), progress=False)
    (scfg, w_teacher), (_, w_random) = seen

    torch.manual_seed(3)
    fresh = Student(scfg)
    assert torch.equal(w_random["embed_in.weight"], fresh.embed_in.weight)
    init_input_embeddings_pca(fresh, rows)
    expected = fresh.state_dict()
    for k, v in expected.items():  # PCA rows, and every other weight as a random start would have it
        assert torch.equal(w_teacher[k], v), k
    n = len(rows)
    start = w_teacher["embed_in.weight"][N_SPECIAL:N_SPECIAL + n].double()
    assert not torch.allclose(start, w_random["embed_in.weight"][N_SPECIAL:N_SPECIAL + n].double())
    # words the teacher places alike start alike: the rows' Gram matrix is the centred teacher rows'
    # one restricted to their top principal directions (all of them here: 24 < d_model), rescaled
    centred = rows.double() - rows.double().mean(0)
    gram, want = start @ start.T, centred @ centred.T
    assert torch.allclose(gram / gram.norm(), want / want.norm(), atol=1e-5)
    assert start.std().item() == pytest.approx(0.02, rel=0.05)
    assert json.loads((teacher_out / "training.json").read_text())["embed_init"] == "teacher"
    assert json.loads((random_out / "training.json").read_text())["embed_init"] == "random"


def test_teacher_init_without_stored_rows_and_no_teacher_is_a_one_line_error(tiny_tokenizer, tmp_path, monkeypatch):
    """Shards without input embeddings whose teacher cannot be loaded here (these synthetic ones
    have none): the decoder refuses in one line naming the fixes; --embed-init random trains."""
    bare = make_shards(tmp_path / "bare", tiny_tokenizer, n=32, input_embeddings=False)
    assert ShardSet(bare).input_embeddings() is None
    cfg = TrainConfig(preset="nano", max_steps=1, batch_size=8, eval_limit=1)
    with pytest.raises(UserError, match=r"holds no input embeddings.*extract --embeddings.*--embed-init random$"):
        train(bare, tmp_path / "s", cfg, progress=False)
    seen = _initial_weights(monkeypatch)
    out = train(bare, tmp_path / "r", TrainConfig(**{**cfg.to_dict(), "embed_init": "random"}), progress=False)
    scfg, w = seen[0]
    torch.manual_seed(0)
    assert torch.equal(w["embed_in.weight"], Student(scfg).embed_in.weight)
    assert json.loads((out / "training.json").read_text())["embed_init"] == "random"


def test_teacher_init_resumes_bit_for_bit(tmp_path, tiny_tokenizer):
    emb = make_shards(tmp_path / "emb", tiny_tokenizer, n=32, input_embeddings=True)
    cfg = TrainConfig(preset="nano", max_steps=4, batch_size=8, eval_limit=1)
    whole_and_resumed(emb, tmp_path, cfg)
    # the option decides the weights: a resume must ask for the same one
    with pytest.raises(TrainError, match=r"other training options \(embed_init='teacher'\)"):
        train(emb, tmp_path / "split", TrainConfig(**{**cfg.to_dict(), "embed_init": "random"}), resume=True,
              progress=False)


def test_dropout_regularises_training_only_and_resumes_bit_for_bit(tmp_path, tiny_tokenizer):
    data = make_shards(tmp_path / "data", tiny_tokenizer, n=32)
    cfg = TrainConfig(preset="nano", max_steps=4, batch_size=8, eval_limit=1, dropout=0.3)
    whole, _ = whole_and_resumed(data, tmp_path, cfg)  # dropout's random masks come back on resume
    assert json.loads((whole / "config.json").read_text())["student"]["dropout"] == 0.3
    # the first step trained through dropout: its loss is the train-mode loss of the seeded
    # student, not the loss of the same student without dropout
    first = steps(whole)[0]["loss"]
    assert first == pytest.approx(_first_batch_loss(data, cfg, train_mode=True), rel=1e-5)
    assert first != pytest.approx(_first_batch_loss(data, cfg, train_mode=False), rel=1e-3)
    # a loaded student predicts deterministically: dropout is off outside training
    model = load_student(whole).model
    b = collate(load_split(ShardSet(data), "train", False, 4)[0], len(ShardSet(data).kept_vocab))
    assert torch.equal(model(b.inp, b.out_in), model(b.inp, b.out_in))
    assert not torch.equal(model.train()(b.inp, b.out_in), model(b.inp, b.out_in))
    with pytest.raises(TrainError, match=r"dropout=1.0: must be in \[0, 1\)"):
        TrainConfig(dropout=1.0)


def test_hidden_state_loss_trains_a_probe_that_stays_out_of_the_student(tmp_path, tiny_tokenizer):
    hid = make_shards(tmp_path / "hid", tiny_tokenizer, n=48, hidden=12)
    assert ShardSet(hid).hidden_layer == 1 and next(ShardSet(hid).records()).hidden.shape == (12,)
    cfg = TrainConfig(preset="nano", epochs=8, batch_size=16, lr=5e-3, eval_limit=1, hidden_weight=3.0)
    on = train(hid, tmp_path / "on", cfg, progress=False, keep_checkpoint=True)
    rows = steps(on)
    # standardised targets: the loss starts near 1 (an untrained probe predicts ~0) and falls
    assert 0.8 < rows[0]["hidden"] < 1.2 and rows[-1]["hidden"] < rows[0]["hidden"] / 2
    for r in rows:  # weighted into the loss beside the curriculum's KL and CE
        assert r["loss"] == pytest.approx(r["w_div"] * r["divergence"] + (1 - r["w_div"]) * r["ce"] + 3.0 * r["hidden"], rel=1e-4)
    assert json.loads((on / "training.json").read_text())["hidden_layer"] == 1
    off = train(hid, tmp_path / "off", TrainConfig(**{**cfg.to_dict(), "hidden_weight": 0.0}), progress=False)
    assert "hidden" not in steps(off)[0]
    text = train(hid, tmp_path / "text", TrainConfig(**{**cfg.to_dict(), "signal": "text"}), progress=False)
    assert "hidden" not in steps(text)[0] and json.loads((text / "training.json").read_text())["hidden_layer"] is None
    # the probe is trained and checkpointed, but the student folder holds the student alone
    a, b = load_file(str(on / "model.safetensors")), load_file(str(off / "model.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    blob = torch.load(on / "checkpoint" / "state.pt", weights_only=True)
    assert blob["probe"]["proj.weight"].shape == (12, 96) and blob["probe"]["mean"].shape == (12,)
    assert load_student(on).model.config.d_model == 96


def test_hidden_state_loss_resumes_bit_for_bit_and_refuses_a_changed_weight(tmp_path, tiny_tokenizer):
    hid = make_shards(tmp_path / "hid", tiny_tokenizer, n=32, hidden=8)
    cfg = TrainConfig(preset="nano", max_steps=4, batch_size=8, eval_limit=1)
    whole, split = whole_and_resumed(hid, tmp_path, cfg)
    assert [r["hidden"] for r in steps(whole)] == [r["hidden"] for r in steps(split)]
    # the same examples without hidden states cannot continue a run that learned from them
    plain = make_shards(tmp_path / "plain", tiny_tokenizer, n=32)
    with pytest.raises(TrainError, match="trained on shards with a different hidden layer"):
        train(plain, split, cfg, resume=True, progress=False)
    with pytest.raises(TrainError, match=r"other training options \(hidden_weight=1.0\)"):
        train(hid, tmp_path / "split", TrainConfig(**{**cfg.to_dict(), "hidden_weight": 2.0}), resume=True,
              progress=False)


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
    ({"embed_init": "pca"}, "embed_init='pca': choose teacher or random"),
    ({"hidden_weight": -1.0}, "hidden_weight=-1.0: must not be negative"),
])
def test_bad_options_are_one_line_errors(kwargs, message):
    with pytest.raises(TrainError, match=message) as e:
        TrainConfig(**kwargs)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


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


def test_train_refuses_a_shard_whose_bytes_changed(tiny_tokenizer, tmp_path):
    """A shard with flipped bytes (same size, still parses) is a one-line error, not training data."""
    import subprocess
    import sys

    data = make_shards(tmp_path / "shards", tiny_tokenizer, n=40)
    shard = sorted(data.glob("shard-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-4096:] = bytes(b ^ 0xFF for b in raw[-4096:])
    shard.write_bytes(bytes(raw))
    r = subprocess.run([sys.executable, "-m", "microdistill", "train", "--data", str(data), "--out", str(tmp_path / "s"),
                        "--preset", "nano", "--max-steps", "1", "--quiet"], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "checksum mismatch" in r.stderr and shard.name in r.stderr
    assert not (tmp_path / "s" / "model.safetensors").exists()


def test_an_out_that_is_a_file_is_refused_before_any_work(shards, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    with pytest.raises(TrainError, match=r"--out .*afile: is a file; give a folder for the student$"):
        train(shards, afile, TrainConfig(preset="nano", max_steps=1), progress=False)
    assert afile.read_text() == "keep me"


def test_one_writer_per_student_folder(shards, tmp_path):
    import os

    from microdistill.core.files import writer_lock

    out = tmp_path / "student"
    with writer_lock(out, "student folder", TrainError):
        with pytest.raises(TrainError, match=rf"student folder {out}: process {os.getpid()} is writing it"):
            train(shards, out, TrainConfig(preset="nano", max_steps=1), progress=False)
    assert not (out / "model.safetensors").exists()


def test_a_killed_run_resumes_from_its_last_periodic_checkpoint(shards, tmp_path):
    """--checkpoint-every 3: a run that dies without warning at step 8 (no SIGINT, no epoch end)
    resumes from step 6 and ends with the weights of a run never killed."""
    cfg = TrainConfig(preset="nano", epochs=1, batch_size=4, eval_limit=1, dropout=0.1)
    whole = train(shards, tmp_path / "whole", cfg, progress=False, checkpoint_every=None)

    class Killed(Exception):
        pass

    def die(step: int) -> None:
        if step == 8:
            raise Killed

    with pytest.raises(Killed):
        train(shards, tmp_path / "split", cfg, progress=False, on_step=die, checkpoint_every="3")
    assert json.loads((tmp_path / "split" / "checkpoint" / "meta.json").read_text())["step"] == 6
    split = train(shards, tmp_path / "split", cfg, resume=True, progress=False)
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(split / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TrainError, match=r"--checkpoint-every 'often'"):
        train(shards, tmp_path / "x", cfg, progress=False, checkpoint_every="often")
