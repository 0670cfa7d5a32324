"""`microdistill synthesize`: the teacher writes a task's inputs, steered per field value, filtered
by the task's input rules, near-duplicates dropped, resumable, one-line errors."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from typer.testing import CliRunner

from microdistill.cli import app, main
from microdistill.core.task import load_task
from microdistill.flows.config import SynthesizeConfig, SynthesizeError
from microdistill.flows.synthesize import grams, near, parse, request, steers, synthesize


def cli_error(monkeypatch, capsys, args: list[str]) -> str:
    """The one line `microdistill ARGS` prints on stderr when it refuses (exit status 2)."""
    monkeypatch.setattr(sys, "argv", ["microdistill", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    return err


def test_steers_take_every_value_of_every_enum_field_in_turn():
    task = load_task("support-ticket")  # team (5 values), urgency (3), summary (free text: no steer)
    s = steers(task)
    assert s[:4] == [{"team": "billing"}, {"urgency": "low"}, {"team": "technical"}, {"urgency": "medium"}]
    assert sorted(x["team"] for x in s if "team" in x) == sorted(task.output.fields[0].values)
    assert len(s) == 5 + 3


def test_the_request_shows_the_examples_as_answered_requests_and_asks_for_the_steered_value():
    task = load_task("support-ticket")
    turns = request(task, {"urgency": "high"})
    assert turns[-1] == {"role": "user", "content": 'Write one new input where the urgency is "high".'}
    assert [t["content"] for t in turns if t["role"] == "assistant"] == [ex.input for ex in task.prompt.examples]
    assert 'urgency is "medium"' in turns[1]["content"]  # the first example's own urgency


def test_parse_keeps_the_input_and_drops_what_is_not_one():
    assert parse('1. "my card was charged twice"\nsecond line') == "my card was charged twice"
    assert parse("Input: the app crashes -> {\"team\":\"technical\"}") == "the app crashes"
    assert parse('{"team": "billing"}') == ""
    assert parse("\n\n") == ""


def test_near_duplicates_by_character_grams():
    a = grams("I was charged twice for my subscription")
    assert near(a, grams("i was charged  twice for my subscription!"), 0.7)
    assert not near(a, grams("the parcel never arrived"), 0.7)


def test_the_cli_writes_inputs_that_pass_the_task_rules_and_continues_a_stopped_run(tiny_teacher_dir, tmp_path,
                                                                                     monkeypatch, capsys):
    out = tmp_path / "inputs.jsonl"
    partial = tmp_path / "inputs.jsonl.partial"
    earlier = {"text": "my parcel is three weeks late and nobody answers", "written_for": {"team": "billing"}}
    partial.write_text(json.dumps(earlier) + "\n")  # what a run killed after its first batch left
    args = ["synthesize", "--task", "support-ticket", "--teacher", str(tiny_teacher_dir), "--n", "4",
            "--batch-size", "4", "--max-tokens", "12", "--similarity", "0.9", "--quiet", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and rows[0] == earlier and not partial.exists()
    task = load_task("support-ticket")
    for r in rows[1:]:
        assert r["text"] and not r["text"].startswith("{")
        assert set(r["written_for"]) <= {"team", "urgency"} and len(r["written_for"]) == 1
    assert len({r["text"] for r in rows}) == 4 and len(task.prompt.examples) == 2  # no duplicates
    before = out.read_bytes()
    assert "already exists" in cli_error(monkeypatch, capsys, args)  # a finished file is never overwritten
    assert out.read_bytes() == before


class Scribe:
    """A teacher that writes numbered, distinct inputs and remembers what it was asked."""

    def __init__(self, tokenizer):
        self.tokenizer, self.asked = tokenizer, []

    def write(self, conversations, max_tokens, temperature, seed):
        self.asked += [c[-1]["content"] for c in conversations]
        return [f"request number {len(self.asked) - len(conversations) + k} about {k * 'x'}y" for k in range(len(conversations))]


def test_a_continued_run_asks_for_the_values_the_stopped_one_had_not_reached(monkeypatch, tmp_path, tiny_tokenizer):
    import microdistill.teachers

    scribe = Scribe(tiny_tokenizer)
    monkeypatch.setattr(microdistill.teachers, "load_teacher", lambda *a, **k: scribe)
    out = tmp_path / "x.jsonl"
    (out.parent / "x.jsonl.partial").write_text("".join(json.dumps({"text": f"an earlier input {w}", "written_for": {}})
                                                        + "\n" for w in ("one", "two", "three"))
                                                + '{"text": "a line the kill cut')  # dropped, not joined to the next
    report = synthesize(SynthesizeConfig(task="support-ticket", n=5, batch_size=2), out, progress_bar=False)
    s = steers(load_task("support-ticket"))
    want = [" and ".join(f'{k} is "{v}"' for k, v in x.items()) for x in s[3:5]]
    assert [a.split("where the ")[1].rstrip(".") for a in scribe.asked] == want  # the 4th and 5th steers
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and [r["text"] for r in rows[:3]] == ["an earlier input one", "an earlier input two", "an earlier input three"]
    assert [r["written_for"] for r in rows[3:]] == s[3:5] and report["written"] == 5 and report["asked"] == 2
    elsewhere = tmp_path / "not" / "yet" / "y.jsonl"  # a folder that does not exist yet is made
    synthesize(SynthesizeConfig(task="support-ticket", n=1, batch_size=1), elsewhere, progress_bar=False)
    assert len(elsewhere.read_text().splitlines()) == 1


def task_file(tmp_path, **changes) -> str:
    spec = load_task("support-ticket").model_dump()
    for key, value in changes.items():
        section, _, name = key.partition("__")
        spec[section][name] = value
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_a_task_without_examples_and_a_teacher_that_writes_nothing_usable_are_one_line_errors(tiny_teacher_dir,
                                                                                            tmp_path, monkeypatch,
                                                                                            capsys):
    with pytest.raises(SynthesizeError, match="has no prompt examples"):
        synthesize(SynthesizeConfig(task=task_file(tmp_path, prompt__examples=[]), teacher=str(tiny_teacher_dir)),
                   tmp_path / "a.jsonl", progress_bar=False)
    rejects_all = task_file(tmp_path, inputs__reject=["."])  # every text fails the input rules
    args = ["synthesize", "--task", rejects_all, "--teacher", str(tiny_teacher_dir), "--n", "2", "--batch-size", "4",
            "--max-tokens", "8", "--quiet", "--out", str(tmp_path / "b.jsonl")]
    err = cli_error(monkeypatch, capsys, args)
    assert "wrote nothing usable" in err and "8 failed the task's input rules" in err
    assert not (tmp_path / "b.jsonl").exists()
    with pytest.raises(SynthesizeError, match="--temperature"):
        SynthesizeConfig(temperature=0)


def test_a_served_teacher_writes_through_the_api(tmp_path, tiny_tokenizer_dir, monkeypatch, capsys):
    """The fake server answers every message with a task answer (JSON), never an input: synthesize
    asks it through the API and refuses, in one line, to keep answers as inputs."""
    from test_api_teacher import start_fake

    proc, base = start_fake(tiny_tokenizer_dir)
    try:
        args = ["synthesize", "--task", "reddit-comment", "--teacher", "openai:tiny", "--teacher-url", base + "/v1",
                "--n", "2", "--batch-size", "2", "--quiet", "--out", str(tmp_path / "c.jsonl")]
        assert "wrote nothing usable" in cli_error(monkeypatch, capsys, args)
        import httpx

        assert httpx.get(base + "/stats").json()["calls"]["tiny"] >= 8  # asked 4 x --n times, then gave up
    finally:
        proc.terminate()
        proc.wait(10)
