"""Uncertainty of evaluation metrics: standard errors and paired bootstrap intervals.

The unit of sampling is the test prompt: a model's samples of one prompt (several seeds) are
averaged first, then prompts vary. A metric is the mean over strata of the mean over the
stratum's prompts: GenEval's strata are its categories (its overall score is the mean of the
per-category accuracies), every other task has one stratum. Inputs are per-prompt means [P] and
the prompts' strata [P]; `evaluation.sample_scores` makes them from images.

    value, se = metric_and_se(per_prompt, strata)
    diff, low, high = paired_difference(per_prompt_a, per_prompt_b, strata)   # same prompts, same noise
    ratio, low, high = paired_ratio(per_prompt_a, per_prompt_b, strata)        # metric(a) / metric(b)

`paired_bootstrap` is the general form (`claims` uses it): any statistic of several models' metrics,
where a model may have replicates (e.g. training seeds, [seeds, P]): each bootstrap draw resamples
the prompts (within strata, the same draw for every model) and each model's seeds with replacement,
so the interval covers seed-to-seed variation as well as the choice of prompts.
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


def _replicates(samples) -> np.ndarray:
    """[replicates, prompts] float array from [prompts] or [replicates, prompts]."""
    array = np.asarray(samples, dtype=float)
    return array[None] if array.ndim == 1 else array


def paired_bootstrap(statistic, samples, strata, n_boot: int = 2000, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
    """statistic(metric_1, ..., metric_k) of k models' metrics on the same prompts, and its percentile
    bootstrap interval. samples: one array per model, per-prompt scores [P] or [replicates, P] (a
    model's replicates, e.g. training seeds, are averaged prompt by prompt). The estimate is the
    statistic of the metrics of those averages; each draw resamples prompts within each stratum (the
    same draw for every model: paired) and each model's replicates with replacement. `statistic`
    must work elementwise on arrays of draws (e.g. np.subtract, np.divide)."""
    arrays = [_replicates(s) for s in samples]
    strata = np.asarray(strata)
    if any(a.shape[1] != len(strata) for a in arrays):
        raise ValueError(f"paired scores must cover the same prompts: {[a.shape[1] for a in arrays]} prompts, "
                         f"{len(strata)} strata labels")
    groups = _groups(strata)
    rng = np.random.default_rng(seed)
    prompt_draws = [rng.integers(0, len(g), size=(n_boot, len(g))) for g in groups]
    metrics = []
    for a in arrays:
        pooled = a[rng.integers(0, len(a), size=(n_boot, len(a)))].mean(axis=1)  # [n_boot, P]
        metrics.append(np.mean([np.take_along_axis(pooled[:, g], d, axis=1).mean(axis=1)
                                for g, d in zip(groups, prompt_draws)], axis=0))
    estimate = statistic(*[metric(a.mean(axis=0), strata) for a in arrays])
    tail = (1 - level) / 2
    low, high = np.quantile(statistic(*metrics), [tail, 1 - tail])
    return float(estimate), float(low), float(high)


def paired_ratio(per_prompt_a, per_prompt_b, strata, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """metric(a) / metric(b) on the same prompts (each [P], or [replicates, P]) and its paired
    percentile bootstrap interval (`paired_bootstrap`): the ratio of the stratified means, not the
    mean of per-prompt ratios."""
    return paired_bootstrap(np.divide, [per_prompt_a, per_prompt_b], strata, n_boot, level, seed)
