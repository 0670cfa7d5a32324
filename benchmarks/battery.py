"""A hostile-but-fair battery: bad input a new user or client sends, on the CLI and over HTTP.

    python benchmarks/battery.py --student runs/default/student --data runs/default/shards --out runs/bench/battery

Works on copies of `--student` and `--data` (made in `--out`, their checkpoints left out), so it
cannot damage them. Every CLI case is a real `microdistill` process expected to refuse: it must
exit non-zero without a traceback, say why in one line (or typer's usage box for a malformed
command line), and leave every folder it was pointed at as it was (no file written, replaced or deleted).
Every HTTP case is sent to a real `serve` process: a client's error must get a 4xx with a JSON
body, never a 5xx, and the server must answer /health after it; at the end /metrics must count
no 5xx. Writes `battery.md` (a row per case) and `battery.jsonl` in `--out`; exits 1 if any case
fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import start_server  # noqa: E402

TIMEOUT_S = 120


def digest(folder: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file below `folder` (a file: itself): a file written,
    replaced or deleted shows."""
    folder = Path(folder)
    paths = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in paths}


def cli_cases(w: Path, student: Path, shards: Path) -> list[tuple[str, list[str], bytes | None, list[Path]]]:
    """(name, arguments, stdin, folders that must stay as they were)."""
    latin1 = w / "latin1.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    a_file = w / "a-file.txt"
    a_file.write_text("not a folder\n")
    flipped = w / "flipped-shards"
    shutil.copytree(shards, flipped)
    shard = sorted(flipped.glob("*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 4096] = bytes(b ^ 0xFF for b in raw[len(raw) // 2: len(raw) // 2 + 4096])
    shard.write_bytes(bytes(raw))
    bad_task = w / "bad-task.yaml"
    bad_task.write_text("name: x\nprompt:\n  user: 'Comment: {text} {other}'\noutput:\n  fields:\n"
                        "  - {name: tone, type: enum, values: [a, b]}\n")
    empty = w / "empty.jsonl"
    empty.write_text("")
    two = w / "two.jsonl"
    two.write_text('{"text": "thanks, this fixed my problem"}\n{"text": "the delivery was late again"}\n')
    other_student = w / "other-student"
    shutil.copytree(student, other_student)
    S, D = str(student), str(shards)
    keep = [student, shards, other_student]
    return [
        ("predict: a latin-1 file", ["predict", "--student", S, "--input", str(latin1)], None, keep),
        ("predict: binary stdin", ["predict", "--student", S, "--input", "-"], bytes(range(256)) * 4, keep),
        ("predict: --batch-size 0", ["predict", "--student", S, "--batch-size", "0", "hello"], None, keep),
        ("predict: a student folder that does not exist", ["predict", "--student", str(w / "nope"), "hi"], None, keep),
        ("predict: a shard folder as the student", ["predict", "--student", D, "hi"], None, keep),
        ("predict: --input a file that does not exist", ["predict", "--student", S, "--input", str(w / "nope.txt")],
         None, keep),
        ("predict: a student of another task", ["predict", "--student", S, "--task", "support-ticket", "hi"], None, keep),
        ("train: --data that does not exist", ["train", "--data", str(w / "nope"), "--out", str(w / "t1")], None, keep),
        ("train: --out an existing file", ["train", "--data", D, "--out", str(a_file)], None, keep + [a_file]),
        ("train: --out the shard folder", ["train", "--data", D, "--out", D], None, keep),
        ("train: --out another student", ["train", "--data", D, "--out", str(other_student)], None, keep),
        ("train: shards with flipped bytes", ["train", "--data", str(flipped), "--out", str(w / "t2")], None,
         keep + [flipped]),
        ("train: --epochs -1", ["train", "--data", D, "--out", str(w / "t3"), "--epochs", "-1"], None, keep),
        ("train: --lr abc", ["train", "--data", D, "--out", str(w / "t4"), "--lr", "abc"], None, keep),
        ("train: --augment 2", ["train", "--data", D, "--out", str(w / "t5"), "--augment", "2"], None, keep),
        ("export: --out the shard folder", ["export", "--student", S, "--out", D], None, keep),
        ("export: --out the student itself", ["export", "--student", S, "--out", S], None, keep),
        ("export: --out another student", ["export", "--student", S, "--out", str(other_student)], None, keep),
        ("export: --out an existing file", ["export", "--student", S, "--out", str(a_file)], None, keep + [a_file]),
        ("export: --quantize int3", ["export", "--student", S, "--out", str(w / "e1"), "--quantize", "int3"], None, keep),
        ("extract: --out an existing file", ["extract", "--input", str(empty), "--out", str(a_file)], None,
         keep + [a_file]),
        ("extract: --out a student folder", ["extract", "--input", str(two), "--out", S], None, keep),
        ("extract: --input that does not exist", ["extract", "--input", str(w / "nope.jsonl"), "--out", str(w / "x1")],
         None, keep),
        ("extract: an unknown task", ["extract", "--input", str(empty), "--out", str(w / "x2"), "--task", "no-such-task"],
         None, keep),
        ("extract: a task with an unknown placeholder",
         ["extract", "--input", str(empty), "--out", str(w / "x3"), "--task", str(bad_task)], None, keep),
        ("extract: --select bogus", ["extract", "--input", str(empty), "--out", str(w / "x4"), "--select", "bogus",
                                     "--budget", "5"], None, keep),
        ("eval: --data that does not exist", ["eval", "--student", S, "--data", str(w / "nope")], None, keep),
        ("eval: a shard folder as the student", ["eval", "--student", D, "--data", D], None, keep),
        ("serve: --port 99999", ["serve", "--student", S, "--port", "99999"], None, keep),
        ("serve: --port -1", ["serve", "--student", S, "--port", "-1"], None, keep),
        ("serve: --traffic an existing file", ["serve", "--student", S, "--traffic", str(a_file)], None,
         keep + [a_file]),
        ("serve: --min-confidence 2", ["serve", "--student", S, "--min-confidence", "2"], None, keep),
        ("update: --input that does not exist",
         ["update", "--student", S, "--input", str(w / "nope.jsonl"), "--out", str(w / "u1")], None, keep),
        ("update: --out the student itself", ["update", "--student", S, "--input", str(empty), "--out", S], None, keep),
        ("inspect: a folder that does not exist", ["inspect", str(w / "nope")], None, keep),
        ("calibrate-confidence: a shard folder as the student", ["calibrate-confidence", "--student", D], None, keep),
        ("an unknown verb", ["distill-everything"], None, keep),
    ]


def run_cli(name: str, args: list[str], stdin: bytes | None, guarded: list[Path]) -> dict:
    before = {str(p): digest(p) for p in guarded}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "microdistill", *args], input=stdin or b"", capture_output=True,
                              timeout=TIMEOUT_S, env={**os.environ, "COLUMNS": "120"})
        code, err = proc.returncode, proc.stderr.decode(errors="replace")
    except subprocess.TimeoutExpired:
        code, err = None, f"still running after {TIMEOUT_S} s"
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("[", "loading "))]  # not progress
    usage = any("Usage:" in line for line in lines)  # typer's box for a malformed command line
    damaged = [p for p, d in before.items() if digest(Path(p)) != d]
    problems = []
    if code in (0, None):
        problems.append("accepted" if code == 0 else "hung")
    if "Traceback" in err:
        problems.append("traceback")
    if not usage and len(lines) != 1:
        problems.append(f"{len(lines)} lines on stderr")
    if damaged:
        problems.append("changed " + ", ".join(damaged))
    return {"case": name, "kind": "cli", "exit": code, "message": lines[-1][:200] if lines else "",
            "seconds": round(time.perf_counter() - t0, 1), "ok": not problems, "problems": problems}


def http_cases(big: int) -> list[tuple[str, str, str, bytes, dict]]:
    """(name, method, path, body, headers); every one a client's error except where the name says 'valid'."""
    j = {"content-type": "application/json"}
    chat = {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}
    return [
        ("predict: not JSON", "POST", "/v1/predict", b"texts=hello", j),
        ("predict: a lone surrogate", "POST", "/v1/predict", b'{"texts": ["\\ud800"]}', j),
        ("predict: JSON nested 50,000 deep", "POST", "/v1/predict", b"[" * 50_000 + b"]" * 50_000, j),
        ("predict: invalid UTF-8", "POST", "/v1/predict", b'{"texts": ["\xff\xfe"]}', j),
        ("predict: an empty body", "POST", "/v1/predict", b"", j),
        ("predict: null", "POST", "/v1/predict", b"null", j),
        ("predict: no texts", "POST", "/v1/predict", b"{}", j),
        ("predict: an empty list", "POST", "/v1/predict", b'{"texts": []}', j),
        ("predict: texts that are numbers", "POST", "/v1/predict", b'{"texts": [1, 2]}', j),
        ("predict: a text over the character cap", "POST", "/v1/predict",
         json.dumps({"texts": ["a" * 10_001]}).encode(), j),
        ("predict: more texts than the cap", "POST", "/v1/predict", json.dumps({"texts": ["hi"] * 257}).encode(), j),
        ("predict: a body over the byte cap", "POST", "/v1/predict", json.dumps({"texts": ["x" * big]}).encode(), j),
        ("predict: GET", "GET", "/v1/predict", b"", {}),
        ("chat: an unknown model", "POST", "/v1/chat/completions", json.dumps(chat).encode(), j),
        ("chat: no messages", "POST", "/v1/chat/completions", b'{"model": "x"}', j),
        ("chat: messages not a list", "POST", "/v1/chat/completions", b'{"model": "x", "messages": "hi"}', j),
        ("chat: n = 3", "POST", "/v1/chat/completions", None, j),
        ("chat: a response_format of another schema", "POST", "/v1/chat/completions", None, j),
        ("an unknown route", "POST", "/v1/embeddings", b'{"input": "hi"}', j),
        ("valid: predict", "POST", "/v1/predict", b'{"texts": ["thanks, this fixed it"]}', j),
        ("valid: chat, streamed", "POST", "/v1/chat/completions", None, j),
    ]


def fill(name: str, body: bytes | None, model: str) -> bytes:
    """The bodies that need the served model's name."""
    user = [{"role": "user", "content": "you are an idiot"}]
    if name == "chat: n = 3":
        return json.dumps({"model": model, "messages": user, "n": 3}).encode()
    if name.startswith("chat: a response_format"):
        schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        return json.dumps({"model": model, "messages": user, "response_format": {
            "type": "json_schema", "json_schema": {"name": "city", "schema": schema}}}).encode()
    if name == "valid: chat, streamed":
        return json.dumps({"model": model, "messages": user, "stream": True}).encode()
    return body


def cut_bodies(url: str, n: int) -> None:
    """`n` clients that announce a body, send part of it and close the connection."""
    host, port = url.removeprefix("http://").split(":")
    for _ in range(n):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"texts\": [\"hal")


def run_http(url: str, model: str, big: int) -> list[dict]:
    rows = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for name, method, path, body, headers in http_cases(big):
            r = http.request(method, path, content=fill(name, body, model), headers=headers)
            try:
                r.json() if "stream" not in name else None
                json_body = True
            except ValueError:
                json_body = False
            healthy = http.get("/health").status_code == 200
            want_ok = name.startswith("valid")
            problems = []
            if want_ok and r.status_code != 200:
                problems.append(f"status {r.status_code}")
            if not want_ok and not 400 <= r.status_code < 500:
                problems.append(f"status {r.status_code}")
            if not json_body:
                problems.append("not a JSON body")
            if name == "valid: chat, streamed" and not r.text.rstrip().endswith("data: [DONE]"):
                problems.append("no [DONE] event")
            if not healthy:
                problems.append("unhealthy after")
            rows.append({"case": name, "kind": "http", "status": r.status_code, "message": r.text[:160].replace("\n", " "),
                         "ok": not problems, "problems": problems})
        cut_bodies(url, 50)
        time.sleep(1)
        metrics = http.get("/metrics").text
        five = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("microdistill_requests_total{") and 'status="5' in line)
        healthy = http.get("/health").status_code == 200
        rows.append({"case": "50 clients that close mid-body, then /metrics", "kind": "http", "status": None,
                     "message": f"5xx counted: {five:g}", "ok": five == 0 and healthy,
                     "problems": ([f"{five:g} 5xx counted"] if five else []) + ([] if healthy else ["unhealthy after"])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", type=Path, required=True, help="a classifier-head student folder")
    ap.add_argument("--data", type=Path, required=True, help="the shard folder it was trained on")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out / "work", ignore_errors=True)
    w = args.out / "work"
    w.mkdir(parents=True)
    student, shards = w / "student", w / "shards"
    shutil.copytree(args.student, student, ignore=shutil.ignore_patterns("checkpoint"))
    shutil.copytree(args.data, shards)
    rows = []
    for case in cli_cases(w, student, shards):
        rows.append(run_cli(*case))
        r = rows[-1]
        print(f"{'ok ' if r['ok'] else 'BAD'} cli  {r['case']}: exit {r['exit']}, {r['message'][:100]}", flush=True)
    proc, url = start_server(student, "--max-body-bytes 100000")
    try:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        for r in run_http(url, model, 200_000):
            rows.append(r)
            print(f"{'ok ' if r['ok'] else 'BAD'} http {r['case']}: {r['status']}, {r['message'][:100]}", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    rows.append({"case": "serve: SIGTERM after a clean drain", "kind": "http", "status": proc.returncode,
                 "message": f"exit {proc.returncode}", "ok": proc.returncode == 0,
                 "problems": [] if proc.returncode == 0 else [f"exit {proc.returncode}"]})
    bad = [r for r in rows if not r["ok"]]
    with open(args.out / "battery.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    cli, http = [r for r in rows if r["kind"] == "cli"], [r for r in rows if r["kind"] == "http"]
    lines = [f"{len(rows) - len(bad)} of {len(rows)} cases as they should be: {sum(r['ok'] for r in cli)}/{len(cli)} "
             f"on the CLI, {sum(r['ok'] for r in http)}/{len(http)} over HTTP.", "",
             "| case | exit / status | what it said | as it should be |", "|---|---|---|---|"]
    for r in rows:
        said = r["message"].replace("|", "\\|")[:140]
        lines.append(f"| {r['kind']}: {r['case']} | {r.get('exit', r.get('status'))} | {said} | "
                     f"{'yes' if r['ok'] else 'NO: ' + ', '.join(r['problems'])} |")
    (args.out / "battery.md").write_text("\n".join(lines) + "\n")
    shutil.rmtree(w, ignore_errors=True)
    print(lines[0])
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
