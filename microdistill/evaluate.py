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

import torch

from microdistill.agreement import (agreement, exact_by_certainty, field_agreement, human_accuracy, valid_rate,
                                    wilson_interval)
from microdistill.config import Options
from microdistill.console import say
from microdistill.errors import UserError
from microdistill.predict import generate, parse_or_none, predict
from microdistill.store import Record, ShardSet, StoreError
from microdistill.students.data import Example, collate, load_split
from microdistill.students.decoder import count_parameters
from microdistill.students.saved import LoadedStudent, load_student
from microdistill.teachers import TeacherError, load_teacher, preset_of
from microdistill.teachers.presets import PRESETS, cache_root

TIMING_SAMPLE = 16  # the teacher is slow on a CPU; a few inputs give a stable median


class EvalError(UserError):
    """An evaluation input that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class EvalConfig(Options):
    """What an evaluation scores and times."""

    teacher: str | None = None  # a teacher spec to time beside the student (None: the shards' own)
    time_teacher: bool = True  # False: load and time no teacher
    limit: int | None = None  # score at most N held-out examples
    timing_inputs: int = TIMING_SAMPLE  # inputs both models are timed on
    batch_size: int = 64  # student batch size while scoring

    def __post_init__(self) -> None:
        for name in ("limit", "timing_inputs", "batch_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise EvalError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.teacher is not None and not self.time_teacher:
            raise EvalError("--teacher and --no-teacher contradict each other; give one")


# ---- during training ------------------------------------------------------------------------
@torch.no_grad()
def evaluate_epoch(loaded: LoadedStudent, examples: list[Example], records: list, batch_size: int) -> dict[str, Any]:
    """Held-out metrics against the teacher: teacher-forced token accuracy, and free-running
    (greedy, constrained) exact match of the whole output and agreement per field."""
    if not examples:
        return {"val_examples": 0}
    model, was_training = loaded.model, loaded.model.training
    model.eval()
    right = total = 0
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i:i + batch_size], len(loaded.kept))
        pred = model(b.inp, b.out_in)[..., : b.n_kept].argmax(-1)
        right += int(((pred == b.target) & b.mask).sum())
        total += int(b.mask.sum())
    model.train(was_training)
    outs = generate(loaded, [r.input_ids for r in records], constrain=True, batch_size=max(batch_size, 64))
    tok, task = loaded.tokenizer, loaded.task
    exact, agree = 0, {name: 0 for name in task.field_names}
    for r, out in zip(records, outs):
        text = tok.decode(out)
        exact += text == tok.decode(r.output_ids[:-1])
        fields_ = parse_or_none(task, text) or {}
        for name in agree:
            agree[name] += fields_.get(name, object()) == r.fields.get(name)
    n = len(records)
    return {"val_examples": n, "val_token_acc": right / max(total, 1), "val_exact_match": exact / n,
            "val_field_agreement": {k: v / n for k, v in agree.items()}}


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
    preset = preset_of(teacher.source or "")
    path = cache_root() / PRESETS[preset].file if preset else Path(teacher.source or "")
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    return None


def student_runner(student) -> Callable[[list[str]], list[dict]]:
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
    return preset_of(source) or source or teacher.get("name") or None


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
    with PeakMemory() as mem:
        student = load_student(student_dir)
        check_pair(student, shards)
        speed, _ = timing(student_runner(student), texts)
    file_bytes = (Path(student_dir) / "model.safetensors").stat().st_size
    return student, Timed("student", speed, count_parameters(student.model), file_bytes, mem.growth,
                          weights_bytes(student.model), [])


def time_teacher(spec: str, shards: ShardSet, texts: list[str], notes: list[str]) -> Timed:
    """Load and time a teacher under one memory measurement, on the kept vocabulary if it is the shards' teacher."""
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


def _preload() -> None:
    """Import what loading either model imports, so neither model's memory counts the libraries."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import microdistill.generation  # noqa: F401


def teacher_timing(teacher: str | None, from_manifest: bool, shards: ShardSet, texts: list[str],
                   notes: list[str], progress: bool) -> tuple[str | None, Timed | None]:
    """Time the given teacher (errors propagate), or the shards' own one (skipped with a note if it fails)."""
    spec = teacher if teacher is not None else (manifest_teacher(shards.dir) if from_manifest else None)
    if spec is None:
        notes.append("teacher not timed (no teacher given)")
        return None, None
    say(f"[eval] timing the teacher {spec} on {len(texts)} inputs", progress)
    try:
        return str(spec), time_teacher(str(spec), shards, texts, notes)
    except TeacherError as e:
        if teacher is not None:
            raise
        notes.append(f"teacher not timed: the shards' teacher cannot be loaded ({e})")
        return str(spec), None


def evaluate(student_dir: Path, data_dir: Path, config: EvalConfig | None = None, progress: bool = True) -> dict:
    """Score and time the student in `student_dir` on the shards in `data_dir`; returns the
    content of report.json (report.py turns it into files).

    With `config.teacher` None and `time_teacher`, the shards' own teacher is timed when it can
    be loaded, and skipped with a note otherwise; a teacher given by name must load.
    """
    cfg = config or EvalConfig()
    student_dir, shards = Path(student_dir), ShardSet(data_dir)
    split, warnings = eval_split(shards)
    for w in warnings:
        say(f"[eval] warning: {w}", progress)
    notes: list[str] = []
    _preload()
    timed_records = list(shards.records(split))[: min(cfg.timing_inputs, cfg.limit or cfg.timing_inputs)]
    texts = [r.text for r in timed_records]
    say(f"[eval] timing the student on {len(texts)} inputs", progress)
    student, s_timed = time_student(student_dir, shards, texts)
    say(f"[eval] scoring the student on the {split} split", progress)
    scores, records = quality(student, shards, split, cfg.limit, cfg.batch_size)
    spec, t_timed = teacher_timing(cfg.teacher, cfg.time_teacher, shards, texts, notes, progress)
    report: dict[str, Any] = {
        "task": student.task.name, "split": split, "n_eval": len(records), **scores, **speed_size_memory(s_timed, t_timed),
        "student": {"path": str(student_dir), "preset": student.meta.get("preset"), "config": student.config.to_dict()},
        "teacher": {"spec": spec, "name": t_timed.name} if t_timed else None,
        "warnings": warnings, "notes": notes,
    }
    if t_timed is not None:
        # The timed teacher should be the one that labelled the shards: say how often it agrees.
        report["speed"]["teacher"]["same_output_as_shards"] = agreement([r.output_text for r in timed_records], t_timed.outputs)
    return report
