"""The cascade: the student answers when it is sure of every field, the teacher answers the rest.

    from microdistill.serve.cascade import Cascade, teacher_for, threshold_for
    student = load_student("runs/demo/student")
    cascade = Cascade(student, threshold_for(student, target_agreement=0.97),
                      teacher_for("qwen2.5-coder-0.5b-instruct", student))
    cascade.predict(["you are an idiot"])   # [{"fields", "output", "confidence", "answered_by", ...}]

The student is anything with `.task`, `.fields` and `.predict(texts, batch_size)` returning
LoadedHeads-style dicts with a "confidence" per field (a heads student folder, or an export
folder of either kind, runtime.load_exported). An input is escalated when its least sure field's
confidence is below the threshold; the teacher then answers it exactly as extraction asked it
(teachers/labeller.py: constrained greedy decoding, or a served teacher's call), and the answer
says `answered_by`. The confidences reported are always the student's, so a client sees why a
call was escalated. service.py runs the two halves on separate workers; `predict` here runs
them one after the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from microdistill.students.confidence import point_for, threshold_of
from microdistill.core.errors import UserError
from microdistill.core.files import read_json
from microdistill.data.corpus import clean_inputs
from microdistill.core.temperatures import CALIBRATION
from microdistill.teachers.labeller import TeacherAnswers


class CascadeError(UserError):
    """A student, teacher or threshold the cascade cannot use; one line for the user."""


def check_student(student, where: str) -> None:
    """A student the cascade can serve: one that gives a confidence per field."""
    if not (hasattr(student, "fields") and callable(getattr(student, "predict", None))):
        kind = getattr(student, "kind", type(student).__name__)
        raise CascadeError(f"{where}: a {kind} student gives no confidence per field, which the cascade and the server "
                           "need; serve a classifier-head student (train --student heads)")


def threshold_for(student, min_confidence: float | None = None, target_agreement: float | None = None) -> float:
    """The confidence the student must reach on every field to answer: `min_confidence`, or the
    threshold that reached `target_agreement` on the held-out curve of the folder's
    calibration.json (confidence.py), or 0 (the student answers everything)."""
    if min_confidence is not None and target_agreement is not None:
        raise CascadeError("give --min-confidence or --target-agreement, not both")
    if min_confidence is not None:
        return float(min_confidence)
    if target_agreement is None:
        return 0.0
    path = Path(getattr(student, "path", None) or ".") / CALIBRATION
    if not path.is_file():
        raise CascadeError(f"{path}: not found, and --target-agreement reads its held-out curve; run "
                           f"microdistill calibrate-confidence --student {path.parent} first, or give --min-confidence")
    curve = read_json(path, "the student's confidence calibration", CascadeError).get("curve")
    if not curve:
        raise CascadeError(f"{path}: has no agreement curve; fit it again with microdistill calibrate-confidence")
    return threshold_of(point_for(curve, target_agreement))


def teacher_for(spec: str, student, url: str | None = None, attempts: int | None = None,
                timeout_s: float | None = None, concurrency: int | None = None) -> TeacherAnswers:
    """The teacher of `spec` (any spec extract takes; `url` for a served one) answering the
    student's task as extraction asked it, in the dtype it labelled the student's shards in
    when it is that teacher. A served teacher is asked with at most `attempts` tries per call,
    each up to `timeout_s`, and `concurrency` calls in flight."""
    from microdistill.teachers import load_teacher

    teacher = load_teacher(spec, url)
    if teacher.access == "black":
        teacher.limit(attempts=attempts, timeout_s=timeout_s, concurrency=concurrency)
    labelled_by = (getattr(student, "meta", None) or {}).get("shards", {}).get("teacher")
    return TeacherAnswers(teacher, student.task, labelled_by, draft=draft_for(student, teacher))


def draft_for(student, teacher):
    """A decoder student in process drafts its local teacher's answers (students/decoder/draft.py): the same
    answers in fewer teacher passes. None where it cannot (another kind, runtime or tokenizer)."""
    from microdistill.students.decoder.draft import DRAFT_TOKENS, check_draft
    from microdistill.extract.config import ExtractError

    if teacher.access != "white" or getattr(student, "kind", None) != "decoder" or getattr(student, "model", None) is None:
        return None
    try:
        return check_draft(student, teacher, student.task, DRAFT_TOKENS, str(student.path))
    except ExtractError:
        return None


@dataclass
class Cascade:
    """Student first; the teacher (when there is one) for inputs below `threshold` on any field."""

    student: Any
    threshold: float = 0.0
    teacher: Callable[[Sequence[str]], list[dict[str, Any]]] | None = None
    batch_size: int = 64

    def __post_init__(self) -> None:
        check_student(self.student, str(getattr(self.student, "path", None) or "the student"))
        if not (0.0 <= self.threshold <= 1.0 or self.threshold == math.inf):
            raise CascadeError(f"the confidence threshold must be between 0 and 1, got {self.threshold}")
        self.current = (self.student, self.threshold)  # what a batch answers with, read in one step

    @property
    def task(self):
        return self.student.task

    def swap(self, student: Any, threshold: float) -> None:
        """Answer with `student` (of the same task) and its threshold from the next batch on."""
        check_student(student, str(getattr(student, "path", None) or "the student"))
        if student.task.fingerprint() != self.task.fingerprint():
            raise CascadeError(f"student {getattr(student, 'path', None)} does the task {student.task.name!r}, not "
                               f"{self.task.name!r}; the server keeps its student")
        self.current = (student, threshold)  # one assignment: no batch sees half of a swap
        self.student, self.threshold = student, threshold

    def student_answers(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """The student's answers; `confident` says whether every field reached the threshold."""
        student, threshold = self.current  # a swap takes effect between batches, never within one
        results = student.predict(clean_inputs(student.task, texts), self.batch_size) if texts else []
        return [{"output": r["output"], "fields": r["fields"], "confidence": r["confidence"],
                 "truncated": r.get("truncated", False), "answered_by": "student",
                 "confident": min(r["confidence"].values()) >= threshold} for r in results]

    def escalates(self, result: dict[str, Any]) -> bool:
        return self.teacher is not None and not result["confident"]

    def teacher_answers(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        if self.teacher is None:
            raise CascadeError("no teacher to escalate to")
        return self.teacher(list(texts))

    @staticmethod
    def merge(result: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
        """The teacher's answer in place of the student's; a teacher answer that is not a valid
        object (cut at the task's max_tokens) leaves the student's, marked as such."""
        if answer["fields"] is None:
            return {**result, "teacher_error": "the teacher's answer was not a valid object"}
        return {**result, "output": answer["output"], "fields": answer["fields"], "answered_by": "teacher"}

    def predict(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """One answer per text: {output, fields, confidence (the student's), truncated, answered_by, confident}."""
        results = self.student_answers(texts)
        todo = [i for i, r in enumerate(results) if self.escalates(r)]
        if todo:
            for i, answer in zip(todo, self.teacher_answers([texts[i] for i in todo])):
                results[i] = self.merge(results[i], answer)
        return results
