"""The five ratio / trust-region methods train as recorded before samplers and algorithms became separate parts
(three digits epochs each, and one run with beta, a replayed anchor, two passes and gradient accumulation).
``data/reference_rows.json`` holds the rows; metrics added since (``NEW_KEYS``) are left out, every recorded key is
compared.

Portable: rows recorded on one CPU are compared within a tolerance, not bitwise. Another CPU runs other kernels
(AVX-512 vs AVX2 code paths in ATen, MKL and oneDNN), which round differently; a training run carries the difference
on. ``benchmarks/reference_spread.py`` reruns the cases on every kernel path this machine offers
(``ATEN_CPU_CAPABILITY``, ``MKL_ENABLE_INSTRUCTIONS``, ``DNNL_MAX_CPU_ISA``, MKL's ``MKL_CBWR``) at 1 and 2 threads.
Measured on an AMD EPYC (AVX-512): the thread count changes nothing; the AVX2, SSE and MKL-compatible paths move the
non-cancelling keys by at most 6e-5 relative (``kl_max``; the rewards and FID by < 2e-6) and the nearly cancelling
means by more (``log_ratio_mean`` 1.3e-2 relative of a 7e-7 value; another CPU showed 3e-2 on it and on ``loss``).
Hence:

- every float within ``RTOL`` = 1e-3 relative: 17x the largest spread measured on a non-cancelling key, and far
  below what a change of the method moves (one epoch moves the rollout reward by ~1e-2);
- a mean of terms that cancel within an absolute tolerance scaled to its terms, not to its value:
  ``loss`` (a mean of -A rho over elements, |A| ~ 1) within 1e-3, ``log_ratio_mean`` within 1e-2 of the row's
  largest |log rho| (from ``ratio_min`` / ``ratio_max``);
- a masked fraction within ``FRACTION_ATOL`` = 2e-2: one element of a trained step's 80 (1/80 = 0.0125) crossing
  the threshold, which another rounding can do (none did in the settings above);
- integers (epochs, trained steps, skipped steps) exactly.

Same-process determinism stays exact: one case trained twice in one process gives bitwise equal rows.
"""

import json
import math
from pathlib import Path

import pytest

from flowdppo.config import load_config
from flowdppo.trainer import train

NEW_KEYS = {
    "time_s",
    "dim_kl_p50",
    "dim_kl_p90",
    "dim_kl_p99",
    "first_moved_log_ratio_mean",
    "first_moved_log_ratio_std",
    "eval/kl_to_base",
    "trained_elements",
    "optimizer_steps",
}
REFERENCE = json.loads((Path(__file__).parent / "data" / "reference_rows.json").read_text())
RTOL = 1e-3
LOSS_ATOL = 1e-3
LOG_RATIO_SCALE = 1e-2
FRACTION_ATOL = 2e-2


def row_tolerance(key: str, row: dict) -> tuple[float, float]:
    """(relative, absolute) tolerance of ``key`` in a recorded ``row`` (see the module docstring)."""
    if key == "loss":
        return RTOL, LOSS_ATOL
    if key == "log_ratio_mean":
        largest = max(abs(math.log(row["ratio_max"])), abs(math.log(row["ratio_min"])))
        return RTOL, LOG_RATIO_SCALE * largest
    if key.startswith("masked_fraction"):
        return RTOL, FRACTION_ATOL
    return RTOL, 0.0


def row_differences(recorded: dict, got: dict) -> list[str]:
    """The keys of ``recorded`` that ``got`` misses or differs in beyond the tolerance, each as a readable line."""
    problems = []
    for key, want in recorded.items():
        have = got.get(key)
        if isinstance(want, float):
            rel, atol = row_tolerance(key, recorded)
            ok = isinstance(have, float) and math.isclose(have, want, rel_tol=rel, abs_tol=atol)
        else:
            ok = have == want
        if not ok:
            problems.append(f"epoch {recorded['epoch']} {key}: recorded {want!r}, got {have!r}")
    return problems


def train_rows(case: dict, out: Path) -> list[dict]:
    run = train(load_config(case["method"], overrides=case["overrides"]), out, progress=False)
    return [{k: v for k, v in r.items() if k not in NEW_KEYS} for r in run.rows()]


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_metrics_rows_are_the_recorded_ones_within_the_cross_cpu_tolerance(tmp_path, one_thread, name):
    case = REFERENCE[name]
    rows = train_rows(case, tmp_path / "run")
    assert len(rows) == len(case["rows"])
    problems = [line for want, got in zip(case["rows"], rows, strict=True) for line in row_differences(want, got)]
    assert not problems, "\n".join(problems)


def test_the_tolerance_still_catches_a_changed_method():
    """The comparison is not vacuous: Flow-GRPO's rows are not Flow-DPPO's, nor a 1% change of one reward."""
    dppo = REFERENCE["flow_dppo"]["rows"]
    assert row_differences(dppo[-1], REFERENCE["flow_grpo"]["rows"][-1])
    nudged = {**dppo[-1], "eval/reward": dppo[-1]["eval/reward"] * 1.01}
    assert row_differences(dppo[-1], nudged) == [
        f"epoch 2 eval/reward: recorded {dppo[-1]['eval/reward']!r}, got {nudged['eval/reward']!r}"
    ]


def test_the_same_run_twice_in_one_process_is_bitwise_equal(tmp_path, one_thread):
    case = REFERENCE["flow_dppo+beta+replay"]
    assert train_rows(case, tmp_path / "a") == train_rows(case, tmp_path / "b")
