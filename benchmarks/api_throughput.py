"""Extraction throughput through vLLM at 1, 4 and 16 calls in flight against the in-process teacher.

    scripts/vllm_server.sh serve &                     # vLLM (CPU, float32) serving the default teacher
    python benchmarks/api_throughput.py --url http://127.0.0.1:8011/v1 --n 32

Every configuration labels the same first N sample comments into its own shard folder through
the real extraction (extract.extract: the API teacher's thread pool, or the in-process teacher's
batched, prompt-cached decoding at batch 16), after a warm-up call. Rates are the manifests'
examples/s (labelling only: neither loading the teacher nor, in-process, calibrating it).
Prints examples/s, answer tokens/s, whether the answers equal the in-process teacher's, and
each rate as a ratio of the in-process one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from microdistill.extract import ExtractConfig, extract
from microdistill.data.samples import sample_corpus
from microdistill.data.shards import ShardSet
from microdistill.teachers import DEFAULT_TEACHER


def run(corpus: Path, out: Path, cfg: ExtractConfig) -> tuple[dict, dict[str, str]]:
    t0 = time.perf_counter()
    shards = ShardSet(extract(corpus, out, cfg, progress=False))
    timings = {**shards.manifest["timings"], "wall_s": time.perf_counter() - t0}
    return timings, {r.id: r.output_text for r in shards.records()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="the vLLM server's OpenAI base URL")
    ap.add_argument("--model", default=DEFAULT_TEACHER, help="its served model name")
    ap.add_argument("--n", type=int, default=32, help="sample comments labelled per configuration")
    ap.add_argument("--concurrency", default="1,4,16")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "comments.jsonl"
        rows = [json.loads(line) for line in Path(sample_corpus()).read_text().splitlines()[: args.n]]
        corpus.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
        warm = Path(tmp) / "warm.jsonl"
        warm.write_text(json.dumps({"text": "a warm-up comment about nothing much"}) + "\n")
        api = ExtractConfig(teacher=f"openai:{args.model}", teacher_url=args.url, calibration=args.n)
        run(warm, Path(tmp) / "warm", api)  # the server's first request compiles and allocates

        results: dict[str, tuple[dict, dict[str, str]]] = {}
        local = ExtractConfig(teacher=DEFAULT_TEACHER, calibration=16, hidden_layer="none")
        results["in-process, batch 16"] = run(corpus, Path(tmp) / "local", local)
        for c in (int(x) for x in args.concurrency.split(",")):
            cfg = ExtractConfig(**{**api.to_dict(), "concurrency": c})
            results[f"vLLM, {c} in flight"] = run(corpus, Path(tmp) / f"api-{c}", cfg)

    base_rate, base_answers = results["in-process, batch 16"][0]["examples_per_s"], results["in-process, batch 16"][1]
    print(f"{'configuration':24s} {'examples/s':>10s} {'tokens/s':>9s} {'wall s':>7s} {'same answers':>13s} {'vs in-process':>13s}")
    for name, (t, answers) in results.items():
        same = sum(answers.get(k) == v for k, v in base_answers.items())
        print(f"{name:24s} {t['examples_per_s']:10.3f} {t['tokens_per_s']:9.1f} {t['wall_s']:7.1f} "
              f"{same:>6d}/{len(base_answers):<6d} {t['examples_per_s'] / base_rate:12.2f}x")


if __name__ == "__main__":
    main()
