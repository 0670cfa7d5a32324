"""Learning from served calls: the traffic a server keeps (`serve --traffic`), and a new student
swapped in under load (SIGHUP) without a failed call. Real server processes, real HTTP clients."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import httpx
import pytest
from synthetic import make_shards, make_texts
from test_serve import scrape, start_server

from microdistill.core.task import load_task
from microdistill.serve.traffic import TrafficError, TrafficLog, read_traffic
from microdistill.students import load_student
from microdistill.train import TrainConfig, train

CFG = TrainConfig(student="heads", max_steps=3, batch_size=8)
TEXTS = make_texts(40, seed=13)


@pytest.fixture(scope="module")
def students(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("traffic")
    shards = make_shards(root / "shards", tiny_tokenizer, n=48)
    a = train(shards, root / "a", CFG, progress=False)
    b = train(shards, root / "b", TrainConfig(**{**CFG.to_dict(), "seed": 5, "max_steps": 6}), progress=False)
    return a, b


def test_every_acknowledged_call_is_in_the_traffic_log_even_after_a_kill(students, tmp_path):
    a, _ = students
    traffic = tmp_path / "traffic"
    proc, url = start_server(a, "--traffic", str(traffic))
    answered = []
    try:
        for i in range(0, len(TEXTS), 4):
            r = httpx.post(f"{url}/v1/predict", json={"texts": TEXTS[i:i + 4]}, timeout=60)
            assert r.status_code == 200
            answered += r.json()["results"]
        assert scrape(url)[("microdistill_traffic_records_total", (("outcome", "kept"),))] == len(TEXTS)
    finally:
        proc.send_signal(signal.SIGKILL)  # no drain, no close: what was acknowledged must be on disk
        proc.wait(30)
    records = list(read_traffic(traffic, load_task("reddit-comment")))
    assert [r["text"] for r in records] == TEXTS
    for rec, ans in zip(records, answered):
        assert (rec["fields"], rec["output"], rec["answered_by"]) == (ans["fields"], ans["output"], ans["answered_by"])
        assert rec["confidence"] == pytest.approx(ans["confidence"])
    # a line cut by a kill mid-write is skipped, not an error
    with open(next(traffic.glob("traffic-*.jsonl")), "ab") as f:
        f.write(b'{"at": 1, "text": "cut sho')
    assert len(list(read_traffic(traffic))) == len(TEXTS)


def test_a_traffic_folder_of_another_task_or_kind_is_refused(tmp_path):
    task, other = load_task("reddit-comment"), load_task("support-ticket")
    log = TrafficLog(tmp_path / "t", task, sample=0.5, seed=1)
    log.record(TEXTS, [{"output": "{}", "fields": {}, "confidence": {}, "answered_by": "student"}] * len(TEXTS))
    log.close()
    assert 0 < log.written < len(TEXTS)  # the sample kept about half
    with pytest.raises(TrafficError, match="holds the traffic of task 'reddit-comment', not 'support-ticket'"):
        TrafficLog(tmp_path / "t", other)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(TrafficError, match="holds other files and no traffic.json"):
        TrafficLog(tmp_path / "x", task)
    capped = TrafficLog(tmp_path / "c", task, max_bytes=300)
    capped.record(TEXTS, [{"output": "{}", "fields": {}, "confidence": {}, "answered_by": "student"}] * len(TEXTS))
    assert capped.written >= 1 and capped.dropped == len(TEXTS) - capped.written
    assert sum(p.stat().st_size for p in (tmp_path / "c").glob("traffic-*.jsonl")) <= 300


def test_a_new_student_is_swapped_in_under_load_without_a_failed_call(students, tmp_path):
    """Eight clients call without pause; the folder is replaced by another student and SIGHUP sent:
    every call succeeds, later calls get the new student's answers, /v1/models names the folder."""
    a, b = students
    folder = tmp_path / "serving"
    shutil.copytree(a, folder, ignore=shutil.ignore_patterns("checkpoint"))
    proc, url = start_server(folder)
    failures, done = [], threading.Event()

    def client(k: int) -> None:
        with httpx.Client(timeout=60) as c:
            while not done.is_set():
                r = c.post(f"{url}/v1/predict", json={"texts": TEXTS[k:k + 3]})
                if r.status_code != 200:
                    failures.append(r.status_code)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        for name in ("model.safetensors", "tokenizer.json", "task.yaml", "calibration.json", "config.json"):
            shutil.copyfile(b / name, folder / name)  # config.json last, as training writes it
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 60
        while scrape(url).get(("microdistill_student_reloads_total", ()), 0) < 1:
            assert time.monotonic() < deadline, "the server did not reload"
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        done.set()
        for t in threads:
            t.join(60)
    try:
        assert failures == []
        want = load_student(b).predict(TEXTS[:6])
        got = httpx.post(f"{url}/v1/predict", json={"texts": TEXTS[:6]}, timeout=60).json()["results"]
        assert [g["confidence"] for g in got] == [pytest.approx(w["confidence"], abs=1e-5) for w in want]
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["root"] == str(folder)
    finally:
        proc.terminate()
        proc.wait(60)
    assert json.loads((folder / "config.json").read_text())["model_sha256"] == \
        json.loads((b / "config.json").read_text())["model_sha256"]
