"""Which inputs of a pool the teacher should label next: the ones the student is least sure of.

    from microdistill.data.select import choose
    chosen = choose(len(pool), budget=200, strategy="diverse", probs=probs, vectors=vectors)

Teacher labels are the expensive part, and most teach a student little: it already agrees on
them. Given the student's calibrated probabilities per field (`probs`: one [N, n_values] array
per field) and, for `diverse`, one vector per input (the student's pooled reading of it):

    first    the pool's first inputs, as a corpus lists them (the baseline that costs nothing)
    random   a uniform sample (the baseline active selection must beat)
    margin   the smallest gap between the best and second-best value of the least sure field
    entropy  the largest summed entropy of the fields (each divided by log of its values)
    diverse  among the 4 x budget least sure by margin, a greedy k-centre cover of their vectors,
             so a batch is not fifty copies of one hard case

Pure functions over arrays: what reads the pool, runs the student and labels the choice lives in
flows/select.py.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

STRATEGIES = ("first", "random", "margin", "entropy", "diverse")
NEEDS_STUDENT = ("margin", "entropy", "diverse")
CANDIDATES_PER_PICK = 4  # diverse: how many uncertain inputs a k-centre pick chooses among


def margin(probs: Sequence[np.ndarray]) -> np.ndarray:
    """[N] the least sure field's gap between its best and second-best value (small: unsure)."""
    gaps = []
    for p in probs:
        top = np.sort(p, axis=1)[:, ::-1]
        gaps.append(top[:, 0] - (top[:, 1] if p.shape[1] > 1 else 0.0))
    return np.min(np.stack(gaps), axis=0)


def entropy(probs: Sequence[np.ndarray]) -> np.ndarray:
    """[N] the fields' entropies, each divided by log(its number of values), summed (large: unsure)."""
    total = np.zeros(len(probs[0]))
    for p in probs:
        if p.shape[1] > 1:
            q = np.clip(p, 1e-12, 1.0)
            total += -(q * np.log(q)).sum(1) / np.log(p.shape[1])
    return total


def k_centre(vectors: np.ndarray, k: int) -> list[int]:
    """Greedy farthest-point cover: start at the vector farthest from the mean, then each time the
    one farthest from every vector chosen so far (cosine distance). Indices into `vectors`."""
    if k >= len(vectors):
        return list(range(len(vectors)))
    v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    centre = v.mean(0)
    chosen = [int(np.argmin(v @ centre))]
    nearest = 1.0 - v @ v[chosen[0]]
    for _ in range(k - 1):
        i = int(np.argmax(nearest))
        chosen.append(i)
        nearest = np.minimum(nearest, 1.0 - v @ v[i])
    return chosen


def choose(n: int, budget: int, strategy: str, probs: Sequence[np.ndarray] | None = None,
           vectors: np.ndarray | None = None, seed: int = 0) -> list[int]:
    """The indices (into a pool of `n`) of the `budget` inputs to label next, best first."""
    if strategy not in STRATEGIES:
        raise ValueError(f"selection {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    budget = min(budget, n)
    if strategy == "first":
        return list(range(budget))
    if strategy == "random":
        return [int(i) for i in np.random.default_rng(seed).permutation(n)[:budget]]
    if probs is None or (strategy == "diverse" and vectors is None):
        raise ValueError(f"selection {strategy!r} needs the student's probabilities" +
                         (" and vectors" if strategy == "diverse" else ""))
    if strategy == "entropy":
        return [int(i) for i in np.argsort(-entropy(probs), kind="stable")[:budget]]
    order = np.argsort(margin(probs), kind="stable")
    if strategy == "margin":
        return [int(i) for i in order[:budget]]
    pool = order[:CANDIDATES_PER_PICK * budget]
    return [int(pool[i]) for i in k_centre(vectors[pool], budget)]
