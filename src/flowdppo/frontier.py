"""KL-proximal efficiency: the reward-vs-KL frontier of a run and the matched comparisons, pure numpy.

A run gives points ``(kl_i, reward_i)`` over training (KL to the base, in-domain reward). Its frontier
``F(k) = max{reward_i : kl_i <= k}`` is the best reward reached within a KL budget ``k``, linearly
interpolated between the points where it rises (and flat after the last one).
"""

from __future__ import annotations

import math

import numpy as np


def frontier(kl: np.ndarray, reward: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rising points of ``F``: sorted by KL, each with a reward above every point of lower KL."""
    order = np.argsort(kl, kind="stable")
    xs, ys = [], []
    for k, r in zip(np.asarray(kl, float)[order], np.asarray(reward, float)[order], strict=True):
        if not ys or r > ys[-1]:
            xs.append(k)
            ys.append(r)
    return np.array(xs), np.array(ys)


def reward_at_kl(kl: np.ndarray, reward: np.ndarray, budget: float) -> float:
    """``F(budget)``: best reward within the KL budget (interpolated); NaN below the first point."""
    xs, ys = frontier(kl, reward)
    if budget < xs[0]:
        return math.nan
    return float(np.interp(budget, xs, ys))


def kl_at_reward(kl: np.ndarray, reward: np.ndarray, target: float) -> float:
    """Smallest KL at which ``F`` reaches ``target`` (interpolated); NaN if it never does."""
    xs, ys = frontier(kl, reward)
    if target > ys[-1]:
        return math.nan
    if target <= ys[0]:
        return float(xs[0])
    return float(np.interp(target, ys, xs))  # ys is strictly increasing


def mean_ci(values: list[float] | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of its Student-t confidence interval (NaN-free values; half-width 0 for one)."""
    from scipy.stats import t

    v = np.asarray([x for x in values if not math.isnan(x)], float)
    if len(v) == 0:
        return math.nan, math.nan
    if len(v) == 1:
        return float(v[0]), 0.0
    return float(v.mean()), float(t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def verdict(differences: list[float], better: str = "lower") -> str:
    """ "holds" if the CI of the per-seed differences lies on the ``better`` side of 0, "does not hold" if it
    lies wholly on the other side, else "inconclusive"."""
    mean, half = mean_ci(differences)
    if math.isnan(mean):
        return "inconclusive"
    sign = -1 if better == "lower" else 1
    if sign * mean - half > 0:
        return "holds"
    if sign * mean + half < 0:
        return "does not hold"
    return "inconclusive"


def value_at_reward(reward: np.ndarray, value: np.ndarray, target: float) -> float:
    """A measure (e.g. diversity) when the reward first reaches ``target`` in training order,
    linearly interpolated between the two evaluations around the crossing; NaN if it never does."""
    reward, value = np.asarray(reward, float), np.asarray(value, float)
    above = np.nonzero(reward >= target)[0]
    if len(above) == 0:
        return math.nan
    i = int(above[0])
    if i == 0:
        return float(value[0])
    w = (target - reward[i - 1]) / (reward[i] - reward[i - 1])
    return float(value[i - 1] + w * (value[i] - value[i - 1]))
