"""Does the server use its cores? Throughput and latency of `microdistill serve` as clients grow,
beside the same student batched in-process with no HTTP around it, in one run.

    python benchmarks/serve_scaling.py --student runs/default/export [--clients 1,8,32,128] [--seconds 20] \
        [--variant "before=asyncio --batch-window-ms 2" ...] [--texts FILE.jsonl] [--out runs/bench/serve-scaling.json]

1. **Raw**: the student (`load_answerer`, the server's own loader) answers batches of
   --max-batch texts in this process for --seconds: the most the model gives on this machine.
2. **Served**: `microdistill serve` on a free port, then, for each client count, `wrk` (a C load
   generator: one thread, a closed loop per connection, each request one text to /v1/predict,
   cycling through the texts) for --seconds after a short warm-up. wrk runs on the same cores
   as the server; its CPU time is printed as a share of all the CPU the run used, so the cost
   of the load itself is on the page.

Needs `wrk` on PATH (Debian/Ubuntu: `apt-get install wrk`). Texts: the packaged sample comments
unless --texts gives a .jsonl with a "text" field per line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from serve_load import batch_totals, start_server

WRK_SCRIPT = """
local bodies = {}
function init(args)
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
  counter = math.random(#bodies)
end
function request()
  counter = counter % #bodies + 1
  return wrk.format("POST", "/v1/predict", {["Content-Type"] = "application/json"}, bodies[counter])
end
"""


def load_texts(path: Path | None) -> list[str]:
    if path is None:
        from microdistill.data.samples import sample_corpus

        path = sample_corpus()
    return [json.loads(line)["text"] for line in Path(path).read_text().splitlines() if line.strip()]


def raw(student: Path, texts: list[str], batch: int, seconds: float, threads: int | None) -> dict:
    """Texts per second of the student alone, batched, in this process."""
    from microdistill.serve.answerers import load_answerer

    model = load_answerer(student, threads=threads)
    model.predict(texts[:batch], batch_size=batch)  # warm-up
    n, i, t0 = 0, 0, time.perf_counter()
    cpu0 = time.process_time()
    while time.perf_counter() - t0 < seconds:
        chunk = [texts[(i + k) % len(texts)] for k in range(batch)]
        model.predict(chunk, batch_size=batch)
        n, i = n + batch, i + batch
    wall = time.perf_counter() - t0
    one = []
    for k in range(200):  # one text at a time: the latency a lone caller could get
        t1 = time.perf_counter()
        model.predict([texts[k % len(texts)]], batch_size=1)
        one.append((time.perf_counter() - t1) * 1e3)
    return {"texts_per_s": n / wall, "batch": batch, "cpu_s_per_s": (time.process_time() - cpu0) / wall,
            "p50_ms_one": float(np.percentile(one, 50))}


def seconds_of(value: str) -> float:
    """wrk's latency ('812.00us', '3.21ms', '1.02s', '2.00m') in milliseconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    return float(m[1]) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[m[2]]


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of a process and its children that have exited (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def wrk(url: str, bodies: Path, script: Path, clients: int, seconds: float) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = ["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "--timeout", "30s", "--latency", "-s", str(script), url,
           "--", str(bodies)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lat = dict(re.findall(r"^\s*(50|90|99)%\s+(\S+)\s*$", out, re.M))
    if len(lat) < 3:
        sys.exit(f"wrk printed no latency distribution:\n{out}")
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    errors += int(m[1]) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    return {"requests": int(re.search(r"(\d+) requests in", out)[1]),
            "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]),
            "p50_ms": seconds_of(lat["50"]), "p90_ms": seconds_of(lat["90"]), "p99_ms": seconds_of(lat["99"]),
            "max_ms": seconds_of(re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out)[1]), "errors": errors,
            "wrk_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", type=Path, required=True, help="export or student folder to serve")
    ap.add_argument("--texts", type=Path, help=".jsonl with a 'text' per line (default: the packaged sample comments)")
    ap.add_argument("--clients", default="1,8,32,128", help="comma-separated client counts")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--max-batch", type=int, default=64, help="the raw run's batch (the server's --max-batch default)")
    ap.add_argument("--threads", type=int, help="the raw run's runtime threads (default: the runtime's own)")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=FLAGS: a server started with these serve flags (repeatable; default: one with none)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not on PATH (Debian/Ubuntu: apt-get install wrk)")
    texts = load_texts(args.texts)
    base = raw(args.student, texts, args.max_batch, args.seconds, args.threads)
    print(f"raw: {base['texts_per_s']:.0f} texts/s in batches of {args.max_batch}; one text p50 "
          f"{base['p50_ms_one']:.2f} ms", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="serve-scaling-"))
    bodies, script = tmp / "bodies.jsonl", tmp / "requests.lua"
    bodies.write_text("".join(json.dumps({"texts": [t]}) + "\n" for t in texts))
    script.write_text(WRK_SCRIPT)
    variants = [v.partition("=")[::2] for v in args.variant] or [("defaults", "")]
    results = {}
    try:
        for name, serve_args in variants:
            results[name] = served(args, serve_args, base, url_files=(bodies, script))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{os.cpu_count()} CPUs; 1-minute load average at the end {os.getloadavg()[0]:.2f}; raw "
          f"{base['texts_per_s']:.0f} texts/s (batches of {args.max_batch}), one text p50 {base['p50_ms_one']:.2f} ms\n")
    print("| serve | clients | requests/s | of raw | p50 ms | p90 ms | p99 ms | max ms | errors | texts per batch "
          "| server CPU s/s | wrk's share of CPU |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (name, serve_args), rows in zip(variants, results.values()):
        for r in rows:
            print(f"| {name} (`{serve_args}`) | {r['clients']} | {r['requests_per_s']:.0f} | {100 * r['of_raw']:.0f}% | "
                  f"{r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.0f} | {r['errors']} | "
                  f"{r['texts_per_batch']:.1f} | {r['server_cpu_s'] / args.seconds:.2f} | {100 * r['wrk_cpu_share']:.0f}% |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"raw": base, "served": results, "cpus": os.cpu_count()}, indent=2))


def start(student: Path, serve_args: str) -> tuple[subprocess.Popen, str]:
    """`microdistill serve`; flags starting with the word `asyncio` run it on Python's own event loop
    and HTTP parser (uvloop and httptools hidden), as uvicorn runs where they are not installed."""
    words = shlex.split(serve_args)
    if words[:1] != ["asyncio"]:
        return start_server(student, serve_args)
    hide = "import sys; sys.modules['uvloop'] = sys.modules['httptools'] = None; from microdistill.cli import main; main()"
    return start_server(student, shlex.join(words[1:]), python=[sys.executable, "-c", hide])


def served(args, serve_args: str, base: dict, url_files: tuple[Path, Path]) -> list[dict]:
    """One server with `serve_args`, loaded by each client count in turn."""
    bodies, script = url_files
    proc, url = start(args.student, serve_args)
    rows = []
    try:
        for clients in (int(c) for c in args.clients.split(",")):
            wrk(url, bodies, script, clients, args.warmup)  # warm-up: connections, first batches
            batches0 = batch_totals(url)
            server0 = server_cpu(proc.pid)
            row = {"clients": clients, **wrk(url, bodies, script, clients, args.seconds)}
            row["server_cpu_s"] = server_cpu(proc.pid) - server0
            row["texts_per_batch"] = batches_since(url, *batches0)
            row["wrk_cpu_share"] = row["wrk_cpu_s"] / max(row["wrk_cpu_s"] + row["server_cpu_s"], 1e-9)
            row["of_raw"] = row["requests_per_s"] / base["texts_per_s"]
            rows.append(row)
            print(f"{serve_args or 'defaults'}, {clients} clients: {row['requests_per_s']:.0f} requests/s, "
                  f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms", flush=True)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(120)
    return rows


def server_cpu(pid: int) -> float:
    """CPU seconds of the server and its worker processes (children counted while they live)."""
    total = cpu_of(pid)
    for child in Path(f"/proc/{pid}/task").parent.glob("task/*/children"):
        for c in child.read_text().split():
            try:
                total += server_cpu(int(c))
            except FileNotFoundError:
                pass
    return total


def batches_since(url: str, texts0: float, count0: float) -> float:
    """Mean texts per student batch since the totals (texts0, count0), from the server's histogram."""
    texts1, count1 = batch_totals(url)
    return (texts1 - texts0) / (count1 - count0) if count1 > count0 else float("nan")


if __name__ == "__main__":
    main()
