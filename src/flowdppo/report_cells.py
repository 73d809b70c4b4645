"""The cells of DigitsBench's tables: an estimator's summary (``estimators.Summary``) as text, with its verdict
and what its CI rules out."""

from __future__ import annotations

import math

from flowdppo.estimators import Summary
from flowdppo.frontier import mean_ci, verdict


def ratio_reading(summary: Summary) -> str:
    """ "less KL" if the ratio's CI lies below 1, "more KL" if above, else "no difference shown", with "at higher
    (lower) reward" where the reward difference's CI excludes 0; n/a with why."""
    if summary.why:
        return f"n/a: {summary.why}"
    _, lo, hi = summary.ratio
    (reward, half), reading = summary.reward, "less KL" if hi < 1 else "more KL" if lo > 1 else "no difference shown"
    return reading + (f", at {'higher' if reward > 0 else 'lower'} reward" if abs(reward) > half else "")


def num(value: float, spec: str = ".3g") -> str:
    """``value`` formatted, "n/a" for NaN."""
    return "n/a" if math.isnan(value) else format(value, spec)


def ratio_cells(summary: Summary) -> tuple[str, str]:
    """("ratio [lo, hi]", "ratio < lo or > hi"): the ratio's CI and what it rules out; n/a when n/a."""
    if summary.why:
        return "n/a", "n/a"
    ratio, lo, hi = summary.ratio
    return f"{ratio:.2f} [{lo:.2f}, {hi:.2f}]", f"ratio < {lo:.2f} or > {hi:.2f}"


def equivalence_margin(differences: list[float], reference: list[float] | None = None) -> str:
    """What the 95% CI of the paired differences rules out: any difference larger than ``m = max(|lo|, |hi|)``
    in size, also given relative to the baseline's mean ``reference``."""
    mean, half = mean_ci(differences)
    if math.isnan(mean):
        return "n/a"
    margin = max(abs(mean - half), abs(mean + half))
    ref = abs(mean_ci(reference)[0]) if reference else math.nan
    relative = f" ({100 * margin / ref:.0f}% of the baseline)" if ref > 0 else ""
    return f"\\|d\\| > {margin:.3g}{relative}"


def fmt(mean: float, half: float) -> str:
    """``mean ± half`` with 3 decimals (2 significant digits in e-notation below 0.01); n/a for NaN."""
    if math.isnan(mean):
        return "n/a"
    digits = 3 if abs(mean) >= 1e-2 or mean == 0 else 2
    style = "f" if abs(mean) >= 1e-2 or mean == 0 else "e"
    return f"{mean:.{digits}{style}} ± {half:.{digits}{style}}"


def cells(summary: Summary, better: str, ratio: bool = False, reference: list[float] | None = None) -> dict:
    """A paired row's cells: pairs behind the CI, the difference (or ratio) with its CI, the verdict, what the CI
    rules out; n/a (and why) with fewer than ``MIN_PAIRS`` pairs."""
    row = {"pairs": f"{summary.pairs} of {summary.seeds}"}
    if summary.why:
        return row | {"difference": "n/a", "verdict": f"n/a: {summary.why}", "margin": "n/a"}
    difference, margin = (
        ratio_cells(summary)
        if ratio
        else (fmt(summary.mean, summary.half), equivalence_margin(list(summary.values), reference))
    )
    return row | {"difference": difference, "verdict": verdict(list(summary.values), better), "margin": margin}
