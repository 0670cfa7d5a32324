"""The teacher's consistency with itself: how often its answer changes under edits that keep
an input's meaning (a full stop added or dropped, the first letter's case, a doubled space).

    from microdistill.teachers.labeller import TeacherAnswers
    records = shards.load("val")
    result = self_consistency(TeacherAnswers(teacher, task).texts, [r.text for r in records],
                              originals=[r.output_text for r in records])
    result["consistent"]  # share of inputs whose answer survived every edit

Why: the student learns the teacher's answers, and a teacher that flips its label when a
comment loses its final "." has no single answer to learn there. A student that reads every
input exactly as the teacher means it still disagrees with those flips, so agreement near
1 - flip rate is an honest ceiling for any student; a gap to that ceiling is the student's,
the rest is the teacher's own noise.

`answer` is any function from a list of input texts to the teacher's answer texts (the same
strings the shards store as `output_text`), so this module runs no model itself. Answers
are compared as exact strings.
"""

from __future__ import annotations

from typing import Callable, Sequence

from microdistill.data.edits import EDITS
from microdistill.evaluate.agreement import wilson_interval

# ---- the measure ----------------------------------------------------------------------------------
def _answers(answer: Callable[[list[str]], list[str]], texts: Sequence[str], batch_size: int) -> list[str]:
    """`answer` over `texts` in chunks of `batch_size`, checked to give one answer per text."""
    out: list[str] = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        got = list(answer(chunk))
        if len(got) != len(chunk):
            raise ValueError(f"answer returned {len(got)} answers for {len(chunk)} texts")
        out += got
    return out


def self_consistency(answer: Callable[[list[str]], list[str]], texts: Sequence[str],
                     originals: Sequence[str] | None = None, batch_size: int = 16) -> dict:
    """How often the teacher's answer changes under each meaning-keeping edit of EDITS.

    `answer` maps a list of input texts to the teacher's answer texts; `originals` are its
    known answers for `texts` (the shards' `output_text`), computed with `answer` when None.
    Each edit is one pass of `answer` over the texts it changes, in chunks of `batch_size`;
    an edit that leaves a text as it is does not apply to that text.

    Returns {"n": len(texts), "edits": {edit: {"n": texts it applied to, "changed": share of
    those whose answer changed (None when it applied to none)}}, "consistent": share of texts
    whose answer stayed the same under every edit that applied to it (a text no edit applies
    to counts as consistent; None when there are no texts), "consistent_ci95": its 95%
    Wilson interval}.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    texts = list(texts)
    if originals is None:
        originals = _answers(answer, texts, batch_size)
    elif len(originals) != len(texts):
        raise ValueError(f"{len(originals)} original answers for {len(texts)} texts")

    flipped = [False] * len(texts)
    edits: dict[str, dict] = {}
    for name, edit in EDITS.items():
        edited = [(i, e) for i, t in enumerate(texts) if (e := edit(t)) != t]
        answers = _answers(answer, [e for _, e in edited], batch_size)
        changed = 0
        for (i, _), a in zip(edited, answers):
            if a != originals[i]:
                changed += 1
                flipped[i] = True
        edits[name] = {"n": len(edited), "changed": changed / len(edited) if edited else None}

    kept = len(texts) - sum(flipped)
    return {
        "n": len(texts),
        "edits": edits,
        "consistent": kept / len(texts) if texts else None,
        "consistent_ci95": tuple(float(x) for x in wilson_interval(kept, len(texts))),
    }
