"""`microdistill run` end to end: extraction, training, evaluation, resume and refusals."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from microdistill.cli import app
from microdistill.evaluate.config import EvalConfig
from microdistill.extract.config import ExtractConfig
from microdistill.flows.config import RunConfig
from microdistill.data.samples import sample_corpus
from microdistill.flows.run import RunError, run
from microdistill.train import TrainConfig, TrainError

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


def _cfg(tmp_path, corpus, teacher, eval_teacher: bool = True, **train) -> RunConfig:
    return RunConfig(
        root=str(tmp_path / "runs"), name="t", input=str(corpus),
        extract=ExtractConfig(labels={"toxicity": "tox"}, teacher=str(teacher), batch_size=8, calibration=8),
        train=TrainConfig(**{"preset": "nano", "epochs": 2, "dropout": 0.1, **train}),
        eval=EvalConfig(time_teacher=eval_teacher))


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
    out = capsys.readouterr().err
    assert out.count("done already") == 3
    assert json.loads((folder / "run.json").read_text())["stages"] == state["stages"]


def test_run_resumes_an_interrupted_stage(tmp_path, corpus, tiny_teacher_dir, monkeypatch):
    import microdistill.extract.local as extract_mod
    from microdistill.extract import extract

    cfg = _cfg(tmp_path, corpus, tiny_teacher_dir)
    folder = tmp_path / "runs" / "t"
    # an extraction cut short (as by Ctrl-C after some shards) leaves shards but no "done"
    extract(corpus, folder / "shards", ExtractConfig.from_dict({**cfg.extract.to_dict(), "limit": 10}),
                        progress=False)
    first = json.loads((folder / "shards" / "manifest.json").read_text())
    (folder / "run.json").write_text(json.dumps({"config": cfg.identity(), "stages": {}}))
    decoded = []
    real = extract_mod.decode_into
    monkeypatch.setattr(extract_mod, "decode_into", lambda w, d, t, items, *a, **k: decoded.extend(items) or real(w, d, t, items, *a, **k))
    run(cfg)
    manifest = json.loads((folder / "shards" / "manifest.json").read_text())
    # continued, not restarted or duplicated: the teacher decoded only the inputs not yet stored,
    # and the shards written before are kept as they were
    assert manifest["counts"]["examples"] == manifest["filters"]["kept"] > 10
    assert len(decoded) == manifest["counts"]["examples"] - first["counts"]["examples"]
    assert manifest["shards"][: len(first["shards"])] == first["shards"]
    assert manifest["created"] == first["created"]


def test_run_refuses_a_folder_holding_another_run(tmp_path, corpus, tiny_teacher_dir):
    cfg = _cfg(tmp_path, corpus, tiny_teacher_dir, epochs=1, eval_teacher=False)
    run(cfg)
    with pytest.raises(RunError, match=r"other arguments \(train.preset\)"):
        run(_cfg(tmp_path, corpus, tiny_teacher_dir, epochs=1, preset="micro"))
    # a folder made before an argument existed reads it as its default, and is not refused
    path = tmp_path / "runs" / "t" / "run.json"
    state = json.loads(path.read_text())
    del state["config"]["train"]["hidden_weight"]
    path.write_text(json.dumps(state))
    run(cfg)
    with pytest.raises(RunError, match=r"other arguments \(train.hidden_weight\)"):
        run(_cfg(tmp_path, corpus, tiny_teacher_dir, epochs=1, eval_teacher=False, hidden_weight=0.0))


def test_run_reads_the_flat_run_json_of_older_folders(tmp_path, corpus, tiny_teacher_dir):
    cfg = _cfg(tmp_path, corpus, tiny_teacher_dir, epochs=1, eval_teacher=False)
    folder = tmp_path / "runs" / "t"
    folder.mkdir(parents=True)
    flat = {"input": str(corpus), "field": "text", "labels": {"toxicity": "tox"}, "task": "reddit-comment",
            "teacher": str(tiny_teacher_dir), "limit": None, "batch_size": 8, "vocab_size": 512, "calibration": 8,
            "hidden_layer": "last", "preset": "nano", "epochs": 1, "dropout": 0.1, "max_steps": None, "seed": 0,
            "extra_train": {}}
    (folder / "run.json").write_text(json.dumps({"config": flat, "stages": {}}))
    run(cfg)  # the same options, written the old way: accepted and continued
    (folder / "run.json").write_text(json.dumps({"config": {**flat, "epochs": 3}, "stages": {}}))
    with pytest.raises(RunError, match=r"other arguments \(train.epochs\)"):
        run(cfg)
    # such a folder was labelled in float32 and trained a decoder: the options that came later
    # read as that, so a run asking for another dtype or student kind is another run
    (folder / "run.json").write_text(json.dumps({"config": flat, "stages": {}}))
    auto = replace(cfg, extract=replace(cfg.extract, dtype="auto"), train=replace(cfg.train, student="auto"))
    with pytest.raises(RunError, match=r"other arguments \(extract.dtype, train.student\)"):
        run(auto)


def test_run_refuses_a_bad_training_option_before_any_work(tmp_path, corpus, tiny_teacher_dir):
    result = CliRunner().invoke(app, ["run", "--input", str(corpus), "--teacher", str(tiny_teacher_dir),
                                      "--root", str(tmp_path / "runs"), "--dropout", "1.5"])
    assert result.exit_code != 0
    assert isinstance(result.exception, TrainError) and "dropout=1.5: must be in [0, 1)" in str(result.exception)
    assert not (tmp_path / "runs").exists()  # no folder, no extraction


def test_run_cli_distils_into_a_body_cut_from_the_teacher(tmp_path, corpus, tiny_teacher_dir):
    """`run --encoder teacher`: the heads student's body is the run's own teacher, cut and pruned."""
    result = CliRunner().invoke(app, ["run", "--input", str(corpus), "--teacher", str(tiny_teacher_dir), "--root",
                                      str(tmp_path / "runs"), "--label", "toxicity=tox", "--encoder", "teacher",
                                      "--epochs", "2", "--no-eval-teacher"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "runs" / "default"
    config = json.loads((folder / "student" / "config.json").read_text())
    assert config["kind"] == "heads" and config["inputs"]["tokenizer"] == "teacher"
    assert config["encoder"]["source"] == f"teacher:{tiny_teacher_dir.name}" and config["training"]["encoder"] == "teacher"
    assert json.loads((folder / "run.json").read_text())["config"]["train"]["encoder"] == "teacher"
    report = json.loads((folder / "eval" / "report.json").read_text())
    assert report["student"]["kind"] == "heads" and report["valid_json_constrained"] == 1.0


def test_run_cli_missing_input_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(app, ["run", "--input", str(tmp_path / "nope.txt"), "--root", str(tmp_path)])
    assert result.exit_code != 0
    assert isinstance(result.exception, RunError) and "nope.txt" in str(result.exception)


def test_a_task_without_a_packaged_corpus_needs_input_before_any_work(tmp_path):
    result = CliRunner().invoke(app, ["run", "--task", "support-ticket", "--root", str(tmp_path / "runs")])
    assert result.exit_code != 0
    assert isinstance(result.exception, RunError)
    assert "'support-ticket' has no packaged sample corpus" in str(result.exception)
    assert "--synthesize N to have the teacher write N inputs first" in str(result.exception)
    assert not (tmp_path / "runs").exists()


def test_the_agent_preset_runs_from_its_packaged_requests(tmp_path, tiny_teacher_dir):
    """`run --task agent-tool` without --input: the packaged requests, a decoder student (the task has a
    string field), and a report with exact match on the tool and chrF on the query."""
    result = CliRunner().invoke(app, ["run", "--task", "agent-tool", "--teacher", str(tiny_teacher_dir), "--root",
                                      str(tmp_path / "runs"), "--limit", "24", "--preset", "nano",
                                      "--epochs", "1", "--no-eval-teacher"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "runs" / "default"
    manifest = json.loads((folder / "shards" / "manifest.json").read_text())
    assert manifest["task"]["name"] == "agent-tool" and manifest["counts"]["examples"] == 24
    assert manifest["filters"]["corpus"].endswith("sample_requests.jsonl")
    assert json.loads((folder / "student" / "config.json").read_text())["kind"] == "decoder"
    report = json.loads((folder / "eval" / "report.json").read_text())
    fields = report["fields"]
    assert set(fields) == {"tool", "query"} and fields["tool"].get("chrf") is None
    assert 0.0 <= fields["query"]["chrf"] <= 100.0
    assert "| query |" in (folder / "eval" / "report.md").read_text()


def test_sample_corpus_ships_with_the_package():
    from microdistill.data.corpus import read_corpus

    items = read_corpus(sample_corpus(), labels={"toxicity": "toxicity"})
    labelled = [it for it in items if it.labels]
    assert len(items) >= 3000 and len(labelled) == 1000 and items[:1000] == labelled  # human labels come first
    assert {it.labels["toxicity"] for it in labelled} == {"toxic", "respectful"}


@pytest.mark.teacher
def test_run_with_the_real_default_teacher(tmp_path):
    cfg = RunConfig(root=str(tmp_path / "runs"), name="real", extract=ExtractConfig(limit=6, calibration=6, batch_size=6),
                    train=TrainConfig(preset="nano", epochs=2), eval=EvalConfig(time_teacher=False))
    folder = run(cfg)
    report = json.loads((folder / "eval" / "report.json").read_text())
    assert report["valid_json_constrained"] == 1.0
    manifest = json.loads((folder / "shards" / "manifest.json").read_text())
    assert manifest["teacher"]["name"] == "qwen2.5-coder-0.5b-instruct"
    assert manifest["counts"]["examples"] == 6


def test_run_from_a_task_file_alone_has_the_teacher_write_its_inputs(tmp_path, tiny_teacher_dir):
    """`run --task T --synthesize N`: inputs.jsonl first (resumable like the other stages), then the
    usual stages on it; --input beside it is refused."""
    args = ["run", "--task", "support-ticket", "--synthesize", "12", "--teacher", str(tiny_teacher_dir), "--root",
            str(tmp_path / "runs"), "--preset", "nano", "--epochs", "1", "--no-eval-teacher"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "runs" / "default"
    written = [json.loads(x) for x in (folder / "inputs.jsonl").read_text().splitlines()]
    assert len(written) == 12 and all(set(w["written_for"]) <= {"team", "urgency"} for w in written)
    state = json.loads((folder / "run.json").read_text())
    assert list(state["stages"]) == ["synthesize", "extract", "train", "eval"]
    manifest = json.loads((folder / "shards" / "manifest.json").read_text())
    assert manifest["filters"]["corpus"] == str(folder / "inputs.jsonl") and manifest["counts"]["examples"] > 0
    assert "[synthesize] done already" in CliRunner().invoke(app, args).output
    both = CliRunner().invoke(app, args + ["--input", str(folder / "inputs.jsonl")])
    assert both.exit_code != 0 and "not both" in str(both.exception)
