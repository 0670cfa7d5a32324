"""The API teacher against real servers, never a mock.

    PYTHONPATH=$PWD python -m pytest -q tests/test_api_teacher.py     # the small misbehaving server
    scripts/vllm_server.sh test                                      # also vLLM against the in-process teacher

A small real HTTP server (tests/fake_openai.py, its own process) answers, rate-limits, fails
and breaks JSON on purpose, so retries, resumes and one-line errors are checked through the real
client. Tests marked `vllm` extract the sample comments through vLLM serving the default teacher
(float32) and compare answers and decision points with the in-process teacher on the same
inputs; they run when MICRODISTILL_VLLM_URL names that server and are deselected otherwise
(conftest.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from synthetic import label, make_texts

from microdistill.plan.cost import CostConfig, api_usd_per_call, teacher_per_call
from microdistill.plan.measured import RunFiles
from microdistill.extract import ExtractConfig, ExtractError, extract
from microdistill.extract.served import decisions_from_steps
from microdistill.data.shards import ShardSet
from microdistill.core.task import load_task
from microdistill.teachers import TeacherError

TASK = load_task("reddit-comment")
HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_fake(tokenizer_dir) -> tuple[subprocess.Popen, str]:
    """A fake_openai.py server process, answering, and its base URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "fake_openai.py"), "--port", str(port),
                             "--tokenizer", str(tokenizer_dir)], env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(base + "/stats", timeout=1)
            return proc, base
        except OSError:
            assert proc.poll() is None, "the test server exited"
            time.sleep(0.1)
    proc.kill()
    pytest.fail("the test server did not start")


@pytest.fixture(scope="module")
def server(tiny_tokenizer_dir):
    """The base URL of a fake_openai.py server, started for this module and stopped after it."""
    proc, base = start_fake(tiny_tokenizer_dir)
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


def calls(base: str, model: str) -> int:
    return json.loads(urllib.request.urlopen(base + "/stats").read())["calls"].get(model, 0)


@pytest.fixture(autouse=True)
def no_key(monkeypatch):
    for var in ("MICRODISTILL_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "comments.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(12, seed=5)))
    return path


def api_extract(corpus, out, base, model="tiny", path="/v1", **kw):
    cfg = ExtractConfig(teacher=f"openai:{model}", teacher_url=base + path, calibration=4, concurrency=3,
                        vocab_size=200, **kw)
    return ShardSet(extract(corpus, out, cfg, progress=False))


# ---- a server that answers well --------------------------------------------------------------
def test_logits_shards_resume_without_asking_twice(server, corpus, tmp_path):
    shards = api_extract(corpus, tmp_path / "s", server, limit=6)
    assert shards.manifest["signal"] == "logits" and len(shards) == 6
    assert calls(server, "tiny") == 6 + 0  # the tokenizer came from the server's `root`: no extra call
    tok = shards.tokenizer()
    for r in shards.records():
        assert r.fields == label(r.text) and tok.decode(r.output_ids[:-1]) == r.output_text
        assert r.logits.shape == (len(r.output_ids), len(shards.kept_vocab)) and not r.lse.any()
        for f in TASK.enum_fields:  # the chosen value took 0.95 of the mass, the rest far less
            p = r.decisions[f.name]
            assert math.isclose(p.sum(), 1, rel_tol=1e-5) and f.values[int(p.argmax())] == r.fields[f.name]
    usage = shards.manifest["api_usage"]
    assert usage["calls"] == 6 and usage["prompt_tokens_per_call"] > 50 and usage["completion_tokens_per_call"] > 5
    # the cost verb prices the tokens the server counted
    per_call = teacher_per_call(CostConfig(), RunFiles(shards=shards.dir), None)
    expected = api_usd_per_call(usage["prompt_tokens_per_call"], usage["completion_tokens_per_call"], 0.15, 0.60)
    assert math.isclose(per_call.usd, expected)

    ids = {r.id for r in shards.records()}
    shards = api_extract(corpus, tmp_path / "s", server)  # the rest of the corpus: only new inputs are asked
    assert calls(server, "tiny") == 12 and len(shards) == 12 and ids < {r.id for r in shards.records()}
    shards = api_extract(corpus, tmp_path / "s", server)
    assert calls(server, "tiny") == 12 and len(shards) == 12 and shards.manifest["api_usage"]["calls"] == 12


def test_decision_points_from_the_step_where_each_value_starts(tiny_tokenizer):
    """P(tone) read from a hand-made top-k: 0.75 neutral (chosen) against 0.25 aggressive."""
    fields = {"tone": "neutral", "sentiment": "negative", "safety": "safe", "toxicity": "respectful"}
    text = TASK.serialize(fields)
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    steps = [(i, 0.0, {i: 0.0}) for i in ids]
    start = text.index("neutral")
    j = next(t for t in range(len(ids)) if len(tiny_tokenizer.decode(ids[:t + 1])) > start)
    assert tiny_tokenizer.decode(ids[:j]) == text[:start]  # the value starts on a token boundary here
    agg = tiny_tokenizer("aggressive", add_special_tokens=False).input_ids[0]
    steps[j] = (ids[j], math.log(0.75), {ids[j]: math.log(0.75), agg: math.log(0.25)})
    d = decisions_from_steps(TASK, tiny_tokenizer, text, steps)
    np.testing.assert_allclose(d["tone"], [0.25, 0.75], atol=1e-6)
    assert d["sentiment"].argmax() == 0 and d["sentiment"][0] > 0.99  # others outside the top-k: bounded


# ---- servers that misbehave ------------------------------------------------------------------
@pytest.mark.parametrize("model, said, retries", [("tiny-429", "rate limit (429); retry 2/5", 2),
                                                  ("tiny-500", "server error (503); retry 1/5", 1)])
def test_rate_limits_and_server_errors_are_retried(server, corpus, tmp_path, capsys, model, said, retries):
    shards = api_extract(corpus, tmp_path / "s", server, model=model, limit=4)
    assert len(shards) == 4 and shards.manifest["api_usage"]["retries"] == 4 * retries
    assert said in capsys.readouterr().err


def test_an_answer_that_is_not_json_is_asked_again(server, corpus, tmp_path):
    shards = api_extract(corpus, tmp_path / "s", server, model="tiny-badjson", limit=4)
    assert len(shards) == 4 and calls(server, "tiny-badjson") == 8


def test_never_json_is_an_error_and_writes_no_shard(server, corpus, tmp_path, capsys):
    with pytest.raises(TeacherError, match="no answer could be stored; the last: not a valid answer"):
        api_extract(corpus, tmp_path / "s", server, model="tiny-alwaysbad", limit=2)
    assert calls(server, "tiny-alwaysbad") == 2 * 3
    assert "skipped" in capsys.readouterr().err
    assert not list((tmp_path / "s").glob("shard-*"))


def test_a_server_without_logprobs_gives_text_only_shards(server, corpus, tmp_path, tiny_tokenizer_dir):
    shards = api_extract(corpus, tmp_path / "s", server, model="tiny-nologprobs", limit=4,
                         teacher_tokenizer=str(tiny_tokenizer_dir))
    assert shards.manifest["signal"] == "text" and "no log-probabilities" in shards.manifest["api"]["notes"][0]
    for r in shards.records():
        assert r.logits is None and not r.decisions and r.fields == label(r.text)


def test_students_train_on_both_kinds_of_api_shards(server, corpus, tmp_path, tiny_tokenizer_dir):
    """Logits shards train with the divergence and CE, text-only ones with CE alone (signal auto)."""
    from microdistill.train import TrainConfig, train

    for model, signal in (("tiny", "logits"), ("tiny-nologprobs", "text")):
        shards = api_extract(corpus, tmp_path / model, server, model=model, teacher_tokenizer=str(tiny_tokenizer_dir))
        out = train(shards.dir, tmp_path / f"{model}-student", TrainConfig(preset="nano", max_steps=2, batch_size=8),
                    progress=False)
        assert json.loads((out / "training.json").read_text())["signal"] == signal


@pytest.mark.teacher  # the stand-in is the default preset's tokenizer
def test_a_model_whose_tokenizer_is_unknown_gives_text_only_shards_in_a_stand_in(server, corpus, tmp_path):
    """No --teacher-tokenizer, not a preset's name, no `root` from the server: the default preset's
    tokenizer spells the answers, which a heads student never reads."""
    shards = api_extract(corpus, tmp_path / "s", server, model="tiny-nologprobs", limit=2)
    assert shards.manifest["signal"] == "text" and "no tokenizer of 'tiny-nologprobs'" in shards.manifest["api"]["notes"][0]
    assert shards.manifest["teacher"]["tokenizer"] == "qwen2.5-coder-0.5b-instruct"
    tok = shards.tokenizer()
    assert all(tok.decode(r.output_ids[:-1]) == r.output_text for r in shards.records())


def test_a_server_without_json_schema_is_asked_plainly(server, corpus, tmp_path):
    shards = api_extract(corpus, tmp_path / "s", server, model="tiny-noschema", limit=3)
    assert shards.manifest["signal"] == "logits" and not shards.manifest["api"]["json_schema"]
    assert "json_schema response format" in shards.manifest["api"]["notes"][0]


def test_run_labels_through_the_api_teacher(server, corpus, tmp_path):
    """`microdistill run --teacher openai:MODEL --teacher-url URL`: the whole pipeline with the teacher
    behind HTTP; the report times that teacher where it labelled the shards, asking it again."""
    from typer.testing import CliRunner

    from microdistill.cli import app

    args = ["run", "--input", str(corpus), "--root", str(tmp_path), "--teacher", "openai:tiny", "--teacher-url",
            server + "/v1", "--concurrency", "2", "--vocab-size", "200", "--student", "decoder", "--preset", "nano",
            "--max-steps", "2", "--limit", "10"]
    before = calls(server, "tiny")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "default"
    shards = ShardSet(run / "shards")
    # ten calls labelled the shards; the evaluation asked the teacher again to time it
    assert len(shards) == 10 and shards.manifest["api_usage"]["calls"] == 10 < calls(server, "tiny") - before
    assert all(r.fields == label(r.text) for r in shards.records())
    saved = json.loads((run / "run.json").read_text())["config"]["extract"]
    assert saved["teacher_url"] == server + "/v1" and saved["concurrency"] == 2
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["speed"]["student"]["p50_ms"] > 0 and report["teacher"]["spec"] == "openai:tiny"
    assert report["speed"]["teacher"]["same_output_as_shards"] == 1.0 and report["size"]["teacher_params"] is None

# ---- one-line errors -------------------------------------------------------------------------
def test_a_missing_or_refused_key(server, corpus, tmp_path, monkeypatch):
    with pytest.raises(TeacherError, match="needs an API key: set MICRODISTILL_API_KEY or OPENAI_API_KEY"):
        api_extract(corpus, tmp_path / "a", server, path="/auth/v1", limit=2)
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    with pytest.raises(TeacherError, match=r"rejected the key in \$OPENAI_API_KEY"):
        api_extract(corpus, tmp_path / "a", server, path="/auth/v1", limit=2)
    monkeypatch.setenv("MICRODISTILL_API_KEY", "secret")
    assert len(api_extract(corpus, tmp_path / "a", server, path="/auth/v1", limit=2)) == 2


def test_a_wrong_model_name(server, corpus, tmp_path):
    with pytest.raises(TeacherError, match="serves no model 'nope'; it serves: tiny, tiny-429"):
        api_extract(corpus, tmp_path / "s", server, model="nope")


def test_options_that_need_an_api_teacher(tiny_teacher_dir):
    with pytest.raises(ExtractError, match="--teacher-url and --teacher-tokenizer are for an API teacher"):
        ExtractConfig(teacher=str(tiny_teacher_dir), teacher_url="http://127.0.0.1:1/v1")
    with pytest.raises(ExtractError, match="--concurrency must be at least 1"):
        ExtractConfig(teacher="openai:m", concurrency=0)


def test_an_unreachable_server_is_one_line_from_the_cli(corpus, tmp_path):
    args = ["extract", "--input", str(corpus), "--out", str(tmp_path / "s"), "--teacher", "openai:tiny",
            "--teacher-url", f"http://127.0.0.1:{free_port()}/v1"]
    p = subprocess.run([sys.executable, "-c", "from microdistill.cli import main; main()", *args],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert lines[-1].startswith("error: cannot reach the teacher server at http://127.0.0.1:")
    assert all("no connection (APIConnectionError); retry" in line for line in lines[:-1]) and len(lines) == 3
    assert not (tmp_path / "s").exists()


# ---- vLLM serving the default teacher --------------------------------------------------------
@pytest.fixture(scope="module")
def sample_corpus_32(tmp_path_factory):
    from microdistill.data.samples import sample_corpus

    rows = [json.loads(line) for line in Path(sample_corpus()).read_text().splitlines()[:32]]
    path = tmp_path_factory.mktemp("sample") / "comments.jsonl"
    path.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    return path


@pytest.mark.vllm
def test_vllm_answers_as_the_in_process_teacher(sample_corpus_32, tmp_path, one_thread):
    """Both float32: every answer equal, and every decision point within DECISION_ATOL."""
    import torch

    url = os.environ["MICRODISTILL_VLLM_URL"]
    api = ShardSet(extract(sample_corpus_32, tmp_path / "api", ExtractConfig(
        teacher="openai:qwen2.5-coder-0.5b-instruct", teacher_url=url, calibration=32, concurrency=4), progress=False))
    torch.set_num_threads(one_thread)
    local = ShardSet(extract(sample_corpus_32, tmp_path / "local", ExtractConfig(calibration=32, hidden_layer="none"),
                             progress=False))
    by_id = {r.id: r for r in local.records()}
    pairs = [(r, by_id[r.id]) for r in api.records()]
    assert api.manifest["signal"] == "logits" and len(pairs) == len(by_id) >= 30
    assert [r.output_text for r, _ in pairs] == [q.output_text for _, q in pairs]
    assert all(list(r.output_ids) == list(q.output_ids) for r, q in pairs)
    worst = max(float(np.abs(r.decisions[f] - q.decisions[f]).max()) for r, q in pairs for f in r.decisions)
    print(f"largest decision-point difference over {len(pairs)} inputs: {worst:.2e}")
    assert worst <= DECISION_ATOL


# Measured: 2e-5 at most over the 32 inputs. Both sides run the same float32 weights, so what is
# left is kernel rounding, and two differences of method: vLLM reports log-probabilities after
# its structured-output mask (the step where values start is normalised over the tokens the
# schema allows there, which cancels when values are normalised against each other, but a
# value's later tokens count as certain where the raw teacher gives them a little less), and a
# value outside the top-20 counts at an upper bound. 1e-3 leaves room for the rounding of other
# CPUs while still failing on any real misreading (a wrong step or token moves a value by >0.01).
DECISION_ATOL = 1e-3


# ---- the same served teacher, timed by eval and asked by the cascade -------------------------------
def test_eval_times_and_the_server_defers_to_a_served_teacher(server, tmp_path):
    """`eval` times the shards' own served teacher (found at the manifest's URL) as it labelled them,
    and `serve --teacher openai:MODEL --teacher-url URL` hands it the calls the student is unsure of."""
    import httpx
    from test_serve import start_server

    from microdistill.evaluate.config import EvalConfig
    from microdistill.evaluate.evaluation import evaluate
    from microdistill.train import TrainConfig, train

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(40, seed=8)))
    shards = api_extract(corpus, tmp_path / "s", server)
    assert shards.manifest["counts"]["val"] >= 1
    student = train(shards.dir, tmp_path / "student", TrainConfig(student="heads", max_steps=2, batch_size=8),
                    progress=False)
    report = evaluate(student, shards.dir, EvalConfig(peers=False, consistency_inputs=0, timing_inputs=2),
                      progress=False)
    assert report["teacher"]["spec"] == "openai:tiny" and report["size"]["teacher_params"] is None
    assert report["speed"]["teacher"]["same_output_as_shards"] == 1.0  # the served teacher, asked again, answered alike

    asked = calls(server, "tiny")
    traffic = tmp_path / "traffic"
    proc, url = start_server(student, "--teacher", "openai:tiny", "--teacher-url", server + "/v1", "--min-confidence", "1.0",
                             "--traffic", str(traffic))
    try:
        texts = make_texts(6, seed=9)
        r = httpx.post(f"{url}/v1/predict", json={"texts": texts}, timeout=120)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["answered_by"] for x in results] == ["teacher"] * 6  # no softmax reaches 1.0
        assert [x["fields"] for x in results] == [label(t) for t in texts]
        assert calls(server, "tiny") >= asked + 6
    finally:
        proc.terminate()
        proc.wait(60)
    # the served teacher's answers were kept as the records its extraction stores (top-k log-probabilities)
    from microdistill.extract.recording import label_records

    kept = {r.text: r for r in label_records(traffic)}
    assert sorted(kept) == sorted(texts) and all(kept[t].fields == label(t) for t in texts)
    again = tmp_path / "again.jsonl"
    again.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    copy = tmp_path / "copy"
    shutil.copytree(shards.dir, copy)
    extracted = {r.text: r for r in api_extract(again, copy, server).records() if r.text in kept}
    for text, record in kept.items():
        other = extracted[text]
        assert record.output_ids.tolist() == other.output_ids.tolist()
        assert np.array_equal(record.logits, other.logits) and np.array_equal(record.lse, other.lse)
        assert all(np.allclose(p, other.decisions[name]) for name, p in record.decisions.items())


def test_a_teacher_that_goes_down_behind_the_cascade(tiny_tokenizer_dir, tmp_path):
    """The served teacher stops answering: under --on-teacher-error student every call still gets
    the student's answer, flagged student-fallback and counted; under error, a 503 that says why."""
    import httpx
    from test_serve import scrape, start_server

    from microdistill.train import TrainConfig, train

    teacher, base = start_fake(tiny_tokenizer_dir)
    servers = []
    try:
        corpus = tmp_path / "c.jsonl"
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(24, seed=4)))
        shards = api_extract(corpus, tmp_path / "s", base)
        student = train(shards.dir, tmp_path / "student", TrainConfig(student="heads", max_steps=2, batch_size=8),
                        progress=False)
        common = ["--teacher", "openai:tiny", "--teacher-url", base + "/v1", "--min-confidence", "1.0",
                  "--teacher-attempts", "1", "--teacher-timeout-s", "5"]
        servers = [start_server(student, *common, "--on-teacher-error", policy)[0:2] for policy in ("student", "error")]
        teacher.terminate()
        teacher.wait(10)
        (_, fallback), (_, strict) = servers
        texts = make_texts(5, seed=6)
        r = httpx.post(f"{fallback}/v1/predict", json={"texts": texts}, timeout=120)
        assert r.status_code == 200 and [x["answered_by"] for x in r.json()["results"]] == ["student-fallback"] * 5
        assert scrape(fallback)[("microdistill_errors_total", (("kind", "teacher"),))] == 5
        r = httpx.post(f"{strict}/v1/predict", json={"texts": texts}, timeout=120)
        assert r.status_code == 503 and "the teacher is unavailable" in r.json()["error"]["message"]
        assert httpx.get(f"{strict}/health", timeout=10).status_code == 200  # and it keeps serving
    finally:
        teacher.kill()
        for proc, _ in servers:
            proc.terminate()
            proc.wait(60)
