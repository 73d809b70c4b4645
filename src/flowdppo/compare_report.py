"""A DigitsBench report from ``results.json`` alone: the arm table, the claims, the per-seed estimators, the
pre-registered decision rule, the plots (``flowdppo.benchplots``); and the page gathering every report."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from flowdppo import estimators as est
from flowdppo import report_cells as rc
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
from flowdppo.compare_claims import (
    CLAIMS,
    LEVELS,
    claim_rows,
    claims,
    estimate_lines,
    estimates,
    level_lines,
    matched_levels,
)
from flowdppo.compare_mechanism import mechanism_lines
from flowdppo.frontier import mean_ci


def probe_line(probe: dict) -> str:
    """One line per setting: what the probe measured and whether its criterion is met (a probe recorded before the
    per-setting probe: one Flow-GRPO eps 1e-4 run, no bias/noise)."""
    old = {"label": "flow_grpo (eps 1e-4)", "seeds": 1, "met": probe.get("reached"), "bias_noise": math.nan}
    settings = probe["settings"] if "settings" in probe else [{**probe, **old}]
    if not settings:
        return "no probe: none of the methods is a clipped-ratio baseline Flow-DPPO is compared with"
    lines = []
    for p in settings:
        bias_noise = p["bias_noise"]
        noise = "not recorded" if math.isnan(bias_noise) else f"{bias_noise:.2g}"
        reading = (
            "the probe's criterion is NOT met"
            if not p["met"]
            else "the paper's regime is reached"
            if bias_noise >= 1
            else "the probe's weak criterion is met"
        )
        seeds = f"{p['seeds']} seed{'s' * (p['seeds'] != 1)}"
        lines.append(
            f"{p['label']}, {p['epochs']} epochs x {seeds} at dim {p['dim']}: p90 of dim*D "
            f"{p['dim_kl_p90']:.3g} (needs >= 0.1); clipped fraction A<0 {p['masked_fraction_neg_adv']:.3f} "
            f"vs A>0 {p['masked_fraction_pos_adv']:.3f} (needs at least twice); the ratio's bias/noise "
            f"{noise}: {reading}."
        )
    return "\n".join(lines)


def decision_lines(preset: str, results: dict | None = None) -> list[str]:
    """The preset's pre-registered decision rule, from its definition; with ``results``, the rule applied."""
    plan, pairs = PLANS[preset], [(a.label, b.label) for a, b in preset_pairs(preset)]
    lines = [
        "## Decision rule (pre-registered)",
        "",
        "Fixed by the preset's definition (`flowdppo.compare.PLANS`) "
        f"before any of its runs: {' and '.join(f'{a} vs {b}' for a, b in pairs)}, every arm with "
        f"`{' '.join(preset_common(preset))}`, {plan.seeds} seeds {plan.seed_offset}-"
        f"{plan.seed_offset + plan.seeds - 1}, used by no earlier report (`flowdppo compare --preset {preset} "
        f"--seeds {plan.seeds} --seed-offset {plan.seed_offset}`). The rule:",
        "",
    ] + [f"- {r}" for r in plan.rule]
    if results is None:
        return lines
    seeds = sorted({int(s) for arm in results["arms"].values() for s in arm["seeds"]})
    ran = f"ran {len(seeds)} seeds {seeds[0]}-{seeds[-1]}" if seeds else "ran no seeds"
    deviation = (
        ""
        if seeds == list(range(plan.seed_offset, plan.seed_offset + plan.seeds))
        else (f" **This report deviates from the plan: it {ran}; the rule is not read.**")
    )
    lines += ["", f"Outcome ({ran}).{deviation}", ""]
    for label, base_label in pairs:
        if not {label, base_label} <= set(results["arms"]):
            lines.append(f"- {label} vs {base_label}: not run.")
            continue
        matched, same, _ = estimates(results, label, base_label).values()
        if preset == "confirm":
            _, lo, hi = matched.ratio
            outcome = (
                f"n/a ({matched.why})"
                if matched.why
                else f"ratio {rc.ratio_cells(matched)[0]} over "
                f"{matched.pairs} pairs: claim 1 {'holds' if hi < 1 else 'does not hold'}; the >= 2x saving is "
                f"{'refuted' if lo > 0.5 else 'not refuted'}; the CI inside {list(NO_DIFFERENCE)} (no "
                f"difference): {'yes' if NO_DIFFERENCE[0] <= lo and hi <= NO_DIFFERENCE[1] else 'no'}"
            )
        else:
            (dr, half), (_, lo, hi) = same.reward, same.ratio
            is_matched = abs(dr) + half <= MATCHED_REWARD
            outcome = (
                f"n/a ({same.why})"
                if same.why
                else f"reward difference {rc.fmt(dr, half)}: "
                f"{'matched' if is_matched else 'NOT matched'}; same-epoch KL ratio {rc.ratio_cells(same)[0]}"
                f" ({same.pairs} pairs), matched-reward ratio {rc.ratio_cells(matched)[0]}: "
                + (
                    ("claim 1 holds" if hi < 1 else "claim 1 does not hold" if lo > 1 else "inconclusive")
                    if is_matched
                    else "not read as claim 1"
                )
            )
        lines.append(f"- {label} vs {base_label}: {outcome}.")
    return lines


def render_plan(preset: str, out: Path) -> Path:
    """REPORT.md of a pre-registered preset before it runs: its arms and decision rule."""
    plan = PLANS[preset]
    arms = preset_arms(preset)
    lines = [
        f"# DigitsBench: {preset}",
        "",
        f"Pre-registered, not run yet: {len(arms)} arms x {plan.seeds} seeds "
        f"on the digits task ({', '.join(a.label for a in arms)}).",
        "",
        *decision_lines(preset),
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")
    return out / "REPORT.md"


def epochs_lines(table: dict[str, dict[str, list[float]]]) -> list[str]:
    """The ``epochs`` preset's tables: several passes vs one, and the method x passes interaction, per seed."""
    lines = [
        "",
        "## Several passes vs one",
        "",
        "Final eval reward of I passes over each rollout divided by "
        "that of one pass, per seed (below 1: the extra passes degrade the result).",
        "",
        "| method | I | final reward / final reward at I = 1 | seeds |",
        "|---|---|---|---|",
    ]
    for method in sorted({label.split("/")[0] for label in table}):
        one = table.get(f"{method}/I1", {}).get("eval reward")
        for label in (f"{method}/I2", f"{method}/I4", f"{method}/half-I2"):
            if one and label in table:
                ratios = [a / b for a, b in zip(table[label]["eval reward"], one, strict=False)]
                lines.append(f"| {method} | {label.split('/')[1]} | {rc.fmt(*mean_ci(ratios))} | {len(ratios)} |")
    lines += [
        "",
        "## Method x passes interaction",
        "",
        "Per seed, (Flow-DPPO at I minus Flow-DPPO at I = 1) "
        "minus (Flow-GRPO at I minus Flow-GRPO at I = 1): what the extra passes do to one method more than "
        "to the other (the half-rollouts arms run their own seeds, so their pairing with I = 1 is by "
        "index only).",
        "",
        "| I | measure | pairs | interaction | verdict (DPPO better) | the CI rules out |",
        "|---|---|---|---|---|---|",
    ]
    for group in ("I2", "I4", "half-I2"):
        for key, better in (("eval reward", "higher"), ("drawdown", "lower")):
            columns = [table.get(f"{m}/{i}", {}).get(key) for m in ("flow_dppo", "flow_grpo") for i in (group, "I1")]
            if all(columns):
                diffs = [(a - b) - (c - d) for a, b, c, d in zip(*columns, strict=False)]
                row = rc.cells(est.paired(diffs), better)
                lines.append(
                    f"| {group} | {key} | {row['pairs']} | {row['difference']} | **{row['verdict']}** | "
                    f"{row['margin']} |"
                )
    return lines


def render_report(out: Path) -> Path:
    """Write REPORT.md and the plots from ``results.json`` (no training)."""
    from flowdppo import benchplots

    results = json.loads((out / "results.json").read_text())
    columns, table = est.arm_table(results)
    n = max(len(a["seeds"]) for a in results["arms"].values())
    first = results.get("seed_offset", 0)
    lines = [
        f"# DigitsBench: {results['preset']}",
        "",
        f"{len(results['arms'])} arms x {n} seeds (from seed {first}) on the digits task, "
        f"{results.get('jobs', 1)} runs at a time of one CPU thread each; "
        f"total wall time {results.get('wall_s', 0) / 60:.1f} min. Extra overrides: "
        f"{' '.join(results['overrides']) or 'none'}. Values are mean ± 95% CI (Student t) over seeds; "
        'eval measures come from 20 ODE samples per digit on fixed noise. The arm table\'s "at reward" and '
        '"at KL" columns use one target for every run (the lowest best reward, the smallest largest KL of '
        "the claims' methods); the paired sections read each seed at its own level.",
        "",
        "| arm | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for label, measures in table.items():
        lines.append(f"| {label} | " + " | ".join(rc.fmt(*mean_ci(measures[c])) for c in columns) + " |")
    if results["preset"] in PLANS:
        lines += ["", *decision_lines(results["preset"], results)]
    if "probe" in results:
        lines += ["", "## Regime probe", "", *(f"- {line}" for line in probe_line(results["probe"]).split("\n"))]
    claim_lines = claims(results, table)
    if claim_lines:
        header = [
            "| claim | pair | measure | pairs | difference | verdict | the CI rules out |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            "",
            "## Claims",
            "",
            "Differences are DPPO minus baseline, paired by seed (KL: the ratio DPPO / "
            f"baseline). A row on fewer than {est.MIN_PAIRS} pairs reads n/a.",
            "",
        ]
        lines += header + claim_lines
    if est.claim_pairs(results):
        evaluated = all(
            est.EVAL_KL in r
            for a in results["arms"].values()
            for rec in a["seeds"].values()
            for r in rec["rows"]
            if "eval/reward" in r
        )
        source = (
            "measured at evaluation on the evaluated samples, Flow-SDE kernel"
            if evaluated
            else "the rollout's, before each update: these runs predate the evaluation-time KL"
        )
        lines += [
            "",
            "## Per-seed estimators",
            "",
            f"KL to the base ({source}), DPPO arm / baseline, seed by seed: "
            f"at the seed's own matched reward (its base plus {CLAIM_LEVEL} of its lower arm's best gain), "
            "averaged over the evaluation epochs (log ratio; with the reward difference over the same epochs), "
            "and at the end (with the final reward difference). Geometric mean over seeds, 95% CI from a "
            "paired t on the logs, Wilcoxon signed-rank p. A seed whose lower arm gains less than "
            f"{est.NOISE_SES:g} eval standard errors (SD over seeds of the base's eval reward) has no level "
            f"above noise and is left out of the matched-reward rows; a row on fewer than {est.MIN_PAIRS} pairs "
            "reads n/a.",
            "",
            *estimate_lines(results),
        ]
        lines += [
            "",
            "## Matched reward, per pair",
            "",
            f"The same per-seed KL ratio at levels "
            f"{', '.join(map(str, LEVELS))} of the way from each seed's base to its lower arm's best.",
            "",
        ]
        lines += level_lines(matched_levels(results))
    if results["preset"] == "epochs":
        lines += epochs_lines(table)
    lines += mechanism_lines(results)  # none for runs that predate the mechanism test
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
    lines = [
        f"| dim | pair | KL ratio at each seed's level {CLAIM_LEVEL} (95% CI) | pairs | the CI rules out | "
        "KL ratio at equal epochs (95% CI, pairs) | reward difference at equal epochs | p90 dim*D (first arm) | "
        "baseline dropped A>0 / A<0 | claim 1 (less KL at that level) | claim 2 (FID at reward) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    reports = {
        path.parent.name: json.loads((path.parent / "results.json").read_text()) for path in root.glob("dim*/REPORT.md")
    }
    reports = {name: r for name, r in reports.items() if r.get("preset") in {f"dim{d}" for d in UPSAMPLE_OF_DIM}}

    def setting(results: dict) -> str:  # e.g. "4096 optim.lr=3e-3"
        return " ".join([results["preset"][3:], *results.get("overrides", [])])

    repeated = Counter(setting(r) for r in reports.values())
    order = sorted(reports.items(), key=lambda kv: (int(kv[1]["preset"][3:]), kv[1].get("overrides", []), kv[0]))
    for folder, results in order:
        dim = setting(results) + (f" ({folder})" if repeated[setting(results)] > 1 else "")  # two reports, one setting
        _, table = est.arm_table(results)
        verdicts = {(r["pair"], r["claim"]): r["verdict"] for r in claim_rows(results, table)}
        for label, base_label in est.claim_pairs(results):
            matched, same, _ = estimates(results, label, base_label).values()
            _, pos, neg = est.mechanism_means(results["arms"][base_label])
            p90 = est.mechanism_means(results["arms"][label])[0]
            claim2 = verdicts.get((f"{label} vs {base_label}", CLAIMS["single"][2][2]), "n/a")
            ci, rules_out = rc.ratio_cells(matched)
            lines.append(
                f"| {dim} | {label} vs {base_label} | {ci} | {matched.pairs} of {matched.seeds} | "
                f"{rules_out} | {rc.ratio_cells(same)[0]}, {same.pairs} | {rc.fmt(*same.reward)} | "
                f"{p90:.3g} | {pos:.3f} / {neg:.3f} | {rc.ratio_reading(matched)} | {claim2} |"
            )
    return lines if len(lines) > 2 else []


def gather_reports(root: Path) -> Path:
    """``root/REPORT.md``: the table across latent sizes, then the claims sections of every preset report under
    ``root`` (a pre-registered preset not run yet: its decision rule), with links."""
    intro = "Each preset's full report (tables, plots) is linked; its claims are repeated here."
    lines = ["# DigitsBench", "", intro, ""]
    dims = across_dims(root)
    if dims:
        lines += ["## Across latent sizes", "", *dims, ""]
    sections = (
        "## Decision rule (pre-registered)",
        "## Regime probe",
        "## Claims",
        "## Per-seed estimators",
        "## Reading",
    )
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
