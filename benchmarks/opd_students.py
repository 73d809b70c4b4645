"""On-policy distillation on the digits task, over seeds: a Flow-DPPO teacher of digits 0-4 and an AWM teacher of
5-9 (each at its preset's defaults) distilled into one `opd` student, the student then measured against each
teacher on that teacher's own classes (the teacher's reward: the classifier's probability of the prompted class).

Every policy is evaluated the same way (``task.evaluate``: fixed noise, ``--per-class`` samples per class, the
classes of the teacher in question), so student and teacher see the same noise; the difference student - teacher
is paired by seed, with a t interval over the seeds.

    python benchmarks/opd_students.py [--seeds 5] [--seed-offset 7000] [--per-class 50] [--jobs 2] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from common import RESULTS_DIR, write_result

from flowdppo.frontier import mean_ci

LOW, HIGH = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
TEACHERS = {"low": ("flow_dppo", LOW), "high": ("awm", HIGH)}


def train(out: Path, method: str, *overrides: str) -> None:
    """``flowdppo train`` in its own one-thread process; a finished run is kept (an unfinished one is refused)."""
    if (out / "final").is_dir():
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "flowdppo", "train", "--no-progress", "--method", method]
    done = subprocess.run([*command, "--out", str(out), *overrides], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{out}: training failed\n{done.stderr[-2000:]}")


def evaluate_on(run_dir: Path, classes: list[int], per_class: int) -> dict[str, float]:
    """The run's trained policy on ``classes`` alone: ``eval/accuracy``, ``eval/reward``, ``eval/fid``, ...."""
    from flowdppo.config import config_from_dict, saved_config
    from flowdppo.distributed import Distributed
    from flowdppo.evaluate import load_trained_policy
    from flowdppo.tasks import load_task

    settings = saved_config(run_dir, str(run_dir))
    settings["digits"] = {**settings.get("digits", {}), "classes": classes}
    cfg = config_from_dict(settings)
    task = load_task(cfg, Distributed().device(cfg.device))
    policy = load_trained_policy(run_dir, task)
    measures = task.evaluate(partial(policy, guidance_scale=cfg.sampler.guidance_scale), per_class)
    return {k: v for k, v in measures.items() if k.startswith("eval/")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--seed-offset", type=int, default=7000)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--runs", type=Path, default=Path("runs/opd-students"))
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every training run")
    args = parser.parse_args()
    seeds = range(args.seed_offset, args.seed_offset + args.seeds)

    def teacher(seed: int, name: str) -> None:
        method, classes = TEACHERS[name]
        train(args.runs / f"seed{seed}" / name, method, f"seed={seed}", f"digits.classes={classes}", *args.overrides)

    def student(seed: int) -> None:
        folder = args.runs / f"seed{seed}"
        train(
            folder / "student",
            "opd",
            f"seed={seed}",
            f"opd.teachers=[{folder / 'low'},{folder / 'high'}]",
            'opd.route=["0,1,2,3,4","5,6,7,8,9"]',
            *args.overrides,
        )

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda job: teacher(*job), [(s, n) for s in seeds for n in TEACHERS]))
        list(pool.map(student, seeds))

    import torch

    torch.set_num_threads(max(1, args.jobs))
    per_seed = {}
    for seed in seeds:
        folder = args.runs / f"seed{seed}"
        per_seed[seed] = {
            name: {
                "teacher": evaluate_on(folder / name, classes, args.per_class),
                "student": evaluate_on(folder / "student", classes, args.per_class),
            }
            for name, (_, classes) in TEACHERS.items()
        }
        print(f"seed {seed}: " + json.dumps(per_seed[seed]), flush=True)

    summary = {}
    for name, (method, classes) in TEACHERS.items():
        for measure in ("eval/accuracy", "eval/reward", "eval/fid", "eval/diversity"):
            gaps = [per_seed[s][name]["student"][measure] - per_seed[s][name]["teacher"][measure] for s in seeds]
            teacher_mean = statistics.fmean(per_seed[s][name]["teacher"][measure] for s in seeds)
            mean, half = mean_ci(gaps)
            low, high = mean - half, mean + half
            summary[f"{name}/{measure}"] = {"teacher": teacher_mean, "student_minus_teacher": [mean, low, high]}
            print(
                f"{method} teacher of {classes[0]}-{classes[-1]}  {measure:<15} teacher {teacher_mean:.3f}  "
                f"student - teacher {mean:+.3f} [{low:+.3f}, {high:+.3f}]  ({len(gaps)} seeds)"
            )
    path = write_result(
        "opd_students",
        {"seeds": list(seeds), "per_class": args.per_class, "per_seed": per_seed, "summary": summary},
        RESULTS_DIR,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
