"""The statistics of the evaluation protocol (``protocol.py``): a reward's mean over prompts with its percentile
bootstrap CI, and the paired difference of the trained and the base policy on the same prompts."""

from __future__ import annotations

from functools import partial

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0


def bootstrap_mean_ci(
    values,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = BOOTSTRAP_CONFIDENCE,
    seed: int = BOOTSTRAP_SEED,
    chunk: int = 1_000,
) -> dict[str, float]:
    """Mean of ``values`` (one number per prompt) and its percentile-bootstrap confidence interval.

    Estimator: ``m = (1/n) sum_i v_i``. Resample ``B = resamples`` times ``n`` indices uniformly with replacement
    (numpy's ``default_rng(seed)``, drawn ``chunk`` resamples at a time, which bounds memory and not the result),
    ``m*_b`` the mean of resample ``b``; the interval is the empirical ``alpha/2`` and ``1 - alpha/2`` quantiles of
    ``m*_1 .. m*_B`` (linear interpolation), ``alpha = 1 - confidence``. For the paired difference of two
    policies on the same prompts, pass ``v_i = trained_i - base_i`` (prompts resampled together).

    Returns ``{"mean": m, "low": ..., "high": ...}``; one value gives a zero-width interval.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"bootstrap_mean_ci: needs a non-empty 1-D array, got shape {values.shape}")
    if not 0 < confidence < 1 or resamples < 1:
        raise ValueError(f"bootstrap_mean_ci: confidence in (0, 1) and resamples >= 1, got {confidence}, {resamples}")
    rng = np.random.default_rng(seed)
    n = values.size
    means = np.concatenate(
        [
            values[rng.integers(0, n, size=(min(chunk, resamples - start), n))].mean(axis=1)
            for start in range(0, resamples, chunk)
        ]
    )
    alpha = 1 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {"mean": float(values.mean()), "low": float(low), "high": float(high)}


def per_prompt_means(scores: list[list[float]]) -> np.ndarray:
    """A prompt's score: the mean over its K samples, ``(n_prompts,)``."""
    return np.asarray(scores, dtype=np.float64).mean(axis=1)


def summarize(
    scores: dict[str, dict[str, list[list[float]]]],
    reward_names: list[str],
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = BOOTSTRAP_CONFIDENCE,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, dict[str, dict[str, float]]]:
    """Per reward: base, trained and ``difference`` (trained - base, paired by prompt), each a bootstrap CI of the
    mean over prompts of the per-prompt means."""
    ci = partial(bootstrap_mean_ci, resamples=resamples, confidence=confidence, seed=seed)
    summary = {}
    for name in reward_names:
        base, trained = per_prompt_means(scores["base"][name]), per_prompt_means(scores["trained"][name])
        summary[name] = {"base": ci(base), "trained": ci(trained), "difference": ci(trained - base)}
    return summary


def excludes_zero(interval: dict[str, float]) -> bool:
    return interval["low"] > 0 or interval["high"] < 0
