"""Each method of a DigitsBench report against Flow-DPPO, Flow-GRPO (the reference of DGPO's and DiffusionNFT's
speed-up claims) and the best likelihood-free arm, seed by seed:
the KL to the base at the pair's matched reward (each seed's level 0.7 of the way from its base to the lower
arm's best, as the report's claim rows), and the epochs and trained elements the method needs to reach the
Flow-DPPO run's level (``est.seed_level`` on the pair), paired by seed. Writes METHODS.md beside results.json.

    python benchmarks/method_claims.py benchmarks/digitsbench/single-methods [--methods dgpo,crd,...]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from flowdppo import estimators as est

LIKELIHOOD_FREE = ("diffusion_nft", "awm")


def epochs_to(curve: est.Curve, level: float) -> float:
    """Epochs trained when the eval reward first reaches ``level`` (NaN: never)."""
    reached = np.nonzero(curve.reward >= level)[0]
    return float(curve.epoch[reached[0]] + 1) if len(reached) else math.nan


def elements_per_epoch(record: dict, run_dir: Path) -> float:
    """Mean ``trained_elements`` of the run's updates: from its record in results.json, or from its
    ``metrics.jsonl`` for a report written before results.json kept the key."""
    rows = record["rows"]
    if not any("trained_elements" in r for r in rows):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return float(np.mean([r["trained_elements"] for r in rows if "trained_elements" in r]))


def cost_to_level(report: Path, results: dict, label: str, reference: str) -> tuple[est.Summary, est.Summary]:
    """Per seed, at the pair's level 0.7: log(epochs of ``label`` / epochs of ``reference``) and the same for
    trained elements, summarised; a seed where either arm never reaches the level is left out."""
    arms = results["arms"]
    seeds = sorted(set(arms[label]["seeds"]) & set(arms[reference]["seeds"]), key=int)
    epochs, elements, whys = [], [], []
    for s in seeds:
        a, b = (arms[x]["seeds"][s] for x in (label, reference))
        ca, cb = est.curve(a), est.curve(b)
        level, gain = est.seed_level(cb, ca)
        ea, eb = epochs_to(ca, level), epochs_to(cb, level)
        ok = gain > 0 and not math.isnan(ea) and not math.isnan(eb)
        whys.append("" if ok else "level not reached")
        epochs.append(math.log(ea / eb) if ok else math.nan)
        per_epoch = [
            elements_per_epoch(arms[x]["seeds"][s], report / "runs" / x / f"seed{s}") for x in (label, reference)
        ]
        elements.append(math.log(ea * per_epoch[0] / (eb * per_epoch[1])) if ok else math.nan)
    return est.summarise(epochs, whys), est.summarise(elements, whys)


def ratio_cell(summary: est.Summary) -> str:
    if summary.why:
        return f"n/a ({summary.why})"
    ratio, low, high = summary.ratio
    return f"{ratio:.2f} [{low:.2f}, {high:.2f}], {summary.pairs} of {summary.seeds} pairs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument(
        "--methods", default="flow_dppo,dgpo,crd,diffusion_dpo,diffusion_dpo_offline,sft,rft,diffusion_nft,awm"
    )
    args = parser.parse_args()
    results = json.loads((args.report / "results.json").read_text())
    arms = results["arms"]
    final_reward = {
        label: np.mean([est.final(r, "eval/reward") for r in arm["seeds"].values()]) for label, arm in arms.items()
    }
    evaluated = est.curve(next(iter(arms["flow_dppo"]["seeds"].values()))).epoch
    every = int(evaluated[2] - evaluated[1])
    best_free = max(LIKELIHOOD_FREE, key=lambda m: final_reward[m])
    lines = [
        f"# Every method against Flow-DPPO, Flow-GRPO and {best_free}",
        "",
        f"From `benchmarks/digitsbench/{args.report.name}/results.json` ({results['preset']},"
        f" {results['seeds']} seeds), by"
        " `benchmarks/method_claims.py`. Ratios are method / reference: geometric mean over seeds, 95% CI from a"
        " paired t on the logs. KL: at each seed's level 0.7 of the way from its base to the lower arm's best"
        " eval reward. Epochs and trained elements: to reach that level (the pair's level, the reference's base),"
        f" read at the evaluations (every {every} epochs, so a ratio moves in steps).",
        f"{best_free} is the likelihood-free arm with the higher final eval reward.",
        "",
        "| method | final eval reward | reference | KL at matched reward | epochs to the level"
        " | trained elements to the level |",
        "|---|---|---|---|---|---|",
    ]
    for method in args.methods.split(","):
        for reference in ("flow_dppo", "flow_grpo", best_free):
            if method == reference or method not in arms:
                continue
            kl = est.matched_reward(est.pair_curves(results, method, reference))
            epochs, elements = cost_to_level(args.report, results, method, reference)
            lines.append(
                f"| {method} | {final_reward[method]:.3f} | {reference} | {ratio_cell(kl)} | {ratio_cell(epochs)} |"
                f" {ratio_cell(elements)} |"
            )
    out = args.report / "METHODS.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
