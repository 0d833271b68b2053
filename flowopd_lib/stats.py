"""Uncertainty of evaluation metrics: standard errors and paired bootstrap intervals.

The unit of sampling is the test prompt: a model's samples of one prompt (several seeds) are
averaged first, then prompts vary. A metric is the mean over strata of the mean over the
stratum's prompts: GenEval's strata are its categories (its overall score is the mean of the
per-category accuracies), every other task has one stratum. Inputs are per-prompt means [P] and
the prompts' strata [P]; `evaluation.sample_scores` makes them from images.

    value, se = metric_and_se(per_prompt, strata)
    diff, low, high = paired_difference(per_prompt_a, per_prompt_b, strata)   # same prompts, same noise
"""
from __future__ import annotations

import numpy as np


def _groups(strata) -> list[np.ndarray]:
    strata = np.asarray(strata)
    return [np.flatnonzero(strata == s) for s in dict.fromkeys(strata.tolist())]


def metric(per_prompt, strata) -> float:
    """Mean over strata of the stratum's mean over prompts."""
    values = np.asarray(per_prompt, dtype=float)
    return float(np.mean([values[g].mean() for g in _groups(strata)]))


def metric_and_se(per_prompt, strata) -> tuple[float, float]:
    """The metric and its standard error (prompts independent within strata; NaN if a stratum
    has a single prompt)."""
    values = np.asarray(per_prompt, dtype=float)
    groups = _groups(strata)
    variances = [values[g].var(ddof=1) / len(g) if len(g) > 1 else np.nan for g in groups]
    return metric(values, strata), float(np.sqrt(np.sum(variances)) / len(groups))


def paired_difference(per_prompt_a, per_prompt_b, strata, n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float]:
    """metric(a) - metric(b) on the same prompts and its percentile bootstrap interval: prompts
    resampled with replacement within each stratum, the same draw for both models (paired)."""
    a, b = np.asarray(per_prompt_a, dtype=float), np.asarray(per_prompt_b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores must cover the same prompts: shapes {a.shape} and {b.shape}")
    diff = a - b
    groups = _groups(strata)
    rng = np.random.default_rng(seed)
    boots = np.zeros(n_boot)
    for g in groups:
        draws = rng.integers(0, len(g), size=(n_boot, len(g)))
        boots += diff[g][draws].mean(axis=1)
    boots /= len(groups)
    tail = (1 - level) / 2
    low, high = np.quantile(boots, [tail, 1 - tail])
    return metric(diff, strata), float(low), float(high)
