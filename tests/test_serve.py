"""Calibrated confidence, the cascade and the server: temperature scaling against references, the
micro-batcher without HTTP, and a real `microdistill serve` process answered over HTTP and by the
`openai` client, with a tiny trained heads student and the tiny random teacher."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from synthetic import make_shards, make_texts

from microdistill.serve.cascade import Cascade, teacher_for, threshold_for
from microdistill.students.confidence import (assess, coverage_curve, cross_fit, ece, fit_temperature, point_for, reliability,
                                     softmax)
from microdistill.serve.config import ServeConfig
from microdistill.serve.service import MicroBatcher, RequestError, Service
from microdistill.students import StudentFolderError
from microdistill.students import load_student
from microdistill.core.task import load_task
from microdistill.train import TrainConfig, train


# ---- temperature scaling and ECE -------------------------------------------------------------------
def test_fitted_temperature_recovers_a_known_temperature():
    """Labels drawn from softmax(z); the student says z * 2.5, so dividing by T = 2.5 is calibrated."""
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 2.0, size=(20_000, 4))
    p = softmax(z)
    y = (rng.random(len(z))[:, None] > np.cumsum(p, 1)).sum(1)
    assert fit_temperature(z * 2.5, y) == pytest.approx(2.5, rel=0.05)
    assert fit_temperature(z / 2.0, y) == pytest.approx(0.5, rel=0.05)
    assert fit_temperature(z, y) == pytest.approx(1.0, rel=0.05)


def test_ece_and_reliability_match_a_hand_computation():
    conf = np.array([0.15, 0.25, 0.95, 0.92, 1.0])
    correct = np.array([0, 1, 1, 0, 1])
    # bins (0.1, 0.2]: conf .15 acc 0; (0.2, 0.3]: .25 acc 1; (0.9, 1]: mean .29/.3 -> 0.9566..., acc 2/3
    want = (0.15 + 0.75 + 3 * abs(2 / 3 - (0.95 + 0.92 + 1.0) / 3)) / 5
    assert ece(conf, correct) == pytest.approx(want)
    rows = reliability(conf, correct)
    assert [r["n"] for r in rows] == [0, 1, 1, 0, 0, 0, 0, 0, 0, 3]
    assert rows[9]["accuracy"] == pytest.approx(2 / 3) and rows[0]["confidence"] is None
    assert ece(np.array([0.8] * 10), np.array([1] * 8 + [0] * 2)) == pytest.approx(0.0)


def test_cross_fitting_never_scores_a_fold_with_temperatures_fitted_on_it():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, size=(40, 3))
    y = rng.integers(0, 3, size=(40, 1))
    a = cross_fit([z], y)[0]
    fold = np.empty(40, dtype=int)
    fold[np.random.default_rng(0).permutation(40)] = np.arange(40) % 2
    y2 = y.copy()
    y2[fold == 0] = (y2[fold == 0] + 1) % 3  # other targets in fold 0 change only fold 1's temperature
    b = cross_fit([z], y2)[0]
    np.testing.assert_allclose(a[fold == 0], b[fold == 0])
    assert not np.allclose(a[fold == 1], b[fold == 1])
    np.testing.assert_allclose(a[fold == 0], softmax(z[fold == 0], fit_temperature(z[fold == 1], y[fold == 1, 0])))


def test_coverage_curve_and_the_point_for_a_target():
    conf = np.array([0.9, 0.5, 0.8, 0.8, 0.6])
    agrees = np.array([True, False, True, False, True])
    curve = coverage_curve(conf, agrees)
    assert [(p["threshold"], p["coverage"], p["agreement"]) for p in curve] == [
        (None, 0.0, 1.0), (0.9, 0.2, 1.0), (0.8, 0.6, 0.8), (0.6, 0.8, 0.8), (0.5, 1.0, 0.6)]
    assert curve[2]["kept_agreement"] == pytest.approx(2 / 3)
    assert point_for(curve, 0.8)["threshold"] == 0.6
    assert point_for(curve, 0.95)["threshold"] == 0.9
    assert point_for(curve, 1.0)["threshold"] == 0.9
    worst_first = coverage_curve(np.array([0.9, 0.5]), np.array([False, True]))
    assert point_for(worst_first, 1.0)["threshold"] is None  # only reached if the teacher answers all


def test_assess_reports_cross_fitted_ece_after():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 1.5, size=(4000, 3))
    y = (rng.random(4000)[:, None] > np.cumsum(softmax(z), 1)).sum(1)[:, None]
    r = assess([z * 3.0], y, ["f"])  # overconfident by a factor of 3
    assert r["temperatures"]["f"] == pytest.approx(3.0, rel=0.1)
    assert r["ece_before"] > 0.1 and r["ece_after"] < 0.03 and r["n"] == 4000
    assert r["curve"][-1]["coverage"] == 1.0


# ---- the student folder and the cascade -------------------------------------------------------------
CFG = TrainConfig(student="heads", max_steps=4, batch_size=8, eval_limit=8, lr=2e-3)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("serve")
    shards = make_shards(root / "shards", tiny_tokenizer, n=64)
    return train(shards, root / "student", CFG, progress=False)


def test_training_writes_calibration_and_the_student_applies_it(student_dir):
    cal = json.loads((student_dir / "calibration.json").read_text())
    assert cal["method"] == "temperature" and cal["n"] >= 4 and set(cal["temperatures"]) == {
        "tone", "sentiment", "safety", "toxicity"}
    student = load_student(student_dir)
    texts = make_texts(5, seed=3)
    logits, probs = student.logits(texts), student.probabilities(texts)
    for f, z, p in zip(student.fields, logits, probs):
        np.testing.assert_allclose(p, softmax(z, cal["temperatures"][f.name]), atol=1e-5)
    for r, i in zip(student.predict(texts), range(len(texts))):
        assert r["confidence"] == pytest.approx({f.name: float(p[i].max()) for f, p in zip(student.fields, probs)})
    (student_dir / "calibration.json").write_text(json.dumps({**cal, "temperatures": {"tone": -1}}))
    try:
        with pytest.raises(StudentFolderError, match="calibration.json: temperatures for unknown fields or not positive "
                                                     "numbers: tone$"):
            load_student(student_dir)
    finally:
        (student_dir / "calibration.json").write_text(json.dumps(cal))


def test_threshold_for_a_target_reads_the_held_out_curve(student_dir):
    student = load_student(student_dir)
    curve = json.loads((student_dir / "calibration.json").read_text())["curve"]
    assert threshold_for(student, min_confidence=0.7) == 0.7
    assert threshold_for(student) == 0.0
    assert threshold_for(student, target_agreement=0.0) == min(p["threshold"] for p in curve[1:])
    assert threshold_for(student, target_agreement=1.0) == (point_for(curve, 1.0)["threshold"] or math.inf)


class FakeStudent:
    """The interface the server needs and nothing else: sure of texts containing 'sure'."""

    def __init__(self):
        self.task = load_task("reddit-comment")
        self.fields = self.task.enum_fields
        self.calls: list[list[str]] = []

    def predict(self, texts, batch_size=64):
        self.calls.append(list(texts))
        answer = {f.name: f.values[0] for f in self.fields}
        c = lambda t: 0.99 if "sure" in t else 0.2  # noqa: E731
        return [{"output": self.task.serialize(answer), "fields": answer, "confidence": {f.name: c(t) for f in self.fields}}
                for t in texts]


def test_the_cascade_escalates_only_unsure_inputs():
    asked = []

    def teacher(texts):
        asked.extend(texts)
        return [{"output": '{"x":1}', "fields": {"tone": "aggressive"}} if "bad" not in t else {"output": "{", "fields": None}
                for t in texts]

    out = Cascade(FakeStudent(), 0.5, teacher).predict(["sure thing", "hmm", "sure again", "bad answer"])
    assert asked == ["hmm", "bad answer"]
    assert [r["answered_by"] for r in out] == ["student", "teacher", "student", "student"]
    assert out[1]["fields"] == {"tone": "aggressive"} and out[1]["confidence"]["tone"] == 0.2  # the student's confidence
    assert "teacher_error" in out[3] and out[3]["fields"] == out[0]["fields"]  # an invalid teacher answer keeps the student's
    alone = Cascade(FakeStudent(), 0.5).predict(["hmm"])  # no teacher: the student answers, flagged
    assert alone[0]["answered_by"] == "student" and alone[0]["confident"] is False


def test_concurrent_callers_share_a_batch_and_a_full_queue_refuses():
    async def main():
        calls = []
        b = MicroBatcher(lambda xs: calls.append(list(xs)) or [x * 2 for x in xs], "student", 64, 0.05, 5)
        await b.start()
        results = await asyncio.gather(b.submit([1]), b.submit([2, 3]), b.submit([4]))
        assert results == [[2], [4, 6], [8]] and calls == [[1, 2, 3, 4]]
        with pytest.raises(RequestError) as e:
            await b.submit([1] * 6)
        assert e.value.status == 503
        pending = asyncio.ensure_future(b.submit([5]))
        await asyncio.sleep(0)
        await b.close()  # drains what was queued before it stops
        assert await pending == [10]
        with pytest.raises(RequestError):
            await b.submit([1])

    asyncio.run(main())


def test_without_a_window_callers_who_queue_behind_a_running_batch_share_the_next_one():
    started, release = threading.Event(), threading.Event()
    calls = []

    def fn(xs):
        calls.append(list(xs))
        started.set()
        release.wait(30)
        return xs

    async def main():
        b = MicroBatcher(fn, "student", 64, 0.0, 100)
        await b.start()
        first = asyncio.ensure_future(b.submit([1]))  # a lone caller: answered at once, no waiting for company
        while not started.is_set():
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(b.submit([x])) for x in (2, 3, 4)]
        await asyncio.sleep(0.01)
        release.set()
        assert await first == [1] and [await r for r in rest] == [[2], [3], [4]]
        await b.close()

    asyncio.run(main())
    assert calls == [[1], [2, 3, 4]]


def test_a_slow_teacher_never_holds_up_a_confident_answer():
    release = threading.Event()

    def teacher(texts):
        release.wait(30)
        return [{"output": "{}", "fields": {"tone": "neutral"}} for _ in texts]

    async def main():
        service = Service(Cascade(FakeStudent(), 0.5, teacher), ServeConfig(min_confidence=0.5), "m")
        await service.start()
        unsure = asyncio.ensure_future(service.predict(["not certain"]))
        while service.teacher.pending == 0:  # the unsure text is with the (blocked) teacher
            await asyncio.sleep(0.001)
        sure = await service.predict(["sure thing"])
        assert sure[0]["answered_by"] == "student" and not unsure.done()
        release.set()
        assert (await unsure)[0]["answered_by"] == "teacher"
        await service.close()

    asyncio.run(main())


def test_a_port_out_of_range_is_refused_before_the_student_loads(tmp_path):
    for port in ("99999", "-1"):
        r = subprocess.run([sys.executable, "-m", "microdistill.cli", "serve", "--student", str(tmp_path / "nowhere"),
                            "--port", port], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.strip() == f"error: --port must be from 0 to 65535, got {port}", r.stderr


def test_a_decoder_student_cannot_be_served(tmp_path, tiny_tokenizer):
    shards = make_shards(tmp_path / "shards", tiny_tokenizer, n=16)
    out = train(shards, tmp_path / "dec", TrainConfig(student="decoder", preset="nano", max_steps=1), progress=False)
    r = subprocess.run([sys.executable, "-m", "microdistill.cli", "serve", "--student", str(out)],
                       capture_output=True, text=True, timeout=300)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "gives no confidence per field" in lines[0]


# ---- a real server process ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(student: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "microdistill.cli", "serve", "--student", str(student),
                             "--port", str(port), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail("the server did not start")


def scrape(url: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of /metrics, parsed as Prometheus text."""
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def requests_of(m: dict, route: str, status: int) -> float:
    return m.get(("microdistill_requests_total", (("route", route), ("status", str(status)))), 0.0)


TEXTS = make_texts(12, seed=5)


@pytest.fixture(scope="module")
def cascade_server(student_dir, tiny_teacher_dir):
    """A server whose threshold splits TEXTS: the sure half answered by the student, the rest by the teacher."""
    student = load_student(student_dir)
    sure = sorted(min(r["confidence"].values()) for r in Cascade(student).student_answers(TEXTS))
    gaps = [(sure[i + 1] - sure[i], i) for i in range(3, len(sure) - 4)]
    _, i = max(gaps)
    threshold = (sure[i] + sure[i + 1]) / 2
    proc, url = start_server(student_dir, "--teacher", str(tiny_teacher_dir), "--min-confidence", str(threshold))
    yield url, student, threshold
    proc.terminate()
    proc.wait(60)


def test_answers_are_the_students_or_the_teachers(cascade_server, tiny_teacher_dir):
    url, student, threshold = cascade_server
    before = scrape(url)
    r = httpx.post(f"{url}/v1/predict", json={"texts": TEXTS}, timeout=300)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    direct = Cascade(student).student_answers(TEXTS)
    teacher = teacher_for(str(tiny_teacher_dir), student)
    by = [x["answered_by"] for x in results]
    assert by.count("student") >= 4 and by.count("teacher") >= 4
    for text, got, want in zip(TEXTS, results, direct):
        assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-5)
        if min(want["confidence"].values()) >= threshold:
            assert got["answered_by"] == "student" and got["fields"] == want["fields"] and got["output"] == want["output"]
        else:
            alone = teacher([text])[0]  # the teacher labelling this text by itself, unbatched
            assert got["answered_by"] == "teacher" and got["output"] == alone["output"] and got["fields"] == alone["fields"]
    after = scrape(url)
    delta = lambda key: after.get(key, 0.0) - before.get(key, 0.0)  # noqa: E731
    assert delta(("microdistill_answers_total", (("answered_by", "teacher"),))) == by.count("teacher")
    assert delta(("microdistill_answers_total", (("answered_by", "student"),))) == by.count("student")
    assert delta(("microdistill_escalations_total", ())) == by.count("teacher")
    assert requests_of(after, "/v1/predict", 200) - requests_of(before, "/v1/predict", 200) == 1
    assert 0 < after[("microdistill_escalation_ratio", ())] < 1


def test_the_openai_client_talks_to_the_server(cascade_server):
    import openai

    url, student, threshold = cascade_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed")
    assert [m.id for m in client.models.list().data] == [student.task.name]
    direct = Cascade(student).student_answers(TEXTS)
    text, want = next((t, w) for t, w in zip(TEXTS, direct) if min(w["confidence"].values()) >= threshold)
    reply = client.chat.completions.create(model=student.task.name, messages=[
        {"role": "system", "content": "ignored: the student reads the last user message"},
        {"role": "user", "content": text}])
    assert reply.choices[0].message.content == want["output"]
    assert json.loads(reply.choices[0].message.content) == want["fields"]
    n_in, n_out = len(student.tokenizer.encode(text).ids), len(student.tokenizer.encode(want["output"]).ids)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (n_in, n_out, n_in + n_out)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": text}])
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=student.task.name, messages=[{"role": "user", "content": " "}])


def test_a_drop_in_for_the_model_an_application_already_calls(student_dir):
    """--served-model-name: the official client keeps model="gpt-4o-mini", streamed or not, with
    OpenAI's sampling options and a response_format that asks for the task's own schema."""
    import openai

    from microdistill.core.task import load_task

    proc, url = start_server(student_dir, "--served-model-name", "gpt-4o-mini", "--served-model-name", "labeller")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed")
        assert [m.id for m in client.models.list().data] == ["gpt-4o-mini", "labeller"]
        want = Cascade(load_student(student_dir)).student_answers(TEXTS[:1])[0]["output"]
        task = load_task("reddit-comment")
        schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": task.json_schema(), "strict": True}}
        messages = [{"role": "user", "content": TEXTS[0]}]
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=messages, temperature=0.7, top_p=0.9,
                                               seed=1, response_format=schema, user="someone")
        assert reply.choices[0].message.content == want and reply.model == "gpt-4o-mini"
        chunks = list(client.chat.completions.create(model="labeller", messages=messages, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
        assert chunks[-1].choices[0].finish_reason == "stop"
        other = {**schema, "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"mood": {}}}}}
        with pytest.raises(openai.BadRequestError, match="asks for the fields"):
            client.chat.completions.create(model="gpt-4o-mini", messages=messages, response_format=other)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="reddit-comment", messages=messages)  # the names replace the task's
    finally:
        proc.terminate()
        proc.wait(60)


def test_bad_requests_are_json_errors_and_the_server_keeps_answering(cascade_server):
    url, _, _ = cascade_server
    before = scrape(url)
    post = lambda body, **kw: httpx.post(f"{url}/v1/predict", content=body, timeout=60,  # noqa: E731
                                         headers=kw.get("headers", {"content-type": "application/json"}))
    cases = [
        (post(b'{"texts": ["a",'), 400),
        (post(b'{"text": ["a"]}'), 422),
        (post(b'{"texts": "a plain string"}'), 422),
        (post(b'{"texts": [1, 2]}'), 422),
        (post(b'{"texts": []}'), 422),
        (post(b'{"texts": [""]}'), 422),
        (post(json.dumps({"texts": ["x" * 1_000_000]}).encode()), 413),
        (post(json.dumps({"texts": ["x" * 2_000_000]}).encode()), 413),
        (post(b'{"texts": ["fine"]}', headers={"content-type": "text/plain"}), 415),
        (post(b'{"texts": ["\\ud800 lone"]}'), 400),  # JSON allows a lone surrogate; no tokenizer reads one
        (post(b"[" * 50_000), 400),  # nested past the parser's recursion limit
        (httpx.get(f"{url}/v1/nothing-here"), 404),
        (httpx.get(f"{url}/v1/predict"), 405),
    ]
    for response, status in cases:
        assert response.status_code == status, (status, response.text)
        error = response.json()["error"]
        assert error["code"] == status and error["message"] and "\n" not in error["message"]
    for _ in range(20):  # clients that promise a body and hang up half way: their doing, not a server error
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as conn:
            conn.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"texts\": [")
    ok = httpx.post(f"{url}/v1/predict", json={"texts": [TEXTS[0]]}, timeout=300)
    assert ok.status_code == 200 and len(ok.json()["results"]) == 1
    after = scrape(url)
    assert requests_of(after, "/v1/predict", 500) == requests_of(before, "/v1/predict", 500)
    for status in (400, 413, 415, 422):
        want = sum(s == status for r, s in cases if r.request.url.path == "/v1/predict")
        assert requests_of(after, "/v1/predict", status) - requests_of(before, "/v1/predict", status) == want, status
    assert requests_of(after, "other", 404) - requests_of(before, "other", 404) == 1
    assert after[("microdistill_request_seconds_count", (("route", "/v1/predict"),))] >= len(cases) - 1


def test_sigterm_lets_an_in_flight_request_finish(student_dir, tiny_teacher_dir):
    """Every text goes to the teacher (threshold 1), so a request of many texts is in flight for a
    while; SIGTERM then must still answer it, and say it drained it."""
    proc, url = start_server(student_dir, "--teacher", str(tiny_teacher_dir), "--min-confidence", "1.0")
    texts = make_texts(48, seed=7)
    got = {}
    client = threading.Thread(target=lambda: got.update(r=httpx.post(f"{url}/v1/predict", json={"texts": texts},
                                                                      timeout=300)))
    client.start()
    while scrape(url).get(("microdistill_requests_in_flight", ()), 0) < 1:
        assert client.is_alive(), "the request finished before it was seen in flight"
    os.kill(proc.pid, signal.SIGTERM)
    client.join(300)
    _, err = proc.communicate(timeout=120)
    assert got["r"].status_code == 200, got["r"].text
    results = got["r"].json()["results"]
    assert len(results) == len(texts) and all(r["answered_by"] == "teacher" for r in results)
    assert "draining 1 in-flight request(s)" in err
    assert proc.returncode == 0  # a clean drain exits cleanly
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)


def test_the_report_draws_calibration_and_the_coverage_table(student_dir, tmp_path):
    from microdistill.evaluate.config import EvalConfig
    from microdistill.flows.eval import make_report

    shards = student_dir.parent / "shards"
    report = make_report(student_dir, shards, tmp_path, EvalConfig(time_teacher=False, peers=False, consistency_inputs=0),
                         progress=False)
    conf = report["confidence"]
    assert conf["n"] == report["n_eval"] and 0 <= conf["ece_after"] <= 1 and conf["curve"][-1]["coverage"] == 1.0
    assert (tmp_path / report["plots"]["reliability"]).is_file() and (tmp_path / report["plots"]["coverage"]).is_file()
    md = (tmp_path / "report.md").read_text()
    assert f"**{100 * conf['ece_before']:.2f}%** raw and **{100 * conf['ece_after']:.2f}%** after" in md
    p = point_for(conf["curve"], 0.97)
    assert f"| 97% | {'all to the teacher' if p['threshold'] is None else format(p['threshold'], '.3f')} | " \
           f"{100 * p['coverage']:.1f}% | {100 * p['agreement']:.1f}% |" in md
