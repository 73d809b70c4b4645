"""REPORT.md's mechanism section: per arm, the per-update mechanism test (``flowdppo.mechanism``) summed over its
seeds' ``mechanism.json``: what Flow-DPPO's mask and Flow-GRPO's clip would each drop, by sign of the advantage, and
how often the ratio's sign disagrees with the mean shift's, by ``dim * D``. Arms whose runs predate it are left out
(no section at all when none has it)."""

from __future__ import annotations

from flowdppo import mechanism as mech

SIGN_NAMES = {"pos": "A > 0", "neg": "A < 0"}  # A = 0: no test drops, summarised in a line


def arm_mechanism(arm: dict) -> tuple[dict, int] | None:
    """An arm's mechanism record summed over its seeds (``mechanism.summary``) and the number of seeds behind it."""
    records = [rec["mechanism"] for rec in arm["seeds"].values() if "mechanism" in rec]
    if not records:
        return None
    total = [sum(col) for col in zip(*(mech.as_vector(r) for r in records), strict=True)]
    return mech.summary(total, records[0]["tau"], records[0]["clip_range"]), len(records)


def share(n: int, of: int) -> str:
    return f"{100 * n / of:.1f}% ({n:,})" if of else "n/a"


def bin_label(k: int) -> str:
    edges = mech.DIM_KL_EDGES
    if k == 0:
        return f"< {edges[0]:.2g}"
    return f">= {edges[-1]:.2g}" if k == len(edges) else f"[{edges[k - 1]:.2g}, {edges[k]:.2g})"


def null_range(k: int) -> str:
    """The disagreement rate a pure-noise shift would give over bin ``k`` (``mechanism.null_disagreement``)."""
    edges = (0.0, *mech.DIM_KL_EDGES, float("inf"))
    lo, hi = (mech.null_disagreement(edges[k + j]) if edges[k + j] != float("inf") else 0.5 for j in (0, 1))
    return f"{100 * lo:.1f}-{100 * hi:.1f}%"


def arm_lines(label: str, record: dict, seeds: int) -> list[str]:
    """The two tables of one arm."""
    lines = [
        f"### {label}",
        "",
        f"tau {record['tau']:g}, eps {record['clip_range']:g}; {record['elements']:,} moved elements over {seeds} "
        f"seeds ({record['nonfinite']:,} non-finite left out). Share of the elements of each advantage sign:",
        "",
        "| A | Flow-DPPO's mask | Flow-GRPO's clip keeps | Flow-GRPO's clip drops |",
        "|---|---|---|---|",
    ]
    for sign, name in SIGN_NAMES.items():
        table = record["table"][sign]
        n = sum(map(sum, table))
        for dppo, word in ((0, "keeps"), (1, "drops")):
            lines.append(f"| {name} | {word} | {share(table[dppo][0], n)} | {share(table[dppo][1], n)} |")
    zero = sum(map(sum, record["table"]["zero"]))
    lines += [
        "",
        f"A = 0: {zero:,} elements, which neither test drops.",
        "",
        "| dim * D | elements | sign(log rho) != sign(shift) | if the shift were noise |",
        "|---|---|---|---|",
    ]
    bins = record["bins"]
    for k, (n, wrong) in enumerate(zip(bins["elements"], bins["disagree"], strict=True)):
        if n:
            lines.append(f"| {bin_label(k)} | {n:,} | {share(wrong, n)} | {null_range(k)} |")
    return lines + [""]


def mechanism_lines(results: dict) -> list[str]:
    """The section, or ``[]`` where no run recorded the mechanism test."""
    arms = {label: arm_mechanism(arm) for label, arm in results["arms"].items()}
    arms = {label: found for label, found in arms.items() if found is not None}
    if not arms:
        return []
    lines = [
        "",
        "## Mechanism test",
        "",
        "On every element replayed after an update's first optimizer step, whatever the arm's loss: whether "
        "Flow-DPPO's mask (D >= tau and rho moving with A) and Flow-GRPO's clip (rho beyond 1 ± eps with A, "
        "on the plain ratio) would drop it, at the arm's loss.kl_mask_threshold and loss.clip_range (a "
        "pre-registered pair's arms both carry the pair's); and how often sign(log rho) disagrees with the "
        "sign of the mean shift along the sampled noise, mean((x_next - mu_old) / s * (mu_new - mu_old)), by "
        "dim * D (the step's full KL). With Gaussian log-probs log rho = shift / s - D: a shift of pure noise "
        "would disagree at Phi(sqrt(dim * D / 2)) - 1/2 (last column, over the bin). Summed over seeds "
        "(`mechanism.json` of each run, `flowdppo.mechanism`).",
        "",
    ]
    for label, (record, seeds) in arms.items():
        lines += arm_lines(label, record, seeds)
    return lines[:-1]
