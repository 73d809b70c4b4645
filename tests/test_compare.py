"""DigitsBench: frontier and matched comparisons on known curves; the compare command end to end."""

import json
import math

import numpy as np
import pytest

from flowdppo.cli import main
from flowdppo.compare import arm_table, claims, preset_arms, render_report, run_overrides
from flowdppo.frontier import frontier, kl_at_reward, mean_ci, reward_at_kl, value_at_reward, verdict

KL = np.array([0.0, 1.0, 2.0, 3.0])
REWARD = np.array([0.5, 0.7, 0.6, 0.9])  # the dip at KL 2 is not on the frontier


def test_frontier_and_matched_values_on_a_known_curve():
    xs, ys = frontier(KL, REWARD)
    assert xs.tolist() == [0.0, 1.0, 3.0] and ys.tolist() == [0.5, 0.7, 0.9]
    assert kl_at_reward(KL, REWARD, 0.8) == pytest.approx(2.0)  # half way from (1, 0.7) to (3, 0.9)
    assert kl_at_reward(KL, REWARD, 0.4) == 0.0
    assert math.isnan(kl_at_reward(KL, REWARD, 0.95))
    assert reward_at_kl(KL, REWARD, 2.0) == pytest.approx(0.8)
    assert reward_at_kl(KL, REWARD, 10.0) == pytest.approx(0.9)
    shuffled = np.array([3, 0, 2, 1])
    assert kl_at_reward(KL[shuffled], REWARD[shuffled], 0.8) == pytest.approx(2.0)  # order of points is irrelevant


def test_value_at_reward_interpolates_at_the_first_crossing():
    reward = np.array([0.5, 0.7, 0.6, 0.9])
    diversity = np.array([2.0, 1.6, 1.5, 1.0])
    assert value_at_reward(reward, diversity, 0.6) == pytest.approx(1.8)  # half way 0.5 -> 0.7
    assert value_at_reward(reward, diversity, 0.8) == pytest.approx(1.5 - 0.5 * 2 / 3)  # 0.6 -> 0.9, two thirds
    assert value_at_reward(reward, diversity, 0.4) == 2.0
    assert math.isnan(value_at_reward(reward, diversity, 0.95))


def test_mean_ci_and_verdict():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)  # t(0.975, 2) * s / sqrt(n)
    assert mean_ci([1.0, math.nan]) == (1.0, 0.0)
    assert verdict([-1.0, -1.1, -0.9], "lower") == "holds"
    assert verdict([1.0, 1.1, 0.9], "lower") == "does not hold"
    assert verdict([-1.0, 1.0, 0.1], "lower") == "inconclusive"
    assert verdict([1.0, 1.1, 0.9], "higher") == "holds"


def synthetic_record(kl_scale, seed):
    """A run whose eval reward rises 0.5 -> 0.9 while its KL rises to ``kl_scale``."""
    rows = []
    for e in range(4):
        rows.append({"epoch": e, "reward_mean": 0.5 + 0.1 * e, "kl_to_base": kl_scale * (e + 1) / 4 * (1 + 0.01 * seed),
                     "masked_fraction": 0.1, "eval/reward": 0.6 + 0.1 * e, "eval/accuracy": 0.6 + 0.1 * e,
                     "eval/fid": 10.0 + kl_scale, "eval/diversity": 2.0 - kl_scale})  # fmt: skip
    base = {"eval/reward": 0.5, "eval/accuracy": 0.5, "eval/fid": 10.0, "eval/diversity": 2.0}
    return {"base": base, "rows": rows, "wall_s": 1.0}


def test_claims_from_synthetic_results():
    """DPPO reaches every reward with half the KL of GRPO: claim 1 holds, and it forgets less (claim 2)."""
    arms = {}
    for label, kl_scale in (("flow_dppo", 0.5), ("flow_grpo", 1.0)):
        seeds = {str(s): synthetic_record(kl_scale, s) for s in range(3)}
        arms[label] = {"method": label, "overrides": [], "group": "", "seeds": seeds}
    results = {"preset": "single", "arms": arms, "overrides": [], "seeds": 3}
    _, table = arm_table(results)
    kl_key = next(k for k in table["flow_dppo"] if k.startswith("KL at reward"))
    np.testing.assert_allclose(np.array(table["flow_dppo"][kl_key]) * 2, table["flow_grpo"][kl_key])
    lines = claims(results, table)
    assert len(lines) == 4 and all("flow_dppo vs flow_grpo" in line for line in lines)
    assert all("**holds**" in line for line in lines), lines


def test_presets_and_half_rollouts():
    assert [a.label for a in preset_arms("single", ("flow_dppo", "flow_grpo"))] == ["flow_dppo", "flow_grpo"]
    epochs = {a.label: a for a in preset_arms("epochs", ("flow_dppo",))}
    assert set(epochs) == {"flow_dppo/I1", "flow_dppo/I2", "flow_dppo/I4", "flow_dppo/half-I2"}
    assert run_overrides(epochs["flow_dppo/half-I2"], ["epochs=30"], seed=2)[-2:] == ["epochs=15", "seed=2"]
    assert len(preset_arms("multi", ("flow_dppo", "flow_grpo"))) == 4
    with pytest.raises(ValueError, match="preset must be one of"):
        preset_arms("everything")


def test_compare_smoke_writes_the_report_and_rerenders_identically(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["compare", "--preset", "smoke", "--methods", "flow_grpo,flow_dppo", "--seeds", "1", "--out", str(out)]
    assert main(args + ["epochs=2", "group_size=4", "eval_every=1"]) == 0
    for name in ("results.json", "REPORT.md", "frontier.png", "curves.png", "ood.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "REPORT.md").read_text()
    assert "| flow_grpo |" in report and "| flow_dppo |" in report
    (out / "REPORT.md").unlink()
    assert main(["compare", "--report-only", str(out)]) == 0  # no training: results.json only
    assert (out / "REPORT.md").read_text() == report
    assert render_report(out).read_text() == report
    # a second report with the same runs trains nothing: it takes them from the first
    again = tmp_path / "again"
    cmd = ["compare", "--preset", "smoke", "--methods", "flow_dppo", "--seeds", "1", "--out", str(again)]
    assert main(cmd + ["--reuse", str(out), "epochs=2", "group_size=4", "eval_every=1"]) == 0
    reused = json.loads((again / "results.json").read_text())["arms"]["flow_dppo"]["seeds"]["0"]
    first = json.loads((out / "results.json").read_text())["arms"]["flow_dppo"]["seeds"]["0"]
    assert reused["reused_from"] == str(out) and reused["rows"] == first["rows"]
    assert not (again / "runs").exists()
    assert main(["compare", "--gather", str(tmp_path)]) == 0
    assert "[bench](bench/REPORT.md)" in (tmp_path / "REPORT.md").read_text()
    assert main(["compare", "--methods", "ppo"]) == 2
    assert "unknown method 'ppo'" in capsys.readouterr().err


def test_epochs_report_compares_several_passes_with_one(tmp_path):
    arms = {}
    for label, kl_scale in (("flow_dppo/I1", 0.5), ("flow_dppo/I2", 1.0)):
        seeds = {str(s): synthetic_record(kl_scale, s) for s in range(2)}
        arms[label] = {"method": "flow_dppo", "overrides": [], "group": label[-2:], "seeds": seeds}
    (tmp_path / "results.json").write_text(json.dumps({"preset": "epochs", "arms": arms, "overrides": []}))
    report = render_report(tmp_path).read_text()
    assert "| flow_dppo | I2 | 1.000 ± 0.000 |" in report  # same final reward with two passes as with one
    assert (tmp_path / "inner_epochs.png").stat().st_size > 0
