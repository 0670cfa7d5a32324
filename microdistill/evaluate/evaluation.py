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

from pathlib import Path
from typing import Any, Sequence

from microdistill.evaluate.agreement import (agreement, exact_by_certainty, field_agreement, human_accuracy, valid_rate,
                                    wilson_interval)
from microdistill.students.confidence import FOLDS, assess_student
from microdistill.evaluate.consistency import self_consistency
from microdistill.core.console import say
from microdistill.evaluate.config import EvalConfig, EvalError
from microdistill.evaluate.peers import PeerError, score_peers
from microdistill.evaluate.speed import (PeakMemory, Timed, speed_size_memory, student_runner, teacher_file_bytes,
                                         timing, weights_bytes)
from microdistill.data.shards import Record, ShardSet, StoreError
from microdistill.students.kind import count_parameters
from microdistill.students import PerField, load_student
from microdistill.teachers import TeacherError, load_teacher, recorded_spec, same_teacher
from microdistill.teachers.labeller import TeacherAnswers


# ---- the evaluation -------------------------------------------------------------------------------
def eval_split(shards: ShardSet) -> tuple[str, list[str]]:
    """The split to evaluate on: held out if there is any, else train with a warning."""
    if any(s.get("n_val", 0) > 0 for s in shards.manifest["shards"]):
        return "val", []
    if len(shards) == 0:
        raise StoreError(f"shard folder {shards.dir}: no examples to evaluate on")
    return "train", [f"shard folder {shards.dir} holds no held-out examples: evaluated on the train split, "
                     "which the student has seen, so these scores overstate it"]


def check_pair(student, shards: ShardSet) -> None:
    """The student must have been trained on shards of the same task (and read their vocabularies)."""
    if student.task.fingerprint() != shards.task().fingerprint():
        raise EvalError(f"student {student.path} and shard folder {shards.dir} are for different tasks "
                        f"({student.task.name!r} vs {shards.task().name!r}); evaluate on the shards the student was "
                        "trained on")
    student.check_shards(shards)


def quality(student, shards: ShardSet, split: str, limit: int | None, batch_size: int) -> tuple[dict, list[Record]]:
    """Agreement with the teacher on the first `limit` examples of `split`, and those examples."""
    # Token accuracy and exact match come from the trainer's own held-out evaluation, so the
    # report and the training log measure the same thing the same way.
    records = list(shards.records(split))[:limit]
    head = student.held_out(records, batch_size)
    texts = [r.text for r in records]
    constrained = student.predict(texts, batch_size, constrain=True)
    free = student.predict(texts, batch_size, constrain=False)
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


def time_student(student_dir: Path, shards: ShardSet, texts: list[str]):
    """Load, check and time the student under one memory measurement; returns (student, Timed)."""
    with PeakMemory() as mem:
        student = load_student(student_dir)
        check_pair(student, shards)
        speed, _ = timing(student_runner(student), texts)
    file_bytes = (Path(student_dir) / "model.safetensors").stat().st_size
    return student, Timed("student", speed, count_parameters(student.model), file_bytes, mem.growth,
                          weights_bytes(student.model), [])


def time_teacher(spec: str, shards: ShardSet, texts: list[str], notes: list[str],
                 consistency_records: Sequence[Record] = (), url: str | None = None) -> Timed:
    """Load and time a teacher under one memory measurement, as it labelled the shards (kept
    vocabulary, dtype) if it is the shards' teacher; then, if it is, ask it `consistency_records`
    again under meaning-preserving edits (consistency.py). Any teacher spec; `url` for a served one."""
    with PeakMemory() as mem:
        teacher = load_teacher(spec, url, progress=False)
        labelled_by = shards.manifest.get("teacher") or {}
        same = same_teacher(labelled_by, teacher.describe())
        if not same:
            notes.append(f"teacher {spec!r} is not the shards' teacher: it was timed with its own full vocabulary "
                         "instead of the kept one")
        kept = [int(i) for i in shards.kept_vocab] if same and teacher.access == "white" else None
        run = TeacherAnswers(teacher, shards.task(), labelled_by, kept).texts
        speed, outputs = timing(run, texts)
    model = teacher.model if teacher.access == "white" else None  # a served teacher's weights are not here
    consistent = None
    if consistency_records and same:
        consistent = self_consistency(run, [r.text for r in consistency_records],
                                      [r.output_text for r in consistency_records])
    return Timed(teacher.name, speed, count_parameters(model) if model is not None else None, teacher_file_bytes(teacher),
                 mem.growth, weights_bytes(model) if model is not None else None, outputs, consistent,
                 getattr(teacher, "dtype", None))


def _preload() -> None:
    """Import what loading either model imports, so neither model's memory counts the libraries."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import microdistill.teachers.decoding  # noqa: F401


def teacher_timing(teacher: str | None, from_manifest: bool, shards: ShardSet, texts: list[str],
                   notes: list[str], progress: bool, consistency_records: Sequence[Record] = (),
                   url: str | None = None) -> tuple[str | None, Timed | None]:
    """Time the given teacher (errors propagate), or the shards' own one (skipped with a note if it fails)."""
    recorded = shards.manifest.get("teacher")
    spec = teacher if teacher is not None else (recorded_spec(recorded) if from_manifest else None)
    if url is None and teacher is None:  # the shards' own served teacher, where it was served
        url = (shards.manifest.get("api") or {}).get("url")
    if spec is None:
        notes.append("teacher not timed (no teacher given)")
        return None, None
    say(f"[eval] timing the teacher {spec} on {len(texts)} inputs", progress)
    try:
        if consistency_records:
            say(f"[eval] asking the teacher {len(consistency_records)} held-out inputs again, edited", progress)
        return str(spec), time_teacher(str(spec), shards, texts, notes, consistency_records, url)
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
    spec, t_timed = teacher_timing(cfg.teacher, cfg.time_teacher, shards, texts, notes, progress,
                                   records[: cfg.consistency_inputs], cfg.teacher_url)
    report: dict[str, Any] = {
        "task": student.task.name, "split": split, "n_eval": len(records), **scores, **speed_size_memory(s_timed, t_timed),
        "student": {"path": str(student_dir), "kind": student.kind, "preset": student.meta.get("preset"),
                    "config": student.describe()},
        "teacher": {"spec": spec, "name": t_timed.name, "dtype": t_timed.dtype} if t_timed else None,
        "warnings": warnings, "notes": notes,
    }
    if t_timed is not None:
        # The timed teacher should be the one that labelled the shards: say how often it agrees.
        report["speed"]["teacher"]["same_output_as_shards"] = agreement([r.output_text for r in timed_records], t_timed.outputs)
    report["teacher_consistency"] = t_timed.consistency if t_timed is not None else None
    report["student_consistency"] = student_consistency(student, records[: cfg.consistency_inputs], cfg.batch_size)
    report["peers"] = peer_rows(shards, split, cfg, notes, progress) if cfg.peers else None
    # calibrated confidence and the cascade's coverage (students/confidence.py), for a kind with one per field
    enough = isinstance(student, PerField) and len(records) >= 2 * FOLDS
    report["confidence"] = assess_student(student, records, cfg.batch_size) if enough else None
    return report


def student_consistency(student, records: Sequence[Record], batch_size: int) -> dict | None:
    """The student's own consistency under the same meaning-keeping edits as the teacher's, on
    the same inputs: a student that flips where the teacher does not loses agreement there."""
    if not records:
        return None
    return self_consistency(lambda texts: [p["output"] for p in student.predict(texts)], [r.text for r in records],
                            batch_size=batch_size)


def peer_rows(shards: ShardSet, split: str, cfg: EvalConfig, notes: list[str], progress: bool) -> list[dict] | None:
    """The peers (peers.py) trained on the train split and scored on the student's split."""
    if split != "val":
        notes.append("no peers: nothing is held out to score them on")
        return None
    try:
        return score_peers(shards.dir, progress=progress, limit_val=cfg.limit)
    except PeerError as e:
        notes.append(f"no peers: {e}")
        return None
