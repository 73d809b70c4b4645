"""DigitsBench: frontier, matched and per-seed comparisons on known curves; the compare command end to end."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import t, wilcoxon

from flowdppo.cli import main
from flowdppo.compare import PLANS, preset_arms, run_overrides
from flowdppo.compare_report import (
    across_dims,
    claims,
    decision_lines,
    gather_reports,
    matched_levels,
    probe_line,
    render_plan,
    render_report,
)
from flowdppo.compare_runs import _config_key, reusable_runs, run_probe
from flowdppo.estimators import (
    CONTROL,
    Curve,
    arm_table,
    at_matched_reward,
    final_kl,
    iso_epoch,
    matched_reward,
    reward_at_matched_kl,
    run_measures,
)
from flowdppo.frontier import frontier, kl_at_reward, mean_ci, reward_at_kl, value_at_reward, verdict
from flowdppo.report_cells import equivalence_margin

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
        rows.append(
            {
                "epoch": e,
                "reward_mean": 0.5 + 0.1 * e,
                "kl_to_base": kl_scale * (e + 1) / 4 * (1 + 0.01 * seed),
                "masked_fraction": 0.1,
                "eval/reward": 0.6 + 0.1 * e,
                "eval/accuracy": 0.6 + 0.1 * e,
                "eval/fid": 10.0 + kl_scale,
                "eval/diversity": 2.0 - kl_scale,
            }
        )
    base = {"eval/reward": 0.5, "eval/accuracy": 0.5, "eval/fid": 10.0, "eval/diversity": 2.0}
    return {"base": base, "rows": rows, "wall_s": 1.0}


def synthetic_results(kl_scales=(("flow_dppo", 0.5), ("flow_grpo", 1.0)), seeds=5, group="", preset="single"):
    arms = {}
    for label, kl_scale in kl_scales:
        records = {str(s): synthetic_record(kl_scale, s) for s in range(seeds)}
        arms[label] = {"method": label.split("/")[0], "overrides": [], "group": group, "seeds": records}
    return {"preset": preset, "arms": arms, "overrides": [], "seeds": seeds}


def test_every_arm_of_a_large_report_is_drawn_in_its_own_style(tmp_path, monkeypatch):
    """15 arms (the dim presets with every method): no two curves share colour and line style."""
    import flowdppo.benchplots as benchplots

    figures = []
    monkeypatch.setattr(benchplots.plt, "close", figures.append)
    results = synthetic_results(tuple((f"arm{i}", 0.5 + 0.1 * i) for i in range(15)))
    benchplots.plot_frontier(results, tmp_path / "frontier.png")
    (lines,) = [fig.axes[0].lines for fig in figures]
    assert [line.get_label() for line in lines] == list(results["arms"])
    assert len({(line.get_color(), line.get_linestyle()) for line in lines}) == 15
    assert (tmp_path / "frontier.png").is_file()


def test_claims_from_synthetic_results():
    """DPPO reaches every reward with half the KL of GRPO: claim 1 holds, and it forgets less (claim 2)."""
    results = synthetic_results(seeds=6)
    arms = results["arms"]
    _, table = arm_table(results)
    kl_key = next(k for k in table["flow_dppo"] if k.startswith("KL at reward"))
    np.testing.assert_allclose(np.array(table["flow_dppo"][kl_key]) * 2, table["flow_grpo"][kl_key])
    lines = claims(results, table)
    assert len(lines) == 4 and all("flow_dppo vs flow_grpo" in line for line in lines)
    assert all("**holds**" in line and "| 6 of 6 |" in line for line in lines), lines
    assert "| KL ratio at each seed's level 0.7 | 6 of 6 | 0.50 [0.50, 0.50] | **holds** |" in lines[0]
    # seed 1 of the baseline falls below its base: it has no level above its base and is left out; the other five
    # are each compared at their own level
    for row in arms["flow_grpo"]["seeds"]["1"]["rows"]:
        row["eval/reward"] = 0.4
    _, table = arm_table(results)
    at_level = [line for line in claims(results, table) if "at each seed's level 0.7 | 5 of 6 |" in line]
    assert len(at_level) == 3 and all("n/a" not in line for line in at_level), lines
    # a second seed gone: 4 pairs, fewer than a CI needs
    for row in arms["flow_grpo"]["seeds"]["2"]["rows"]:
        row["eval/reward"] = 0.4
    _, table = arm_table(results)
    lines = claims(results, table)
    assert sum("**n/a: 4 pairs (needs 5); 2 seeds: no gain over the base**" in line for line in lines) == 3
    assert "n/a" not in next(line for line in lines if "reward at each seed's matched KL" in line)  # still compared


def test_matched_levels_use_the_evaluation_kl_and_give_the_ratio_per_level():
    """KL_dppo = KL_grpo / 2 at every reward: ratio 0.5 at each level, every seed compared; the evaluation-time
    KL (here 3x the rollout's) is what is compared, not the rollout's."""
    results = synthetic_results()
    for arm in results["arms"].values():
        for record in arm["seeds"].values():
            for row in record["rows"]:
                row["eval/kl_to_base"] = 3 * row["kl_to_base"]
    levels = matched_levels(results)
    assert [row["fraction"] for row in levels] == [0.7, 0.8, 0.9]
    for row in levels:
        s = row["summary"]
        assert row["pair"] == "flow_dppo vs flow_grpo" and (s.pairs, s.seeds, s.below) == (5, 5, 5)
        assert s.ratio[0] == pytest.approx(0.5) and s.p == pytest.approx(wilcoxon(s.values).pvalue)
    # each seed's level 0.8 of the way from 0.5 to 0.9 = 0.82: on the segment (0.8 at KL 3/4 s, 0.9 at KL s)
    assert levels[1]["reward"] == pytest.approx(0.82)
    expected = np.mean([3 * (0.75 + 0.2 * 0.25) * (1 + 0.01 * s) for s in range(5)])
    assert levels[1]["summary"].means[1] == pytest.approx(expected)
    # a run that never leaves the base: no level above the base to match
    for record in results["arms"]["flow_grpo"]["seeds"].values():
        for row in record["rows"]:
            row["eval/reward"] = 0.5
    assert {row["summary"].why for row in matched_levels(results)} == {
        "0 pairs (needs 5); 5 seeds: no gain over the base"
    }


def rising(base, gains, kls, epochs=(4, 9)):
    """A curve from ``base``: eval reward base + gains[i] at KL kls[i], evaluations at ``epochs``."""
    return Curve(np.array([-1, *epochs]), np.array([0.0, *kls]), np.array([base, *(base + g for g in gains)]))


BASES = [0.50, 0.52, 0.48, 0.51, 0.49, 0.50, 0.50, 0.50]
SCALES = [1.0, 1.5, 2.0, 0.5, 1.0]  # the baseline's KL scale in the five regular seeds


def per_seed_pairs():
    """Five regular seeds: DPPO gains 0.2 / 0.4 at KL 1 / 2, the baseline 0.1 / 0.3 at KL 2c / 4c; seed 5 gains only
    0.1 in both arms (a slow seed: a level pooled over seeds is out of its reach); seed 6's baseline never rises
    above its base; seed 7's gain, 0.01, lies within evaluation noise."""
    pairs = [
        (rising(b, (0.2, 0.4), (1, 2)), rising(b, (0.1, 0.3), (2 * c, 4 * c)))
        for b, c in zip(BASES[:5], SCALES, strict=True)
    ]
    pairs.append((rising(0.5, (0.05, 0.1), (1, 2)), rising(0.5, (0.05, 0.1), (2, 4))))
    pairs.append((rising(0.5, (0.2, 0.4), (1, 2)), rising(0.5, (0.0, -0.05), (1, 2))))
    pairs.append((rising(0.5, (0.01, 0.01), (1, 2)), rising(0.5, (0.01, 0.01), (1, 2))))
    return pairs


def test_matched_reward_ratio_is_read_at_each_seed_level():
    """By hand: a regular seed's level is its base + 0.7 * 0.3 (the lower arm's best gain): DPPO's frontier reaches
    it at KL 1 + 0.01 / 0.2 = 1.05, the baseline's at 2c + 0.11 / 0.2 * 2c = 3.1c; the slow seed's level is
    base + 0.07: KL 1.4 against 2.8. The seed that never gains and the one within noise (0.01 < 2 SE, SE = SD of
    the bases = 0.012) are left out, and counted."""
    pairs = per_seed_pairs()
    logs = [math.log(1.05 / (3.1 * c)) for c in SCALES] + [math.log(0.5)]
    s = matched_reward(pairs)
    np.testing.assert_allclose(s.values, logs)
    half = t.ppf(0.975, 5) * np.std(logs, ddof=1) / math.sqrt(6)
    assert s.ratio == pytest.approx(
        (math.exp(np.mean(logs)), math.exp(np.mean(logs) - half), math.exp(np.mean(logs) + half))
    )
    assert (s.pairs, s.seeds, s.below, s.why) == (6, 8, 6, "")
    assert s.left_out == {"no gain over the base": 1, "gain below 2 eval SEs": 1}
    assert s.p == pytest.approx(wilcoxon(logs).pvalue)
    np.testing.assert_allclose(s.means, (np.mean([1.05] * 5 + [1.4]), np.mean([3.1 * c for c in SCALES] + [2.8])))
    # the never-gaining seed's level is its base, both arms are there at KL 0: nothing to divide
    level, kl_a, kl_b, why = at_matched_reward(*pairs[6])
    assert (level, kl_a, kl_b, why) == (0.5, 0.0, 0.0, "no gain over the base")
    # a level beyond what a seed reaches (here asked for above the lower arm's best) is never reached: left out
    assert at_matched_reward(*pairs[0], fraction=1.5)[3] == "level not reached"
    assert math.isnan(at_matched_reward(*pairs[0], fraction=1.5)[2])
    # four regular seeds alone: fewer pairs than a CI needs
    short = matched_reward(pairs[:4])
    assert short.why == "4 pairs (needs 5)" and math.isnan(short.ratio[0])
    # forgetting measures: differences at the same per-seed levels
    with_fid = [
        (Curve(a.epoch, a.kl, a.reward, {"fid": a.kl * 10}), Curve(b.epoch, b.kl, b.reward, {"fid": b.kl}))
        for a, b in pairs[:5]
    ]
    diffs = matched_reward(with_fid, "fid", ratio=False)
    np.testing.assert_allclose(diffs.values, [10.5 - 3.1 * c for c in SCALES])


def test_iso_epoch_and_final_kl_ratios_by_hand():
    """Seed by seed: the log KL ratio averaged over the evaluations both runs have (epochs 4 and 14 here; KL 0 at
    an epoch leaves it out), with the reward difference over them; the final KL ratio with the final rewards."""
    scales = (1.0, 2.0, 0.5, 1.0, 4.0)
    a = Curve(np.array([-1, 4, 9, 14]), np.array([0.0, 1.0, 2.0, 4.0]), np.array([0.5, 0.6, 0.7, 0.8]))
    b = Curve(np.array([-1, 4, 14]), np.array([0.0, 2.0, 3.0]), np.array([0.5, 0.55, 0.75]))
    pairs = [(a, Curve(b.epoch, b.kl * c, b.reward)) for c in scales]
    s = iso_epoch(pairs)
    np.testing.assert_allclose(s.values, [(math.log(1 / (2 * c)) + math.log(4 / (3 * c))) / 2 for c in scales])
    assert s.reward[0] == pytest.approx(0.05) and s.reward[1] == pytest.approx(0.0)  # (0.05 + 0.05) / 2 every seed
    f = final_kl(pairs)
    np.testing.assert_allclose(f.values, [math.log(4 / (3 * c)) for c in scales])
    assert f.reward[0] == pytest.approx(0.05) and f.below == 2  # c = 2 and 4
    spent_nothing = Curve(b.epoch, np.array([0.0, 0.0, 3.0]), b.reward)  # its first evaluation has no KL
    assert iso_epoch([(a, spent_nothing)] * 5).values[0] == pytest.approx(math.log(4 / 3))
    # each seed's KL budget is the smaller largest KL: 3 at c = 1, where both reach 0.75; 4 at c = 4, where the
    # baseline's frontier is at 0.5 + 0.05 * 4 / 8
    at_kl = reward_at_matched_kl(pairs)
    assert at_kl.values[0] == pytest.approx(0.0, abs=1e-12) and at_kl.values[4] == pytest.approx(0.8 - 0.525)
    assert at_kl.pairs == 5 and not at_kl.why


def test_equivalence_margin_is_the_larger_end_of_the_ci():
    from scipy.stats import t

    diffs = [-0.02, 0.03, 0.01, 0.0]
    half = t.ppf(0.975, 3) * np.std(diffs, ddof=1) / 2
    margin = max(abs(np.mean(diffs) - half), abs(np.mean(diffs) + half))
    relative = f"({100 * margin / 0.5:.0f}% of the baseline)"
    assert equivalence_margin(diffs, [0.5, 0.5, 0.5, 0.5]) == f"\\|d\\| > {margin:.3g} {relative}"
    assert equivalence_margin(diffs) == f"\\|d\\| > {margin:.3g}"


def test_probe_runs_each_baseline_setting_and_words_its_criterion(tmp_path, capsys):
    probe = {
        "label": "flow_grpo",
        "dim": 4096,
        "epochs": 5,
        "seeds": 2,
        "dim_kl_p90": 0.3,
        "bias_noise": 0.4,
        "masked_fraction_pos_adv": 0.01,
        "masked_fraction_neg_adv": 0.05,
        "met": True,
    }
    line = probe_line({"settings": [probe]})
    assert "p90 of dim*D 0.3" in line and "bias/noise 0.4: the probe's weak criterion is met." in line
    assert probe_line({"settings": [probe | {"bias_noise": 1.5}]}).endswith("the paper's regime is reached.")
    assert probe_line({"settings": [probe | {"met": False}]}).endswith("the probe's criterion is NOT met.")
    old = {
        "dim": 4096,
        "epochs": 5,
        "dim_kl_p90": 0.2,
        "masked_fraction_pos_adv": 0.05,
        "masked_fraction_neg_adv": 0.14,
        "reached": True,
    }  # a committed report's probe: one run, no bias/noise
    assert probe_line(old) == (
        "flow_grpo (eps 1e-4), 5 epochs x 1 seed at dim 4096: p90 of dim*D 0.2 (needs >= "
        "0.1); clipped fraction A<0 0.140 vs A>0 0.050 (needs at least twice); the ratio's "
        "bias/noise not recorded: the probe's weak criterion is met."
    )
    tiny = ["epochs=2", "group_size=4", "eval_samples_per_class=2"]
    measured = run_probe("dim64", tiny, tmp_path / "probe", ("flow_dppo", "flow_grpo"))["settings"]
    assert [(m["label"], m["dim"], m["seeds"], m["epochs"]) for m in measured] == [("flow_grpo", 64, 2, 2)]
    assert measured[0]["bias_noise"] > 0 and not measured[0]["met"]  # dim 64: the ratio's noise swamps D
    assert {d.name for d in (tmp_path / "probe" / "runs" / "probe" / "flow_grpo").iterdir()} == {"seed0", "seed1"}
    # methods with no clipped-ratio baseline among them (e.g. --methods rft,sft): nothing to probe, and it says so
    assert run_probe("dim64", tiny, tmp_path / "none", ("rft", "sft")) == {"settings": []}
    assert probe_line({"settings": []}).startswith("no probe: none of the methods is a clipped-ratio baseline")
    assert main(["compare", "--preset", "dims"]) == 2
    assert "unknown preset 'dims'" in capsys.readouterr().err


def test_presets_and_half_rollouts():
    assert [a.label for a in preset_arms("single", ("flow_dppo", "flow_grpo"))] == ["flow_dppo", "flow_grpo"]
    epochs = {a.label: a for a in preset_arms("epochs", ("flow_dppo",))}
    assert set(epochs) == {"flow_dppo/I1", "flow_dppo/I2", "flow_dppo/I4", "flow_dppo/half-I2"}
    assert run_overrides(epochs["flow_dppo/half-I2"], ["epochs=30"], seed=2)[-2:] == ["epochs=15", "seed=1002"]
    calib = {a.label: a for a in preset_arms("calib")}
    assert set(calib) == {
        "flow_dppo",
        CONTROL,
        "flow_grpo/eps0.0003",
        "flow_grpo/eps0.001",
        "flow_grpo/eps0.003",
        "grpo_guard/eps5e-05",
        "grpo_guard/eps0.0002",
    }
    for dim, u in (("1024", 4), ("4096", 8)):
        arms = preset_arms(f"dim{dim}", ("flow_dppo", "flow_grpo"))
        assert [a.label for a in arms] == ["flow_dppo", "flow_grpo", CONTROL]
        assert all(f"digits.upsample={u}" in run_overrides(a, []) for a in arms)
    heldout = preset_arms("heldout")
    assert [a.label for a in heldout] == ["flow_dppo", "flow_grpo", "grpo_guard", CONTROL]
    assert all("digits.classes=[0,1,2,3,4]" in run_overrides(a, []) for a in heldout)
    stress = {a.label: run_overrides(a, [], 0) for a in preset_arms("stress")}
    assert "loss.clip_range=0.0016" in stress["flow_grpo/eps0.0016"]  # eps * dim equal to SD3.5's 1e-4 * 65,536
    assert all({"digits.upsample=8", "optim.lr=3e-3"} <= set(o) for o in stress.values())
    assert len(preset_arms("multi", ("flow_dppo", "flow_grpo"))) == 4
    confirm = {a.label: (a.group, run_overrides(a, [], 5000)) for a in preset_arms("confirm")}
    assert set(confirm) == {"flow_dppo/tau1e-05", "flow_grpo/eps0.0001"} and len({g for g, _ in confirm.values()}) == 1
    assert {
        "digits.upsample=8",
        "optim.lr=3e-3",
        "optim.inner_epochs=1",
        "epochs=40",
        "loss.kl_mask_threshold=1e-05",
        "seed=5000",
    } <= set(confirm["flow_dppo/tau1e-05"][1])
    matched = {a.label: a.group for a in preset_arms("matched")}
    assert matched == {
        "flow_dppo/tau1e-05": "grpo",
        "flow_grpo/eps5e-05": "grpo",
        "flow_dppo/tau1e-09": "guard",
        "grpo_guard/eps2e-06": "guard",
    }
    with pytest.raises(ValueError, match="preset must be one of"):
        preset_arms("everything")


def test_preregistered_seeds_are_fresh_and_the_rule_is_written_before_the_runs(tmp_path):
    committed = set()
    for path in Path(__file__).parents[1].glob("benchmarks/digitsbench/*/results.json"):
        if path.parent.name in PLANS:  # a plan's own runs: its seeds, by definition
            continue
        for arm in json.loads(path.read_text())["arms"].values():
            committed |= {int(s) + 1000 * ("epochs=half" in arm["overrides"]) for s in arm["seeds"]}
    assert committed, "the committed reports are read"
    for name, plan in PLANS.items():
        assert not committed & set(range(plan.seed_offset, plan.seed_offset + plan.seeds)), name
    text = render_plan("confirm", tmp_path / "confirm").read_text()
    assert "40 seeds 5000-5039" in text and "`flowdppo compare --preset confirm --seeds 40 --seed-offset 5000`" in text
    assert "upper end of the CI of the per-seed matched-reward KL ratio" in text and "[0.8, 1.25]" in text
    # the rule applied: five seeds of the plan's first, DPPO at half the KL: claim 1 holds, 2x not refuted
    results = synthetic_results(
        (("flow_dppo/tau1e-05", 0.5), ("flow_grpo/eps0.0001", 1.0)), group="c", preset="confirm"
    )
    outcome = decision_lines("confirm", results)
    assert "**This report deviates from the plan: it ran 5 seeds 0-4; the rule is not read.**" in outcome[-3]
    assert outcome[-1] == (
        "- flow_dppo/tau1e-05 vs flow_grpo/eps0.0001: ratio 0.50 [0.50, 0.50] over 5 pairs: claim "
        "1 holds; the >= 2x saving is not refuted; the CI inside [0.8, 1.25] (no difference): "
        "no."
    )
    matched = synthetic_results(
        (("flow_dppo/tau1e-05", 0.5), ("flow_grpo/eps5e-05", 1.0)), group="grpo", preset="matched"
    )
    (line,) = [x for x in decision_lines("matched", matched) if x.startswith("- flow_dppo/tau1e-05")]
    assert "reward difference 0.000 ± 0.000: matched; same-epoch KL ratio 0.50 [0.50, 0.50] (5 pairs)" in line
    assert line.endswith(": claim 1 holds.")
    assert decision_lines("matched", matched)[-1] == "- flow_dppo/tau1e-09 vs grpo_guard/eps2e-06: not run."


def test_compare_smoke_writes_the_report_and_rerenders_identically(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["compare", "--preset", "smoke", "--methods", "flow_grpo,flow_dppo", "--seeds", "1", "--out", str(out)]
    tiny = ["epochs=2", "group_size=4", "eval_every=1"]
    assert main(args + ["--seed-offset", "7", *tiny]) == 0
    for name in ("results.json", "REPORT.md", "frontier.png", "curves.png", "ood.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "REPORT.md").read_text()
    assert "| flow_grpo |" in report and "| flow_dppo |" in report and "x 1 seeds (from seed 7)" in report
    results = json.loads((out / "results.json").read_text())
    assert results["seed_offset"] == 7 and set(results["arms"]["flow_dppo"]["seeds"]) == {"7"}
    assert main(args + ["--seed-offset", "3", *tiny]) == 2  # its runs started at seed 7: not mixed with others
    assert f"--seed-offset: {out} holds runs from seed 7; pass --seed-offset 7" in capsys.readouterr().err
    assert main(args + ["--seed-offset", "-1", *tiny]) == 2
    assert "--seed-offset: must be >= 0, got -1" in capsys.readouterr().err
    keys = set(reusable_runs([out]))  # --reuse offers the runs under the seeds they ran
    dppo = next(a for a in preset_arms("smoke", ("flow_dppo",)))
    assert _config_key("flow_dppo", run_overrides(dppo, tiny, 7)) in keys
    assert _config_key("flow_dppo", run_overrides(dppo, tiny, 0)) not in keys
    (out / "REPORT.md").unlink()
    assert main(["compare", "--report-only", str(out)]) == 0  # no training: results.json only
    assert (out / "REPORT.md").read_text() == report
    assert render_report(out).read_text() == report
    # a second report with the same runs trains nothing: it takes them from the first
    again = tmp_path / "again"
    cmd = ["compare", "--preset", "smoke", "--methods", "flow_dppo", "--seeds", "1", "--out", str(again)]
    assert main(cmd + ["--seed-offset", "7", "--reuse", str(out), *tiny]) == 0
    reused = json.loads((again / "results.json").read_text())["arms"]["flow_dppo"]["seeds"]["7"]
    first = json.loads((out / "results.json").read_text())["arms"]["flow_dppo"]["seeds"]["7"]
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
        capsys.readouterr().err
    )
    assert (out / "REPORT.md").read_text() == report  # the finished report is left as it was


def test_epochs_report_compares_several_passes_with_one(tmp_path):
    arms = {}
    for label, kl_scale in (("flow_dppo/I1", 0.5), ("flow_dppo/I2", 1.0)):
        seeds = {str(s): synthetic_record(kl_scale, s) for s in range(2)}
        arms[label] = {"method": "flow_dppo", "overrides": [], "group": label[-2:], "seeds": seeds}
    (tmp_path / "results.json").write_text(json.dumps({"preset": "epochs", "arms": arms, "overrides": []}))
    report = render_report(tmp_path).read_text()
    assert "| flow_dppo | I2 | 1.000 ± 0.000 | 2 |" in report  # same final reward with two passes as with one
    assert (tmp_path / "inner_epochs.png").stat().st_size > 0


def test_across_dims_table_reads_each_dim_report(tmp_path):
    """One row per dim and pair: the per-seed KL ratio 0.5 at each seed's level 0.7 and at equal epochs, the
    baseline's dropped fractions by sign."""
    results = synthetic_results(group="dim", preset="dim1024")
    for label, pos, neg in (("flow_dppo", 0.1, 0.1), ("flow_grpo", 0.02, 0.3)):
        for record in results["arms"][label]["seeds"].values():
            for row in record["rows"]:
                row.update({"masked_fraction_pos_adv": pos, "masked_fraction_neg_adv": neg, "dim_kl_p90": 2.0})
    (tmp_path / "dim1024").mkdir()
    (tmp_path / "dim1024" / "results.json").write_text(json.dumps(results))
    assert across_dims(tmp_path) == []  # not rendered yet: a preset still running is left out
    render_report(tmp_path / "dim1024")
    header, _, row = across_dims(tmp_path)
    assert "KL ratio at each seed's level 0.7" in header
    assert row.startswith(
        "| 1024 | flow_dppo vs flow_grpo | 0.50 [0.50, 0.50] | 5 of 5 | ratio < 0.50 or > 0.50 | "
        "0.50 [0.50, 0.50], 5 | 0.000 ± 0.000 | 2 |"
    )
    assert row.endswith("| 0.020 / 0.300 | less KL | holds |")
    assert across_dims(tmp_path / "dim1024") == []  # no dim reports under it
    (tmp_path / "dim1024-lr").mkdir()  # the same preset with a user override: rows of its own, after the plain ones
    (tmp_path / "dim1024-lr" / "results.json").write_text(json.dumps(results | {"overrides": ["optim.lr=3e-3"]}))
    render_report(tmp_path / "dim1024-lr")
    rows = across_dims(tmp_path)[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| 1024", "| 1024 optim.lr=3e-3"]
    (tmp_path / "dim1024-rerun").mkdir()  # a second report of one setting: each row names its folder
    (tmp_path / "dim1024-rerun" / "results.json").write_text(json.dumps(results))
    render_report(tmp_path / "dim1024-rerun")
    rows = across_dims(tmp_path)[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| 1024 (dim1024)", "| 1024 (dim1024-rerun)", "| 1024 optim.lr=3e-3"]
    render_plan("matched", tmp_path / "matched")  # pre-registered, not run: its rule is gathered, no plots
    gathered = gather_reports(tmp_path).read_text()
    assert "## [matched](matched/REPORT.md)" in gathered and "### Decision rule (pre-registered)" in gathered
    assert "matched/frontier.png" not in gathered and "dim1024/frontier.png" in gathered


def test_drawdown_and_collapse():
    """Eval reward 0.5 (base) -> 0.6, 0.7, 0.4: drawdown 0.3 from the peak, and it ended below the base."""
    record = synthetic_record(1.0, 0)
    for row, reward in zip(record["rows"], (0.6, 0.7, 0.4, 0.4), strict=True):
        row["eval/reward"] = reward
    measures = run_measures(record)
    assert measures["drawdown"] == pytest.approx(0.3) and measures["collapsed"] == 1.0
    assert run_measures(synthetic_record(1.0, 0))["drawdown"] == 0.0  # still rising at the end
    assert run_measures(synthetic_record(1.0, 0))["collapsed"] == 0.0


def test_a_pre_registered_preset_runs_its_plans_seeds_and_refuses_others(tmp_path, monkeypatch, capsys):
    import flowdppo.compare_runs

    calls = []
    monkeypatch.setattr(flowdppo.compare_runs, "run_compare", lambda preset, out, seeds, *rest: calls.append(seeds))
    assert main(["compare", "--preset", "confirm", "--out", str(tmp_path / "c")]) == 0
    assert main(["compare", "--preset", "matched", "--seeds", "20", "--out", str(tmp_path / "m")]) == 0
    assert main(["compare", "--preset", "single", "--out", str(tmp_path / "s")]) == 0
    assert calls == [PLANS["confirm"].seeds, PLANS["matched"].seeds, 5] == [40, 20, 5]
    assert main(["compare", "--preset", "confirm", "--seeds", "5", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--seeds: the pre-registered preset confirm runs its plan's 40 seeds" in err
    assert len(calls) == 3 and not (tmp_path / "x").exists()


def test_default_arms_and_a_report_without_the_claims_methods():
    """``opd`` needs teachers, so it is no default arm; a report of methods outside the claims' (``dgpo``, ``crd``)
    takes its matched targets from every run instead of failing on none."""
    from flowdppo.compare import METHODS
    from flowdppo.settings import PRESETS

    assert "opd" in PRESETS and "opd" not in METHODS and {"dgpo", "crd", "flow_dppo"} <= set(METHODS)
    results = synthetic_results(kl_scales=(("dgpo", 0.5), ("crd", 1.0)))
    _, table = arm_table(results)
    kl_key = next(k for k in table["dgpo"] if k.startswith("KL at reward"))
    assert kl_key == "KL at reward 0.900"  # the best reward every run reaches
    np.testing.assert_allclose(np.array(table["dgpo"][kl_key]) * 2, table["crd"][kl_key])
