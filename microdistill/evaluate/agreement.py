"""Agreement between two labellers of the same inputs (teacher and student, or either and
human labels): exact match with its interval, per-field agreement and confusion, validity.

Pure functions over answers (dicts of field values, None for an invalid answer); evaluate.py
and every later comparison score with these.
"""

from __future__ import annotations

import numpy as np
from typing import Any, Sequence

from microdistill.data.shards import Record

INVALID = "(invalid)"  # the confusion-matrix column of outputs that are not a valid object
SURE = 0.8  # the teacher's probability of its least sure value above which it counts as sure


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
    """Per output field: agreement with the teacher (exact), its confusion matrix for enum fields,
    and for free-text fields chrF against the teacher's text (`chrf`, 0–100), which credits a
    summary that says the same in nearly the same words.

    `student` holds the parsed fields of each output, or None where the output is invalid
    (which then disagrees on every field, and counts as an empty text).
    """
    from microdistill.core.task import EnumField, StringField

    out: dict[str, dict] = {}
    for f in task.output.fields:
        ref = [t[f.name] for t in teacher]
        pred = [s.get(f.name) if s is not None else None for s in student]
        entry: dict[str, Any] = {"agreement": agreement(ref, pred), "confusion": None}
        if isinstance(f, EnumField):
            entry["confusion"] = confusion(ref, pred, f.values)
        if isinstance(f, StringField):
            entry["chrf"] = chrf(ref, pred)
        out[f.name] = entry
    return out


def chrf(reference: Sequence[Any], predicted: Sequence[Any]) -> float | None:
    """Corpus chrF (sacrebleu's, character n-grams up to 6, beta 2) of the predicted texts against
    the reference texts, 0–100; a missing prediction is an empty text. None for no texts."""
    from sacrebleu.metrics import CHRF

    if not reference:
        return None
    hyps = ["" if p is None else str(p) for p in predicted]
    return CHRF().corpus_score(hyps, [[str(r) for r in reference]]).score


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
