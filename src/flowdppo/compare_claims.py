"""The claim rows, the matched-reward levels and the per-seed estimator tables of a DigitsBench report, from
``results.json`` alone (``compare_report`` puts them on the page)."""

from __future__ import annotations

import math

import numpy as np

from flowdppo import estimators as est
from flowdppo import report_cells as rc
from flowdppo.compare import CLAIM_LEVEL, PLANS

LEVELS = (0.7, 0.8, 0.9)  # matched rewards: these fractions of the way from each seed's base to its lower arm's best


CLAIMS = {
    "single": [
        ("KL at reward", "lower", "1: less KL to reach the matched reward"),
        ("reward at KL", "higher", "1: more reward at the matched KL"),
        ("fid at reward", "lower", "2: forgets less (lower feature FID at the matched reward)"),
        ("diversity at reward", "higher", "2: forgets less (more diversity at the matched reward)"),
    ],
    "multi": [("worst gain", "higher", "3: the worst-served reward gains more")],
    "epochs": [
        ("eval reward", "higher", "4: higher final reward with several inner epochs"),
        ("drawdown", "lower", "4: less drawdown from the peak with several inner epochs"),
    ],
}
CLAIMS.update({p: CLAIMS["single"] for p in ("calib", "dim64", "dim1024", "dim4096", *PLANS)})
CLAIMS["stress"] = CLAIMS["epochs"]
CLAIMS["heldout"] = [CLAIMS["single"][0]] + [
    (f"held-out {key} at reward", better, f"2: forgets less (held-out digits' {key} at the matched reward)")
    for key, better in (("accuracy", "higher"), ("fid", "lower"), ("diversity", "higher"))
]


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
                row |= rc.cells(summary, better, name == "KL", [summary.means[1]])
            else:
                key = next(k for k in table[label] if k.startswith(prefix))
                diffs = [a - b for a, b in zip(table[label][key], table[base_label][key], strict=False)]
                summary = est.paired(diffs)
                row |= {"measure": key} | rc.cells(summary, better, reference=table[base_label][key])
            rows.append(row)
    return rows


def claims(results: dict, table: dict[str, dict[str, list[float]]]) -> list[str]:
    """``claim_rows`` as markdown table rows."""
    return [
        f"| {r['claim']} | {r['pair']} | {r['measure']} | {r['pairs']} | {r['difference']} | **{r['verdict']}** | "
        f"{r['margin']} |"
        for r in claim_rows(results, table)
    ]


def matched_levels(results: dict, fractions: tuple[float, ...] = LEVELS) -> list[dict]:
    """Per claim pair and per fraction: each seed's KL ratio at its own level (``estimators.matched_reward``),
    the level ``fraction`` of the way from the seed's base to its lower arm's best, summarised over seeds."""
    out = []
    for label, base_label in est.claim_pairs(results):
        pairs = est.pair_curves(results, label, base_label)
        for fraction in fractions:
            levels = [est.seed_level(a, b, fraction)[0] for a, b in pairs]
            out.append(
                {
                    "pair": f"{label} vs {base_label}",
                    "fraction": fraction,
                    "reward": float(np.mean(levels)),
                    "summary": est.matched_reward(pairs, fraction=fraction),
                }
            )
    return out


def level_lines(levels: list[dict]) -> list[str]:
    """The markdown table of ``matched_levels``."""
    lines = [
        "| pair | level | eval reward (seed mean) | pairs | KL (DPPO) | KL (baseline) | KL ratio, 95% CI | "
        "below 1 | Wilcoxon p | reading | the CI rules out |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in levels:
        s = row["summary"]
        lines.append(
            f"| {row['pair']} | {row['fraction']:.1f} | {row['reward']:.3f} | {s.pairs} of {s.seeds} | "
            f"{rc.num(s.means[0])} | {rc.num(s.means[1])} | {rc.ratio_cells(s)[0]} | {s.below} | "
            f"{rc.num(s.p, '.2g')} | "
            f"{rc.ratio_reading(s)} | {rc.ratio_cells(s)[1]} |"
        )
    return lines


def estimates(results: dict, label: str, base_label: str) -> dict[str, est.Summary]:
    """The per-seed KL ratios of one pair: at each seed's matched reward, at equal epochs, at the end."""
    pairs = est.pair_curves(results, label, base_label)
    return {
        f"matched reward (level {CLAIM_LEVEL})": est.matched_reward(pairs),
        "same epochs": est.iso_epoch(pairs),
        "final KL": est.final_kl(pairs),
    }


def estimate_lines(results: dict) -> list[str]:
    """The per-seed estimators' table, every claim pair."""
    lines = [
        "| pair | estimator | KL ratio, 95% CI | pairs | below 1 | Wilcoxon p | reward difference | reading | "
        "the CI rules out |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, base_label in est.claim_pairs(results):
        for name, s in estimates(results, label, base_label).items():
            reward = "matched" if math.isnan(s.reward[0]) else rc.fmt(*s.reward)
            ci, rules_out = rc.ratio_cells(s)
            lines.append(
                f"| {label} vs {base_label} | {name} | {ci} | {s.pairs} of {s.seeds} | {s.below} | "
                f"{rc.num(s.p, '.2g')} | {reward} | {rc.ratio_reading(s)} | {rules_out} |"
            )
    return lines
