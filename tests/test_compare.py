"""DigitsBench: frontier and matched comparisons on known curves; the compare command end to end."""

import json
import math

import numpy as np
import pytest

from flowdppo.cli import main
from flowdppo.compare import (
    CONTROL,
    across_dims,
    arm_table,
    claims,
    equivalence_margin,
    matched_levels,
    preset_arms,
    probe_line,
    render_report,
    run_measures,
    run_overrides,
)
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
    # seed 1 of the baseline falls below its base: the pair's level is 0.8 of the way from 0.5 to the lower arm's
    # mean best (0.9 + 0.5 + 0.9) / 3, that seed never reaches it, the other two are compared
    for row in arms["flow_grpo"]["seeds"]["1"]["rows"]:
        row["eval/reward"] = 0.4
    _, table = arm_table(results)
    lines = claims(results, table)
    level = 0.5 + 0.8 * ((0.9 + 0.5 + 0.9) / 3 - 0.5)
    at_level = [line for line in lines if f"at reward {level:.3f} (2 of 3 seeds)" in line]
    assert len(at_level) == 3 and all("n/a" not in line for line in at_level), lines
    # no seed of the baseline gains: nothing to match
    for record in arms["flow_grpo"]["seeds"].values():
        for row in record["rows"]:
            row["eval/reward"] = 0.4
    _, table = arm_table(results)
    lines = claims(results, table)
    assert sum("**n/a: no gain over the base**" in line for line in lines) == 3
    assert "n/a" not in next(line for line in lines if "reward at KL" in line)  # matched KL: still compared


def test_matched_levels_use_the_evaluation_kl_and_give_the_ratio_per_level():
    """KL_dppo = KL_grpo / 2 at every reward: ratio 0.5 at each level, every seed reaching it; the evaluation-time
    KL (here 3x the rollout's) is what is compared, not the rollout's."""
    arms = {}
    for label, kl_scale in (("flow_dppo", 0.5), ("flow_grpo", 1.0)):
        seeds = {str(s): synthetic_record(kl_scale, s) for s in range(3)}
        for record in seeds.values():
            for row in record["rows"]:
                row["eval/kl_to_base"] = 3 * row["kl_to_base"]
        arms[label] = {"method": label, "overrides": [], "group": "", "seeds": seeds}
    levels = matched_levels({"preset": "single", "arms": arms})
    assert [row["fraction"] for row in levels] == [0.7, 0.8, 0.9]
    for row in levels:
        assert row["pair"] == "flow_dppo vs flow_grpo" and row["reached"] == (3, 3, 3)
        assert row["ratio"][0] == pytest.approx(0.5) and row["verdict"] == "less KL"
    # level 0.8 of the way from 0.5 to 0.9 = 0.82: on the segment (0.8 at KL 3/4 s, 0.9 at KL s) of seed 0
    assert levels[1]["reward"] == pytest.approx(0.82)
    expected = np.mean([3 * (0.75 + 0.2 * 0.25) * (1 + 0.01 * s) for s in range(3)])
    assert levels[1]["kl"][1] == pytest.approx(expected)
    # a run that never leaves the base: no gain over the base to match
    for record in arms["flow_grpo"]["seeds"].values():
        for row in record["rows"]:
            row["eval/reward"] = 0.5
    assert {row["verdict"] for row in matched_levels({"preset": "single", "arms": arms})} == {"no gain over the base"}


def test_equivalence_margin_is_the_larger_end_of_the_ci():
    from scipy.stats import t

    diffs = [-0.02, 0.03, 0.01, 0.0]
    half = t.ppf(0.975, 3) * np.std(diffs, ddof=1) / 2
    margin = max(abs(np.mean(diffs) - half), abs(np.mean(diffs) + half))
    relative = f"({100 * margin / 0.5:.0f}% of the baseline)"
    assert equivalence_margin(diffs, [0.5, 0.5, 0.5, 0.5]) == f"\\|d\\| > {margin:.3g} {relative}"
    assert equivalence_margin(diffs) == f"\\|d\\| > {margin:.3g}"


def test_probe_says_whether_the_regime_is_reached(tmp_path, capsys):
    probe = {"dim": 4096, "epochs": 5, "dim_kl_p90": 0.3, "masked_fraction_pos_adv": 0.01,
             "masked_fraction_neg_adv": 0.05, "reached": True}  # fmt: skip
    assert "p90 of dim*D 0.3" in probe_line(probe) and probe_line(probe).endswith("regime is reached.")
    args = ["compare", "--preset", "calib", "--probe-only", "--out", str(tmp_path / "probe"), "epochs=2",
            "group_size=4", "eval_samples_per_class=2"]  # fmt: skip
    assert main(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("Flow-GRPO (eps 1e-4), 2 epochs at dim 64: p90 of dim*D ")
    assert line.endswith("regime is NOT reached.")  # dim 64: the ratio's noise swamps D
    assert main(["compare", "--preset", "dims"]) == 2
    assert "unknown preset 'dims'" in capsys.readouterr().err


def test_presets_and_half_rollouts():
    assert [a.label for a in preset_arms("single", ("flow_dppo", "flow_grpo"))] == ["flow_dppo", "flow_grpo"]
    epochs = {a.label: a for a in preset_arms("epochs", ("flow_dppo",))}
    assert set(epochs) == {"flow_dppo/I1", "flow_dppo/I2", "flow_dppo/I4", "flow_dppo/half-I2"}
    assert run_overrides(epochs["flow_dppo/half-I2"], ["epochs=30"], seed=2)[-2:] == ["epochs=15", "seed=1002"]
    calib = {a.label: a for a in preset_arms("calib")}
    assert set(calib) == {"flow_dppo", CONTROL, "flow_grpo/eps0.0003", "flow_grpo/eps0.001", "flow_grpo/eps0.003",
                          "grpo_guard/eps5e-05", "grpo_guard/eps0.0002"}  # fmt: skip
    for dim, u in (("1024", 4), ("4096", 8)):
        arms = preset_arms(f"dim{dim}", ("flow_dppo", "flow_grpo"))
        assert [a.label for a in arms] == ["flow_dppo", "flow_grpo", CONTROL]
        assert all(f"digits_upsample={u}" in run_overrides(a, []) for a in arms)
    heldout = preset_arms("heldout")
    assert [a.label for a in heldout] == ["flow_dppo", "flow_grpo", "grpo_guard", CONTROL]
    assert all("digits_classes=[0,1,2,3,4]" in run_overrides(a, []) for a in heldout)
    stress = {a.label: run_overrides(a, [], 0) for a in preset_arms("stress")}
    assert "loss.clip_range=0.0016" in stress["flow_grpo/eps0.0016"]  # eps * dim equal to SD3.5's 1e-4 * 65,536
    assert all({"digits_upsample=8", "optim.lr=3e-3"} <= set(o) for o in stress.values())
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
    assert main(["compare", "--report-only", str(tmp_path)]) == 2  # not a compare folder
    assert f"no results.json in {tmp_path}" in capsys.readouterr().err
    (tmp_path / "results.json").write_text("[1, 2]")
    assert main(["compare", "--report-only", str(tmp_path)]) == 2
    assert "results.json is not a compare results file" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    results["arms"]["flow_grpo"]["seeds"] = {}  # a preset still running: its runs are not all in
    (out / "results.json").write_text(json.dumps(results))
    assert main(["compare", "--report-only", str(out)]) == 2
    assert f"holds 1 of 2 runs; finish it with `flowdppo compare --preset smoke --seeds 1 --out {out} epochs=2" in (
        capsys.readouterr().err)
    assert (out / "REPORT.md").read_text() == report  # the finished report is left as it was


def test_epochs_report_compares_several_passes_with_one(tmp_path):
    arms = {}
    for label, kl_scale in (("flow_dppo/I1", 0.5), ("flow_dppo/I2", 1.0)):
        seeds = {str(s): synthetic_record(kl_scale, s) for s in range(2)}
        arms[label] = {"method": "flow_dppo", "overrides": [], "group": label[-2:], "seeds": seeds}
    (tmp_path / "results.json").write_text(json.dumps({"preset": "epochs", "arms": arms, "overrides": []}))
    report = render_report(tmp_path).read_text()
    assert "| flow_dppo | I2 | 1.000 ± 0.000 |" in report  # same final reward with two passes as with one
    assert (tmp_path / "inner_epochs.png").stat().st_size > 0


def test_across_dims_table_reads_each_dim_report(tmp_path):
    """One row per dim and pair: KL ratio 0.5 at the 0.8 level, the baseline's dropped fractions by sign."""
    arms = {}
    for label, kl_scale, pos, neg in (("flow_dppo", 0.5, 0.1, 0.1), ("flow_grpo", 1.0, 0.02, 0.3)):
        seeds = {str(s): synthetic_record(kl_scale, s) for s in range(3)}
        for record in seeds.values():
            for row in record["rows"]:
                row.update({"masked_fraction_pos_adv": pos, "masked_fraction_neg_adv": neg, "dim_kl_p90": 2.0})
        arms[label] = {"method": label, "overrides": [], "group": "dim", "seeds": seeds}
    (tmp_path / "dim1024").mkdir()
    (tmp_path / "dim1024" / "results.json").write_text(json.dumps({"preset": "dim1024", "arms": arms, "overrides": []}))
    assert across_dims(tmp_path) == []  # not rendered yet: a preset still running is left out
    render_report(tmp_path / "dim1024")
    header, _, row = across_dims(tmp_path)
    assert "KL ratio at reward level 0.8" in header
    assert row.startswith("| 1024 | flow_dppo vs flow_grpo | 0.50 [0.50, 0.50] | 3/3, 3/3 |")
    assert "| 2 | 0.020 / 0.300 | less KL | holds |" in row
    assert across_dims(tmp_path / "dim1024") == []  # no dim reports under it
    (tmp_path / "dim1024-lr").mkdir()  # the same preset with a user override: rows of its own, after the plain ones
    (tmp_path / "dim1024-lr" / "results.json").write_text(
        json.dumps({"preset": "dim1024", "arms": arms, "overrides": ["optim.lr=3e-3"]}))
    render_report(tmp_path / "dim1024-lr")
    rows = across_dims(tmp_path)[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| 1024", "| 1024 optim.lr=3e-3"]


def test_drawdown_and_collapse():
    """Eval reward 0.5 (base) -> 0.6, 0.7, 0.4: drawdown 0.3 from the peak, and it ended below the base."""
    record = synthetic_record(1.0, 0)
    for row, reward in zip(record["rows"], (0.6, 0.7, 0.4, 0.4), strict=True):
        row["eval/reward"] = reward
    measures = run_measures(record)
    assert measures["drawdown"] == pytest.approx(0.3) and measures["collapsed"] == 1.0
    assert run_measures(synthetic_record(1.0, 0))["drawdown"] == 0.0  # still rising at the end
    assert run_measures(synthetic_record(1.0, 0))["collapsed"] == 0.0
