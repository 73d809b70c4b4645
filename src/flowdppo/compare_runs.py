"""Running a DigitsBench preset: every arm x seed in spawned worker processes, the regime probe, reuse of runs
another report already trained, ``results.json`` kept up to date after each run."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from tqdm.auto import tqdm

from flowdppo import estimators as est
from flowdppo import mechanism
from flowdppo.compare import METHODS, PLANS, PROBE_SEEDS, PROBED, Arm, preset_arms, probe_settings, run_overrides
from flowdppo.compare_report import probe_line, render_plan, render_report
from flowdppo.errors import ConfigError

MECHANISM = (
    "masked_fraction_pos_adv",
    "masked_fraction_neg_adv",
    "dim_kl_p50",
    "dim_kl_p90",
    "dim_kl_p99",
    "first_moved_log_ratio_mean",
    "first_moved_log_ratio_std",
)  # the trust tests' mechanism, per update
KEPT = (
    "epoch",
    "reward_mean",
    "kl_to_base",
    "masked_fraction",
    "ratio_mean",
    "kl_max",
    "time_s",
    "trained_elements",
    *MECHANISM,
)


def _run_one(method: str, overrides: list[str], path: str) -> dict:
    """One training run in a worker process; returns its compact record."""
    import torch

    from flowdppo.config import load_config
    from flowdppo.trainer import train

    torch.set_num_threads(1)
    start = time.perf_counter()
    run = train(load_config(method, overrides=overrides), Path(path), overwrite=True, progress=False)
    rows = [
        {k: v for k, v in r.items() if k in KEPT or k.startswith(("eval/", "eval_heldout/", "reward/"))}
        for r in run.rows()
    ]
    record = {"base": run.load_json("base_eval.json"), "rows": rows, "wall_s": time.perf_counter() - start}
    if (run.path / mechanism.FILE).is_file():  # the per-update mechanism test, summed over the run
        record["mechanism"] = run.load_json(mechanism.FILE)["total"]
    return record


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
                if not any(est.EVAL_KL in r for r in record["rows"]):
                    continue  # recorded before the evaluation-time KL: its measures are not comparable
                key = _config_key(spec.method, run_overrides(spec, results["overrides"], int(seed)))
                found[key] = {**record, "reused_from": str(other)}
    return found


def run_probe(preset: str, overrides: list[str], out: Path, methods: tuple[str, ...] = METHODS) -> dict:
    """Short runs of each baseline setting of the preset (``PROBE_SEEDS``), measured against the paper's regime:
    p90 of ``dim * D`` >= 0.1 and a clipped fraction for ``A < 0`` at least twice that for ``A > 0`` (averaged
    over the updates): the probe's weak criterion; and the ratio's bias/noise ``|mean| / sd`` of ``log rho``
    (per update, averaged), which the criterion does not bound: below 1 the ratio is still mostly noise."""
    from flowdppo.config import load_config

    settings = []
    for arm in probe_settings(preset, methods):
        runs = []
        for seed in PROBE_SEEDS:
            path = out / "runs" / "probe" / arm.label.replace("/", "_") / f"seed{seed}"
            runs.append(_run_one(arm.method, run_overrides(arm, overrides, seed), str(path))["rows"])
        dim = 64 * load_config(arm.method, overrides=run_overrides(arm, overrides)).digits.upsample ** 2
        settings.append({"label": arm.label, "dim": dim, **est.regime_measures(runs)})
    return {"settings": settings}


DEFAULT_SEEDS = 5  # --seeds of a preset that is not pre-registered


def seeds_of(preset: str, seeds: int | None) -> int:
    """The seeds per arm: a pre-registered preset's plan's number (``--seeds`` may only repeat it), else ``--seeds``
    or ``DEFAULT_SEEDS``."""
    if preset not in PLANS:
        return DEFAULT_SEEDS if seeds is None else seeds
    planned = PLANS[preset].seeds
    if seeds not in (None, planned):
        raise ConfigError(
            f"--seeds: the pre-registered preset {preset} runs its plan's {planned} seeds; "
            f"drop --seeds or pass --seeds {planned}"
        )
    return planned


def seed_offset_of(preset: str, results: dict, seed_offset: int | None, out: Path) -> int:
    """The first seed: ``--seed-offset``, else the one ``results`` recorded, else the preset's plan's, else 0."""
    recorded = results.get("seed_offset", 0 if results.get("arms") else None)
    if seed_offset is not None and seed_offset < 0:
        raise ConfigError(f"--seed-offset: must be >= 0, got {seed_offset}")
    if None not in (seed_offset, recorded) and seed_offset != recorded:
        raise ConfigError(
            f"--seed-offset: {out} holds runs from seed {recorded}; pass --seed-offset {recorded} to "
            "finish it, or give another --out"
        )
    planned = PLANS[preset].seed_offset if preset in PLANS else 0
    return next(o for o in (seed_offset, recorded, planned) if o is not None)


def run_compare(
    preset: str,
    out: Path,
    seeds: int,
    methods: tuple[str, ...],
    overrides: list[str],
    jobs: int | None = None,
    reuse: list[Path] | None = None,
    seed_offset: int | None = None,
) -> dict:
    """Train every arm x seed (seeds ``seed_offset`` on; skipping runs already in ``results.json`` or, with the
    same resolved config, in the ``reuse`` reports), save results, render the report."""
    from flowdppo.config import load_config

    arms = preset_arms(preset, methods)
    for arm in arms:  # fail early on a bad override, before any process starts
        load_config(arm.method, overrides=run_overrides(arm, overrides))
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    offset = seed_offset_of(preset, results, seed_offset, out)
    results.update({"preset": preset, "overrides": overrides, "seeds": seeds, "seed_offset": offset})
    results.setdefault("arms", {})
    if preset in PLANS and not (out / "REPORT.md").is_file():  # the decision rule is on disk before any run
        render_plan(preset, out)
    if preset in PROBED and "probe" not in results:  # before the preset's budget is spent
        results["probe"] = run_probe(preset, overrides, out, methods)
        print(probe_line(results["probe"]))
    reusable = reusable_runs(reuse or [])
    todo = []
    for arm in arms:
        entry = results["arms"].setdefault(
            arm.label, {"method": arm.method, "overrides": arm.overrides, "group": arm.group, "seeds": {}}
        )
        for seed in range(offset, offset + seeds):
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
            pool.submit(
                _run_one,
                arm.method,
                run_overrides(arm, overrides, seed),
                str(out / "runs" / arm.label.replace("/", "_") / f"seed{seed}"),
            ): (arm, seed)
            for arm, seed in todo
        }
        for future in tqdm(as_completed(futures), total=len(futures), desc=f"compare {preset}"):
            arm, seed = futures[future]
            results["arms"][arm.label]["seeds"][str(seed)] = future.result()
            results_path.write_text(json.dumps(results) + "\n")
    results["wall_s"] = results.get("wall_s", 0.0) + time.perf_counter() - start
    results["jobs"] = jobs
    results_path.write_text(json.dumps(results) + "\n")
    render_report(out)
    return results
