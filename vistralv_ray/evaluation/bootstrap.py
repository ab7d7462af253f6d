"""Bootstrap 95% intervals of a metric, and the paired bootstrap that compares two models on one set.

Questions are resampled with replacement and the metric reduced again from its per-question
statistics (`ItemScores`), so corpus BLEU is recomputed from resampled n-gram counts. CIDEr-D keeps the
document frequencies of the full set: recomputing them per resample would cost a full re-score each
time and changes the interval little (the idf of a large set barely moves under resampling).
"""

from __future__ import annotations

import numpy as np

from vistralv_ray.evaluation.metrics import ItemScores

DEFAULT_RESAMPLES = 1000
CONFIDENCE = 0.95


def resamples(n: int, count: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(count, n) indices; a fixed seed so that a rerun reports the same interval."""
    return np.random.default_rng(seed).integers(0, n, size=(count, n))


def interval(samples: np.ndarray, confidence: float = CONFIDENCE) -> list[float]:
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.nanpercentile(samples, [tail, 100 - tail])
    return [float(lo), float(hi)]


def bootstrap_interval(scores: ItemScores, count: int = DEFAULT_RESAMPLES, seed: int = 0) -> list[float] | None:
    """The percentile 95% interval of the metric; None for an empty set."""
    n = len(scores.values)
    if n == 0:
        return None
    return interval(np.asarray([scores.score(idx) for idx in resamples(n, count, seed)]))


def paired_bootstrap(a: ItemScores, b: ItemScores, count: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """B - A on the same questions: the difference, its 95% interval, and a two-sided p-value (twice the
    share of resamples on the far side of zero, at most 1). `a` and `b` hold the same questions in the
    same order; every resample draws the same questions for both."""
    n = len(a.values)
    if n != len(b.values):
        raise ValueError(f"paired bootstrap: {n} questions against {len(b.values)}")
    if n == 0:
        return {"difference": None, "ci95": None, "p_value": None}
    deltas = np.asarray([b.score(idx) - a.score(idx) for idx in resamples(n, count, seed)])
    p = min(1.0, 2 * min(float(np.mean(deltas <= 0)), float(np.mean(deltas >= 0))))
    return {"difference": b.score() - a.score(), "ci95": interval(deltas), "p_value": p}
