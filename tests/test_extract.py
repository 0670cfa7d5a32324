"""Extraction on a tiny random teacher: cached/batched decoding equals the plain computation,
shards round-trip, resume never duplicates, and the CLI reports user errors in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from synthetic import label, make_texts

from microdistill.extract import local as extract_mod
from microdistill.core.grammar import Grammar
from microdistill.extract import ExtractConfig, ExtractError, extract
from microdistill.data.inspection import inspect
from microdistill.teachers.decoding import Decoder, prompt_layout
from microdistill.data.shards import ShardSet, ShardWriter, StoreError
from microdistill.core.task import load_task
from microdistill.teachers import load_teacher

TASK = load_task("reddit-comment")
# lengths differ a lot, so batches hold padding
TEXTS = ["you idiot", "thanks so much, this fixed my problem!", "what a lovely day at the beach with friends today",
         "this is the worst service I have ever had", "shut up"]


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_teacher(str(tiny_teacher_dir))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 inputs with human labels for two fields; one input is a duplicate and one too short."""
    path = tmp_path_factory.mktemp("corpus") / "comments.jsonl"
    texts = make_texts(24, seed=3) + [make_texts(1, seed=3)[0], "ok"]
    rows = [{"body": t, "tox": label(t)["toxicity"], "sent": label(t)["sentiment"]} for t in texts]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _extract(corpus, teacher, out, task=TASK, **kw):
    args = dict(limit=None, batch_size=5, vocab_size=200, calibration=6, field="body",
                labels={"toxicity": "tox", "sentiment": "sent"})
    return extract(corpus, out, ExtractConfig(**{**args, **kw}), task=task, teacher=teacher, progress=False)


@pytest.fixture(scope="module")
def shards(corpus, teacher, tmp_path_factory):
    return _extract(corpus, teacher, tmp_path_factory.mktemp("run") / "shards")


# ---- decoding ------------------------------------------------------------------------------
def test_prompt_split_tokenizes_like_the_whole_prompt(teacher):
    layout = prompt_layout(teacher, TASK)
    tok = teacher.tokenizer
    assert layout.prefix_ids  # the system prompt and few-shot turns are shared
    for text in TEXTS + [" spaced  out ", "émoji 😀 ok"]:
        whole = tok(teacher.prompt_text(TASK, text), add_special_tokens=False).input_ids
        rest = tok(layout.head + text + layout.tail, add_special_tokens=False).input_ids
        assert layout.prefix_ids + rest == whole


def test_batched_prefix_cached_decoding_equals_plain_forward(teacher):
    """Every stored logit row and log-sum-exp equals a fresh, unbatched, uncached forward pass
    over the whole prompt; every chosen token is the grammar-masked argmax of that pass."""
    tok, model = teacher.tokenizer, teacher.model
    keep = list(range(teacher.vocab_size))  # store everything, so every logit is compared
    grammar = Grammar(TASK, tok, teacher.vocab_size, teacher.eos_id)
    decoder = Decoder(teacher, TASK, grammar, keep_ids=keep)
    batch = decoder.generate([decoder.rest_ids(t) for t in TEXTS], TASK.output.max_tokens)
    assert len({len(r) for r in batch.rests}) > 2
    for text, row in zip(TEXTS, batch.rows):
        assert row.finished
        prompt = tok(teacher.prompt_text(TASK, text), add_special_tokens=False).input_ids
        ids = torch.tensor([prompt + row.output_ids[:-1]])
        with torch.no_grad():
            ref = model(input_ids=ids).logits[0, len(prompt) - 1 :].float()  # [n_out, V]
        got = torch.from_numpy(np.stack(row.logits)).float()
        assert torch.allclose(got, ref, atol=2e-3, rtol=1e-3)  # float16 storage
        assert torch.allclose(torch.tensor(row.lse), torch.logsumexp(ref, -1), atol=1e-4)
        state = grammar.batch(1)
        for t, chosen in enumerate(row.output_ids):
            assert int(state.mask_(ref[t : t + 1].clone()).argmax()) == chosen
            state.accept(0, chosen)


def test_decision_points_equal_teacher_forcing(teacher, shards):
    """P(value) per enum field equals the normalised product of token probabilities of the value,
    computed by plain forward passes over prompt + answer prefix + value."""
    tok, model = teacher.tokenizer, teacher.model
    for rec in ShardSet(shards).load()[:3]:
        prompt = tok(teacher.prompt_text(TASK, rec.text), add_special_tokens=False).input_ids
        answer = rec.output_ids.tolist()
        for f in TASK.enum_fields:
            start = rec.output_text.index(f'"{f.name}":"') + len(f.name) + 4
            # the context is the teacher's own answer tokens up to the value
            j = next(t for t in range(len(answer)) if tok.decode(answer[:t]) == rec.output_text[:start])
            context = prompt + answer[:j]
            scores = []
            for value in f.values:
                cont = tok(value, add_special_tokens=False).input_ids
                with torch.no_grad():
                    logp = model(input_ids=torch.tensor([context + cont])).logits[0].float().log_softmax(-1)
                scores.append(sum(float(logp[len(context) - 1 + k, c]) for k, c in enumerate(cont)))
            expected = torch.tensor(scores).softmax(0).numpy()
            assert np.allclose(rec.decisions[f.name], expected, atol=1e-4)
            # greedy picked the value the teacher finds most likely (all values are single tokens here)
            assert f.values[int(np.argmax(rec.decisions[f.name]))] == rec.fields[f.name]


# ---- shards --------------------------------------------------------------------------------
def test_shards_round_trip(shards, teacher):
    s = ShardSet(shards, verify=True)
    m = s.manifest
    records = s.load()
    assert len(records) == 24 and m["complete"]  # the duplicate and the too-short input are dropped
    assert m["filters"]["duplicate"] == 1 and m["filters"]["too_short"] == 1
    assert m["signal"] == "logits" and m["task_fingerprint"] == TASK.fingerprint()
    assert m["teacher"] == teacher.describe()
    assert set(m["vocab"]) >= {"kept", "kept_tokens", "n_required", "eos", "input", "coverage"}
    assert set(m["timings"]) == {"extract_s", "calibrate_s", "examples_per_s", "tokens_per_s", "teacher_passes"}
    kept = s.kept_vocab
    assert len(kept) == 200 and s.eos_id == teacher.eos_id
    tok = s.tokenizer()
    assert tok.get_vocab() == teacher.tokenizer.get_vocab()
    input_vocab = set(s.input_vocab.tolist())
    for r in records:
        assert TASK.parse(r.output_text) == r.fields
        assert tok.decode(r.output_ids[:-1]) == r.output_text and r.output_ids[-1] == teacher.eos_id
        assert set(r.output_ids.tolist()) <= set(kept.tolist())
        assert tok.decode(r.input_ids) == r.text and set(r.input_ids.tolist()) <= input_vocab
        assert r.logits.shape == (len(r.output_ids), len(kept)) and r.logits.dtype == np.float16
        # the full-vocabulary normaliser bounds the kept part from above
        kept_lse = torch.logsumexp(torch.from_numpy(r.logits).float(), -1).numpy()
        assert np.all(r.lse >= kept_lse - 1e-2)
        assert r.labels == {"toxicity": label(r.text)["toxicity"], "sentiment": label(r.text)["sentiment"]}
        assert set(r.decisions) == {f.name for f in TASK.enum_fields}
        assert all(abs(float(v.sum()) - 1) < 1e-5 for v in r.decisions.values())


def test_input_hidden_states_equal_a_plain_forward(shards, teacher):
    """Each stored hidden state is the last layer's output averaged over the input's own prompt
    tokens (prefix excluded), as a fresh unbatched forward pass over the whole prompt gives it;
    calibration answers stored without decoding again carry it too."""
    s = ShardSet(shards)
    n_layers = teacher.model.config.num_hidden_layers
    assert s.hidden_layer == n_layers  # the default, "last"
    n_prefix = len(prompt_layout(teacher, TASK).prefix_ids)
    tok = teacher.tokenizer
    for r in s.load():
        prompt = tok(teacher.prompt_text(TASK, r.text), add_special_tokens=False).input_ids
        with torch.no_grad():
            states = teacher.model(input_ids=torch.tensor([prompt]), output_hidden_states=True).hidden_states
        ref = states[n_layers][0, n_prefix:].float().mean(0)
        assert r.hidden.dtype == np.float16 and r.hidden.shape == (teacher.model.config.hidden_size,)
        assert torch.allclose(torch.from_numpy(r.hidden.astype(np.float32)), ref, atol=2e-3, rtol=2e-3)


def test_hidden_layer_choice_and_none(corpus, teacher, tmp_path):
    middle = ShardSet(_extract(corpus, teacher, tmp_path / "middle", limit=3, hidden_layer="middle"))
    assert middle.hidden_layer == teacher.model.config.num_hidden_layers // 2
    none = ShardSet(_extract(corpus, teacher, tmp_path / "none", limit=3, hidden_layer="none"))
    assert none.hidden_layer is None and all(r.hidden is None for r in none.load())
    # a folder keeps what it was made with: continuing it never mixes hidden and no hidden
    _extract(corpus, teacher, tmp_path / "none", limit=8)
    assert ShardSet(tmp_path / "none").hidden_layer is None and all(r.hidden is None for r in ShardSet(tmp_path / "none").load())


@pytest.fixture(scope="module")
def with_embeddings(corpus, teacher, tmp_path_factory):
    return _extract(corpus, teacher, tmp_path_factory.mktemp("emb") / "shards", embeddings=True)


def test_teacher_input_embeddings_are_stored_at_the_input_ids(shards, with_embeddings, teacher, tmp_path, corpus):
    assert "input_embeddings" not in ShardSet(shards).manifest  # only asked for: a heads student never reads them
    assert not (shards / "input_embeddings.safetensors").exists()
    shards = with_embeddings
    s = ShardSet(shards)
    assert s.manifest["input_embeddings"] == "input_embeddings.safetensors"
    ids = [int(i) for i in s.input_vocab]
    static = teacher.model.get_input_embeddings().weight.detach()[ids].double()
    raw = load_file(str(shards / "input_embeddings.safetensors"))
    assert set(raw) == {"rows"} and raw["rows"].dtype == torch.float16
    rows = s.input_embeddings()
    assert rows.dtype == torch.float32 and rows.shape == (len(ids), teacher.model.config.hidden_size)
    # each token the corpus uses: its middle-layer state averaged over its occurrences, every
    # input read alone and unpadded, then put on the static rows' per-dimension scale
    middle = teacher.model.config.num_hidden_layers // 2
    total, count = torch.zeros_like(static), torch.zeros(len(ids))
    with torch.no_grad():
        for r in s.load():
            q = teacher.tokenizer(r.text, add_special_tokens=False).input_ids
            h = teacher.model(input_ids=torch.tensor([q]), output_hidden_states=True).hidden_states[middle][0]
            for j, t in enumerate(q):
                total[ids.index(t)] += h[j].double()
                count[ids.index(t)] += 1
    seen = count > 0
    assert 10 < int(seen.sum()) < len(ids)  # byte fallbacks and specials the corpus never uses stay static
    ctx = total[seen] / count[seen, None]
    ctx = (ctx - ctx.mean(0)) / ctx.std(0)
    expected = static.clone()
    expected[seen] = ctx * static[seen].std(0) + static[seen].mean(0)
    assert torch.equal(rows[~seen], static[~seen].half().float())
    assert torch.allclose(rows[seen], expected[seen].float(), rtol=1e-2, atol=1e-3)
    assert not torch.allclose(rows[seen], static[seen].float(), rtol=1e-2, atol=1e-3)
    # a folder written before the file existed gets it on the next run, with nothing else redone
    import shutil

    old = tmp_path / "old"
    shutil.copytree(shards, old)
    (old / "input_embeddings.safetensors").unlink()
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["input_embeddings"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert ShardSet(old).input_embeddings() is None
    _extract(corpus, teacher, old, embeddings=True)
    again = ShardSet(old)
    assert again.manifest["input_embeddings"] == "input_embeddings.safetensors"
    assert again.manifest["shards"] == s.manifest["shards"] and again.manifest["vocab"] == s.manifest["vocab"]
    assert torch.equal(again.input_embeddings(), rows)
    # a damaged file is a one-line error, not a crash in training
    (old / "input_embeddings.safetensors").write_bytes(b"junk")
    with pytest.raises(StoreError, match="corrupted or not an input embedding file"):
        again.input_embeddings()
    # bytes flipped inside the rows keep the file readable: its stored checksum catches them
    flipped = shutil.copytree(s.dir, tmp_path / "flipped")
    path = flipped / "input_embeddings.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-8:] = bytes(b ^ 0x01 for b in raw[-8:])  # the last rows' low bits: still finite numbers
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="damaged \\(its rows fail their checksum"):
        ShardSet(flipped).input_embeddings()


def test_a_decoder_student_gets_the_embeddings_it_reads_from_the_shards_teacher(shards, with_embeddings, tmp_path):
    """Training a decoder on a folder extracted without input embeddings computes them once from the
    teacher the manifest names: the rows extraction would have stored; a teacher that cannot be
    loaded is a one-line error naming the command that fixes it."""
    import shutil

    from microdistill.train import TrainConfig, train

    folder = tmp_path / "later"
    shutil.copytree(shards, folder)
    out = train(folder, tmp_path / "student", TrainConfig(preset="nano", max_steps=1, batch_size=4), progress=False)
    assert json.loads((out / "training.json").read_text())["embed_init"] == "teacher"
    later = ShardSet(folder)
    assert later.manifest["input_embeddings"] == "input_embeddings.safetensors"
    # the same rows (summed in another order: the records', not the corpus')
    assert torch.allclose(later.input_embeddings(), ShardSet(with_embeddings).input_embeddings(), atol=1e-3)
    gone = tmp_path / "gone"
    shutil.copytree(shards, gone)
    manifest = json.loads((gone / "manifest.json").read_text())
    manifest["teacher"]["source"] = str(tmp_path / "no-such-teacher")
    (gone / "manifest.json").write_text(json.dumps(manifest))
    r = subprocess.run([sys.executable, "-m", "microdistill", "train", "--data", str(gone), "--out", str(tmp_path / "s2"),
                        "--student", "decoder", "--preset", "nano", "--max-steps", "1", "--quiet"],
                       capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "holds no input embeddings" in r.stderr and "extract --embeddings" in r.stderr


def test_calibration_answers_equal_decoding_again(corpus, teacher, tmp_path, monkeypatch):
    """Calibration answers stored without decoding again are what decoding them again gives."""
    reused = []
    real = extract_mod.reuse_calibration
    monkeypatch.setattr(extract_mod, "reuse_calibration", lambda *a: reused.append(real(*a)) or reused[-1])
    first = _extract(corpus, teacher, tmp_path / "first", limit=10)
    assert reused and reused[0] > 0  # the tiny teacher's calibration answers use kept tokens
    again = tmp_path / "again"
    again.mkdir()
    manifest = json.loads((first / "manifest.json").read_text())
    (again / "manifest.json").write_text(json.dumps({**manifest, "shards": [], "complete": False}))
    _extract(corpus, teacher, again, limit=10)  # same vocabulary, no calibration: every input decoded
    assert len(reused) == 1
    fresh = {r.id: r for r in ShardSet(again).load()}
    records = ShardSet(first).load()
    assert len(records) == len(fresh) == 10
    for r in records:
        f = fresh[r.id]
        assert r.output_ids.tolist() == f.output_ids.tolist()
        assert np.allclose(r.logits.astype(np.float32), f.logits.astype(np.float32), atol=2e-3, rtol=1e-3)
        assert np.allclose(r.lse, f.lse, atol=1e-4)
        assert all(np.allclose(r.decisions[k], f.decisions[k], atol=1e-4) for k in r.decisions)


def test_inspect_summarises_and_verifies(shards, tmp_path):
    info = inspect(shards)
    assert info["counts"]["examples"] == 24 == info["counts"]["train"] + info["counts"]["val"]
    assert sum(info["labels"]["tone"].values()) == 24
    assert info["vocab"]["kept"] == 200 and 0 < info["vocab"]["coverage"] <= 1
    assert info["bytes_per_example"] == info["bytes"] / 24 > 0
    assert set(info["human_agreement"]) == {"toxicity", "sentiment"}
    # a flipped byte in a shard is caught by the checksum
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    shard = next(bad.glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum"):
        inspect(bad)
    with pytest.raises(StoreError, match="no manifest.json"):
        inspect(tmp_path)


# ---- resume --------------------------------------------------------------------------------
def test_limit_then_continue_then_nothing_new(corpus, teacher, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    _extract(corpus, teacher, out, limit=7)
    first = ShardSet(out).manifest
    assert first["counts"]["examples"] == 7
    # a resumed folder keeps its vocabulary: calibration must not run again
    monkeypatch.setattr(extract_mod, "calibrate", lambda *a, **k: pytest.fail("calibrated twice"))
    _extract(corpus, teacher, out)
    second = ShardSet(out).manifest
    assert second["counts"]["examples"] == 24 and second["vocab"] == first["vocab"]
    _extract(corpus, teacher, out)
    third = ShardSet(out).manifest
    assert third["shards"] == second["shards"]
    ids = [r.id for r in ShardSet(out).load()]
    assert len(ids) == len(set(ids)) == 24


def test_interrupt_keeps_written_shards(corpus, teacher, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    monkeypatch.setattr(ShardWriter.__init__, "__defaults__", (4,))  # shards of 4 examples
    calls = {"n": 0}
    real = Decoder.generate

    def interrupted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # after 2 calibration batches and 2 extraction batches
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Decoder, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _extract(corpus, teacher, out)
    m = ShardSet(out, verify=True).manifest
    # whole shards only: the examples buffered for the next shard are dropped
    assert m["counts"]["examples"] == 4 * len(m["shards"]) >= 8 and not m["complete"]
    monkeypatch.setattr(Decoder, "generate", real)
    _extract(corpus, teacher, out)
    ids = [r.id for r in ShardSet(out, verify=True).load()]
    assert len(ids) == len(set(ids)) == 24


def test_foreign_folder_is_refused(corpus, teacher, shards, tmp_path):
    with pytest.raises(StoreError, match="different task fingerprint"):
        _extract(corpus, teacher, shards, task=load_task("support-ticket"), calibration=2, labels=None)
    with pytest.raises(StoreError, match="--vocab-size 200"):
        _extract(corpus, teacher, shards, vocab_size=300)
    (tmp_path / "manifest.json").write_text('{"format": "something/else", "shards": []}')
    with pytest.raises(StoreError, match="not a microdistill.shards/1 manifest"):
        _extract(corpus, teacher, tmp_path)


def test_bad_arguments(corpus, teacher, tmp_path):
    with pytest.raises(ExtractError, match="--batch-size"):
        _extract(corpus, teacher, tmp_path / "x", batch_size=0)
    with pytest.raises(ExtractError, match="--limit"):
        _extract(corpus, teacher, tmp_path / "x", limit=0)
    for bad in ("deep", "99", -1):
        with pytest.raises(ExtractError, match=rf"--hidden-layer {bad!r}: expected middle, last, none or a layer from 0 to"):
            _extract(corpus, teacher, tmp_path / "x", hidden_layer=bad)


# ---- command line --------------------------------------------------------------------------
def _cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    from microdistill import cli

    monkeypatch.setattr(sys, "argv", ["microdistill", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_extract_and_inspect(corpus, tiny_teacher_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "shards"
    code, stdout, _ = _cli(monkeypatch, capsys, "extract", "--task", "reddit-comment", "--input", str(corpus),
                           "--teacher", str(tiny_teacher_dir), "--out", str(out), "--limit", "6", "--batch-size", "4",
                           "--vocab-size", "150", "--calibration", "4", "--field", "body", "--label", "toxicity=tox",
                           "--quiet")
    assert code in (0, None) and f"shards: {out}" in stdout
    code, stdout, _ = _cli(monkeypatch, capsys, "inspect", str(out), "--json")
    info = json.loads(stdout)
    assert info["counts"]["examples"] == 6 and info["vocab"]["kept"] == 150
    assert set(info["human_agreement"]) == {"toxicity"}
    code, stdout, _ = _cli(monkeypatch, capsys, "inspect", str(out))
    assert "examples: 6" in stdout and "150 kept output tokens" in stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--teacher", "no-such-teacher"], "unknown teacher 'no-such-teacher'"),
        (["--task", "no-such-task"], "unknown task 'no-such-task'"),
        (["--input", "EMPTY"], "empty corpus"),
        (["--field", "nope"], "no field 'nope'"),
        (["--hidden-layer", "deep"], "--hidden-layer 'deep': expected middle, last, none or a layer"),
    ],
)
def test_cli_user_errors(args, message, corpus, tiny_teacher_dir, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    base = {"--task": "reddit-comment", "--input": str(corpus), "--teacher": str(tiny_teacher_dir),
            "--out": str(tmp_path / "out"), "--field": "body"}
    given = dict(zip(args[::2], args[1::2]))
    given = {k: (str(empty) if v == "EMPTY" else v) for k, v in given.items()}
    argv = [x for kv in {**base, **given}.items() for x in kv]
    code, _, err = _cli(monkeypatch, capsys, "extract", *argv, "--quiet")
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_inspect_foreign_folder(tmp_path, monkeypatch, capsys):
    code, _, err = _cli(monkeypatch, capsys, "inspect", str(tmp_path))
    assert code == 2 and "no manifest.json" in err and err.count("\n") == 1


# ---- the real teacher ----------------------------------------------------------------------
@pytest.mark.teacher
def test_default_teacher_labels_sensibly(tmp_path, one_thread, request):
    request.addfinalizer(lambda n=torch.get_num_threads(): torch.set_num_threads(n))  # the next tests' count
    torch.set_num_threads(one_thread)
    corpus = tmp_path / "c.txt"
    texts = ["you are a worthless idiot, shut up and go away", "thank you so much, this is wonderful and kind",
             "the bus was ten minutes late this morning", "I finally finished painting the kitchen"]
    corpus.write_text("\n".join(texts) + "\n")
    out = extract(corpus, tmp_path / "shards", ExtractConfig(batch_size=4, calibration=4), task=TASK, progress=False)
    s = ShardSet(out, verify=True)
    by_text = {r.text: r for r in s.load()}
    assert set(by_text) == set(texts)
    for r in by_text.values():
        assert TASK.parse(r.output_text) == r.fields
        assert set(r.output_ids.tolist()) <= set(s.kept_vocab.tolist())
    assert by_text[texts[0]].fields["toxicity"] == "toxic"
    assert by_text[texts[1]].fields["toxicity"] == "respectful"
    assert by_text[texts[1]].fields["sentiment"] == "positive"
    assert s.manifest["vocab"]["coverage"] > 0.9


def test_bfloat16_teacher_is_recorded_and_resumed_in_its_dtype(corpus, tiny_teacher_dir, tmp_path, monkeypatch):
    import microdistill.extract.prepare as calibrate_mod

    out = tmp_path / "bf16"
    teacher = load_teacher(str(tiny_teacher_dir))
    _extract(corpus, teacher, out, limit=8, dtype="bfloat16")
    m = ShardSet(out).manifest
    assert m["teacher"]["dtype"] == "bfloat16" and m["dtype_check"] == {"dtype": "bfloat16", "why": "asked"}
    # resuming with a freshly loaded (float32) teacher labels the rest in the folder's dtype
    _extract(corpus, load_teacher(str(tiny_teacher_dir)), out)
    records = ShardSet(out, verify=True).load()
    assert len(records) == 24 and all(TASK.parse(r.output_text) == r.fields for r in records)
    # auto: bfloat16 only where it answers the calibration inputs as float32 does
    monkeypatch.setattr(calibrate_mod, "bfloat16_is_fast", lambda: True)
    auto = tmp_path / "auto"
    _extract(corpus, load_teacher(str(tiny_teacher_dir)), auto, limit=4, dtype="auto")
    check = ShardSet(auto).manifest["dtype_check"]
    assert check["n"] == 6 and 0 <= check["same"] <= 6  # every calibration input was finished and compared
    assert check["dtype"] == ("bfloat16" if check["same"] / check["n"] >= check["min_same"] else "float32")
    assert ShardSet(auto).manifest["teacher"].get("dtype", "float32") == check["dtype"]
    # a teacher that fails the check goes back to its own float32 weights, not bfloat16-rounded ones
    monkeypatch.setattr(calibrate_mod, "MIN_SAME", 1.01)
    kept = load_teacher(str(tiny_teacher_dir))
    before = {k: v.clone() for k, v in kept.model.state_dict().items()}
    _extract(corpus, kept, tmp_path / "refused", limit=4, dtype="auto")
    assert ShardSet(tmp_path / "refused").manifest["dtype_check"]["dtype"] == "float32" and kept.dtype == "float32"
    assert all(torch.equal(before[k], v) for k, v in kept.model.state_dict().items())
    monkeypatch.setattr(calibrate_mod, "bfloat16_is_fast", lambda: False)
    _extract(corpus, load_teacher(str(tiny_teacher_dir)), tmp_path / "slow", limit=4, dtype="auto")
    assert ShardSet(tmp_path / "slow").manifest["dtype_check"] == {"dtype": "float32", "why": "no native bfloat16 on this CPU"}
    assert "dtype" not in ShardSet(tmp_path / "slow").manifest["teacher"]  # float32 folders read as before
    with pytest.raises(ExtractError, match="--dtype 'half': choose float32, bfloat16 or auto"):
        _extract(corpus, teacher, tmp_path / "x", dtype="half")


def test_one_writer_per_shard_folder(corpus, teacher, tmp_path):
    """While one process writes a shard folder, a second extraction into it stops at once in one line
    naming the first; --out an existing file is refused before the teacher works."""
    import os

    from microdistill.core.files import writer_lock

    out = tmp_path / "shards"
    with writer_lock(out, "shard folder", ExtractError):
        with pytest.raises(ExtractError, match=rf"shard folder {out}: process {os.getpid()} is writing it; wait"):
            _extract(corpus, teacher, out)
    assert not (out / "manifest.json").exists()
    assert len(ShardSet(_extract(corpus, teacher, out))) > 0  # once it is free, it extracts
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ExtractError, match="--out .*afile: is a file; give a folder for the shards"):
        _extract(corpus, teacher, afile)
    student = tmp_path / "student"  # a folder of other files (here a student's) gets no shards mixed in
    student.mkdir()
    (student / "config.json").write_text("{}")
    with pytest.raises(ExtractError, match=r"--out .*student: holds other files \(config.json\) and no shards"):
        _extract(corpus, teacher, student)
    assert [p.name for p in student.iterdir()] == ["config.json"]


def extract_killed(corpus, teacher, out, monkeypatch, after: int) -> list[int]:
    """Extract into `out`, killed (KeyboardInterrupt) as the decoder starts its call number
    `after` + 1; the sizes of the calls that finished."""
    from microdistill.teachers.decoding import Decoder

    real, done = Decoder.generate, []

    def killed(self, rests, *a, **k):
        if len(done) == after:
            raise KeyboardInterrupt
        done.append(len(rests))
        return real(self, rests, *a, **k)

    monkeypatch.setattr(Decoder, "generate", killed)
    with pytest.raises(KeyboardInterrupt):
        _extract(corpus, teacher, out)
    monkeypatch.setattr(Decoder, "generate", real)
    return done


def extract_counted(corpus, teacher, out, monkeypatch) -> tuple[dict, list[int]]:
    """Extract into `out` (resuming it): its records by id, and the sizes of the decoder's calls."""
    from microdistill.teachers.decoding import Decoder

    real, sizes = Decoder.generate, []
    monkeypatch.setattr(Decoder, "generate", lambda self, rests, *a, **k: sizes.append(len(rests)) or real(self, rests, *a, **k))
    return {r.id: r for r in ShardSet(_extract(corpus, teacher, out)).records()}, sizes


def journaled(out) -> int:
    from microdistill.data.shards import decode_shard

    return len(decode_shard((out / "journal.safetensors").read_bytes(), out))


def test_a_kill_loses_only_the_batch_in_flight(corpus, teacher, tmp_path, monkeypatch):
    """Killed while a shard is still filling (shards of 128, batches of 5), the next run takes back
    every finished batch from the journal, decodes only the rest, and ends with the records of a
    run never killed, bit for bit."""
    whole = {r.id: r for r in ShardSet(_extract(corpus, teacher, tmp_path / "whole")).records()}
    out = tmp_path / "shards"
    first = extract_killed(corpus, teacher, out, monkeypatch, after=4)  # 2 calibration batches (6 inputs), 2 labelled
    assert (out / "journal.safetensors").is_file() and not ShardSet(out).manifest["shards"]
    kept = journaled(out)  # calibration answers + 2 batches
    assert kept >= sum(first[2:]) == 10
    got, second = extract_counted(corpus, teacher, out, monkeypatch)
    assert got.keys() == whole.keys() and not (out / "journal.safetensors").exists()
    for k, r in got.items():
        w = whole[k]
        assert r.logits.tobytes() == w.logits.tobytes() and r.output_ids.tobytes() == w.output_ids.tobytes()
    assert sum(second) == len(whole) - kept  # the resumed run decoded only what the journal did not hold


def test_a_kill_before_the_first_batch_keeps_the_calibration_answers(corpus, teacher, tmp_path, monkeypatch):
    """Killed in its first labelled batch, a new folder still holds the calibration answers it
    reused: the next run decodes only the other inputs, in the batches a run never killed decodes."""
    whole = {r.id: r for r in ShardSet(_extract(corpus, teacher, tmp_path / "whole")).records()}
    out = tmp_path / "shards"
    extract_killed(corpus, teacher, out, monkeypatch, after=2)  # two calibration batches; the first labelled one dies
    reused = journaled(out)
    assert reused > 0
    got, second = extract_counted(corpus, teacher, out, monkeypatch)
    assert got.keys() == whole.keys() and sum(second) == len(whole) - reused
    assert all(got[k].logits.tobytes() == whole[k].logits.tobytes() for k in got)
