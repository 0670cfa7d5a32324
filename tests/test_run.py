"""`microdistill run` end to end: extraction, training, evaluation, resume and refusals."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from microdistill.cli import app
from microdistill.run import RunConfig, RunError, run, sample_corpus

TEXTS = [
    "you are an idiot and nobody likes you", "thanks so much, this fixed my problem!",
    "what a lovely day at the beach with friends", "this is the worst service I have ever had",
    "I think the update is fine, nothing special", "shut up, you worthless troll",
    "great match last night, what a goal", "can someone explain how the new filter works",
    "my cat knocked the plant over again", "nobody asked for your stupid opinion",
    "the soup recipe was easy and tasty", "delete your account, clown",
]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "comments.jsonl"
    rows = [{"text": t, "tox": "toxic" if i % 3 == 0 else "respectful"} for i, t in enumerate(TEXTS * 3)]
    rows = [{**r, "text": f"{r['text']} {i}" if i >= len(TEXTS) else r["text"]} for i, r in enumerate(rows)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, corpus, teacher, **kw) -> RunConfig:
    base = dict(root=str(tmp_path / "runs"), name="t", input=str(corpus), labels={"toxicity": "tox"},
                teacher=str(teacher), preset="nano", epochs=2, batch_size=8, calibration=8, eval_teacher=True)
    return RunConfig(**{**base, **kw})


def test_run_end_to_end_then_resume_skips_finished_stages(tmp_path, corpus, tiny_teacher_dir, capsys):
    folder = run(_cfg(tmp_path, corpus, tiny_teacher_dir))
    state = json.loads((folder / "run.json").read_text())
    assert set(state["stages"]) == {"extract", "train", "eval"}
    assert all(s["done"] and s["wall_s"] > 0 for s in state["stages"].values())
    manifest = json.loads((folder / "shards" / "manifest.json").read_text())
    assert manifest["counts"]["examples"] == manifest["filters"]["kept"] > 20
    assert (folder / "student" / "model.safetensors").is_file()
    report = json.loads((folder / "eval" / "report.json").read_text())
    assert report["valid_json_constrained"] == 1.0
    assert "toxicity" in report["human"]  # the label column reached the report
    assert report["speed"]["teacher"]["p50_ms"] > 0 and report["speed"]["student"]["p50_ms"] > 0
    assert (folder / "eval" / "report.md").read_text().startswith("#")

    capsys.readouterr()
    run(_cfg(tmp_path, corpus, tiny_teacher_dir))
    out = capsys.readouterr().out
    assert out.count("done already") == 3
    assert json.loads((folder / "run.json").read_text())["stages"] == state["stages"]


def test_run_resumes_an_interrupted_stage(tmp_path, corpus, tiny_teacher_dir):
    cfg = _cfg(tmp_path, corpus, tiny_teacher_dir)
    folder = tmp_path / "runs" / "t"
    # an extraction cut short (as by Ctrl-C after some shards) leaves shards but no "done"
    from microdistill.extract import extract

    extract("reddit-comment", corpus, str(tiny_teacher_dir), folder / "shards", limit=10, calibration=8,
            labels={"toxicity": "tox"}, progress=False)
    folder.mkdir(exist_ok=True)
    (folder / "run.json").write_text(json.dumps({"config": cfg.identity(), "stages": {}}))
    run(cfg)
    manifest = json.loads((folder / "shards" / "manifest.json").read_text())
    # continued, not restarted or duplicated
    assert manifest["counts"]["examples"] == manifest["filters"]["kept"] > 10


def test_run_refuses_a_folder_holding_another_run(tmp_path, corpus, tiny_teacher_dir):
    cfg = _cfg(tmp_path, corpus, tiny_teacher_dir, epochs=1, eval_teacher=False)
    run(cfg)
    with pytest.raises(RunError, match=r"other arguments \(preset\)"):
        run(_cfg(tmp_path, corpus, tiny_teacher_dir, epochs=1, preset="micro"))
    # a folder made before an argument existed reads it as its default, and is not refused
    path = tmp_path / "runs" / "t" / "run.json"
    state = json.loads(path.read_text())
    del state["config"]["hidden_weight"]
    path.write_text(json.dumps(state))
    run(cfg)
    with pytest.raises(RunError, match=r"other arguments \(hidden_weight\)"):
        run(_cfg(tmp_path, corpus, tiny_teacher_dir, epochs=1, eval_teacher=False, hidden_weight=0.0))


def test_run_refuses_a_bad_training_option_before_any_work(tmp_path, corpus, tiny_teacher_dir):
    from microdistill.train import TrainError

    with pytest.raises(TrainError, match=r"dropout=1.5: must be in \[0, 1\)"):
        run(_cfg(tmp_path, corpus, tiny_teacher_dir, dropout=1.5))
    assert not (tmp_path / "runs").exists()  # no folder, no extraction


def test_run_cli_missing_input_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(app, ["run", "--input", str(tmp_path / "nope.txt"), "--root", str(tmp_path)])
    assert result.exit_code != 0
    assert isinstance(result.exception, RunError) and "nope.txt" in str(result.exception)


def test_sample_corpus_ships_with_the_package():
    from microdistill.corpus import read_corpus

    items = read_corpus(sample_corpus(), labels={"toxicity": "toxicity"})
    assert len(items) >= 500
    assert {it.labels["toxicity"] for it in items} == {"toxic", "respectful"}


@pytest.mark.teacher
def test_run_with_the_real_default_teacher(tmp_path):
    cfg = RunConfig(root=str(tmp_path / "runs"), name="real", limit=6, calibration=6, batch_size=6,
                    preset="nano", epochs=2, eval_teacher=False)
    folder = run(cfg)
    report = json.loads((folder / "eval" / "report.json").read_text())
    assert report["valid_json_constrained"] == 1.0
    manifest = json.loads((folder / "shards" / "manifest.json").read_text())
    assert manifest["teacher"]["name"] == "qwen2.5-coder-0.5b-instruct"
    assert manifest["counts"]["examples"] == 6
