"""Evaluation: how closely and how fast the student does the teacher's job.

    microdistill eval --student runs/demo/student --data runs/demo/shards

On the held-out split of the shards (the train split, with a warning, when nothing is held
out) it measures agreement with the teacher: teacher-forced token accuracy, free-running exact
match of the whole object, agreement and a confusion matrix per field, JSON validity with and
without the grammar, and, where the shards carry human labels, the accuracy of teacher and
student against them. Teacher and student are then timed in the same process on the same
inputs (constrained generation for both), beside their sizes and memory. Everything lands in
`out_dir` as report.json (the numbers), report.md and PNG plots (report.py).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from microdistill.store import Record, ShardSet, StoreError

INVALID = "(invalid)"  # the confusion-matrix column of outputs that are not a valid object
TIMING_SAMPLE = 16  # the teacher is slow on a CPU; a few inputs give a stable median
SURE = 0.8  # the teacher's probability of its least sure value above which it counts as sure


class EvalError(ValueError):
    """An evaluation input that cannot be used; the message is one line for the user."""


# ---- agreement --------------------------------------------------------------------------------
def confusion(reference: Sequence[Any], predicted: Sequence[Any], labels: Sequence[str] | None = None) -> dict:
    """Counts of (reference, predicted) pairs: matrix[i][j] = #(reference == labels[i], predicted == labels[j]).

    Rows are the teacher's values, columns the student's. A predicted value outside `labels`
    (None for an invalid output) is counted in an extra INVALID column, added only when needed.
    """
    labels = list(labels) if labels is not None else sorted({str(v) for v in reference})
    index = {v: i for i, v in enumerate(labels)}
    cols = labels + ([INVALID] if any(p not in index for p in predicted) else [])
    matrix = np.zeros((len(labels), len(cols)), dtype=np.int64)
    for r, p in zip(reference, predicted, strict=True):
        if r not in index:
            raise ValueError(f"reference value {r!r} is not one of the labels {labels}")
        matrix[index[r], index.get(p, len(labels))] += 1
    return {"labels": labels, "columns": cols, "matrix": matrix.tolist()}


def agreement(reference: Sequence[Any], predicted: Sequence[Any]) -> float:
    """Fraction of positions where the two sequences hold the same value."""
    if len(reference) != len(predicted):
        raise ValueError(f"{len(reference)} references but {len(predicted)} predictions")
    return sum(r == p for r, p in zip(reference, predicted)) / max(len(reference), 1)


def field_agreement(task, teacher: Sequence[dict], student: Sequence[dict | None]) -> dict[str, dict]:
    """Per output field: agreement with the teacher, and its confusion matrix for enum fields.

    `student` holds the parsed fields of each output, or None where the output is invalid
    (which then disagrees on every field).
    """
    from microdistill.task import EnumField

    out: dict[str, dict] = {}
    for f in task.output.fields:
        ref = [t[f.name] for t in teacher]
        pred = [s.get(f.name) if s is not None else None for s in student]
        entry: dict[str, Any] = {"agreement": agreement(ref, pred), "confusion": None}
        if isinstance(f, EnumField):
            entry["confusion"] = confusion(ref, pred, f.values)
        out[f.name] = entry
    return out


def _same_label(value: Any, label: Any) -> bool:
    # Human labels come from spreadsheets: "Positive " and "positive" are the same answer.
    return str(value).strip().casefold() == str(label).strip().casefold()


def human_accuracy(records: Sequence[Record], student: Sequence[dict | None]) -> dict[str, dict]:
    """Accuracy of the teacher (the shards' fields) and the student against human labels,
    per labelled field, over the records that carry a label for it."""
    out: dict[str, dict] = {}
    for r, s in zip(records, student, strict=True):
        for name, label in (r.labels or {}).items():
            if label is None or str(label).strip() == "" or name not in r.fields:
                continue
            acc = out.setdefault(name, {"teacher": 0, "student": 0, "n": 0})
            acc["n"] += 1
            acc["teacher"] += _same_label(r.fields[name], label)
            acc["student"] += s is not None and name in s and _same_label(s[name], label)
    return {k: {"teacher_acc": v["teacher"] / v["n"], "student_acc": v["student"] / v["n"], "n": v["n"]}
            for k, v in out.items()}


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n: how far a held-out accuracy may be from
    the one on unseen inputs (on 93 examples, 83% means anything from 74% to 89%)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def teacher_certainty(task, record: Record) -> float | None:
    """The teacher's probability of its own least sure enum value (from the shards' decision
    points), or None when the record has none."""
    probs = []
    for f in task.enum_fields:
        d = record.decisions.get(f.name)
        value = record.fields.get(f.name)
        if d is None or value not in f.values:
            continue
        probs.append(float(d[f.values.index(value)]))
    return min(probs) if probs else None


def exact_by_certainty(task, records: Sequence[Record], student: Sequence[dict | None],
                       threshold: float = SURE) -> list[dict] | None:
    """Student-only exact match where the teacher was sure of every field (its least sure value
    >= threshold) and where it was not. Disagreements cluster where the teacher hesitates: there
    its own choice is close to a coin toss. None when the shards hold no decision points."""
    sure = [teacher_certainty(task, r) for r in records]
    if any(c is None for c in sure) or not records:
        return None
    rows = []
    for name, keep in ((f"teacher sure (every field ≥ {threshold:.0%})", lambda c: c >= threshold),
                       (f"teacher unsure (some field < {threshold:.0%})", lambda c: c < threshold)):
        hits = [s == r.fields for r, s, c in zip(records, student, sure, strict=True) if keep(c)]
        rows.append({"group": name, "n": len(hits), "exact": sum(hits) / len(hits) if hits else None})
    return rows


def valid_rate(predictions: Sequence[dict]) -> float:
    return sum(bool(p["valid"]) for p in predictions) / max(len(predictions), 1)


# ---- speed and memory ---------------------------------------------------------------------------
def timing(fn: Callable[[list[str]], Any], texts: list[str]) -> tuple[dict[str, float], Any]:
    """Latency of `fn` on one text at a time (p50/p95 ms) and its throughput on all texts at once;
    returns those figures and what the batched call returned.

    One warm-up call first, so lazy initialisation (grammar compilation, caches) is not timed.
    """
    fn(texts[:1])
    ms = []
    for t in texts:
        t0 = time.perf_counter()
        fn([t])
        ms.append((time.perf_counter() - t0) * 1e3)
    t0 = time.perf_counter()
    outputs = fn(list(texts))
    batched_s = time.perf_counter() - t0
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "per_s": len(texts) / batched_s, "n": len(texts), "batch": len(texts)}, outputs


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """Peak growth of resident memory while the block runs, sampled every few milliseconds.

    Torch allocates outside Python's allocator, so tracemalloc cannot see model memory;
    the process's resident set can.
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s, self.peak, self.start = interval_s, 0, 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def weights_bytes(model) -> int:
    """Bytes the parameters and buffers take in memory."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def teacher_file_bytes(teacher) -> int | None:
    """Size on disk of what the teacher ships as: its GGUF file, or its folder's weight files."""
    from microdistill.teacher import PRESETS, cache_root

    src = teacher.source or ""
    if src.startswith("preset:"):
        path = cache_root() / PRESETS[src.split(":", 1)[1]].file
    else:
        path = Path(src)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    return None


def student_runner(student) -> Callable[[list[str]], list[dict]]:
    from microdistill.predict import predict

    return lambda texts: predict(student, texts, constrain=True, batch_size=max(len(texts), 1))


def teacher_runner(teacher, task, kept: Sequence[int] | None) -> Callable[[list[str]], list[str]]:
    """Constrained greedy generation with the teacher, as extraction runs it; returns output texts."""
    from microdistill.constrain import Grammar
    from microdistill.generation import Decoder

    grammar = Grammar(task, teacher.tokenizer, teacher.vocab_size, teacher.eos_id, allowed=kept)
    decoder = Decoder(teacher, task, grammar)

    def run(texts: list[str]) -> list[str]:
        batch = decoder.generate([decoder.rest_ids(t) for t in texts], task.output.max_tokens)
        return [teacher.tokenizer.decode([i for i in g.output_ids if i != teacher.eos_id]) for g in batch.rows]

    return run


# ---- the evaluation -------------------------------------------------------------------------------
def manifest_teacher(data_dir: Path) -> str | None:
    """The teacher spec that made the shards (a preset name or a path), if one is recorded."""
    teacher = ShardSet(data_dir).manifest.get("teacher") or {}
    source = str(teacher.get("source") or "")
    if source.startswith("preset:"):
        return source.split(":", 1)[1]
    return source or teacher.get("name") or None


def eval_split(shards: ShardSet) -> tuple[str, list[str]]:
    """The split to evaluate on: held out if there is any, else train with a warning."""
    if any(s.get("n_val", 0) > 0 for s in shards.manifest["shards"]):
        return "val", []
    if len(shards) == 0:
        raise StoreError(f"shard folder {shards.dir}: no examples to evaluate on")
    return "train", [f"shard folder {shards.dir} holds no held-out examples: evaluated on the train split, "
                     "which the student has seen, so these scores overstate it"]


def check_pair(student, shards: ShardSet) -> None:
    """The student must have been trained on shards of the same task and vocabularies."""
    where = f"student {student.path} and shard folder {shards.dir}"
    if student.task.fingerprint() != shards.task().fingerprint():
        raise EvalError(f"{where} are for different tasks ({student.task.name!r} vs {shards.task().name!r}); "
                        "evaluate on the shards the student was trained on")
    if not (np.array_equal(student.kept, shards.kept_vocab) and np.array_equal(student.input_vocab, shards.input_vocab)):
        raise EvalError(f"{where} use different vocabularies (shards from another extraction); "
                        "evaluate on the shards the student was trained on")


def quality(student, shards: ShardSet, split: str, limit: int | None, batch_size: int) -> tuple[dict, list[Record]]:
    """Agreement with the teacher on the first `limit` examples of `split`, and those examples."""
    from microdistill.predict import predict
    from microdistill.train import evaluate_epoch, load_split

    # Token accuracy and exact match come from the trainer's own held-out evaluation, so the
    # report and the training log measure the same thing the same way.
    examples, records = load_split(shards, split, False, limit)
    head = evaluate_epoch(student, examples, records, batch_size)
    texts = [r.text for r in records]
    constrained = predict(student, texts, constrain=True, batch_size=batch_size)
    free = predict(student, texts, constrain=False, batch_size=batch_size)
    student_fields = [p["fields"] for p in constrained]
    n_exact = round(head["val_exact_match"] * len(records))
    result = {
        "student_only_exact": head["val_exact_match"],
        "student_only_exact_ci95": list(wilson_interval(n_exact, len(records))),
        "exact_by_teacher_certainty": exact_by_certainty(student.task, records, student_fields),
        "teacher_forced_token_acc": head["val_token_acc"],
        "valid_json_constrained": valid_rate(constrained),
        "valid_json_unconstrained": valid_rate(free),
        "fields": field_agreement(student.task, [r.fields for r in records], student_fields),
        "human": human_accuracy(records, student_fields),
    }
    return result, records


@dataclass
class Timed:
    """One model's measurements: speed (see `timing`), parameters, bytes on disk, memory."""

    name: str
    speed: dict
    params: int
    file_bytes: int | None
    rss_bytes: int
    weights_bytes: int
    outputs: list


def time_student(student_dir: Path, shards: ShardSet, texts: list[str]):
    """Load, check and time the student under one memory measurement; returns (student, Timed)."""
    from microdistill.saved import load_student
    from microdistill.student import count_parameters

    with PeakMemory() as mem:
        student = load_student(student_dir)
        check_pair(student, shards)
        speed, _ = timing(student_runner(student), texts)
    file_bytes = (Path(student_dir) / "model.safetensors").stat().st_size
    return student, Timed("student", speed, count_parameters(student.model), file_bytes, mem.growth,
                          weights_bytes(student.model), [])


def time_teacher(spec: str, shards: ShardSet, texts: list[str], notes: list[str]) -> Timed:
    """Load and time a teacher under one memory measurement, on the kept vocabulary if it is the shards' teacher."""
    from microdistill.teacher import load_teacher

    with PeakMemory() as mem:
        teacher = load_teacher(spec)
        same_tokenizer = teacher.tokenizer_sha256 == (shards.manifest.get("teacher") or {}).get("tokenizer_sha256")
        if not same_tokenizer:
            notes.append(f"teacher {spec!r} has another tokenizer than the shards' teacher: it was timed with "
                         "its own full vocabulary instead of the kept one")
        run = teacher_runner(teacher, shards.task(), [int(i) for i in shards.kept_vocab] if same_tokenizer else None)
        speed, outputs = timing(run, texts)
    params = sum(p.numel() for p in teacher.model.parameters())
    return Timed(teacher.name, speed, params, teacher_file_bytes(teacher), mem.growth, weights_bytes(teacher.model), outputs)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def speed_size_memory(student: Timed, teacher: Timed | None) -> dict:
    import torch

    t = teacher
    return {
        "speed": {
            "student": student.speed, "teacher": t.speed if t else None,
            "speedup_p50": _ratio(t.speed["p50_ms"], student.speed["p50_ms"]) if t else None,
            "speedup_throughput": _ratio(student.speed["per_s"], t.speed["per_s"]) if t else None,
            "torch_threads": torch.get_num_threads(),
        },
        "size": {
            "student_params": student.params, "student_bytes": student.file_bytes,
            "teacher_params": t.params if t else None, "teacher_bytes": t.file_bytes if t else None,
            "ratio": _ratio(t.file_bytes, student.file_bytes) if t else None,
            "params_ratio": _ratio(t.params, student.params) if t else None,
        },
        "memory": {
            "student_rss_bytes": student.rss_bytes, "student_weights_bytes": student.weights_bytes,
            "teacher_rss_bytes": t.rss_bytes if t else None, "teacher_weights_bytes": t.weights_bytes if t else None,
            "ratio": _ratio(t.rss_bytes, student.rss_bytes) if t else None,
            "method": "peak growth of the process's resident memory while loading and timing each model",
        },
    }


def cost_section(student_dir: Path, data_dir: Path, out_dir: Path, speed: dict) -> tuple[str | None, str | None]:
    """(Markdown of the break-even analysis at example prices, None) or (None, why it is missing)."""
    from dataclasses import replace

    from microdistill.cost import CostConfig, CostError, RunFiles, analyse, cost_section_markdown, plot_cumulative

    parent = Path(student_dir).parent
    run = parent if (parent / "run.json").is_file() else None
    try:
        analysis = analyse(RunFiles.resolve(run, shards=data_dir, student=student_dir), CostConfig(), speed=speed)
    except CostError as e:
        return None, f"no cost section: {e}"
    analysis = replace(analysis, plot=str(plot_cumulative(analysis, Path(out_dir) / "cost.png")))
    return cost_section_markdown(analysis), None


def _preload() -> None:
    """Import what loading either model imports, so neither model's memory counts the libraries."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import microdistill.generation  # noqa: F401
    import microdistill.predict  # noqa: F401
    import microdistill.train  # noqa: F401


def teacher_timing(teacher: str | None, from_manifest: bool, shards: ShardSet, texts: list[str],
                   notes: list[str], say: Callable[[str], None]) -> tuple[str | None, Timed | None]:
    """Time the given teacher (errors propagate), or the shards' own one (skipped with a note if it fails)."""
    from microdistill.teacher import TeacherError

    spec = teacher if teacher is not None else (manifest_teacher(shards.dir) if from_manifest else None)
    if spec is None:
        notes.append("teacher not timed (no teacher given)")
        return None, None
    say(f"timing the teacher {spec} on {len(texts)} inputs")
    try:
        return str(spec), time_teacher(str(spec), shards, texts, notes)
    except TeacherError as e:
        if teacher is not None:
            raise
        notes.append(f"teacher not timed: the shards' teacher cannot be loaded ({e})")
        return str(spec), None


def evaluate(student_dir: Path, data_dir: Path, out_dir: Path, teacher: str | None = None, limit: int | None = None,
             *, teacher_from_manifest: bool = False, timing_n: int = TIMING_SAMPLE, batch_size: int = 64,
             progress: bool = True) -> dict:
    """Evaluate the student in `student_dir` on the shards in `data_dir`; write the report to `out_dir`.

    teacher: a teacher spec to time beside the student, or None for no teacher. With
    teacher_from_manifest=True (and teacher=None) the shards' own teacher is used when it can
    be loaded, and skipped with a note otherwise. Returns the content of report.json.
    """
    from microdistill.report import write_report

    for name, v in (("limit", limit), ("timing_n", timing_n), ("batch_size", batch_size)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise EvalError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    say = (lambda m: print(f"[eval] {m}", file=sys.stderr, flush=True)) if progress else (lambda m: None)
    student_dir, out_dir, shards = Path(student_dir), Path(out_dir), ShardSet(data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split, warnings = eval_split(shards)
    for w in warnings:
        say(f"warning: {w}")
    notes: list[str] = []
    _preload()
    timed_records = list(shards.records(split))[: min(timing_n, limit or timing_n)]
    texts = [r.text for r in timed_records]
    say(f"timing the student on {len(texts)} inputs")
    student, s_timed = time_student(student_dir, shards, texts)
    say(f"scoring the student on the {split} split")
    scores, records = quality(student, shards, split, limit, batch_size)
    spec, t_timed = teacher_timing(teacher, teacher_from_manifest, shards, texts, notes, say)
    report: dict[str, Any] = {
        "task": student.task.name, "split": split, "n_eval": len(records), **scores, **speed_size_memory(s_timed, t_timed),
        "student": {"path": str(student_dir), "preset": student.meta.get("preset"), "config": student.config.to_dict()},
        "teacher": {"spec": spec, "name": t_timed.name} if t_timed else None,
        "warnings": warnings, "notes": notes,
    }
    if t_timed is not None:
        # The timed teacher should be the one that labelled the shards: say how often it agrees.
        report["speed"]["teacher"]["same_output_as_shards"] = agreement([r.output_text for r in timed_records], t_timed.outputs)
    cost_md, why = cost_section(student_dir, shards.dir, out_dir, report["speed"])
    notes += [why] if why else []
    say(f"writing the report to {out_dir}")
    return write_report(report, out_dir, student_dir / "metrics.jsonl", cost_md)
