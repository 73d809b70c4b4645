"""``benchmarks/method_claims.py``: epochs and trained elements to a pair's matched level, by hand."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from flowdppo import estimators as est

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "method_claims.py"


def load_script():
    spec = importlib.util.spec_from_file_location("method_claims", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(rewards: list[float]) -> dict:
    rows = [{"epoch": e, "eval/reward": r, "eval/kl_to_base": 0.1 * (e + 1)} for e, r in enumerate(rewards)]
    return {"base": {"eval/reward": 0.5}, "rows": rows, "wall_s": 1.0}


def write_report(
    root: Path, arms: dict[str, tuple[list[float], float]], seeds: int = 5, in_results: bool = False
) -> dict:
    """A report folder: results.json with each arm's eval rewards, and each run's ``trained_elements`` per epoch in
    its rows there (``in_results``) or, as a report before results.json kept the key, in its run's metrics.jsonl."""
    results = {"preset": "single", "seeds": seeds, "overrides": [], "arms": {}}
    for label, (rewards, elements) in arms.items():
        results["arms"][label] = {"method": label, "seeds": {str(s): record(rewards) for s in range(seeds)}}
        if in_results:
            for rec in results["arms"][label]["seeds"].values():
                for row in rec["rows"]:
                    row["trained_elements"] = elements
            continue
        for s in range(seeds):
            run = root / "runs" / label / f"seed{s}"
            run.mkdir(parents=True)
            rows = [{"epoch": e, "trained_elements": elements} for e in range(len(rewards))]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "results.json").write_text(json.dumps(results))
    return results


@pytest.mark.parametrize("in_results", [False, True])
def test_epochs_and_elements_to_the_level_are_read_at_the_first_crossing(tmp_path, in_results):
    """Base 0.5, both arms' best 0.9: the level is 0.5 + 0.7 * 0.4 = 0.78. The reference first reaches it at epoch
    2 (3 epochs trained), the fast arm at epoch 0 (1 epoch) with 3x the elements per epoch: epochs 1/3, elements 1."""
    mc = load_script()
    results = write_report(
        tmp_path, {"flow_grpo": ([0.6, 0.7, 0.8, 0.9], 100.0), "fast": ([0.8, 0.9, 0.9, 0.9], 300.0)}, 5, in_results
    )
    assert (tmp_path / "runs").is_dir() != in_results
    level, gain = est.seed_level(*(est.curve(results["arms"][a]["seeds"]["0"]) for a in ("flow_grpo", "fast")))
    assert (level, gain) == pytest.approx((0.78, 0.4))
    assert mc.epochs_to(est.curve(results["arms"]["flow_grpo"]["seeds"]["0"]), level) == 3.0
    assert math.isnan(mc.epochs_to(est.curve(results["arms"]["flow_grpo"]["seeds"]["0"]), 0.95))  # never reached
    epochs, elements = mc.cost_to_level(tmp_path, results, "fast", "flow_grpo")
    assert epochs.pairs == elements.pairs == 5
    assert epochs.ratio == pytest.approx((1 / 3, 1 / 3, 1 / 3)) and elements.ratio == pytest.approx((1, 1, 1))


def test_a_pair_whose_reference_never_gains_is_left_out(tmp_path):
    mc = load_script()
    results = write_report(
        tmp_path, {"flow_grpo": ([0.5, 0.45, 0.4, 0.4], 100.0), "fast": ([0.8, 0.9, 0.9, 0.9], 300.0)}
    )
    epochs, elements = mc.cost_to_level(tmp_path, results, "fast", "flow_grpo")
    assert epochs.pairs == elements.pairs == 0 and "level not reached" in epochs.why
