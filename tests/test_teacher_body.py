"""A heads student whose body is cut from the teacher: its first blocks, their MLPs pruned by
activation importance, its input rows pruned to the corpus; trained, saved, loaded and used
through the CLI, with one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from synthetic import make_shards

from microdistill.data.shards import ShardSet
from microdistill.students.heads.folder import LoadedHeads
from microdistill.students import load_student
from microdistill.students.heads.teacher_body import TeacherBodyError, TeacherTokens, cut_teacher, input_rows, mlp_importance
from microdistill.teachers import load_teacher
from microdistill.train import TrainConfig, TrainError, train
from microdistill.train.loop import set_up


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_tokenizer):
    return make_shards(tmp_path_factory.mktemp("cut") / "shards", tiny_tokenizer, n=40)


def texts_of(shards) -> list[str]:
    return [r.text for r in ShardSet(shards).records("train")]


def test_full_width_cut_computes_what_the_teachers_first_blocks_compute(shards, tiny_teacher_dir):
    """Cutting keeps the first blocks' weights and the used input rows: at full MLP width the body
    maps a text to the teacher's own states after those blocks."""
    body, tokens, _ = cut_teacher(f"teacher:{tiny_teacher_dir}", ShardSet(shards), texts_of(shards), 1, 64, False)
    assert len(body.layers) == 1 and body.config.num_hidden_layers == 1
    assert body.get_input_embeddings().weight.shape[0] == len(tokens.input_vocab) < 600
    teacher = load_teacher(str(tiny_teacher_dir)).model
    tok = tokens.tokenizer
    word = next(w for w in (tok.decode([i]) for i in range(len(tok)) if i not in tokens.input_vocab)
                if len(w.strip()) > 2 and w.strip().isalpha())  # a token no training text uses: spelled in bytes
    text = texts_of(shards)[0] + word + " ✓"
    ids = tokens.encode(text).ids
    assert [tokens.input_vocab[i] for i in ids] != tokens.tokenizer.encode(text, add_special_tokens=False)
    assert tokens.tokenizer.decode([tokens.input_vocab[i] for i in ids]) == text
    first = tokens.encode(texts_of(shards)[0]).ids  # a training text: every token is a row, states match exactly
    want = after_block(teacher.model.layers[0], teacher, input_ids=torch.tensor([[tokens.input_vocab[i] for i in first]]))
    got = after_block(body.layers[0], body, input_ids=torch.tensor([first]),
                      attention_mask=torch.ones(1, len(first), dtype=torch.long))
    assert torch.allclose(got, want, atol=1e-5)
    # the final norm's gain is rescaled so that every channel leaves with RMS 1 over the training inputs
    assert not torch.allclose(body.norm.weight, teacher.model.norm.weight)
    states = torch.cat([body(input_ids=torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long))
                        .last_hidden_state[0] for x in (e.ids for e in tokens.encode_batch(texts_of(shards)))])
    assert torch.allclose(states.pow(2).mean(0).sqrt(), torch.ones(states.shape[1]), atol=1e-3)


def after_block(block, model, **inputs) -> torch.Tensor:
    """The states `block` passes on when `model` runs `inputs` (before any final norm)."""
    seen = []
    hook = block.register_forward_hook(lambda module, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        model(**inputs)
    finally:
        hook.remove()
    return seen[0]


def test_mlp_pruning_keeps_the_most_active_neurons(shards, tiny_teacher_dir, tmp_path):
    """Neurons whose gate rows are zero never activate: width pruning drops them first, and the
    kept rows are the teacher's rows of the surviving neurons, in order."""
    teacher = load_teacher(str(tiny_teacher_dir))
    dead = [3, 10, 20, 41, 63]
    with torch.no_grad():
        for block in teacher.model.model.layers:
            block.mlp.gate_proj.weight[dead] = 0.0
    folder = tmp_path / "teacher"
    teacher.model.save_pretrained(str(folder))
    teacher.tokenizer.save_pretrained(str(folder))
    texts = texts_of(shards)
    score = mlp_importance(load_teacher(str(folder)).model.model, [teacher.tokenizer.encode(t) for t in texts])
    assert all(s[dead].max() == 0 and (s > 0).sum() == 64 - len(dead) for s in score)
    body, _, _ = cut_teacher(f"teacher:{folder}", ShardSet(shards), texts, 2, 64 - len(dead), False)
    alive = [i for i in range(64) if i not in dead]
    for kept, original in zip(body.layers, teacher.model.model.layers):
        assert kept.mlp.gate_proj.weight.shape == (64 - len(dead), 32) and body.config.intermediate_size == 59
        assert torch.equal(kept.mlp.up_proj.weight, original.mlp.up_proj.weight[alive])
        assert torch.equal(kept.mlp.down_proj.weight, original.mlp.down_proj.weight[:, alive])
        assert torch.equal(kept.self_attn.q_proj.weight, original.self_attn.q_proj.weight)


def test_input_rows_keep_bytes_and_the_most_frequent_tokens_within_the_budget(tiny_tokenizer):
    from microdistill.data.vocab import build_input_vocab

    always = build_input_vocab(tiny_tokenizer, [])
    a, b, c = [i for i in range(len(tiny_tokenizer)) if i not in always][:3]
    ids = [[a, b, b, c], [b, c, 0]]  # b three times, c twice, a once
    assert input_rows(tiny_tokenizer, ids, len(always) + 2) == sorted(set(always) | {b, c})
    assert input_rows(tiny_tokenizer, ids, 10_000) == build_input_vocab(tiny_tokenizer, ids)
    assert input_rows(tiny_tokenizer, ids, 0) == always  # bytes and specials whatever the budget: any text encodes


def test_the_whole_student_stays_within_the_parameter_budget(shards, tiny_teacher_dir, monkeypatch):
    """When the corpus uses more tokens than the budget leaves rows for, the rarest go (input_rows):
    body and heads together fit."""
    import microdistill.students.heads.teacher_body as teacher_body

    cfg = TrainConfig(student="heads", encoder=f"teacher:{tiny_teacher_dir}", max_steps=1, batch_size=8)
    full = set_up(shards, cfg, progress=False).model
    rows = full.encoder.get_input_embeddings().weight.shape[0]
    budget = sum(p.numel() for p in full.parameters()) - 10 * 32  # room for 10 rows fewer
    monkeypatch.setattr(teacher_body, "BUDGET", budget)
    cut = set_up(shards, cfg, progress=False).model
    assert sum(p.numel() for p in cut.parameters()) <= budget
    assert cut.encoder.get_input_embeddings().weight.shape[0] == rows - 10


def test_trains_saves_and_loads_through_the_cli(shards, tiny_teacher_dir, tmp_path):
    out = tmp_path / "cut"
    run = lambda *a: subprocess.run([sys.executable, "-m", "microdistill.cli", *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=600)
    r = run("train", "--data", str(shards), "--out", str(out), "--student", "heads", "--encoder",
            f"teacher:{tiny_teacher_dir}", "--encoder-layers", "1", "--mlp-width", "16", "--max-steps", "6",
            "--batch-size", "8", "--eval-limit", "8", "--quiet")
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["inputs"]["tokenizer"] == "teacher" and (out / "tokenizer" / "tokenizer.json").is_file()
    assert config["encoder"]["config"]["intermediate_size"] == 16 and config["encoder"]["config"]["num_hidden_layers"] == 1
    student = load_student(out)
    assert isinstance(student, LoadedHeads) and isinstance(student.tokenizer, TeacherTokens)
    assert student.tokenizer.input_vocab == config["inputs"]["vocab"]
    stats = json.loads((out / "training.json").read_text())
    assert stats["layers"] == 1 and stats["parameters"] == sum(p.numel() for p in student.model.parameters())
    # the folder answers as the trained model does, on seen and unseen text alike
    texts = ["you are an idiot", "zebra quizzically ✓ thanks"]
    trained = set_up(shards, TrainConfig(student="heads", encoder=f"teacher:{tiny_teacher_dir}", encoder_layers=1,
                                         mlp_width=16, max_steps=6, batch_size=8), progress=False)
    trained.model.load_state_dict(student.model.state_dict())
    assert torch.allclose(trained.model(*_batch(student, texts))[0], student.model(*_batch(student, texts))[0])
    r = run("predict", "--student", str(out), *texts)
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.returncode == 0 and [x["fields"] for x in lines] == [p["fields"] for p in student.predict(texts)]
    # the body's config names no special token: its ids index the teacher's table, not the pruned rows
    assert all(config["encoder"]["config"].get(f"{k}_token_id") is None for k in ("bos", "eos", "pad"))
    r = run("eval", "--student", str(out), "--data", str(shards), "--no-teacher", "--json", "--quiet", "--limit", "6")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["student"]["kind"] == "heads"


def _batch(student, texts):
    from microdistill.students.heads.model import HeadsExample, collate_heads, encode_texts

    b = collate_heads([HeadsExample(x, [0] * len(student.fields), None) for x in encode_texts(student.tokenizer, texts)])
    return b.ids, b.mask


def test_bad_inputs_are_one_line_errors(shards, tiny_teacher_dir, tmp_path):
    def fails(error, pattern, cfg, data=shards):
        with pytest.raises(error, match=pattern) as e:
            train(data, tmp_path / "x", cfg, progress=False)
        assert "\n" not in str(e.value)

    # the synthetic shards name a teacher that cannot be loaded: say so, and how to give one
    fails(TeacherBodyError, r"--encoder teacher: .*tests/synthetic.py", TrainConfig(student="heads", encoder="teacher"))
    fails(TeacherBodyError, "the teacher has 2 blocks; choose 1 to 2",
          TrainConfig(student="heads", encoder=f"teacher:{tiny_teacher_dir}", encoder_layers=3))
    fails(TrainError, "mlp_width is for a body cut from the teacher", TrainConfig(student="heads", mlp_width=64))
    with pytest.raises(TrainError, match="mlp_width=0"):
        TrainConfig(mlp_width=0)
    # another tokenizer than the shards': the body's rows would mean other tokens
    other = tmp_path / "other"
    shutil.copytree(tiny_teacher_dir, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    fails(TeacherBodyError, "tokenizes differently", TrainConfig(student="heads", encoder=f"teacher:{other}"))
    # the ONNX export refuses it; a folder whose teacher tokenizer is gone does not load
    out = train(shards, tmp_path / "ok", TrainConfig(student="heads", encoder=f"teacher:{tiny_teacher_dir}",
                                                      max_steps=1, batch_size=8, eval_limit=4), progress=False)
    from microdistill.export import ExportError, export

    with pytest.raises(ExportError, match="its body is cut from the teacher, which this version does not export"):
        export(out, tmp_path / "export", progress=False)
    assert not (tmp_path / "export").exists()
    shutil.rmtree(out / "tokenizer")
    from microdistill.students import StudentFolderError

    with pytest.raises(StudentFolderError, match="tokenizer is missing"):
        load_student(out)
