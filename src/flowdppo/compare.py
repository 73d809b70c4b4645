"""DigitsBench presets: the arms every method runs as (a label, a method and config overrides) and the
pre-registered plans.

    flowdppo compare --preset single --seeds 5 --out benchmarks/digitsbench/single
    flowdppo compare --report-only benchmarks/digitsbench/single    # re-render, no training

Every arm of a preset runs once per seed (seeds ``seed_offset``, ``seed_offset + 1``, ...), in parallel processes
of one thread each (``flowdppo.compare_runs``); ``results.json`` keeps every run's per-epoch metrics, so the report
(``flowdppo.compare_report``) can be rendered again without training. Pairs of arms are compared seed by seed
(``flowdppo.estimators``); the pre-registered presets (``PLANS``) carry their seeds and decision rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flowdppo import estimators as est
from flowdppo.settings import PRESETS


def trains_alone(method: str) -> bool:
    """Whether ``method``'s preset trains from its own rollouts with no further input (``opd`` needs teachers,
    offline preference or data methods a file): only those are default arms."""
    from flowdppo.config import load_config
    from flowdppo.errors import ConfigError

    try:
        load_config(method)
    except ConfigError:
        return False
    return True


METHODS = tuple(m for m in PRESETS if m != est.CONTROL and trains_alone(m))  # every self-contained method preset
BENCH_OVERRIDES = ["eval_every=5", "eval_samples_per_class=20", "checkpoint_every=1000", "keep_checkpoints=1"]
HALF_EPOCHS = "epochs=half"  # resolved to half the run's epochs (half the rollouts)
HALF_SEED_OFFSET = 1000  # the half-rollouts arms run seeds 1000, 1001, ...: independent of the full runs
UPSAMPLE_OF_DIM = {64: 1, 1024: 4, 4096: 8}  # latent dim -> digits.upsample
SD35_LATENT_DIM = 16 * 64 * 64  # SD3.5 at 512 x 512: 16 channels x 64 x 64
STRESS = ["optim.lr=3e-3", "optim.inner_epochs=4"]  # 3x the learning rate, 4 passes over each rollout
CLAIM_LEVEL = est.CLAIM_FRACTION  # the level the claim rows read measures at a matched reward at
REGIME = ["optim.lr=3e-3", "optim.inner_epochs=1", "epochs=40"]  # with dim 4,096: where the probe's criterion is met
HELDOUT = ["digits.classes=[0,1,2,3,4]"]  # trained on 0-4; 5-9 held out
BENCH_PRESETS = (
    "single",
    "multi",
    "epochs",
    "threshold",
    "calib",
    "dim64",
    "dim1024",
    "dim4096",
    "stress",
    "heldout",
    "confirm",
    "matched",
    "smoke",
)


@dataclass
class Arm:
    label: str
    method: str
    overrides: list[str] = field(default_factory=list)
    group: str = ""  # arms compared with each other in a claim share a group


@dataclass(frozen=True)
class Plan:
    """A pre-registered preset: its seeds (beyond any a committed report used: 0-9, 1000-1009 and the probes'
    0-1) and its decision rule, rendered into REPORT.md from this definition before it runs."""

    seeds: int
    seed_offset: int
    pairs: tuple[tuple[str, float, str, float], ...]  # (group, Flow-DPPO's tau, the baseline's method, its eps)
    rule: tuple[str, ...]


NO_DIFFERENCE = (0.8, 1.25)  # a "no difference" needs the KL ratio's CI inside these
MATCHED_REWARD = 0.02  # a pair is matched in reward when its reward difference's CI lies within +- this
PLANS = {
    "confirm": Plan(
        40,
        5000,
        (("c", 1e-5, "flow_grpo", 1e-4),),
        (
            f"claim 1 holds on this task if the upper end of the CI of the per-seed matched-reward KL ratio (each "
            f"seed's level {CLAIM_LEVEL}) is below 1;",
            "the paper's >= 2x saving is refuted if its lower end is above 0.5;",
            f'"no difference" needs the CI inside [{NO_DIFFERENCE[0]}, {NO_DIFFERENCE[1]}].',
        ),
    ),
    "matched": Plan(
        20,
        6000,
        (("grpo", 1e-5, "flow_grpo", 5e-5), ("guard", 1e-9, "grpo_guard", 2e-6)),
        (
            f"a pair counts as matched only if the 95% CI of its reward difference (Flow-DPPO minus the baseline, "
            f"per seed the mean over the evaluation epochs) lies within +-{MATCHED_REWARD};",
            "for a matched pair claim 1 holds if the upper end of the CI of its same-epoch KL ratio is below 1, and "
            "does not hold if the lower end is above 1 (the per-seed matched-reward ratio is shown beside it);",
            "an unmatched pair's ratios are reported, not read as claim 1: they compare step sizes.",
        ),
    ),
}


def kl_in_flow_sde(method: str) -> list[str]:
    """The override that measures an arm's path KL to the base in the Flow-SDE kernel, as the Flow-SDE arms
    do, when its sampler is another one (CPS arms keep their kernel: their pairs compare within it)."""
    from flowdppo.config import load_config

    sampler = load_config(method).sampler
    return (
        [] if sampler.kind in ("flow_sde", "cps") or sampler.kl_kernel != "rollout" else ["sampler.kl_kernel=flow_sde"]
    )


def at_dim(dim: int) -> list[str]:
    """The override that runs the digits task with a latent of ``dim`` elements."""
    return [] if dim == 64 else [f"digits.upsample={UPSAMPLE_OF_DIM[dim]}"]


def preset_common(preset: str) -> list[str]:
    """Overrides every arm of ``preset`` shares (its latent size, its optimiser setting)."""
    if preset.startswith("dim"):
        return at_dim(int(preset[3:]))
    if preset in PLANS:
        return at_dim(4096) + REGIME
    return at_dim(4096) + STRESS if preset == "stress" else []


def preset_arms(preset: str, methods: tuple[str, ...] = METHODS) -> list[Arm]:
    """The arms of a named experiment."""
    if preset == "calib":  # dim 64: the baselines' constants swept, next to Flow-DPPO and the unconstrained control
        sweep = [("flow_grpo", e) for e in (3e-4, 1e-3, 3e-3)] + [("grpo_guard", e) for e in (5e-5, 2e-4)]
        return [Arm(m, m, [], "calib") for m in ("flow_dppo", est.CONTROL)] + [
            Arm(f"{m}/eps{e:g}", m, [f"loss.clip_range={e:g}"], "calib") for m, e in sweep
        ]
    if preset in ("dim64", "dim1024", "dim4096"):  # the public constants at one latent size, every method
        return [Arm(m, m, preset_common(preset) + kl_in_flow_sde(m), "dim") for m in (*methods, est.CONTROL)]
    if preset == "heldout":  # forgetting: trained on digits 0-4, measured on 5-9 at matched in-domain reward
        return [Arm(m, m, HELDOUT, "heldout") for m in ("flow_dppo", "flow_grpo", "grpo_guard", est.CONTROL)]
    if preset == "stress":  # the largest latent, a 3x learning rate, 4 passes; eps scaled to SD3.5's eps * dim
        eps = 1e-4 * SD35_LATENT_DIM / 4096
        common = preset_common(preset)
        arms = [Arm(m, m, common, "I4") for m in ("flow_dppo", est.CONTROL)]
        arms += [
            Arm(f"flow_grpo/eps{e:g}", "flow_grpo", [*common, f"loss.clip_range={e:g}"], "I4") for e in (1e-4, eps)
        ]
        return arms + [
            Arm(f"{m}/half-I2", m, [*common, HALF_EPOCHS, "optim.inner_epochs=2"], "half-I2")
            for m in ("flow_dppo", "flow_grpo")
        ]
    if preset in PLANS:  # the pre-registered pairs, in the probe's regime, on fresh seeds
        common = preset_common(preset)
        # both arms of a pair carry its tau and eps: each logs the mechanism test at the pair's constants (the
        # constant its own loss does not use changes nothing in its training)
        return [
            arm
            for group, tau, base, eps in PLANS[preset].pairs
            for pair in ([f"loss.kl_mask_threshold={tau:g}", f"loss.clip_range={eps:g}"],)
            for arm in (
                Arm(f"flow_dppo/tau{tau:g}", "flow_dppo", [*common, *pair], group),
                Arm(f"{base}/eps{eps:g}", base, [*common, *pair[::-1]], group),
            )
        ]
    if preset == "single":  # claims 1 and 2
        return [Arm(m, m, kl_in_flow_sde(m)) for m in methods]
    if preset == "multi":  # claim 3: two competing rewards
        rewards = ["reward.names=[classifier_prob, ink]", "reward.weights=[1.0, 1.0]"]
        return [
            Arm(f"{m}/{agg}", m, kl_in_flow_sde(m) + rewards + [f"reward.aggregation={agg}"], agg)
            for agg in ("sum", "gdpo")
            for m in methods
        ]
    if preset == "epochs":  # claim 4: inner epochs at equal rollouts, and half the rollouts x 2 passes
        arms = [
            Arm(f"{m}/I{i}", m, kl_in_flow_sde(m) + [f"optim.inner_epochs={i}"], f"I{i}")
            for i in (1, 2, 4)
            for m in methods
        ]
        return arms + [
            Arm(f"{m}/half-I2", m, kl_in_flow_sde(m) + [HALF_EPOCHS, "optim.inner_epochs=2"], "half-I2")
            for m in methods
        ]
    if preset == "threshold":  # the mask threshold a decade either side of the default
        return [
            Arm(f"flow_dppo/tau{t:g}", "flow_dppo", [f"loss.kl_mask_threshold={t:g}"], "tau")
            for t in (1e-6, 3e-6, 1e-5, 3e-5, 1e-4)
        ]
    if preset == "smoke":  # what CI runs
        return [Arm(m, m, kl_in_flow_sde(m)) for m in methods]
    raise ValueError(f"preset must be one of {', '.join(BENCH_PRESETS)}; got {preset!r}")


def run_overrides(arm: Arm, overrides: list[str], seed: int | None = None) -> list[str]:
    """The full override list of one run: bench defaults, the arm's, the user's, the seed."""
    from flowdppo.config import load_config

    full = BENCH_OVERRIDES + [o for o in arm.overrides if o != HALF_EPOCHS] + overrides
    if HALF_EPOCHS in arm.overrides:  # its own seeds: its rollouts are not the first half of the full run's
        full.append(f"epochs={max(1, load_config(arm.method, overrides=full).epochs // 2)}")
        seed = None if seed is None else seed + HALF_SEED_OFFSET
    return full + ([f"seed={seed}"] if seed is not None else [])


PROBE_EPOCHS = 5
PROBE_SEEDS = (0, 1)
PROBED = ("calib", "dim64", "dim1024", "dim4096", "stress", "confirm", "matched")  # presets about the paper's regime


def preset_pairs(preset: str, methods: tuple[str, ...] = METHODS) -> list[tuple[Arm, Arm]]:
    """The (DPPO arm, baseline arm) pairs the preset's claims compare (``estimators.claim_pairs``)."""
    arms = {arm.label: arm for arm in preset_arms(preset, methods)}
    specs = {"preset": preset, "arms": {a.label: {"method": a.method, "group": a.group} for a in arms.values()}}
    return [(arms[a], arms[b]) for a, b in est.claim_pairs(specs)]


def probe_settings(preset: str, methods: tuple[str, ...] = METHODS) -> list[Arm]:
    """Each clipping setting the preset's claim pairs compare Flow-DPPO with, once, for ``PROBE_EPOCHS`` epochs."""
    settings = {}
    for _, arm in preset_pairs(preset, methods):
        kept = [o for o in arm.overrides if o != HALF_EPOCHS]
        if arm.method != est.CONTROL:
            settings.setdefault((arm.method, *kept), Arm(arm.label, arm.method, [*kept, f"epochs={PROBE_EPOCHS}"]))
    return list(settings.values())
