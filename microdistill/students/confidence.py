"""Calibrated confidence per field: temperature scaling on held-out inputs, ECE, and who answers.

    microdistill calibrate-confidence --student runs/demo/student

A classifier-head student's softmax maximum is its confidence in a field, but nothing in
training makes that number mean "right this often". Temperature scaling (Guo et al. 2017,
"On Calibration of Modern Neural Networks") divides each field's logits by one number T,
chosen to minimise the negative log-likelihood of the teacher's value on held-out inputs; the
answer (the argmax) never changes, only how sure the student says it is.

Honest numbers. `ece_before` is the raw softmax's expected calibration error on the held-out
inputs. `ece_after` comes from 2-fold cross-fitting on the same inputs: each half is scaled
with temperatures fitted on the other half, so no confidence is scored by temperatures fitted
on it. The temperatures written to the student folder (calibration.json) are then fitted on
all of them. The agreement-against-coverage curve uses the cross-fitted confidences as well;
the threshold it gives for a target agreement is still chosen on those same inputs, so on new
traffic the agreement it buys scatters around the target by about its standard error.

Training a heads student ends by writing calibration.json when the shards hold a held-out
split (train/heads.py); this verb fits it again, e.g. for a folder trained before it existed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from microdistill.core.console import say
from microdistill.core.errors import UserError
from microdistill.data.corpus import clean_inputs
from microdistill.core.files import atomic_write_json
from microdistill.core.temperatures import CALIBRATION

if TYPE_CHECKING:  # the server imports this module for its curve, and must not need the shard store (safetensors)
    from microdistill.data.shards import Record

BINS = 10  # equal-width confidence bins of the ECE and the reliability diagram
FOLDS = 2
T_RANGE = (0.05, 20.0)  # temperatures searched; far outside it a softmax is one-hot or flat


class ConfidenceError(UserError):
    """A student or shard folder whose confidence cannot be calibrated; one line for the user."""


# ---- pure functions ---------------------------------------------------------------------------------
def softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """z [N, K] -> softmax(z / T) [N, K], in float64."""
    z = np.asarray(z, dtype=np.float64) / temperature
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def nll(z: np.ndarray, target: np.ndarray, temperature: float) -> float:
    """Mean -log softmax(z / T)[target]; z [N, K], target [N] value indices."""
    s = np.asarray(z, dtype=np.float64) / temperature
    m = s.max(-1)
    lse = m + np.log(np.exp(s - m[:, None]).sum(-1))
    return float(np.mean(lse - s[np.arange(len(s)), target]))


def fit_temperature(z: np.ndarray, target: np.ndarray) -> float:
    """The T in T_RANGE minimising nll(z, target, T), by golden-section search over log T.

    The NLL is convex in 1/T (a log-sum-exp of linear functions minus a linear one), so it has
    one minimum along log T and the search cannot stop in a wrong valley.
    """
    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    f = lambda log_t: nll(z, target, math.exp(log_t))  # noqa: E731
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(60):  # shrinks the interval by 0.618^60: far below any meaningful digit
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    return math.exp((lo + hi) / 2)


def _bin_of(conf: np.ndarray, bins: int) -> np.ndarray:
    """Bin b holds confidences in (b/bins, (b+1)/bins]; 0 falls in the first bin."""
    return np.clip(np.ceil(np.asarray(conf) * bins).astype(int) - 1, 0, bins - 1)


def reliability(conf: np.ndarray, correct: np.ndarray, bins: int = BINS) -> list[dict[str, Any]]:
    """Per equal-width bin: {lo, hi, n, confidence (mean), accuracy}; empty bins have None means."""
    conf, correct = np.asarray(conf, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    at = _bin_of(conf, bins)
    rows = []
    for b in range(bins):
        sel = at == b
        n = int(sel.sum())
        rows.append({"lo": b / bins, "hi": (b + 1) / bins, "n": n,
                     "confidence": float(conf[sel].mean()) if n else None,
                     "accuracy": float(correct[sel].mean()) if n else None})
    return rows


def ece(conf: np.ndarray, correct: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: sum over bins of (n_b / N) * |accuracy_b - mean confidence_b|."""
    n = len(conf)
    return float(sum(r["n"] / n * abs(r["accuracy"] - r["confidence"]) for r in reliability(conf, correct, bins) if r["n"]))


def cross_fit(logits: Sequence[np.ndarray], targets: np.ndarray, folds: int = FOLDS, seed: int = 0) -> list[np.ndarray]:
    """Per field, out-of-fold calibrated probabilities [N, K]: each fold is scaled by the
    temperature fitted on the other folds. targets [N, F] value indices."""
    n = len(targets)
    if n < folds:
        raise ConfidenceError(f"{n} held-out example(s): {folds}-fold cross-fitting needs at least {folds}")
    fold = np.empty(n, dtype=int)
    fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    out = [np.zeros(np.shape(z), dtype=np.float64) for z in logits]
    for k in range(folds):
        test, fit = fold == k, fold != k
        for f, z in enumerate(logits):
            out[f][test] = softmax(z[test], fit_temperature(z[fit], targets[fit, f]))
    return out


def coverage_curve(conf: np.ndarray, agrees: np.ndarray) -> list[dict[str, Any]]:
    """Who answers at each threshold: the student keeps the inputs whose confidence is >= the
    threshold and the teacher answers the rest, so those agree with the teacher by definition.

    One point per distinct confidence (highest first), after a first point where the teacher
    answers everything (threshold None): {threshold, coverage (share the student keeps),
    agreement (of all answers with the teacher's), kept_agreement (of the student's own)}.
    """
    conf, agrees = np.asarray(conf, dtype=np.float64), np.asarray(agrees, dtype=bool)
    n = len(conf)
    order = np.argsort(-conf, kind="stable")
    errors = np.cumsum(~agrees[order])
    points: list[dict[str, Any]] = [{"threshold": None, "coverage": 0.0, "agreement": 1.0, "kept_agreement": None}]
    for k in range(1, n + 1):
        if k < n and conf[order[k]] == conf[order[k - 1]]:
            continue  # ties are kept or escalated together
        e = int(errors[k - 1])
        points.append({"threshold": float(conf[order[k - 1]]), "coverage": k / n, "agreement": (n - e) / n,
                       "kept_agreement": (k - e) / k})
    return points


def point_for(curve: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """The point of largest coverage whose agreement reaches `target` (the all-teacher point at worst)."""
    return max((p for p in curve if p["agreement"] >= target), key=lambda p: p["coverage"])


def threshold_of(point: dict[str, Any]) -> float:
    """A point's threshold as a number: escalating everything is an infinite threshold."""
    return math.inf if point["threshold"] is None else float(point["threshold"])


# ---- on a student's held-out answers ----------------------------------------------------------------
def assess(logits: Sequence[np.ndarray], targets: np.ndarray, names: Sequence[str], bins: int = BINS) -> dict[str, Any]:
    """Temperatures (fitted on all inputs), ECE before and after (cross-fitted), reliability
    bins before and after, and the agreement-against-coverage curve; the calibration.json
    content. logits: per field [N, K]; targets [N, F] the teacher's value indices."""
    targets = np.asarray(targets)
    raw = [softmax(z) for z in logits]
    oof = cross_fit(logits, targets)

    def pooled(probs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return (np.concatenate([p.max(-1) for p in probs]),
                np.concatenate([p.argmax(-1) == targets[:, f] for f, p in enumerate(probs)]))

    (c0, ok0), (c1, ok1) = pooled(raw), pooled(oof)
    correct = np.stack([p.argmax(-1) == targets[:, f] for f, p in enumerate(raw)], 1)
    return {
        "method": "temperature",
        "temperatures": {name: fit_temperature(z, targets[:, f]) for f, (name, z) in enumerate(zip(names, logits))},
        "n": len(targets), "ece_before": ece(c0, ok0, bins), "ece_after": ece(c1, ok1, bins), "ece_bins": bins,
        "ece_after_method": f"{FOLDS}-fold cross-fitting: each half scaled by temperatures fitted on the other half",
        "fields": {name: {"ece_before": ece(raw[f].max(-1), correct[:, f], bins),
                          "ece_after": ece(oof[f].max(-1), correct[:, f], bins)} for f, name in enumerate(names)},
        "reliability": {"before": reliability(c0, ok0, bins), "after": reliability(c1, ok1, bins)},
        # one example is kept by the student only when every field is sure enough: its least sure field decides
        "curve": coverage_curve(np.min([p.max(-1) for p in oof], 0), correct.all(1)),
    }


def value_targets(fields, records: Sequence[Record]) -> np.ndarray:
    """[N, F]: the index of the teacher's value of each field in each record."""
    return np.array([[f.values.index(r.fields[f.name]) for f in fields] for r in records], dtype=np.int64).reshape(-1, len(fields))


def assess_student(student, records: Sequence[Record], batch_size: int = 64) -> dict[str, Any]:
    """`assess` on a loaded heads student's raw logits for `records` (inputs cleaned as predict cleans them)."""
    logits = student.logits(clean_inputs(student.task, [r.text for r in records]), batch_size)
    return assess(logits, value_targets(student.fields, records), [f.name for f in student.fields])


def calibrate_confidence(student_dir: Path, data_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Fit the per-field temperatures of the heads student in `student_dir` on the held-out
    split of its shards (`data_dir`, default: the folder it was trained on) and write
    `student_dir`/calibration.json; returns its content."""
    from microdistill.data.shards import ShardSet
    from microdistill.students import PerField, load_student

    student_dir = Path(student_dir)
    student = load_student(student_dir)
    if not isinstance(student, PerField):
        raise ConfidenceError(f"student folder {student_dir}: a {student.kind} student has no confidence per field to "
                              "calibrate; train a classifier-head student (--student heads)")
    data_dir = Path(data_dir or student.meta.get("shards", {}).get("path") or "")
    if not (data_dir / "manifest.json").is_file():
        raise ConfidenceError(f"shard folder {data_dir}: not found; pass --data with the shards the student was trained on")
    shards = ShardSet(data_dir)
    if shards.task().fingerprint() != student.task.fingerprint():
        raise ConfidenceError(f"shard folder {data_dir} is for another task than student {student_dir}; "
                              "pass the shards it was trained on")
    records = list(shards.records("val"))
    if len(records) < 2 * FOLDS:
        raise ConfidenceError(f"shard folder {data_dir}: {len(records)} held-out example(s); temperatures fitted on "
                              "training inputs would keep the student overconfident, so calibration needs a held-out split")
    result = {**assess_student(student, records), "split": "val", "shards": str(data_dir)}
    atomic_write_json(student_dir / CALIBRATION, result)
    say(f"[confidence] {student_dir / CALIBRATION}: ECE {result['ece_before']:.2%} -> {result['ece_after']:.2%} "
        f"(cross-fitted) on {result['n']} held-out examples", progress)
    return result
