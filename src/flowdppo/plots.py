"""Plots of a run, from its ``metrics.jsonl`` rows (matplotlib, no display needed)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from flowdppo.errors import cut  # noqa: E402
from flowdppo.files import write_atomic  # noqa: E402


def plot_training_curves(rows: list[dict], path: Path, title: str = "", reward: str = "") -> None:
    """Reward and KL-to-base vs epoch, and reward vs KL-to-base (the KL-proximal frontier)."""
    save_figure(training_curves_figure(rows, title, reward), path)


def training_curves_figure(rows: list[dict], title: str = "", reward: str = "") -> Figure:
    """``plot_training_curves``'s figure; ``reward`` names the reward (``reward_label``). The rollouts' reward and
    KL, or in a run with no rollout (trained on a file or a folder) the evaluations' (``eval/reward``,
    ``eval/kl_to_base``)."""
    rollouts = any("reward_mean" in r for r in rows)
    reward_key, kl_key = ("reward_mean", "kl_to_base") if rollouts else ("eval/reward", "eval/kl_to_base")
    rows = [r for r in rows if reward_key in r and kl_key in r]
    epochs = [r["epoch"] for r in rows]
    reward_mean = [r[reward_key] for r in rows]
    kl = [r[kl_key] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(epochs, reward_mean, color="tab:blue")
    axes[0].set(xlabel="epoch", ylabel=f"mean reward ({'rollout' if rollouts else 'evaluation'})", title="reward")
    axes[1].plot(epochs, kl, color="tab:red")
    axes[1].set(xlabel="epoch", ylabel="path KL to base", title="KL to base")
    axes[2].plot(kl, reward_mean, marker=".", color="tab:purple")
    axes[2].set(xlabel="path KL to base", ylabel="mean reward", title="reward vs KL")
    for ax in axes:
        ax.grid(alpha=0.3)
    for axis in (axes[1].yaxis, axes[2].xaxis):  # KL values: few ticks, in scientific notation, never overlapping
        axis.set_major_locator(MaxNLocator(4))
    for ax, which in ((axes[1], "y"), (axes[2], "x")):
        ax.ticklabel_format(axis=which, style="sci", scilimits=(-2, 3))
    if title or reward:
        fig.suptitle(" - ".join(filter(None, [title, reward and f"reward: {reward}"])))
    fig.tight_layout()
    return fig


def reward_label(names: list[str], weights: list[float]) -> str:
    """What ``reward_mean`` is: the reward's name, or the weighted mean of several
    (``weighted mean of pickscore (1), temporal_consistency (0.5)``)."""
    if len(names) == 1:
        return names[0]
    return "weighted mean of " + ", ".join(f"{n} ({w:g})" for n, w in zip(names, weights, strict=True))


def per_step_means(rows: list[dict], prefix: str) -> dict[int, float]:
    """Mean over epochs of ``{prefix}/step_k`` metrics, per step ``k`` (steps are trained in some epochs only)."""
    pattern = re.compile(rf"^{re.escape(prefix)}/step_(\d+)$")
    values: dict[int, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            match = pattern.match(key)
            if match:
                values.setdefault(int(match.group(1)), []).append(value)
    return {k: float(np.mean(v)) for k, v in sorted(values.items())}


def plot_per_step(rows: list[dict], path: Path, tau: float | None = None) -> None:
    """Per trained step, averaged over the epochs that trained it: mean divergence D to the rollout policy (with
    Flow-DPPO's threshold ``tau``) and mean masked fraction."""
    save_figure(per_step_figure(rows, tau), path)


def per_step_figure(rows: list[dict], tau: float | None = None) -> Figure:
    kl, masked = per_step_means(rows, "kl_mean"), per_step_means(rows, "masked_fraction")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].bar(list(kl), list(kl.values()), color="tab:orange")
    axes[0].set(
        xlabel="step index", ylabel="mean D (to rollout policy)", title="per-step divergence\n(mean over epochs)"
    )
    if tau is not None:
        label = f"tau = {tau:g} (loss.kl_mask_threshold)"
        axes[0].axhline(tau, color="black", linestyle="--", linewidth=1, label=label)
        axes[0].legend(fontsize=8)
    axes[0].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    axes[1].bar(list(masked), list(masked.values()), color="tab:gray")
    title = "masked / clipped fraction\n(mean over epochs)"
    axes[1].set(xlabel="step index", ylabel="fraction", title=title, ylim=(0, 1))
    fig.tight_layout()
    return fig


def grid_mosaic(grid: np.ndarray) -> np.ndarray:
    """A panel ``(rows, cols, H, W)`` grey (ink = 1) or ``(rows, cols, H, W, 3)`` RGB in [0, 1] as one RGB image
    ``(rows (H + 1) - 1, cols (W + 1) - 1, 3)`` in [0, 1], samples separated by white lines."""
    rows, cols, h, w = grid.shape[:4]
    rgb = np.repeat(1 - grid[..., None], 3, axis=-1) if grid.ndim == 4 else grid
    mosaic = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1, 3))
    for i in range(rows):
        for j in range(cols):
            mosaic[i * (h + 1) : i * (h + 1) + h, j * (w + 1) : j * (w + 1) + w] = rgb[i, j]
    return mosaic.clip(0, 1)


def save_image_grid(panels: dict[str, np.ndarray], path: Path, row_labels: list[str] | None = None) -> None:
    """Side-by-side mosaics (``grid_mosaic``) of the panels, one row per prompt."""
    save_figure(image_grid_figure(panels, row_labels), path)


ROW_LABEL_CHARS = 32  # a prompt labelling a row of samples.png is cut to this length


def image_grid_figure(panels: dict[str, np.ndarray], row_labels: list[str] | None = None) -> Figure:
    """``save_image_grid``'s figure: the rows labelled by ``row_labels`` (prompts, cut to ``ROW_LABEL_CHARS``) on the
    first panel, else by their index on each."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + (1.6 if row_labels else 0), 4.4))
    axes = np.atleast_1d(axes)
    for i, (ax, (name, grid)) in enumerate(zip(axes, panels.items(), strict=True)):
        h, rows = grid.shape[2], grid.shape[0]
        ax.imshow(grid_mosaic(grid), interpolation="nearest")
        ax.set_title(name)
        ticks = [r * (h + 1) + h / 2 for r in range(rows)]
        if row_labels is None:
            ax.set_yticks(ticks, [str(r) for r in range(rows)])
        elif i == 0:
            ax.set_yticks(ticks, [cut(label, ROW_LABEL_CHARS) for label in row_labels[:rows]])
            ax.tick_params(axis="y", labelsize=8)
        else:
            ax.set_yticks([])
        ax.set_xticks([])
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> None:
    """``fig`` as a PNG at ``path``, written atomically (``flowdppo.files``); the figure is closed."""
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
