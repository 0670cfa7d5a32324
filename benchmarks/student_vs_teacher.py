"""The student in PyTorch and as ONNX (float32, int8) against the teacher at its fastest, in one run.

    python benchmarks/student_vs_teacher.py --student runs/default/student --data runs/default/shards
    python benchmarks/student_vs_teacher.py --run runs/default          # the same, from a run folder
    python benchmarks/student_vs_teacher.py --student HEADS --student DECODER --data SHARDS   # both kinds

All models answer the held-out texts of --data. Each is measured in its own fresh process, so
peak memory (the process's peak resident set) and cold start (process start to the first
answer, imports and loading included) are its own: the teacher as it labelled the shards
(bfloat16 when extraction chose it, prompt-prefix KV cache, constrained greedy decoding) on the
first --teacher-inputs texts; each --student (heads or decoder) through predict.predict; its
float32 and int8 exports through runtime.py, whose process never imports torch. Latency is per text at batch 1
after one warm-up call; throughput is --throughput-inputs texts (the held-out ones, repeated)
at batch 64 (the teacher: its texts in one batch). For a heads student a last row runs the int8
export with every input padded to 128 tokens, to show what length bucketing buys. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(kind: str, path: Path, data: Path, texts: list[str], batched: list[str], started: float) -> dict:
    """Load one model, answer once (cold start), then time it; runs in its own process."""
    from microdistill.evaluate.speed import timing

    if kind == "teacher":
        from microdistill.data.shards import ShardSet
        from microdistill.evaluate.speed import teacher_file_bytes
        from microdistill.teachers import load_teacher, recorded_spec
        from microdistill.teachers.labeller import TeacherAnswers

        shards = ShardSet(data)
        m = shards.manifest
        teacher = load_teacher(recorded_spec(m.get("teacher")))
        fn = TeacherAnswers(teacher, shards.task(), m.get("teacher"), [int(i) for i in shards.kept_vocab]).texts
        info = {"dtype": teacher.dtype, "file_bytes": teacher_file_bytes(teacher)}
        batch = len(batched)
    elif kind == "torch":
        from microdistill.students import load_student

        student = load_student(path)
        fn = lambda t: student.predict(t, 64)  # noqa: E731
        info = {"file_bytes": (path / "model.safetensors").stat().st_size}
        batch = 64
    else:
        from microdistill.runtime import load_exported

        exported = load_exported(path)
        fn = (lambda t: exported.predict(t, batch_size=64)) if kind == "onnx" else padded(exported)
        info = {"file_bytes": sum(f.stat().st_size for f in path.glob("*.onnx")), "parity": exported.manifest["parity"]}
        batch = 64
    fn(texts[:1])
    info["cold_start_s"] = time.time() - started
    info.update(timing(fn, texts, batched, batch)[0])
    info["peak_rss_bytes"] = peak_rss()
    info["torch_imported"] = "torch" in sys.modules
    return info


def peak_rss() -> int:
    """This process's peak resident memory. VmHWM starts afresh at exec; ru_maxrss would carry the
    parent's peak over from the fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def padded(exported):
    """Answers with every input padded to the longest the student reads (no length bucketing)."""
    import numpy as np

    def run(texts: list[str]):
        ids = [x[:exported.max_length] for x in exported.encode(texts)]
        for i in range(0, len(ids), 64):
            chunk = ids[i:i + 64]
            x = np.zeros((len(chunk), exported.max_length), np.int64)
            mask = np.zeros_like(x)
            for row, seq in enumerate(chunk):
                x[row, :len(seq)], mask[row, :len(seq)] = seq, 1
            exported.session.run(None, {"input_ids": x, "attention_mask": mask})
        return []  # only the time counts
    return run


def measure(kind: str, path: Path, data: Path, texts: list[str], batched: list[str]) -> dict:
    """Run `worker` in a fresh Python process; cold start counts from just before it is spawned."""
    job = Path(tempfile.mkdtemp()) / "job.json"
    job.write_text(json.dumps({"kind": kind, "path": str(path), "data": str(data), "texts": texts, "batched": batched,
                               "started": time.time()}))
    p = subprocess.run([sys.executable, __file__, "--worker", str(job)], capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", type=Path, action="append", default=[],
                    help="a student folder, heads or decoder (repeatable: each gets its rows)")
    ap.add_argument("--data", type=Path, help="the shard folder it was trained on")
    ap.add_argument("--run", type=Path, help="a run folder: --student RUN/student --data RUN/shards")
    ap.add_argument("--teacher-inputs", type=int, default=16, help="held-out texts the teacher answers (it is slow)")
    ap.add_argument("--throughput-inputs", type=int, default=1024, help="texts each student answers at batch 64")
    ap.add_argument("--exports", type=Path, help="where to write the exports (default: a temporary folder)")
    ap.add_argument("--no-teacher", action="store_true", help="time the students only")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        job = json.loads(args.worker.read_text())
        print(json.dumps(worker(job["kind"], Path(job["path"]), Path(job["data"]), job["texts"], job["batched"],
                                job["started"])))
        return
    # absolute: the workers run from the repository root
    students = [p.resolve() for p in args.student or [args.run / "student"]]
    data = (args.data or args.run / "shards").resolve()

    from microdistill.evaluate.evaluation import eval_split
    from microdistill.export import export
    from microdistill.runtime import ExportError
    from microdistill.data.shards import ShardSet

    shards = ShardSet(data)
    texts = [r.text for r in shards.load(eval_split(shards)[0])]
    batched = (texts * (args.throughput_inputs // len(texts) + 1))[:args.throughput_inputs]
    rows = {}
    if not args.no_teacher:
        few = texts[:args.teacher_inputs]
        rows["teacher"] = measure("teacher", students[0], data, few, few)
    kinds = [json.loads((s / "config.json").read_text()).get("kind", "decoder") for s in students]
    for n, (student, kind) in enumerate(zip(students, kinds)):
        # rows and export folders by kind; numbered when two students are of one kind, so neither overwrites
        label = kind if kinds.count(kind) == 1 else f"{kind}-{n}"
        exports = (args.exports or Path(tempfile.mkdtemp())) / label
        rows[f"{label}, PyTorch"] = measure("torch", student, data, texts, batched)
        try:
            for precision in ("float32", "int8"):
                if not (exports / precision / "export.json").is_file():
                    export(student, exports / precision, quantize=None if precision == "float32" else "int8", data=data)
        except ExportError as e:  # e.g. a body cut from the teacher: timed in PyTorch only
            print(f"{label}: PyTorch only, {e}", file=sys.stderr)
            continue
        rows[f"{label}, ONNX float32"] = measure("onnx", exports / "float32", data, texts, batched)
        rows[f"{label}, ONNX int8"] = measure("onnx", exports / "int8", data, texts, batched)
        if kind == "heads":
            rows[f"{label}, ONNX int8, padded to 128"] = measure("onnx-padded", exports / "int8", data, texts, batched)
    print(table(rows, len(texts), args.teacher_inputs))


def table(rows: dict[str, dict], n: int, n_teacher: int) -> str:
    t = rows.get("teacher")
    ratio = lambda a, b: f"{a / b:,.0f}×" if t and b else "–"  # noqa: E731
    out = [f"{n} held-out inputs (teacher: the first {n_teacher}); ratios are the teacher's figure over the model's "
           "(throughput: the model's over the teacher's)", "",
           "| model | file MB | p50 ms | p95 ms | inputs/s (batch) | peak RSS MB | cold start s | p50 vs teacher | "
           "throughput vs teacher | size vs teacher | parity with PyTorch |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        parity = r.get("parity", {})
        p = parity.get("int8") or parity.get("float32")
        name = f"{name} ({r['dtype']})" if "dtype" in r else name
        out.append(f"| {name}{' (torch imported)' if r['torch_imported'] and 'ONNX' in name else ''} | "
                   f"{(r['file_bytes'] or 0) / 1e6:,.1f} | {r['p50_ms']:,.2f} | {r['p95_ms']:,.2f} | "
                   f"{r['per_s']:,.1f} ({r['batch']}) | {r['peak_rss_bytes'] / 1e6:,.0f} | {r['cold_start_s']:.2f} | "
                   f"{ratio(t['p50_ms'], r['p50_ms']) if t else '–'} | {ratio(r['per_s'], t['per_s']) if t else '–'} | "
                   f"{ratio(t['file_bytes'] or 0, r['file_bytes']) if t else '–'} | "
                   f"{str(p['same']) + '/' + str(p['n']) if p else '–'} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
