"""Plots of a DigitsBench report, from ``results.json`` alone."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flowdppo.estimators import eval_points  # noqa: E402
from flowdppo.frontier import mean_ci  # noqa: E402


def arm_style(index: int) -> dict:
    """The line style of the ``index``-th arm: matplotlib's ten cycle colours, solid, then dashed, then dotted, so
    no two of 30 arms look alike."""
    return {"color": f"C{index % 10}", "linestyle": ("-", "--", ":")[index // 10 % 3]}


def _records(arm: dict) -> list[dict]:
    return [rec for _, rec in sorted(arm["seeds"].items(), key=lambda kv: int(kv[0]))]


def _series(arm: dict, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, seed mean and CI half-width of ``key`` (rows that have it)."""
    per_seed = [[(r["epoch"], r[key]) for r in rec["rows"] if key in r] for rec in _records(arm)]
    epochs = [e for e, _ in per_seed[0]]
    stats = [mean_ci([s[i][1] for s in per_seed if i < len(s)]) for i in range(len(epochs))]
    return np.array(epochs), np.array([m for m, _ in stats]), np.array([h for _, h in stats])


def plot_frontier(results: dict, path: Path) -> None:
    """Eval reward vs KL to the base over training, seed means, one curve per arm (start: the base)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (label, arm) in enumerate(results["arms"].items()):
        kl, reward = np.mean([eval_points(rec) for rec in _records(arm)], 0)
        ax.plot(kl, reward, marker="o", ms=3, label=label, **arm_style(i))
    ax.set(
        xlabel="path KL to base (estimators.eval_points)",
        ylabel="eval reward (p of prompted digit)",
        title="reward vs KL to base",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_vs_epoch(results: dict, keys: list[str], path: Path) -> None:
    """Each key vs epoch, seed mean with a 95% CI band, one line per arm."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.8))
    for ax, key in zip(np.atleast_1d(axes), keys, strict=True):
        for i, (label, arm) in enumerate(results["arms"].items()):
            epochs, mean, half = _series(arm, key)
            ax.plot(epochs, mean, label=label, **arm_style(i))
            ax.fill_between(epochs, mean - half, mean + half, alpha=0.15, color=arm_style(i)["color"])
        ax.set(xlabel="epoch", title=key)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_inner_epochs(results: dict, path: Path) -> None:
    """Final eval reward vs inner epochs (1, 2, 4) per method, with CIs."""
    fig, ax = plt.subplots(figsize=(6, 4))
    methods = sorted({arm["method"] for arm in results["arms"].values()})
    for index, method in enumerate(methods):
        xs, means, halves = [], [], []
        for i in (1, 2, 4):
            arm = results["arms"].get(f"{method}/I{i}")
            if arm:
                finals = [[r["eval/reward"] for r in rec["rows"] if "eval/reward" in r][-1] for rec in _records(arm)]
                m, h = mean_ci(finals)
                xs.append(i), means.append(m), halves.append(h)
        ax.errorbar(xs, means, yerr=halves, marker="o", capsize=3, label=method, **arm_style(index))
    ax.set(
        xscale="log",
        xticks=[1, 2, 4],
        xticklabels=["1", "2", "4"],
        xlabel="inner epochs",
        ylabel="final eval reward",
        title="stability with several passes over a rollout",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_all(results: dict, out: Path) -> list[str]:
    """Every plot that fits the preset; returns the file names."""
    names = ["frontier.png", "curves.png", "ood.png"]
    plot_frontier(results, out / "frontier.png")
    plot_vs_epoch(results, ["reward_mean", "kl_to_base", "masked_fraction"], out / "curves.png")
    plot_vs_epoch(results, ["eval/reward", "eval/fid", "eval/diversity"], out / "ood.png")
    if "eval_heldout/accuracy" in _records(next(iter(results["arms"].values())))[0]["base"]:
        plot_vs_epoch(
            results, ["eval_heldout/accuracy", "eval_heldout/fid", "eval_heldout/diversity"], out / "heldout.png"
        )
        names.append("heldout.png")
    if any("dim_kl_p90" in r for arm in results["arms"].values() for rec in _records(arm) for r in rec["rows"]):
        mechanism = ["dim_kl_p90", "masked_fraction_pos_adv", "masked_fraction_neg_adv", "first_moved_log_ratio_std"]
        plot_vs_epoch(results, mechanism, out / "mechanism.png")
        names.append("mechanism.png")
    first = next(iter(results["arms"].values()))
    reward_keys = sorted(k for k in _records(first)[0]["rows"][0] if k.startswith("reward/"))
    if len(reward_keys) > 1:
        plot_vs_epoch(results, reward_keys, out / "per_reward.png")
        names.append("per_reward.png")
    if results["preset"] == "epochs":
        plot_inner_epochs(results, out / "inner_epochs.png")
        names.append("inner_epochs.png")
    return names
