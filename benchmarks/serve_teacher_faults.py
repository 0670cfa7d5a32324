"""The cascade under load when its served teacher is slow or down: does the student keep answering?

    python benchmarks/serve_teacher_faults.py --student runs/default/export --tokenizer TOKENIZER_DIR \
        [--min-confidence 0.9] [--clients 8] [--seconds 15] [--delay-s 2]

The teacher is tests/fake_openai.py, a real OpenAI-compatible HTTP server in its own process
(`--tokenizer`: the tokenizer folder it answers in; `--delay-s`: how long the slow teacher
takes per call). `serve --teacher openai:tiny --teacher-url ...` escalates every text whose
least sure field is below --min-confidence. --clients threads post one text at a time
(closed loop, the packaged sample comments) for --seconds per phase:

1. no teacher: the student answers everything (the baseline latency of the student's answers);
2. the teacher up and answering at once;
3. the teacher slow (--delay-s per call): the student's own answers must keep their latency;
4. the teacher down (killed after the server started), `--on-teacher-error student`: no
   request may fail, each escalated text answered `student-fallback`;
5. the same with `--on-teacher-error error`: escalated requests get 503, the rest 200.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from serve_load import free_port, start_server
from serve_scaling import load_texts

ROOT = Path(__file__).resolve().parents[1]


def start_teacher(tokenizer: Path, delay_s: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai.py"), "--port", str(port),
                             "--tokenizer", str(tokenizer), "--delay-s", str(delay_s)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            httpx.get(base + "/stats", timeout=1)
            return proc, base
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    sys.exit("the fake teacher did not start")


def load(url: str, texts: list[str], clients: int, seconds: float) -> dict:
    """Closed-loop clients for `seconds`; each answer's status, latency and who answered."""
    rows: list[tuple[int, float, str]] = []
    stop_at = time.perf_counter() + seconds

    def run(k: int) -> None:
        i = k * 97
        with httpx.Client(timeout=60) as http:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    r = http.post(f"{url}/v1/predict", json={"texts": [texts[i % len(texts)]]})
                    who = r.json()["results"][0]["answered_by"] if r.status_code == 200 else "-"
                    status = r.status_code
                except (httpx.HTTPError, ValueError, KeyError):
                    status, who = 0, "-"
                rows.append((status, (time.perf_counter() - t0) * 1e3, who))
                i += 1

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    student_ms = np.array([ms for status, ms, who in rows if who == "student"] or [np.nan])
    return {"requests": len(rows), "status": dict(Counter(s for s, _, _ in rows)),
            "answered_by": dict(Counter(w for _, _, w in rows)),
            "student_p50_ms": float(np.nanpercentile(student_ms, 50)),
            "student_p99_ms": float(np.nanpercentile(student_ms, 99))}


def phase(name: str, student: Path, flags: str, texts: list[str], args, teacher=None, kill_teacher=False) -> dict:
    proc, url = start_server(student, flags)
    try:
        if kill_teacher:
            teacher.kill()
            teacher.wait()
        out = {"phase": name, "flags": flags, **load(url, texts, args.clients, args.seconds)}
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(120)
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", type=Path, required=True, help="export or student folder of reddit-comment")
    ap.add_argument("--tokenizer", type=Path, required=True, help="tokenizer folder the fake teacher answers in")
    ap.add_argument("--min-confidence", type=float, default=0.9)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--delay-s", type=float, default=2.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    texts = load_texts(None)
    rows = [phase("no teacher", args.student, f"--min-confidence {args.min_confidence}", texts, args)]
    for name, delay, policy, kill in (("teacher up", 0.0, "student", False),
                                      (f"teacher slow ({args.delay_s:g} s a call)", args.delay_s, "student", False),
                                      ("teacher down, --on-teacher-error student", 0.0, "student", True),
                                      ("teacher down, --on-teacher-error error", 0.0, "error", True)):
        teacher, base = start_teacher(args.tokenizer, delay)
        flags = (f"--min-confidence {args.min_confidence} --teacher openai:tiny --teacher-url {base}/v1 "
                 f"--on-teacher-error {policy} --teacher-attempts 1 --teacher-timeout-s 30")
        try:
            rows.append(phase(name, args.student, flags, texts, args, teacher, kill))
        finally:
            teacher.kill()
            teacher.wait()
    print(f"\n{args.clients} clients, {args.seconds:g} s a phase, --min-confidence {args.min_confidence}\n")
    print("| phase | requests | HTTP 200 | HTTP 503 | other failures | answered by the student | by the teacher "
          "| student-fallback | the student's answers: p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s, w = r["status"], r["answered_by"]
        print(f"| {r['phase']} | {r['requests']} | {s.get(200, 0)} | {s.get(503, 0)} | "
              f"{sum(v for k, v in s.items() if k not in (200, 503))} | {w.get('student', 0)} | {w.get('teacher', 0)} | "
              f"{w.get('student-fallback', 0)} | {r['student_p50_ms']:.1f} | {r['student_p99_ms']:.1f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
