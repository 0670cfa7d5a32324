"""Texts -> the teacher's answers, asked exactly as extraction asked: what the cascade defers to
and what the evaluation times, for any teacher.

    from microdistill.teachers import load_teacher
    from microdistill.teachers.labeller import TeacherAnswers
    answers = TeacherAnswers(load_teacher("qwen2.5-coder-0.5b-instruct"), task, labelled_by=manifest["teacher"])
    answers(["you are an idiot"])      # [{"output": '{"tone": ...}', "fields": {...}}]

When the teacher is the one that labelled the shards (`labelled_by`, a manifest's `teacher`
entry), it runs in the dtype it labelled them in, so its answers here are the ones the student
learned from.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from microdistill.core.task import Task, parse_or_none
from microdistill.data.corpus import clean_inputs
from microdistill.teachers.teacher import Teacher, same_teacher


def local_labeller(teacher, task: Task, kept: Sequence[int] | None, draft=None) -> Callable[[list[str]], list[str]]:
    """Constrained greedy generation with a local teacher, as extraction runs it (with `draft`
    proposing tokens: students/decoder/draft.py); returns output texts."""
    from microdistill.core.grammar import Grammar  # xgrammar: loaded when a teacher answers
    from microdistill.teachers.decoding import Decoder

    grammar = Grammar(task, teacher.tokenizer, teacher.vocab_size, teacher.eos_id, allowed=kept)
    decoder = Decoder(teacher, task, grammar, drafter=draft)

    def run(texts: list[str]) -> list[str]:
        batch = decoder.generate([decoder.rest_ids(t) for t in texts], task.output.max_tokens, texts=texts)
        return [teacher.tokenizer.decode([i for i in g.output_ids if i != teacher.eos_id]) for g in batch.rows]

    return run


def as_labelled(teacher: Teacher, labelled_by: dict[str, Any] | None) -> bool:
    """Whether `teacher` is the one that labelled shards recorded as `labelled_by`; if so, a white
    box is cast to the dtype it labelled them in."""
    same = same_teacher(labelled_by, teacher.describe())
    if same and hasattr(teacher, "to_dtype"):
        teacher.to_dtype(labelled_by.get("dtype", "float32"))
    return same


class TeacherAnswers:
    """Texts -> the teacher's answers ({output, fields}; fields None for an unusable answer)."""

    def __init__(self, teacher: Teacher, task: Task, labelled_by: dict[str, Any] | None = None,
                 kept: Sequence[int] | None = None, draft=None):
        self.teacher, self.task, self.name, self.draft = teacher, task, teacher.name, draft
        self.same = as_labelled(teacher, labelled_by)
        self.run = teacher.labeller(task, list(kept) if kept is not None else None, draft)

    def texts(self, texts: Sequence[str]) -> list[str]:
        """The answer texts of the (already cleaned) texts."""
        return self.run(list(texts)) if texts else []

    def __call__(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        outputs = self.texts(clean_inputs(self.task, texts))
        return [{"output": o, "fields": parse_or_none(self.task, o)} for o in outputs]
