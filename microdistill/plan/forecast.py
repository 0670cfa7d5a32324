"""How big a corpus must be: the learning-curve forecast of the examples a target agreement needs.

    microdistill cost runs/demo --target-agreement 0.9 [--points 250:0.61,500:0.72]

Quality is not linear in the corpus: student error against the teacher falls roughly as a
power of the number of teacher-labelled examples, so `forecast` fits error(n) = a * n^(-b) to
a pilot's points (flows/cost.py trains the pilot) and says how many examples reach a target
agreement; `plan_from_forecast` plans that corpus for the cost model.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from microdistill.data.shards import VAL_FRACTION
from microdistill.plan.cost import CostConfig
from microdistill.plan.measured import CostError

# A perfect score on a small held-out set only says the error is below that set's resolution;
# flooring it keeps log(error) finite without letting one point dominate the fit.
ERROR_FLOOR = 1e-3
# Beyond this many examples a forecast says nothing useful about a teacher budget.
MAX_FORECAST_N = 1e12


def plan_from_forecast(cfg: CostConfig, fc: dict) -> CostConfig:
    """Plan the corpus a forecast asks for, when no corpus size was given.

    The forecast counts training examples; the teacher also labels the held-out split.
    """
    if cfg.corpus_size is not None or not fc.get("reachable"):
        return cfg
    return replace(cfg, corpus_size=math.ceil(fc["n_needed"] / (1 - VAL_FRACTION)))


def fit_learning_curve(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(a, b) of error(n) = a * n^(-b), least squares on log(error) = log(a) - b log(n).

    `points` are (training examples, agreement with the teacher in [0, 1]).
    """
    if len({n for n, _ in points}) < 2:
        raise CostError(f"a learning curve needs points at two or more training sizes, got {len(points)} point(s)")
    for n, acc in points:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise CostError(f"learning-curve point size must be a positive integer, got {n!r}")
        if not 0.0 <= acc <= 1.0:
            raise CostError(f"learning-curve point agreement must be in [0, 1], got {acc!r} at n={n}")
    n = np.array([p[0] for p in points], dtype=np.float64)
    err = np.clip(1.0 - np.array([p[1] for p in points], dtype=np.float64), ERROR_FLOOR, 1.0)
    design = np.stack([np.ones_like(n), np.log(n)], axis=1)
    (log_a, slope), *_ = np.linalg.lstsq(design, np.log(err), rcond=None)
    return float(np.exp(log_a)), float(-slope)


def forecast(points: list[tuple[int, float]], target: float) -> dict:
    """How many teacher-labelled training examples reach `target` agreement.

    Returns {a, b, target, n_needed (int, or None), reachable, points}. Not reachable when the
    fitted error does not fall with more data (b <= 0) or only beyond MAX_FORECAST_N examples.
    """
    if not 0.0 < target < 1.0:
        raise CostError(f"--target-agreement must be between 0 and 1 (exclusive), got {target}")
    a, b = fit_learning_curve(points)
    n_needed = None
    if b > 0:
        n = (a / (1.0 - target)) ** (1.0 / b) if a > 1.0 - target else 1.0
        # Round first so float noise in an exact fit cannot push ceil() one example up.
        n_needed = math.ceil(round(n, 6)) if n <= MAX_FORECAST_N else None
    return {
        "a": a, "b": b, "target": target, "n_needed": n_needed, "reachable": n_needed is not None,
        "points": [[int(n), float(acc)] for n, acc in points],
    }


def parse_points(text: str) -> list[tuple[int, float]]:
    """'250:0.61,500:0.72' -> [(250, 0.61), (500, 0.72)]."""
    try:
        return [(int(n), float(acc)) for n, acc in (item.split(":") for item in text.split(",") if item.strip())]
    except ValueError:
        raise CostError(f"--points {text!r}: expected examples:agreement pairs, e.g. 250:0.61,500:0.72") from None
