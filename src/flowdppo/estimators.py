"""DigitsBench's measures: of one run (from its per-epoch rows), of each arm, and of a pair of arms seed by seed.

Per-seed estimators of a pair of arms say what one arm spends or gains relative to the other, seed by seed.

The two arms of a pair run the same seeds (same prompts, rollout noise, eval noise, hence the same base eval
reward). Each estimator first reduces every seed to one number, then summarises those over the seeds: the mean
with its 95% Student-t CI, the number of pairs (seeds) it rests on, how many lie below 0 and a Wilcoxon
signed-rank p-value. No seed drops out because another seed's run was slow; a seed is left out only for a
reason of its own, which the summary counts. Notation, for seed ``s``, arm ``x`` in ``{a, b}``, evaluation ``e``::

    matched reward   g_s = min_x max_e R_x,s,e - R_s,base        (the lower arm's best gain in that seed)
                     L_s = R_s,base + f * g_s                   (f: ``CLAIM_FRACTION`` by default)
                     r_s = log(KL_a,s(L_s) / KL_b,s(L_s))        (KL where each arm's frontier reaches L_s)
    same epochs      r_s = mean_e log(KL_a,s,e / KL_b,s,e),  dR_s = mean_e (R_a,s,e - R_b,s,e)
    final KL         r_s = log(KL_a,s,last / KL_b,s,last),   dR_s = R_a,s,last - R_b,s,last
    summary          ratio exp(mean_s r_s), CI exp(mean_s r_s -+ t_{0.975, n-1} sd(r) / sqrt(n))

A seed whose lower arm gains less than ``NOISE_SES`` eval standard errors (``g_s < 2 SE``) has no level above
evaluation noise and is left out of the matched-reward estimators; ``SE`` is the standard deviation over the
pair's seeds of the base's eval reward: one model, scored on each seed's own fixed eval noise, so that spread is
the eval reward's sampling error. A summary of fewer than ``MIN_PAIRS`` pairs reads n/a, and says why.
Pure functions of runs' records and curves; no I/O.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from flowdppo.frontier import kl_at_reward, mean_ci, reward_at_kl, value_at_reward

CLAIM_FRACTION = 0.7  # the matched reward: this fraction of the way from a seed's base to its lower arm's best
MIN_PAIRS = 5  # a CI on fewer pairs reads n/a
NOISE_SES = 2.0  # a seed's gain below this many eval standard errors is evaluation noise
CONTROL = "unconstrained"  # -A rho with no trust test: what the trust tests are measured against
BASELINES_OF = {"flow_dppo": ("flow_grpo", "flow_cps", "grpo_guard", CONTROL), "flow_dppo_cps": ("flow_cps",)}
EVAL_KL = "eval/kl_to_base"
FORGETTING = ("eval/fid", "eval/diversity", "eval_heldout/accuracy", "eval_heldout/fid", "eval_heldout/diversity")


@dataclass(frozen=True)
class Curve:
    """One run's evaluations in training order, the base (before any update: epoch -1, KL 0) first.

    ``epoch``, ``kl`` (KL to the base), ``reward`` (eval reward) and every array of ``measures`` (other eval
    measures by name, e.g. ``fid``) have one entry per evaluation, shape (E + 1,)."""

    epoch: np.ndarray
    kl: np.ndarray
    reward: np.ndarray
    measures: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Summary:
    """Per-seed values of a pair summarised over seeds. For a ratio the values are logs (``ratio`` reads them).

    ``values``: the compared seeds' values, ``pairs`` of them out of ``seeds``; ``below``: how many are below 0
    (a ratio below 1); ``p``: Wilcoxon signed-rank, two-sided; ``means``: arm a's and arm b's mean value over the
    compared seeds (at their levels; NaN where the estimator has none); ``reward``: mean and CI half-width of the
    reward difference a - b over the same seeds (NaN where reward is matched by construction); ``why``: non-empty
    when the summary reads n/a; ``left_out``: why seeds were left out, with counts."""

    mean: float
    half: float
    values: tuple[float, ...]
    seeds: int
    below: int = 0
    p: float = math.nan
    means: tuple[float, float] = (math.nan, math.nan)
    reward: tuple[float, float] = (math.nan, math.nan)
    why: str = ""
    left_out: dict[str, int] = field(default_factory=dict)

    @property
    def pairs(self) -> int:
        return len(self.values)

    @property
    def ratio(self) -> tuple[float, float, float]:
        """(geometric mean ratio, lower CI end, upper CI end); NaN when n/a."""
        if self.why:
            return math.nan, math.nan, math.nan
        return math.exp(self.mean), math.exp(self.mean - self.half), math.exp(self.mean + self.half)


# ---------------------------------------------------------------- measures of one run and of each arm


def eval_points(record: dict, key: str = "eval/reward") -> tuple[np.ndarray, np.ndarray]:
    """(KL to base, eval measure ``key``) at the base (KL 0) and at every evaluated epoch.

    The KL is ``eval/kl_to_base``: measured at evaluation, on the evaluated samples, in the Flow-SDE kernel for
    every arm. Runs recorded before it existed fall back to the rollout's ``kl_to_base`` (taken before the
    epoch's update, in the arm's own measuring kernel)."""
    rows = [r for r in record["rows"] if key in r]
    kl_key = EVAL_KL if all(EVAL_KL in r for r in rows) else "kl_to_base"
    kl = np.array([0.0] + [r[kl_key] for r in rows])
    return kl, np.array([record["base"][key]] + [r[key] for r in rows])


def final(record: dict, key: str) -> float:
    return [r[key] for r in record["rows"] if key in r][-1]


def forgetting_name(key: str) -> str:
    """``eval/fid`` -> ``fid``, ``eval_heldout/accuracy`` -> ``held-out accuracy``."""
    return key.replace("eval/", "").replace("eval_heldout/", "held-out ")


def curve(record: dict) -> Curve:
    """One run's evaluations as an ``estimators.Curve``: ``eval_points`` with the epochs and forgetting measures."""
    kl, reward = eval_points(record)
    epochs = [r["epoch"] for r in record["rows"] if "eval/reward" in r]
    measures = {forgetting_name(k): eval_points(record, k)[1] for k in FORGETTING if k in record["base"]}
    return Curve(np.array([-1, *epochs]), kl, reward, measures)


def run_measures(record: dict) -> dict[str, float]:
    """Final in-domain and out-of-domain measures of one run, and their change from the base."""
    base, rows = record["base"], record["rows"]
    measures = {
        "eval reward": final(record, "eval/reward"),
        "eval accuracy": final(record, "eval/accuracy"),
        "KL to base": eval_points(record)[0][-1],
        "FID change": final(record, "eval/fid") - base["eval/fid"],
        "diversity change": final(record, "eval/diversity") - base["eval/diversity"],
        "masked fraction": float(np.mean([r.get("masked_fraction", math.nan) for r in rows])),
        "wall s": record["wall_s"],
    }
    # stability: how far the final eval reward sits below the run's best (the base included), and whether it ended
    # below the base (a collapse: whatever was gained is lost, and more)
    rewards = eval_points(record)[1]
    measures["drawdown"] = float(rewards.max() - rewards[-1])
    measures["collapsed"] = float(rewards[-1] < rewards[0])
    # eval reward gained from the base per epoch and per minute of training (rollout + update, no evaluation)
    gain = measures["eval reward"] - base["eval/reward"]
    measures["gain per epoch"] = gain / len(rows)
    measures["gain per min"] = gain / (sum(r.get("time_s", math.nan) for r in rows) / 60)
    if any("dim_kl_p90" in r for r in rows):  # the mechanism, averaged over epochs (runs recorded before: absent)
        for key, name in (
            ("masked_fraction_pos_adv", "masked A>0"),
            ("masked_fraction_neg_adv", "masked A<0"),
            ("dim_kl_p90", "p90 dim*D"),
            ("first_moved_log_ratio_std", "log rho std"),
        ):
            measures[name] = float(np.mean([r.get(key, math.nan) for r in rows]))
    reward_keys = sorted(k for k in rows[0] if k.startswith("reward/"))
    if len(reward_keys) > 1:  # per-reward gain: mean of the last 5 epochs minus the first epoch
        gains = {k: float(np.mean([r[k] for r in rows[-5:]]) - rows[0][k]) for k in reward_keys}
        measures.update({f"gain {k[7:]}": v for k, v in gains.items()})
        measures["worst gain"] = min(gains.values())
    return measures


def regime_measures(runs: list[list[dict]]) -> dict:
    """The probe's measures over several runs' rows: the means over their updates of p90 of ``dim * D`` and of
    the dropped fractions by advantage sign; the ratio's bias/noise (``|mean| / sd`` of ``log rho`` per update,
    averaged); whether the weak criterion is ``met`` (p90 >= 0.1, dropped A<0 at least twice A>0); epochs per
    run and runs (``seeds``)."""
    rows = [r for run in runs for r in run]
    out = {
        key: mean_ci([r.get(key, math.nan) for r in rows])[0]  # NaN-free mean, NaN when none
        for key in ("dim_kl_p90", "masked_fraction_pos_adv", "masked_fraction_neg_adv")
    }
    out["bias_noise"] = mean_ci(
        [
            abs(r["first_moved_log_ratio_mean"]) / r["first_moved_log_ratio_std"]
            for r in rows
            if r.get("first_moved_log_ratio_std", 0) > 0
        ]
    )[0]
    out["met"] = bool(
        out["dim_kl_p90"] >= 0.1
        and out["masked_fraction_neg_adv"] > 0
        and out["masked_fraction_neg_adv"] >= 2 * out["masked_fraction_pos_adv"]
    )
    return out | {"epochs": len(rows) // len(runs), "seeds": len(runs)}


def mechanism_means(arm: dict) -> tuple[float, float, float]:
    """An arm's p90 of ``dim * D`` and dropped fractions for ``A > 0`` and ``A < 0``, over its updates and seeds."""
    rows = [r for rec in arm["seeds"].values() for r in rec["rows"]]
    return tuple(
        float(np.mean([r.get(k, math.nan) for r in rows]))
        for k in ("dim_kl_p90", "masked_fraction_pos_adv", "masked_fraction_neg_adv")
    )


def claim_methods() -> set[str]:
    """The methods the paper's claims are about: Flow-DPPO and the ratio-clipping baselines."""
    return set(BASELINES_OF) | {m for baselines in BASELINES_OF.values() for m in baselines}


def matched_targets(arms: dict) -> tuple[float, float]:
    """The best reward every run of the claims' methods reaches, and their smallest final KL (other arms
    are measured at the same targets, so adding an arm does not change them; with none of them, every run).
    Runs that never rise above their base (a collapse from the start) are left out, else the target would be a
    base reward."""
    records = [rec for arm in arms.values() if arm["method"] in claim_methods() for rec in arm["seeds"].values()]
    records = records or [rec for arm in arms.values() for rec in arm["seeds"].values()]
    records = [rec for rec in records if eval_points(rec)[1].max() > eval_points(rec)[1][0]] or records
    target_reward = min(eval_points(rec)[1].max() for rec in records)
    target_kl = min(eval_points(rec)[0].max() for rec in records)
    return float(target_reward), float(target_kl)


def arm_table(results: dict) -> tuple[list[str], dict[str, dict[str, list[float]]]]:
    """Per arm, per measure: the list of per-seed values (seed order)."""
    arms = results["arms"]
    target_reward, target_kl = matched_targets(arms)
    per_arm: dict[str, list[dict[str, float]]] = {}
    for label, arm in arms.items():
        per_seed = per_arm[label] = []
        for _, rec in sorted(arm["seeds"].items(), key=lambda kv: int(kv[0])):
            m = run_measures(rec)
            kl, reward = eval_points(rec)
            m[f"KL at reward {target_reward:.3f}"] = kl_at_reward(kl, reward, target_reward)
            m[f"reward at KL {target_kl:.3g}"] = reward_at_kl(kl, reward, target_kl)
            for key in FORGETTING:  # at the same in-domain reward (held-out digits: with digits.classes)
                if key in rec["base"]:
                    name = forgetting_name(key)
                    m[f"{name} at reward {target_reward:.3f}"] = value_at_reward(
                        reward, eval_points(rec, key)[1], target_reward
                    )
            per_seed.append(m)
    columns = list(dict.fromkeys(k for per_seed in per_arm.values() for m in per_seed for k in m))  # arms may lack some
    table = {label: {k: [m.get(k, math.nan) for m in per_seed] for k in columns} for label, per_seed in per_arm.items()}
    return columns, table


def claim_pairs(results: dict) -> list[tuple[str, str]]:
    """(DPPO arm, baseline arm) labels compared in the claims: same group, the baseline's method one of
    ``BASELINES_OF`` the arm's (the one-pass arms of ``epochs`` are its reference, not a claim)."""
    arms = results["arms"]
    return [
        (label, other)
        for label, arm in arms.items()
        for other, base in arms.items()
        if base["group"] == arm["group"]
        and base["method"] in BASELINES_OF.get(arm["method"], ())
        and not (results["preset"] == "epochs" and arm["group"] == "I1")
    ]


def pair_curves(results: dict, label: str, base_label: str) -> list[tuple[Curve, Curve]]:
    """The two arms' curves, seed by seed, over the seeds both ran."""
    a, b = results["arms"][label]["seeds"], results["arms"][base_label]["seeds"]
    return [(curve(a[s]), curve(b[s])) for s in sorted(set(a) & set(b), key=int)]


# ---------------------------------------------------------------- per-seed estimators of a pair


def summarise(
    values: list[float],
    whys: list[str],
    rewards: list[float] | None = None,
    arms: list[tuple[float, float]] | None = None,
) -> Summary:
    """``Summary`` of per-seed ``values``; ``whys[s]`` says why seed ``s`` is left out ("" when it is compared).
    ``rewards``: its reward differences, ``arms``: the two arms' values, per seed."""
    from scipy.stats import wilcoxon

    kept = [i for i, why in enumerate(whys) if not why]
    left_out = dict(Counter(filter(None, whys)))
    v = [float(values[i]) for i in kept]
    mean, half = mean_ci(v)
    p = float(wilcoxon(v).pvalue) if len(v) >= 2 and any(v) else math.nan
    means = (math.nan, math.nan)
    if arms and kept:
        means = (float(np.mean([arms[i][0] for i in kept])), float(np.mean([arms[i][1] for i in kept])))
    reward = mean_ci([rewards[i] for i in kept]) if rewards else (math.nan, math.nan)
    why = ""
    if len(v) < MIN_PAIRS:
        why = f"{len(v)} pairs (needs {MIN_PAIRS})" + "".join(
            f"; {n} seed{'s' * (n != 1)}: {reason}" for reason, n in left_out.items()
        )
    return Summary(mean, half, tuple(v), len(values), sum(x < 0 for x in v), p, means, reward, why, left_out)


def paired(differences: list[float]) -> Summary:
    """``Summary`` of per-seed paired differences (NaN: a seed that lacks the measure)."""
    return summarise(differences, ["measure missing" if math.isnan(d) else "" for d in differences])


def eval_noise(pairs: list[tuple[Curve, Curve]]) -> float:
    """The eval reward's standard error: the SD over seeds of the base's eval reward (NaN with one seed)."""
    bases = [a.reward[0] for a, _ in pairs]
    return float(np.std(bases, ddof=1)) if len(bases) > 1 else math.nan


def value_at(curve: Curve, name: str, level: float) -> float:
    """``name`` ("KL" or one of ``measures``) where the run's eval reward first reaches ``level``: the KL on the
    reward-vs-KL frontier (``kl_at_reward``), another measure at the first crossing in training order
    (``value_at_reward``); NaN if it never does."""
    if name == "KL":
        return kl_at_reward(curve.kl, curve.reward, level)
    return value_at_reward(curve.reward, curve.measures[name], level)


def seed_level(a: Curve, b: Curve, fraction: float = CLAIM_FRACTION) -> tuple[float, float]:
    """(the seed's level ``L_s``, the lower arm's best gain ``g_s``), the gain clipped at 0."""
    gain = max(0.0, float(min(a.reward.max(), b.reward.max()) - a.reward[0]))
    return float(a.reward[0] + fraction * gain), gain


def at_matched_reward(
    a: Curve, b: Curve, name: str = "KL", fraction: float = CLAIM_FRACTION, noise: float = math.nan
) -> tuple[float, float, float, str]:
    """One seed at its own matched reward: (its level, ``name`` of arm a there, of arm b, why it is left out:
    "" when compared)."""
    level, gain = seed_level(a, b, fraction)
    va, vb = value_at(a, name, level), value_at(b, name, level)
    if gain <= 0:
        why = "no gain over the base"
    elif gain < NOISE_SES * noise:
        why = f"gain below {NOISE_SES:g} eval SEs"
    elif math.isnan(va) or math.isnan(vb):
        why = "level not reached"
    elif name == "KL" and min(va, vb) <= 0:
        why = "level reached without KL"
    else:
        why = ""
    return level, va, vb, why


def matched_reward(
    pairs: list[tuple[Curve, Curve]], name: str = "KL", fraction: float = CLAIM_FRACTION, ratio: bool = True
) -> Summary:
    """``name`` at each seed's matched reward: log ratios a / b (``ratio``) or differences a - b, summarised."""
    noise = eval_noise(pairs)
    seeds = [at_matched_reward(a, b, name, fraction, noise) for a, b in pairs]
    values = [(math.log(va / vb) if ratio else va - vb) if not why else math.nan for _, va, vb, why in seeds]
    return summarise(values, [why for *_, why in seeds], arms=[(va, vb) for _, va, vb, _ in seeds])


def same_epochs(a: Curve, b: Curve) -> tuple[float, float, str]:
    """One seed at equal epochs: (mean log KL ratio, mean reward difference, why it is left out) over the
    evaluations after the base that both runs have, with KL above 0 in both."""
    common, ia, ib = np.intersect1d(a.epoch[1:], b.epoch[1:], return_indices=True)
    ia, ib = ia + 1, ib + 1
    spent = (a.kl[ia] > 0) & (b.kl[ib] > 0)
    if not spent.any():
        return math.nan, math.nan, "no common evaluation with KL" if len(common) else ("no common evaluation")
    ia, ib = ia[spent], ib[spent]
    return float(np.mean(np.log(a.kl[ia] / b.kl[ib]))), float(np.mean(a.reward[ia] - b.reward[ib])), ""


def iso_epoch(pairs: list[tuple[Curve, Curve]]) -> Summary:
    """The log KL ratio averaged over the evaluation epochs, per seed, summarised with its reward difference."""
    seeds = [same_epochs(a, b) for a, b in pairs]
    return summarise([s[0] for s in seeds], [s[2] for s in seeds], [s[1] for s in seeds])


def final_kl(pairs: list[tuple[Curve, Curve]]) -> Summary:
    """The final KL ratio a / b per seed, summarised with the final reward difference."""
    whys = ["" if a.kl[-1] > 0 and b.kl[-1] > 0 else "no KL at the end" for a, b in pairs]
    values = [math.log(a.kl[-1] / b.kl[-1]) if not why else math.nan for (a, b), why in zip(pairs, whys, strict=True)]
    return summarise(values, whys, [float(a.reward[-1] - b.reward[-1]) for a, b in pairs])


def reward_at_matched_kl(pairs: list[tuple[Curve, Curve]]) -> Summary:
    """Reward difference a - b per seed at the seed's own KL budget, the smaller of the two runs' largest KL
    (where both frontiers are measured), summarised."""
    budgets = [min(a.kl.max(), b.kl.max()) for a, b in pairs]
    whys = ["" if k > 0 else "no KL spent" for k in budgets]
    values = [
        reward_at_kl(a.kl, a.reward, k) - reward_at_kl(b.kl, b.reward, k) if k > 0 else math.nan
        for (a, b), k in zip(pairs, budgets, strict=True)
    ]
    return summarise(values, whys)
