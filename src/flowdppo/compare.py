"""DigitsBench: every method on the same prompts, budget and seeds; results, plots and REPORT.md.

    flowdppo compare --preset single --seeds 5 --out benchmarks/digitsbench/single
    flowdppo compare --report-only benchmarks/digitsbench/single    # re-render, no training

A preset is a list of arms (a label, a method and config overrides); every arm runs once per seed, in
parallel processes of one thread each. ``results.json`` keeps every run's per-epoch metrics, so the
report can be rendered again without training.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from flowdppo.frontier import kl_at_reward, mean_ci, reward_at_kl, value_at_reward, verdict

METHODS = ("flow_grpo", "flow_cps", "grpo_guard", "flow_dppo", "flow_dppo_cps", "dance_grpo", "diffusion_nft", "awm")
CONTROL = "unconstrained"  # -A rho with no trust test: what the trust tests are measured against
BASELINES_OF = {"flow_dppo": ("flow_grpo", "flow_cps", "grpo_guard", CONTROL), "flow_dppo_cps": ("flow_cps",)}
BENCH_OVERRIDES = ["eval_every=5", "eval_samples_per_class=20", "checkpoint_every=1000", "keep_checkpoints=1"]
HALF_EPOCHS = "epochs=half"  # resolved to half the run's epochs (half the rollouts)
HALF_SEED_OFFSET = 1000  # the half-rollouts arms run seeds 1000, 1001, ...: independent of the full runs
MECHANISM = ("masked_fraction_pos_adv", "masked_fraction_neg_adv", "dim_kl_p50", "dim_kl_p90", "dim_kl_p99",
             "first_moved_log_ratio_mean", "first_moved_log_ratio_std")  # the trust tests' mechanism, per update
KEPT = ("epoch", "reward_mean", "kl_to_base", "masked_fraction", "ratio_mean", "kl_max", "time_s", *MECHANISM)
UPSAMPLE_OF_DIM = {64: 1, 1024: 4, 4096: 8}  # latent dim -> digits_upsample
SD35_LATENT_DIM = 16 * 64 * 64  # SD3.5 at 512 x 512: 16 channels x 64 x 64
STRESS = ["optim.lr=3e-3", "optim.inner_epochs=4"]  # 3x the learning rate, 4 passes over each rollout
LEVELS = (0.7, 0.8, 0.9)  # matched rewards: these fractions of the way from the base to the lower arm's best
CLAIM_LEVEL = 0.8  # the level the claim rows read measures at a matched reward at
EVAL_KL = "eval/kl_to_base"
FORGETTING = ("eval/fid", "eval/diversity", "eval_heldout/accuracy", "eval_heldout/fid", "eval_heldout/diversity")
HELDOUT = ["digits_classes=[0,1,2,3,4]"]  # trained on 0-4; 5-9 held out
BENCH_PRESETS = ("single", "multi", "epochs", "threshold", "calib", "dim64", "dim1024", "dim4096", "stress", "heldout",
                 "smoke")  # fmt: skip


@dataclass
class Arm:
    label: str
    method: str
    overrides: list[str] = field(default_factory=list)
    group: str = ""  # arms compared with each other in a claim share a group


def kl_in_flow_sde(method: str) -> list[str]:
    """The override that measures an arm's path KL to the base in the Flow-SDE kernel, as the Flow-SDE arms
    do, when its sampler is another one (CPS arms keep their kernel: their pairs compare within it)."""
    from flowdppo.config import load_config

    sampler = load_config(method).sampler
    return [] if sampler.kind in ("flow_sde", "cps") or sampler.kl_kernel != "rollout" else [
        "sampler.kl_kernel=flow_sde"]  # fmt: skip


def at_dim(dim: int) -> list[str]:
    """The override that runs the digits task with a latent of ``dim`` elements."""
    return [] if dim == 64 else [f"digits_upsample={UPSAMPLE_OF_DIM[dim]}"]


def preset_common(preset: str) -> list[str]:
    """Overrides every arm of ``preset`` shares (its latent size, its optimiser setting)."""
    if preset.startswith("dim"):
        return at_dim(int(preset[3:]))
    return at_dim(4096) + STRESS if preset == "stress" else []


def preset_arms(preset: str, methods: tuple[str, ...] = METHODS) -> list[Arm]:
    """The arms of a named experiment."""
    if preset == "calib":  # dim 64: the baselines' constants swept, next to Flow-DPPO and the unconstrained control
        sweep = [("flow_grpo", e) for e in (3e-4, 1e-3, 3e-3)] + [("grpo_guard", e) for e in (5e-5, 2e-4)]
        return [Arm(m, m, [], "calib") for m in ("flow_dppo", CONTROL)] + [
            Arm(f"{m}/eps{e:g}", m, [f"loss.clip_range={e:g}"], "calib") for m, e in sweep]  # fmt: skip
    if preset in ("dim64", "dim1024", "dim4096"):  # the public constants at one latent size, every method
        return [Arm(m, m, preset_common(preset) + kl_in_flow_sde(m), "dim") for m in (*methods, CONTROL)]
    if preset == "heldout":  # forgetting: trained on digits 0-4, measured on 5-9 at matched in-domain reward
        return [Arm(m, m, HELDOUT, "heldout") for m in ("flow_dppo", "flow_grpo", "grpo_guard", CONTROL)]
    if preset == "stress":  # the largest latent, a 3x learning rate, 4 passes; eps scaled to SD3.5's eps * dim
        eps = 1e-4 * SD35_LATENT_DIM / 4096
        common = preset_common(preset)
        arms = [Arm(m, m, common, "I4") for m in ("flow_dppo", CONTROL)]
        arms += [Arm(f"flow_grpo/eps{e:g}", "flow_grpo", [*common, f"loss.clip_range={e:g}"], "I4")
                 for e in (1e-4, eps)]  # fmt: skip
        return arms + [Arm(f"{m}/half-I2", m, [*common, HALF_EPOCHS, "optim.inner_epochs=2"], "half-I2")
                       for m in ("flow_dppo", "flow_grpo")]  # fmt: skip
    if preset == "single":  # claims 1 and 2
        return [Arm(m, m, kl_in_flow_sde(m)) for m in methods]
    if preset == "multi":  # claim 3: two competing rewards
        rewards = ["reward.names=[classifier_prob, ink]", "reward.weights=[1.0, 1.0]"]
        return [Arm(f"{m}/{agg}", m, kl_in_flow_sde(m) + rewards + [f"reward.aggregation={agg}"], agg)
                for agg in ("sum", "gdpo") for m in methods]  # fmt: skip
    if preset == "epochs":  # claim 4: inner epochs at equal rollouts, and half the rollouts x 2 passes
        arms = [Arm(f"{m}/I{i}", m, kl_in_flow_sde(m) + [f"optim.inner_epochs={i}"], f"I{i}") for i in (1, 2, 4)
                for m in methods]  # fmt: skip
        return arms + [Arm(f"{m}/half-I2", m, kl_in_flow_sde(m) + [HALF_EPOCHS, "optim.inner_epochs=2"], "half-I2")
                       for m in methods]  # fmt: skip
    if preset == "threshold":  # the mask threshold a decade either side of the default
        return [Arm(f"flow_dppo/tau{t:g}", "flow_dppo", [f"loss.kl_mask_threshold={t:g}"], "tau")
                for t in (1e-6, 3e-6, 1e-5, 3e-5, 1e-4)]  # fmt: skip
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


def _run_one(method: str, overrides: list[str], path: str) -> dict:
    """One training run in a worker process; returns its compact record."""
    import torch

    from flowdppo.config import load_config
    from flowdppo.trainer import train

    torch.set_num_threads(1)
    start = time.perf_counter()
    run = train(load_config(method, overrides=overrides), Path(path), overwrite=True, progress=False)
    rows = [{k: v for k, v in r.items() if k in KEPT or k.startswith(("eval/", "eval_heldout/", "reward/"))}
            for r in run.rows()]
    return {"base": run.load_json("base_eval.json"), "rows": rows, "wall_s": time.perf_counter() - start}


def _config_key(method: str, overrides: list[str]) -> str:
    from flowdppo.config import load_config, to_dict

    return json.dumps(to_dict(load_config(method, overrides=overrides)), sort_keys=True)


def reusable_runs(other_dirs: list[Path]) -> dict[str, dict]:
    """Records of other reports, by resolved config: a run with the same config is not trained twice."""
    found = {}
    for other in other_dirs:
        results = json.loads((other / "results.json").read_text())
        for arm in results["arms"].values():
            spec = Arm("", arm["method"], arm["overrides"])
            for seed, record in arm["seeds"].items():
                if not any(EVAL_KL in r for r in record["rows"]):
                    continue  # recorded before the evaluation-time KL: its measures are not comparable
                key = _config_key(spec.method, run_overrides(spec, results["overrides"], int(seed)))
                found[key] = {**record, "reused_from": str(other)}
    return found


PROBE_EPOCHS = 5
PROBED = ("calib", "dim64", "dim1024", "dim4096", "stress")  # presets about the paper's regime


def run_probe(preset: str, overrides: list[str], out: Path) -> dict:
    """A short Flow-GRPO run (its public eps 1e-4, the preset's latent size and optimiser, seed 0) that says
    whether the paper's regime is reached: p90 of ``dim * D`` >= 0.1 and a clipped fraction for ``A < 0`` at
    least twice that for ``A > 0`` (averaged over its updates)."""
    from flowdppo.config import load_config

    arm = Arm("probe", "flow_grpo", [*preset_common(preset), f"epochs={PROBE_EPOCHS}"])
    full = run_overrides(arm, overrides, 0)
    record = _run_one("flow_grpo", full, str(out / "runs" / "probe"))
    rows = record["rows"]
    probe = {key: float(np.mean([r[key] for r in rows])) for key in
             ("dim_kl_p90", "masked_fraction_pos_adv", "masked_fraction_neg_adv")}  # fmt: skip
    probe["dim"] = 64 * load_config("flow_grpo", overrides=full).digits_upsample ** 2
    probe["epochs"] = len(rows)
    probe["reached"] = bool(probe["dim_kl_p90"] >= 0.1 and probe["masked_fraction_neg_adv"] > 0
                            and probe["masked_fraction_neg_adv"] >= 2 * probe["masked_fraction_pos_adv"])  # fmt: skip
    return probe


def probe_line(probe: dict) -> str:
    """One sentence: what the probe measured and whether the regime is reached."""
    return (f"Flow-GRPO (eps 1e-4), {probe['epochs']} epochs at dim {probe['dim']}: p90 of dim*D "
            f"{probe['dim_kl_p90']:.3g} (needs >= 0.1); clipped fraction A<0 {probe['masked_fraction_neg_adv']:.3f} "
            f"vs A>0 {probe['masked_fraction_pos_adv']:.3f} (needs at least twice): the paper's regime is "
            f"{'reached' if probe['reached'] else 'NOT reached'}.")


def run_compare(preset: str, out: Path, seeds: int, methods: tuple[str, ...], overrides: list[str],
                jobs: int | None = None, reuse: list[Path] | None = None) -> dict:  # fmt: skip
    """Train every arm x seed (skipping runs already in ``results.json`` or, with the same resolved
    config, in the ``reuse`` reports), save results, render the report."""
    from flowdppo.config import load_config

    arms = preset_arms(preset, methods)
    for arm in arms:  # fail early on a bad override, before any process starts
        load_config(arm.method, overrides=run_overrides(arm, overrides))
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.update({"preset": preset, "overrides": overrides, "seeds": seeds})
    results.setdefault("arms", {})
    if preset in PROBED and "probe" not in results:  # before the preset's budget is spent
        results["probe"] = run_probe(preset, overrides, out)
        print(probe_line(results["probe"]))
    reusable = reusable_runs(reuse or [])
    todo = []
    for arm in arms:
        entry = results["arms"].setdefault(arm.label, {"method": arm.method, "overrides": arm.overrides,
                                                        "group": arm.group, "seeds": {}})  # fmt: skip
        for seed in range(seeds):
            key = _config_key(arm.method, run_overrides(arm, overrides, seed)) if reusable else None
            if str(seed) in entry["seeds"]:
                continue
            if key in reusable:
                entry["seeds"][str(seed)] = reusable[key]
            else:
                todo.append((arm, seed))
    jobs = jobs or max(1, min(len(todo), os.cpu_count() or 1))
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        futures = {
            pool.submit(_run_one, arm.method, run_overrides(arm, overrides, seed),
                        str(out / "runs" / arm.label.replace("/", "_") / f"seed{seed}")): (arm, seed)
            for arm, seed in todo
        }  # fmt: skip
        for future in tqdm(as_completed(futures), total=len(futures), desc=f"compare {preset}"):
            arm, seed = futures[future]
            results["arms"][arm.label]["seeds"][str(seed)] = future.result()
            results_path.write_text(json.dumps(results) + "\n")
    results["wall_s"] = results.get("wall_s", 0.0) + time.perf_counter() - start
    results["jobs"] = jobs
    results_path.write_text(json.dumps(results) + "\n")
    render_report(out)
    return results


# ---------------------------------------------------------------- measures of one run


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
        for key, name in (("masked_fraction_pos_adv", "masked A>0"), ("masked_fraction_neg_adv", "masked A<0"),
                          ("dim_kl_p90", "p90 dim*D"), ("first_moved_log_ratio_std", "log rho std")):
            measures[name] = float(np.mean([r.get(key, math.nan) for r in rows]))
    reward_keys = sorted(k for k in rows[0] if k.startswith("reward/"))
    if len(reward_keys) > 1:  # per-reward gain: mean of the last 5 epochs minus the first epoch
        gains = {k: float(np.mean([r[k] for r in rows[-5:]]) - rows[0][k]) for k in reward_keys}
        measures.update({f"gain {k[7:]}": v for k, v in gains.items()})
        measures["worst gain"] = min(gains.values())
    return measures


def claim_methods() -> set[str]:
    """The methods the paper's claims are about: Flow-DPPO and the ratio-clipping baselines."""
    return set(BASELINES_OF) | {m for baselines in BASELINES_OF.values() for m in baselines}


def matched_targets(arms: dict) -> tuple[float, float]:
    """The best reward every run of the claims' methods reaches, and their smallest final KL (other arms
    are measured at the same targets, so adding an arm does not change them). Runs that never rise above their
    base (a collapse from the start) are left out, else the target would be a base reward."""
    records = [rec for arm in arms.values() if arm["method"] in claim_methods() for rec in arm["seeds"].values()]
    records = [rec for rec in records if eval_points(rec)[1].max() > eval_points(rec)[1][0]] or records
    target_reward = min(eval_points(rec)[1].max() for rec in records)
    target_kl = min(eval_points(rec)[0].max() for rec in records)
    return float(target_reward), float(target_kl)


# ---------------------------------------------------------------- the report


def _fmt(mean: float, half: float) -> str:
    if math.isnan(mean):
        return "n/a"
    digits = 3 if abs(mean) >= 1e-2 or mean == 0 else 2
    style = "f" if abs(mean) >= 1e-2 or mean == 0 else "e"
    return f"{mean:.{digits}{style}} ± {half:.{digits}{style}}"


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
            for key in FORGETTING:  # at the same in-domain reward (held-out digits: with digits_classes)
                if key in rec["base"]:
                    name = forgetting_name(key)
                    m[f"{name} at reward {target_reward:.3f}"] = value_at_reward(reward, eval_points(rec, key)[1],
                                                                                 target_reward)  # fmt: skip
            per_seed.append(m)
    columns = list(dict.fromkeys(k for per_seed in per_arm.values() for m in per_seed for k in m))  # arms may lack some
    table = {label: {k: [m.get(k, math.nan) for m in per_seed] for k in columns} for label, per_seed in per_arm.items()}
    return columns, table


def claim_pairs(results: dict) -> list[tuple[str, str]]:
    """(DPPO arm, baseline arm) labels compared in the claims: same group, the baseline's method one of
    ``BASELINES_OF`` the arm's (the one-pass arms of ``epochs`` are its reference, not a claim)."""
    arms = results["arms"]
    return [(label, other) for label, arm in arms.items() for other, base in arms.items()
            if base["group"] == arm["group"] and base["method"] in BASELINES_OF.get(arm["method"], ())
            and not (results["preset"] == "epochs" and arm["group"] == "I1")]  # fmt: skip


CLAIMS = {
    "single": [("KL at reward", "lower", "1: less KL to reach the matched reward"),
               ("reward at KL", "higher", "1: more reward at the matched KL"),
               ("fid at reward", "lower", "2: forgets less (lower feature FID at the matched reward)"),
               ("diversity at reward", "higher", "2: forgets less (more diversity at the matched reward)")],
    "multi": [("worst gain", "higher", "3: the worst-served reward gains more")],
    "epochs": [("eval reward", "higher", "4: higher final reward with several inner epochs"),
               ("drawdown", "lower", "4: less drawdown from the peak with several inner epochs")],
}  # fmt: skip
CLAIMS.update({p: CLAIMS["single"] for p in ("calib", "dim64", "dim1024", "dim4096")})
CLAIMS["stress"] = CLAIMS["epochs"]
CLAIMS["heldout"] = [CLAIMS["single"][0]] + [
    (f"held-out {key} at reward", better, f"2: forgets less (held-out digits' {key} at the matched reward)")
    for key, better in (("accuracy", "higher"), ("fid", "lower"), ("diversity", "higher"))]  # fmt: skip


def equivalence_margin(differences: list[float], reference: list[float] | None = None) -> str:
    """What the 95% CI of the paired differences rules out: any difference larger than ``m = max(|lo|, |hi|)``
    in size, also given relative to the baseline's mean ``reference``."""
    mean, half = mean_ci(differences)
    if math.isnan(mean):
        return "n/a"
    margin = max(abs(mean - half), abs(mean + half))
    ref = abs(mean_ci(reference)[0]) if reference else math.nan
    relative = f" ({100 * margin / ref:.0f}% of the baseline)" if ref > 0 else ""
    return f"\\|d\\| > {margin:.3g}{relative}"


def forgetting_name(key: str) -> str:
    """``eval/fid`` -> ``fid``, ``eval_heldout/accuracy`` -> ``held-out accuracy``."""
    return key.replace("eval/", "").replace("eval_heldout/", "held-out ")


def value_at_level(record: dict, name: str, level: float) -> float:
    """``name`` ("KL" or a forgetting measure's name) of one run where its eval reward first reaches ``level``."""
    if name == "KL":
        return kl_at_reward(*eval_points(record), level)
    key = next(k for k in FORGETTING if forgetting_name(k) == name)
    return value_at_reward(eval_points(record)[1], eval_points(record, key)[1], level)


def pair_span(a: dict, b: dict, seeds: list[str]) -> tuple[float, float]:
    """(the pair's mean base eval reward, the lower arm's best): seed means of each run's best eval reward."""
    base = float(np.mean([a[s]["base"]["eval/reward"] for s in seeds]))
    best = min(float(np.mean([eval_points(arm[s])[1].max() for s in seeds])) for arm in (a, b))
    return base, best


def claim_rows(results: dict, table: dict[str, dict[str, list[float]]]) -> list[dict]:
    """Each claim's verdict per (DPPO arm, baseline arm) pair, from per-seed paired differences, with what the
    CI rules out (the equivalence margin a "no difference" comes with).

    Measures at a matched reward are read at the pair's own level, ``CLAIM_LEVEL`` of the way from the base to
    the lower arm's best (as in ``matched_levels``), on the seeds where both arms reach it from below."""
    rows = []
    for prefix, better, claim in CLAIMS.get(results["preset"], []):
        for label, base_label in claim_pairs(results):
            row, vacuous = {"claim": claim, "pair": f"{label} vs {base_label}"}, ""
            if prefix.endswith(" at reward"):
                a, b = results["arms"][label]["seeds"], results["arms"][base_label]["seeds"]
                seeds = sorted(set(a) & set(b), key=int)
                base, best = pair_span(a, b, seeds)
                level = base + CLAIM_LEVEL * (best - base)
                name = prefix.removesuffix(" at reward")
                below = [s for s in seeds if a[s]["base"]["eval/reward"] < level]  # a base above it says nothing
                reference = [value_at_level(b[s], name, level) for s in below]
                diffs = [value_at_level(a[s], name, level) - ref for s, ref in zip(below, reference, strict=True)]
                compared = sum(not math.isnan(d) for d in diffs)  # both arms reach the level
                row["measure"] = f"{prefix} {level:.3f} ({compared} of {len(seeds)} seeds)"
                if best <= base:
                    vacuous = "no gain over the base"
                elif compared < 2:
                    vacuous = "fewer than 2 seeds reach it"
            else:
                key = next(k for k in table[label] if k.startswith(prefix))
                reference = table[base_label][key]
                diffs = [a - b for a, b in zip(table[label][key], reference, strict=False)]
                row["measure"] = key
            row.update(difference=_fmt(*mean_ci(diffs)), verdict=verdict(diffs, better),
                       margin=equivalence_margin(diffs, reference))  # fmt: skip
            if vacuous:
                row.update(difference="n/a", verdict=f"n/a: {vacuous}", margin="n/a")
            rows.append(row)
    return rows


def claims(results: dict, table: dict[str, dict[str, list[float]]]) -> list[str]:
    """``claim_rows`` as markdown table rows."""
    return [f"| {r['claim']} | {r['pair']} | {r['measure']} | {r['difference']} | **{r['verdict']}** | "
            f"{r['margin']} |" for r in claim_rows(results, table)]  # fmt: skip


def matched_levels(results: dict, fractions: tuple[float, ...] = LEVELS) -> list[dict]:
    """Per claim pair and per reward level: the KL each arm spends to reach it, seed by seed.

    The levels lie ``fractions`` of the way from the base's eval reward to the lower of the two arms' best
    (seed means of each run's best eval reward), so both arms can reach them and the slowest run of the whole
    report does not set them. The ratio is the geometric mean of ``KL_dppo / KL_baseline`` over the seeds
    where both reach the level, with the 95% CI of its log; the verdict reads that CI.
    """
    out = []
    for label, base_label in claim_pairs(results):
        a, b = results["arms"][label]["seeds"], results["arms"][base_label]["seeds"]
        seeds = sorted(set(a) & set(b), key=int)
        base, best = pair_span(a, b, seeds)
        for fraction in fractions:
            level = base + fraction * (best - base)
            kls = np.array([[value_at_level(arm[s], "KL", level) for arm in (a, b)] for s in seeds])
            both = kls[np.all(kls > 0, axis=1)]  # reached by both (NaN: never reached; 0: reached at the base)
            mean, half = math.nan, math.nan
            if best <= base:
                decision = "no gain over the base"
            elif len(both) < 2:
                decision = "too few seeds reach it"
            else:
                log_ratios = np.log(both[:, 0] / both[:, 1])
                mean, half = mean_ci(log_ratios)
                decision = {"holds": "less KL", "does not hold": "more KL", "inconclusive": "no difference shown"}[
                    verdict(log_ratios.tolist(), "lower")]
            out.append({"pair": f"{label} vs {base_label}", "fraction": fraction, "reward": level,
                        "reached": (int(np.isfinite(kls[:, 0]).sum()), int(np.isfinite(kls[:, 1]).sum()), len(seeds)),
                        "kl": (float(np.nanmean(kls[:, 0])), float(np.nanmean(kls[:, 1]))),
                        "ratio": (math.exp(mean), math.exp(mean - half), math.exp(mean + half)),
                        "verdict": decision})  # fmt: skip
    return out


def level_lines(levels: list[dict]) -> list[str]:
    """The markdown table of ``matched_levels``."""
    lines = ["| pair | level | eval reward | seeds reaching it | KL (DPPO) | KL (baseline) | KL ratio, 95% CI | "
             "reading | the CI rules out |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in levels:
        ratio, lo, hi = row["ratio"]
        a, b, n = row["reached"]
        ci = "n/a" if math.isnan(ratio) else f"{ratio:.2f} [{lo:.2f}, {hi:.2f}]"
        rules_out = "n/a" if math.isnan(ratio) else f"ratio < {lo:.2f} or > {hi:.2f}"
        lines.append(f"| {row['pair']} | {row['fraction']:.1f} | {row['reward']:.3f} | {a}/{n} and {b}/{n} | "
                     f"{row['kl'][0]:.3g} | {row['kl'][1]:.3g} | {ci} | {row['verdict']} | {rules_out} |")  # fmt: skip
    return lines


def render_report(out: Path) -> Path:
    """Write REPORT.md and the plots from ``results.json`` (no training)."""
    from flowdppo import benchplots

    results = json.loads((out / "results.json").read_text())
    columns, table = arm_table(results)
    n = max(len(a["seeds"]) for a in results["arms"].values())
    lines = [f"# DigitsBench: {results['preset']}", "",
             f"{len(results['arms'])} arms x {n} seeds on the digits task, "
             f"{results.get('jobs', 1)} runs at a time of one CPU thread each; "
             f"total wall time {results.get('wall_s', 0) / 60:.1f} min. Extra overrides: "
             f"{' '.join(results['overrides']) or 'none'}. Values are mean ± 95% CI (Student t) over seeds; "
             "eval measures come from 20 ODE samples per digit on fixed noise.", "",
             "| arm | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]  # fmt: skip
    for label, measures in table.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(*mean_ci(measures[c])) for c in columns) + " |")
    if "probe" in results:
        lines += ["", "## Regime probe", "", probe_line(results["probe"])]
    claim_lines = claims(results, table)
    if claim_lines:
        header = ["| claim | pair | measure | difference | verdict | the CI rules out |", "|---|---|---|---|---|---|"]
        lines += ["", "## Claims", "", "Differences are DPPO minus baseline, paired by seed.", ""]
        lines += header + claim_lines
    if results["preset"] in ("single", "calib", "dim64", "dim1024", "dim4096", "heldout"):
        evaluated = all(EVAL_KL in r for a in results["arms"].values() for rec in a["seeds"].values()
                        for r in rec["rows"] if "eval/reward" in r)  # fmt: skip
        source = ("measured at evaluation on the evaluated samples, Flow-SDE kernel" if evaluated else
                  "the rollout's, before each update: these runs predate the evaluation-time KL")  # fmt: skip
        lines += ["", "## Matched reward, per pair", "", f"KL to the base ({source}) at eval rewards "
                  f"{', '.join(map(str, LEVELS))} of the way from the base to the lower arm's best.", ""]
        lines += level_lines(matched_levels(results))
    if results["preset"] == "epochs":
        lines += ["", "## Several passes vs one", "", "Final eval reward of I passes over each rollout divided by "
                  "that of one pass, per seed (below 1: the extra passes degrade the result).", "",
                  "| method | I | final reward / final reward at I = 1 |", "|---|---|---|"]  # fmt: skip
        for method in sorted({arm["method"] for arm in results["arms"].values()}):
            one = table.get(f"{method}/I1", {}).get("eval reward")
            for label in (f"{method}/I2", f"{method}/I4", f"{method}/half-I2"):
                if one and label in table:
                    ratios = [a / b for a, b in zip(table[label]["eval reward"], one, strict=False)]
                    lines.append(f"| {method} | {label.split('/')[1]} | {_fmt(*mean_ci(ratios))} |")
        lines += ["", "## Method x passes interaction", "", "Per seed, (Flow-DPPO at I minus Flow-DPPO at I = 1) "
                  "minus (Flow-GRPO at I minus Flow-GRPO at I = 1): what the extra passes do to one method more than "
                  "to the other (the half-rollouts arms run their own seeds, so their pairing with I = 1 is by "
                  "index only).", "", "| I | measure | interaction | verdict (DPPO better) | the CI rules out |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for group in ("I2", "I4", "half-I2"):
            for key, better in (("eval reward", "higher"), ("drawdown", "lower")):
                cells = [table.get(f"{m}/{i}", {}).get(key) for m in ("flow_dppo", "flow_grpo") for i in (group, "I1")]
                if all(cells):
                    diffs = [(a - b) - (c - d) for a, b, c, d in zip(*cells, strict=False)]
                    lines.append(f"| {group} | {key} | {_fmt(*mean_ci(diffs))} | **{verdict(diffs, better)}** | "
                                 f"{equivalence_margin(diffs)} |")  # fmt: skip
    notes = out / "NOTES.md"  # a hand-written reading of the numbers, kept across re-renders
    if notes.is_file():
        lines += ["", "## Reading", "", notes.read_text().strip()]
    lines += ["", "## Plots", ""]
    for name in benchplots.render_all(results, out):
        lines.append(f"![{name}]({name})")
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def mechanism_means(arm: dict) -> tuple[float, float, float]:
    """An arm's p90 of ``dim * D`` and dropped fractions for ``A > 0`` and ``A < 0``, over its updates and seeds."""
    rows = [r for rec in arm["seeds"].values() for r in rec["rows"]]
    return tuple(float(np.mean([r.get(k, math.nan) for r in rows]))
                 for k in ("dim_kl_p90", "masked_fraction_pos_adv", "masked_fraction_neg_adv"))  # fmt: skip


def across_dims(root: Path, fraction: float = 0.8) -> list[str]:
    """One table over the ``dim*`` reports under ``root``: per latent size and claim pair, the KL ratio at the
    matched reward ``fraction`` of the way from the base (CI, what it rules out, seeds reaching it), the
    baseline's dropped fractions by advantage sign (the paper's asymmetry: A<0 clipped far more than A>0), the
    reading of that ratio (claim 1) and the verdict of claim 2 (feature FID at the pair's level ``CLAIM_LEVEL``).
    Only rendered (finished) reports count; a dim preset run with extra overrides (``--out dim4096-lr3e-3
    optim.lr=3e-3``) gets rows of its own."""
    lines = [f"| dim | pair | KL ratio at reward level {fraction} (95% CI) | seeds reaching | the CI rules out | "
             "p90 dim*D (first arm) | baseline dropped A>0 / A<0 | claim 1 (less KL at that level) | "
             "claim 2 (FID at reward) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    reports = [json.loads((path.parent / "results.json").read_text()) for path in root.glob("dim*/REPORT.md")]
    reports = [r for r in reports if r.get("preset") in {f"dim{d}" for d in UPSAMPLE_OF_DIM}]
    for results in sorted(reports, key=lambda r: (int(r["preset"][3:]), r.get("overrides", []))):
        dim = " ".join([results["preset"][3:], *results.get("overrides", [])])  # e.g. "4096 optim.lr=3e-3"
        _, table = arm_table(results)
        verdicts = {(r["pair"], r["claim"]): r["verdict"] for r in claim_rows(results, table)}
        for row in matched_levels(results, (fraction,)):
            label, base_label = row["pair"].split(" vs ")
            _, pos, neg = mechanism_means(results["arms"][base_label])
            ratio, lo, hi = row["ratio"]
            a, b, n = row["reached"]
            claim2 = verdicts.get((row["pair"], CLAIMS["single"][2][2]), "n/a")
            ci = "n/a" if math.isnan(ratio) else f"{ratio:.2f} [{lo:.2f}, {hi:.2f}]"
            rules_out = "n/a" if math.isnan(ratio) else f"< {lo:.2f} or > {hi:.2f}"
            p90 = mechanism_means(results["arms"][label])[0]
            lines.append(f"| {dim} | {row['pair']} | {ci} | {a}/{n}, {b}/{n} | {rules_out} | {p90:.3g} | "
                         f"{pos:.3f} / {neg:.3f} | {row['verdict']} | {claim2} |")  # fmt: skip
    return lines if len(lines) > 2 else []


def gather_reports(root: Path) -> Path:
    """``root/REPORT.md``: the table across latent sizes, then the claims sections of every preset report under
    ``root``, with links."""
    intro = "Each preset's full report (tables, plots) is linked; its claims are repeated here."
    lines = ["# DigitsBench", "", intro, ""]
    dims = across_dims(root)
    if dims:
        lines += ["## Across latent sizes", "", *dims, ""]
    for report in sorted(root.glob("*/REPORT.md")):
        text = report.read_text()
        summary = text.split("\n")[2]
        lines += [f"## [{report.parent.name}]({report.parent.name}/REPORT.md)", "", summary, ""]
        for section in ("## Regime probe", "## Claims", "## Matched reward, per pair", "## Reading"):
            if section in text:
                body = text.split(section, 1)[1].split("\n## ", 1)[0].strip()
                lines += [f"### {section[3:]}", "", body, ""]
        lines += [f"![frontier]({report.parent.name}/frontier.png)", ""]
    path = root / "REPORT.md"
    path.write_text("\n".join(lines))
    return path
