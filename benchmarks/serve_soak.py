"""Kill `microdistill serve --traffic` with SIGKILL under load, again and again: every call a client
got an answer for must be in the traffic log, and the log must stay readable.

    python benchmarks/serve_soak.py --student runs/default/export [--kills 20] [--clients 8] [--seed 0] \
        [--out runs/bench/serve-soak.json]

Each round starts the server on a free port with a traffic folder shared by all rounds, lets
--clients threads post one text at a time to /v1/predict (a closed loop, cycling through the
packaged sample comments), and kills the server with SIGKILL after a random 2–8 s. Every answer
a client received (HTTP 200) is acknowledged; after the last round the log is read back with
`read_traffic`, as `microdistill update` reads it, and each acknowledged (text, answer) must be
there. Records of calls whose answer never reached the client (the kill fell between the write
and the reply) are counted, not an error: the log may hold more than was acknowledged, never less.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from serve_load import start_server
from serve_scaling import load_texts


def clients(url: str, texts: list[str], n: int, acknowledged: list, stop: threading.Event) -> list[threading.Thread]:
    def run(k: int) -> None:
        i = k * 97
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                text = texts[i % len(texts)]
                i += 1
                try:
                    r = http.post(f"{url}/v1/predict", json={"texts": [text]})
                except httpx.HTTPError:
                    return  # the server is gone: this round is over for this client
                if r.status_code == 200:
                    acknowledged.append((text, r.json()["results"][0]["output"]))

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    return threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", type=Path, required=True, help="export or student folder to serve")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the result as JSON here too")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    texts = load_texts(None)
    traffic = Path(tempfile.mkdtemp(prefix="serve-soak-")) / "traffic"
    acknowledged: list[tuple[str, str]] = []
    try:
        for k in range(args.kills):
            proc, url = start_server(args.student, f"--traffic {traffic}")
            stop = threading.Event()
            threads = clients(url, texts, args.clients, acknowledged, stop)
            time.sleep(rng.uniform(2.0, 8.0))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            stop.set()
            for t in threads:
                t.join(60)
            print(f"kill {k + 1}/{args.kills}: {len(acknowledged)} answers acknowledged so far", flush=True)
        from microdistill.serve.traffic import read_traffic

        logged = Counter((r["text"], r["output"]) for r in read_traffic(traffic))
        files = sorted(traffic.glob("traffic-*.jsonl"))
        torn = sum(1 for f in files if (b := f.read_bytes()) and not b.endswith(b"\n"))
    finally:
        shutil.rmtree(traffic.parent, ignore_errors=True)
    acked = Counter(acknowledged)
    lost = sum((acked - logged).values())
    result = {"kills": args.kills, "clients": args.clients, "acknowledged": len(acknowledged),
              "records": sum(logged.values()), "lost": lost, "files": len(files), "cut_last_lines": torn,
              "logged_not_acknowledged": sum((logged - acked).values())}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    if lost:
        raise SystemExit(f"{lost} acknowledged answers are missing from the traffic log")


if __name__ == "__main__":
    main()
