"""Load test of `microdistill serve`: N concurrent clients for a while; throughput, latency, errors, escalations.

    python benchmarks/serve_load.py --student runs/default/student --data runs/default/shards \
        [--clients 8] [--seconds 60] [--serve-args "--target-agreement 0.97"]
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --data runs/default/shards   # a running server

Without --url it starts `microdistill serve` on a free port (with --serve-args), waits for
/health, and stops it with SIGTERM afterwards. Each client posts one input at a time to
/v1/predict, the next as soon as the answer is back (a closed loop), cycling through the
shards' inputs, held-out ones first. The clients run in this process on asyncio, so on a small
machine they share the CPU with the server. "not confident" is the share of answers below the
threshold: the calls a cascade sends to the teacher (answered by it only when the server has one).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from microdistill.data.shards import ShardSet


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(student: Path, serve_args: str, python: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """`microdistill serve` on a free port, once /health answers; `python`: how to start the CLI
    (default `python -m microdistill.cli`)."""
    port = free_port()
    cmd = [*(python or [sys.executable, "-m", "microdistill.cli"]), "serve", "--student", str(student),
           "--port", str(port), *shlex.split(serve_args)]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"the server exited (code {proc.returncode}): {shlex.join(cmd)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("the server did not start within 5 minutes")


async def client(http: httpx.AsyncClient, url: str, texts: list[str], start: int, stop_at: float, warm_until: float,
                 out: dict) -> None:
    i = start
    while (now := time.perf_counter()) < stop_at:
        t0 = now
        try:
            r = await http.post(f"{url}/v1/predict", json={"texts": [texts[i % len(texts)]]})
            ok = r.status_code == 200
            results = r.json()["results"] if ok else []
        except (httpx.HTTPError, ValueError):
            ok, results = False, []
        t1 = time.perf_counter()
        i += 1
        if t0 < warm_until:
            continue  # warm-up: first batches, lazy initialisation
        out["ms"].append((t1 - t0) * 1e3)
        out["errors"] += not ok
        out["texts"] += len(results)
        out["not_confident"] += sum(not x["confident"] for x in results)
        out["teacher"] += sum(x["answered_by"] == "teacher" for x in results)


async def run(url: str, texts: list[str], clients: int, seconds: float, warmup: float) -> dict:
    out = {"ms": [], "errors": 0, "texts": 0, "not_confident": 0, "teacher": 0}
    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(http, url, texts, k * 97, t0 + warmup + seconds, t0 + warmup, out)
                               for k in range(clients)))
    out["seconds"] = seconds
    return out


def batch_totals(url: str) -> tuple[float, float]:
    """(texts, batches) the student has answered so far, from the server's own histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
              for s in f.samples if s.name.startswith("microdistill_student_batch_texts")}
    return values.get("microdistill_student_batch_texts_sum", 0.0), values.get("microdistill_student_batch_texts_count", 0.0)


def batch_mean(url: str) -> float | None:
    """Mean texts per student batch, from the server's own histogram."""
    texts, n = batch_totals(url)
    return texts / n if n else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", type=Path, help="student folder to serve (unless --url)")
    ap.add_argument("--data", type=Path, required=True, help="shard folder whose inputs the clients send")
    ap.add_argument("--url", help="a server already running, e.g. http://127.0.0.1:8000")
    ap.add_argument("--serve-args", default="", help="extra flags for microdistill serve, e.g. '--target-agreement 0.97'")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0, help="measured duration (after --warmup)")
    ap.add_argument("--warmup", type=float, default=3.0)
    args = ap.parse_args()
    if not args.url and not args.student:
        ap.error("give --student (to start a server) or --url")
    shards = ShardSet(args.data)
    texts = [r.text for r in shards.records("val")] + [r.text for r in shards.records("train")]
    proc, url = (None, args.url) if args.url else start_server(args.student, args.serve_args)
    try:
        out = asyncio.run(run(url, texts, args.clients, args.seconds, args.warmup))
        mean_batch = batch_mean(url)
    finally:
        if proc is not None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(120)
    ms = np.array(out["ms"])
    n = len(ms)
    print(f"load: {os.getloadavg()[0]:.2f} (1-min load average at the end, {os.cpu_count()} CPUs)")
    print("| clients | seconds | requests | requests/s | p50 ms | p90 ms | p99 ms | max ms | errors | not confident "
          "| answered by the teacher | texts per student batch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    share = lambda k: f"{100 * out[k] / max(out['texts'], 1):.1f}%"  # noqa: E731
    print(f"| {args.clients} | {args.seconds:g} | {n} | {n / args.seconds:.1f} | {np.percentile(ms, 50):.1f} | "
          f"{np.percentile(ms, 90):.1f} | {np.percentile(ms, 99):.1f} | {ms.max():.1f} | {out['errors']} | "
          f"{share('not_confident')} | {share('teacher')} | {mean_batch:.2f} |" if n else "no requests completed")


if __name__ == "__main__":
    main()
