"""A DigitsBench report from ``results.json`` alone: the arm table, the claims, the per-seed estimators, the
pre-registered decision rule, the plots (``flowdppo.benchplots``); and the page gathering every report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from flowdppo import estimators as est
from flowdppo.compare import (
    CLAIM_LEVEL,
    MATCHED_REWARD,
    NO_DIFFERENCE,
    PLANS,
    UPSAMPLE_OF_DIM,
    preset_arms,
    preset_common,
    preset_pairs,
)
from flowdppo.frontier import mean_ci

LEVELS = (0.7, 0.8, 0.9)  # matched rewards: these fractions of the way from each seed's base to its lower arm's best


def probe_line(probe: dict) -> str:
    """One line per setting: what the probe measured and whether its criterion is met (a probe recorded before the
    per-setting probe: one Flow-GRPO eps 1e-4 run, no bias/noise)."""
    old = {"label": "flow_grpo (eps 1e-4)", "seeds": 1, "met": probe.get("reached"), "bias_noise": math.nan}
    lines = []
    for p in probe.get("settings") or [{**probe, **old}]:
        bias_noise = p["bias_noise"]
        noise = "not recorded" if math.isnan(bias_noise) else f"{bias_noise:.2g}"
        reading = ("the probe's criterion is NOT met" if not p["met"] else "the paper's regime is reached"
                   if bias_noise >= 1 else "the probe's weak criterion is met")  # fmt: skip
        seeds = f"{p['seeds']} seed{'s' * (p['seeds'] != 1)}"
        lines.append(f"{p['label']}, {p['epochs']} epochs x {seeds} at dim {p['dim']}: p90 of dim*D "
                     f"{p['dim_kl_p90']:.3g} (needs >= 0.1); clipped fraction A<0 {p['masked_fraction_neg_adv']:.3f} "
                     f"vs A>0 {p['masked_fraction_pos_adv']:.3f} (needs at least twice); the ratio's bias/noise "
                     f"{noise}: {reading}.")  # fmt: skip
    return "\n".join(lines)


CLAIMS = {
    "single": [("KL at reward", "lower", "1: less KL to reach the matched reward"),
               ("reward at KL", "higher", "1: more reward at the matched KL"),
               ("fid at reward", "lower", "2: forgets less (lower feature FID at the matched reward)"),
               ("diversity at reward", "higher", "2: forgets less (more diversity at the matched reward)")],
    "multi": [("worst gain", "higher", "3: the worst-served reward gains more")],
    "epochs": [("eval reward", "higher", "4: higher final reward with several inner epochs"),
               ("drawdown", "lower", "4: less drawdown from the peak with several inner epochs")],
}  # fmt: skip
CLAIMS.update({p: CLAIMS["single"] for p in ("calib", "dim64", "dim1024", "dim4096", *PLANS)})
CLAIMS["stress"] = CLAIMS["epochs"]
CLAIMS["heldout"] = [CLAIMS["single"][0]] + [
    (f"held-out {key} at reward", better, f"2: forgets less (held-out digits' {key} at the matched reward)")
    for key, better in (("accuracy", "higher"), ("fid", "lower"), ("diversity", "higher"))]  # fmt: skip


def claim_rows(results: dict, table: dict[str, dict[str, list[float]]]) -> list[dict]:
    """Each claim's verdict per (DPPO arm, baseline arm) pair from per-seed paired values, with the pairs behind
    its CI and what the CI rules out (the equivalence margin a "no difference" comes with).

    Measures at a matched reward are read at each seed's own level, ``CLAIM_LEVEL`` of the way from its base to
    its lower arm's best (``estimators.matched_reward``; KL as a ratio); reward at a matched KL at each seed's own
    budget (``estimators.reward_at_matched_kl``); other measures from the arm table, paired by seed order."""
    rows = []
    for prefix, better, claim in CLAIMS.get(results["preset"], []):
        for label, base_label in est.claim_pairs(results):
            row = {"claim": claim, "pair": f"{label} vs {base_label}"}
            if prefix.endswith(" at reward") or prefix == "reward at KL":
                pairs = est.pair_curves(results, label, base_label)
                name = prefix.removesuffix(" at reward")
                if prefix == "reward at KL":
                    summary, row["measure"] = est.reward_at_matched_kl(pairs), "reward at each seed's matched KL"
                else:
                    summary = est.matched_reward(pairs, name, CLAIM_LEVEL, ratio=name == "KL")
                    row["measure"] = f"{'KL ratio' if name == 'KL' else name} at each seed's level {CLAIM_LEVEL}"
                row |= est.cells(summary, better, name == "KL", [summary.means[1]])
            else:
                key = next(k for k in table[label] if k.startswith(prefix))
                diffs = [a - b for a, b in zip(table[label][key], table[base_label][key], strict=False)]
                summary = est.paired(diffs)
                row |= {"measure": key} | est.cells(summary, better, reference=table[base_label][key])
            rows.append(row)
    return rows


def claims(results: dict, table: dict[str, dict[str, list[float]]]) -> list[str]:
    """``claim_rows`` as markdown table rows."""
    return [f"| {r['claim']} | {r['pair']} | {r['measure']} | {r['pairs']} | {r['difference']} | **{r['verdict']}** | "
            f"{r['margin']} |" for r in claim_rows(results, table)]  # fmt: skip


def matched_levels(results: dict, fractions: tuple[float, ...] = LEVELS) -> list[dict]:
    """Per claim pair and per fraction: each seed's KL ratio at its own level (``estimators.matched_reward``),
    the level ``fraction`` of the way from the seed's base to its lower arm's best, summarised over seeds."""
    out = []
    for label, base_label in est.claim_pairs(results):
        pairs = est.pair_curves(results, label, base_label)
        for fraction in fractions:
            levels = [est.seed_level(a, b, fraction)[0] for a, b in pairs]
            out.append({"pair": f"{label} vs {base_label}", "fraction": fraction, "reward": float(np.mean(levels)),
                        "summary": est.matched_reward(pairs, fraction=fraction)})
    return out


def level_lines(levels: list[dict]) -> list[str]:
    """The markdown table of ``matched_levels``."""
    lines = ["| pair | level | eval reward (seed mean) | pairs | KL (DPPO) | KL (baseline) | KL ratio, 95% CI | "
             "below 1 | Wilcoxon p | reading | the CI rules out |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in levels:
        s = row["summary"]
        lines.append(f"| {row['pair']} | {row['fraction']:.1f} | {row['reward']:.3f} | {s.pairs} of {s.seeds} | "
                     f"{est.num(s.means[0])} | {est.num(s.means[1])} | {est.ratio_cells(s)[0]} | {s.below} | "
                     f"{est.num(s.p, '.2g')} | "
                     f"{est.ratio_reading(s)} | {est.ratio_cells(s)[1]} |")  # fmt: skip
    return lines


def estimates(results: dict, label: str, base_label: str) -> dict[str, est.Summary]:
    """The per-seed KL ratios of one pair: at each seed's matched reward, at equal epochs, at the end."""
    pairs = est.pair_curves(results, label, base_label)
    return {f"matched reward (level {CLAIM_LEVEL})": est.matched_reward(pairs), "same epochs": est.iso_epoch(pairs),
            "final KL": est.final_kl(pairs)}  # fmt: skip


def estimate_lines(results: dict) -> list[str]:
    """The per-seed estimators' table, every claim pair."""
    lines = ["| pair | estimator | KL ratio, 95% CI | pairs | below 1 | Wilcoxon p | reward difference | reading | "
             "the CI rules out |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, base_label in est.claim_pairs(results):
        for name, s in estimates(results, label, base_label).items():
            reward = "matched" if math.isnan(s.reward[0]) else est.fmt(*s.reward)
            ci, rules_out = est.ratio_cells(s)
            lines.append(f"| {label} vs {base_label} | {name} | {ci} | {s.pairs} of {s.seeds} | {s.below} | "
                         f"{est.num(s.p, '.2g')} | {reward} | {est.ratio_reading(s)} | {rules_out} |")
    return lines


def decision_lines(preset: str, results: dict | None = None) -> list[str]:
    """The preset's pre-registered decision rule, from its definition; with ``results``, the rule applied."""
    plan, pairs = PLANS[preset], [(a.label, b.label) for a, b in preset_pairs(preset)]
    lines = ["## Decision rule (pre-registered)", "", "Fixed by the preset's definition (`flowdppo.compare.PLANS`) "
             f"before any of its runs: {' and '.join(f'{a} vs {b}' for a, b in pairs)}, every arm with "
             f"`{' '.join(preset_common(preset))}`, {plan.seeds} seeds {plan.seed_offset}-"
             f"{plan.seed_offset + plan.seeds - 1}, used by no earlier report (`flowdppo compare --preset {preset} "
             f"--seeds {plan.seeds} --seed-offset {plan.seed_offset}`). The rule:", ""] + [f"- {r}" for r in plan.rule]
    if results is None:
        return lines
    seeds = sorted({int(s) for arm in results["arms"].values() for s in arm["seeds"]})
    ran = f"ran {len(seeds)} seeds {seeds[0]}-{seeds[-1]}" if seeds else "ran no seeds"
    deviation = "" if seeds == list(range(plan.seed_offset, plan.seed_offset + plan.seeds)) else (
        f" **This report deviates from the plan: it {ran}; the rule is not read.**")  # fmt: skip
    lines += ["", f"Outcome ({ran}).{deviation}", ""]
    for label, base_label in pairs:
        if not {label, base_label} <= set(results["arms"]):
            lines.append(f"- {label} vs {base_label}: not run.")
            continue
        matched, same, _ = estimates(results, label, base_label).values()
        if preset == "confirm":
            _, lo, hi = matched.ratio
            outcome = (f"n/a ({matched.why})" if matched.why else f"ratio {est.ratio_cells(matched)[0]} over "
                       f"{matched.pairs} pairs: claim 1 {'holds' if hi < 1 else 'does not hold'}; the >= 2x saving is "
                       f"{'refuted' if lo > 0.5 else 'not refuted'}; the CI inside {list(NO_DIFFERENCE)} (no "
                       f"difference): {'yes' if NO_DIFFERENCE[0] <= lo and hi <= NO_DIFFERENCE[1] else 'no'}")
        else:
            (dr, half), (_, lo, hi) = same.reward, same.ratio
            is_matched = abs(dr) + half <= MATCHED_REWARD
            outcome = (f"n/a ({same.why})" if same.why else f"reward difference {est.fmt(dr, half)}: "
                       f"{'matched' if is_matched else 'NOT matched'}; same-epoch KL ratio {est.ratio_cells(same)[0]}"
                       f" ({same.pairs} pairs), matched-reward ratio {est.ratio_cells(matched)[0]}: " + (
                           ("claim 1 holds" if hi < 1 else "claim 1 does not hold" if lo > 1 else "inconclusive")
                           if is_matched else "not read as claim 1"))  # fmt: skip
        lines.append(f"- {label} vs {base_label}: {outcome}.")
    return lines


def render_plan(preset: str, out: Path) -> Path:
    """REPORT.md of a pre-registered preset before it runs: its arms and decision rule."""
    plan = PLANS[preset]
    arms = preset_arms(preset)
    lines = [f"# DigitsBench: {preset}", "", f"Pre-registered, not run yet: {len(arms)} arms x {plan.seeds} seeds "
             f"on the digits task ({', '.join(a.label for a in arms)}).", "", *decision_lines(preset)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")
    return out / "REPORT.md"


def epochs_lines(table: dict[str, dict[str, list[float]]]) -> list[str]:
    """The ``epochs`` preset's tables: several passes vs one, and the method x passes interaction, per seed."""
    lines = ["", "## Several passes vs one", "", "Final eval reward of I passes over each rollout divided by "
             "that of one pass, per seed (below 1: the extra passes degrade the result).", "",
             "| method | I | final reward / final reward at I = 1 | seeds |", "|---|---|---|---|"]  # fmt: skip
    for method in sorted({label.split("/")[0] for label in table}):
        one = table.get(f"{method}/I1", {}).get("eval reward")
        for label in (f"{method}/I2", f"{method}/I4", f"{method}/half-I2"):
            if one and label in table:
                ratios = [a / b for a, b in zip(table[label]["eval reward"], one, strict=False)]
                lines.append(f"| {method} | {label.split('/')[1]} | {est.fmt(*mean_ci(ratios))} | {len(ratios)} |")
    lines += ["", "## Method x passes interaction", "", "Per seed, (Flow-DPPO at I minus Flow-DPPO at I = 1) "
              "minus (Flow-GRPO at I minus Flow-GRPO at I = 1): what the extra passes do to one method more than "
              "to the other (the half-rollouts arms run their own seeds, so their pairing with I = 1 is by "
              "index only).", "", "| I | measure | pairs | interaction | verdict (DPPO better) | the CI rules out |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for group in ("I2", "I4", "half-I2"):
        for key, better in (("eval reward", "higher"), ("drawdown", "lower")):
            columns = [table.get(f"{m}/{i}", {}).get(key) for m in ("flow_dppo", "flow_grpo") for i in (group, "I1")]
            if all(columns):
                diffs = [(a - b) - (c - d) for a, b, c, d in zip(*columns, strict=False)]
                row = est.cells(est.paired(diffs), better)
                lines.append(f"| {group} | {key} | {row['pairs']} | {row['difference']} | **{row['verdict']}** | "
                             f"{row['margin']} |")  # fmt: skip
    return lines


def render_report(out: Path) -> Path:
    """Write REPORT.md and the plots from ``results.json`` (no training)."""
    from flowdppo import benchplots

    results = json.loads((out / "results.json").read_text())
    columns, table = est.arm_table(results)
    n = max(len(a["seeds"]) for a in results["arms"].values())
    first = results.get("seed_offset", 0)
    lines = [f"# DigitsBench: {results['preset']}", "",
             f"{len(results['arms'])} arms x {n} seeds (from seed {first}) on the digits task, "
             f"{results.get('jobs', 1)} runs at a time of one CPU thread each; "
             f"total wall time {results.get('wall_s', 0) / 60:.1f} min. Extra overrides: "
             f"{' '.join(results['overrides']) or 'none'}. Values are mean ± 95% CI (Student t) over seeds; "
             "eval measures come from 20 ODE samples per digit on fixed noise. The arm table's \"at reward\" and "
             "\"at KL\" columns use one target for every run (the lowest best reward, the smallest largest KL of "
             "the claims' methods); the paired sections read each seed at its own level.", "",
             "| arm | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]  # fmt: skip
    for label, measures in table.items():
        lines.append(f"| {label} | " + " | ".join(est.fmt(*mean_ci(measures[c])) for c in columns) + " |")
    if results["preset"] in PLANS:
        lines += ["", *decision_lines(results["preset"], results)]
    if "probe" in results:
        lines += ["", "## Regime probe", "", *(f"- {line}" for line in probe_line(results["probe"]).split("\n"))]
    claim_lines = claims(results, table)
    if claim_lines:
        header = ["| claim | pair | measure | pairs | difference | verdict | the CI rules out |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += ["", "## Claims", "", "Differences are DPPO minus baseline, paired by seed (KL: the ratio DPPO / "
                  f"baseline). A row on fewer than {est.MIN_PAIRS} pairs reads n/a.", ""]  # fmt: skip
        lines += header + claim_lines
    if est.claim_pairs(results):
        evaluated = all(est.EVAL_KL in r for a in results["arms"].values() for rec in a["seeds"].values()
                        for r in rec["rows"] if "eval/reward" in r)  # fmt: skip
        source = ("measured at evaluation on the evaluated samples, Flow-SDE kernel" if evaluated else
                  "the rollout's, before each update: these runs predate the evaluation-time KL")  # fmt: skip
        lines += ["", "## Per-seed estimators", "", f"KL to the base ({source}), DPPO arm / baseline, seed by seed: "
                  f"at the seed's own matched reward (its base plus {CLAIM_LEVEL} of its lower arm's best gain), "
                  "averaged over the evaluation epochs (log ratio; with the reward difference over the same epochs), "
                  "and at the end (with the final reward difference). Geometric mean over seeds, 95% CI from a "
                  "paired t on the logs, Wilcoxon signed-rank p. A seed whose lower arm gains less than "
                  f"{est.NOISE_SES:g} eval standard errors (SD over seeds of the base's eval reward) has no level "
                  f"above noise and is left out of the matched-reward rows; a row on fewer than {est.MIN_PAIRS} pairs "
                  "reads n/a.", "", *estimate_lines(results)]  # fmt: skip
        lines += ["", "## Matched reward, per pair", "", f"The same per-seed KL ratio at levels "
                  f"{', '.join(map(str, LEVELS))} of the way from each seed's base to its lower arm's best.", ""]
        lines += level_lines(matched_levels(results))
    if results["preset"] == "epochs":
        lines += epochs_lines(table)
    notes = out / "NOTES.md"  # a hand-written reading of the numbers, kept across re-renders
    if notes.is_file():
        lines += ["", "## Reading", "", notes.read_text().strip()]
    lines += ["", "## Plots", ""]
    for name in benchplots.render_all(results, out):
        lines.append(f"![{name}]({name})")
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def across_dims(root: Path) -> list[str]:
    """One table over the ``dim*`` reports under ``root``: per latent size and claim pair, the per-seed KL ratio at
    each seed's level ``CLAIM_LEVEL`` (CI, pairs behind it, what it rules out) and at equal epochs (with the
    reward difference), the first arm's p90 of ``dim * D``, the baseline's dropped fractions by advantage sign
    (the paper's asymmetry: A<0 clipped far more than A>0), the reading of the matched ratio (claim 1) and the
    verdict of claim 2 (feature FID at each seed's level). Only rendered (finished) reports count; a dim preset
    run with extra overrides (``--out dim4096-lr3e-3 optim.lr=3e-3``) gets rows of its own."""
    lines = [f"| dim | pair | KL ratio at each seed's level {CLAIM_LEVEL} (95% CI) | pairs | the CI rules out | "
             "KL ratio at equal epochs (95% CI, pairs) | reward difference at equal epochs | p90 dim*D (first arm) | "
             "baseline dropped A>0 / A<0 | claim 1 (less KL at that level) | claim 2 (FID at reward) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    reports = [json.loads((path.parent / "results.json").read_text()) for path in root.glob("dim*/REPORT.md")]
    reports = [r for r in reports if r.get("preset") in {f"dim{d}" for d in UPSAMPLE_OF_DIM}]
    for results in sorted(reports, key=lambda r: (int(r["preset"][3:]), r.get("overrides", []))):
        dim = " ".join([results["preset"][3:], *results.get("overrides", [])])  # e.g. "4096 optim.lr=3e-3"
        _, table = est.arm_table(results)
        verdicts = {(r["pair"], r["claim"]): r["verdict"] for r in claim_rows(results, table)}
        for label, base_label in est.claim_pairs(results):
            matched, same, _ = estimates(results, label, base_label).values()
            _, pos, neg = est.mechanism_means(results["arms"][base_label])
            p90 = est.mechanism_means(results["arms"][label])[0]
            claim2 = verdicts.get((f"{label} vs {base_label}", CLAIMS["single"][2][2]), "n/a")
            ci, rules_out = est.ratio_cells(matched)
            lines.append(f"| {dim} | {label} vs {base_label} | {ci} | {matched.pairs} of {matched.seeds} | "
                         f"{rules_out} | {est.ratio_cells(same)[0]}, {same.pairs} | {est.fmt(*same.reward)} | "
                         f"{p90:.3g} | {pos:.3f} / {neg:.3f} | {est.ratio_reading(matched)} | {claim2} |")  # fmt: skip
    return lines if len(lines) > 2 else []


def gather_reports(root: Path) -> Path:
    """``root/REPORT.md``: the table across latent sizes, then the claims sections of every preset report under
    ``root`` (a pre-registered preset not run yet: its decision rule), with links."""
    intro = "Each preset's full report (tables, plots) is linked; its claims are repeated here."
    lines = ["# DigitsBench", "", intro, ""]
    dims = across_dims(root)
    if dims:
        lines += ["## Across latent sizes", "", *dims, ""]
    sections = ("## Decision rule (pre-registered)", "## Regime probe", "## Claims", "## Per-seed estimators",
                "## Reading")  # fmt: skip
    for report in sorted(root.glob("*/REPORT.md")):
        text = report.read_text()
        summary = text.split("\n")[2]
        lines += [f"## [{report.parent.name}]({report.parent.name}/REPORT.md)", "", summary, ""]
        for section in sections:
            if section in text:
                body = text.split(section, 1)[1].split("\n## ", 1)[0].strip()
                lines += [f"### {section[3:]}", "", body, ""]
        if (report.parent / "frontier.png").is_file():
            lines += [f"![frontier]({report.parent.name}/frontier.png)", ""]
    path = root / "REPORT.md"
    path.write_text("\n".join(lines))
    return path
