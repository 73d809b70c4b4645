"""Plots of a run, from its ``metrics.jsonl`` rows (matplotlib, no display needed)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flowdppo.files import write_atomic  # noqa: E402


def plot_training_curves(rows: list[dict], path: Path, title: str = "") -> None:
    """Reward and KL-to-base vs epoch, and reward vs KL-to-base (the KL-proximal frontier): the rollouts', or in a run
    with no rollout (trained on a file or a folder) the evaluations' (``eval/reward``, ``eval/kl_to_base``)."""
    rollouts = any("reward_mean" in r for r in rows)
    reward_key, kl_key = ("reward_mean", "kl_to_base") if rollouts else ("eval/reward", "eval/kl_to_base")
    rows = [r for r in rows if reward_key in r and kl_key in r]
    epochs = [r["epoch"] for r in rows]
    reward = [r[reward_key] for r in rows]
    kl = [r[kl_key] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, reward, color="tab:blue")
    axes[0].set(xlabel="epoch", ylabel=f"mean reward ({'rollout' if rollouts else 'evaluation'})", title="reward")
    axes[1].plot(epochs, kl, color="tab:red")
    axes[1].set(xlabel="epoch", ylabel="path KL to base", title="KL to base")
    axes[2].plot(kl, reward, marker=".", color="tab:purple")
    axes[2].set(xlabel="path KL to base", ylabel="mean reward", title="reward vs KL")
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


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


def plot_per_step(rows: list[dict], path: Path) -> None:
    """Per trained step: mean divergence D to the rollout policy and mean masked fraction."""
    kl, masked = per_step_means(rows, "kl_mean"), per_step_means(rows, "masked_fraction")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].bar(list(kl), list(kl.values()), color="tab:orange")
    axes[0].set(xlabel="step index", ylabel="mean D (to rollout policy)", title="per-step divergence")
    axes[1].bar(list(masked), list(masked.values()), color="tab:gray")
    axes[1].set(xlabel="step index", ylabel="fraction", title="masked / clipped fraction", ylim=(0, 1))
    fig.tight_layout()
    save_figure(fig, path)


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


def save_image_grid(panels: dict[str, np.ndarray], path: Path) -> None:
    """Side-by-side mosaics (``grid_mosaic``) of the panels, one row per prompt."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4))
    axes = np.atleast_1d(axes)
    for ax, (name, grid) in zip(axes, panels.items(), strict=True):
        h = grid.shape[2]
        ax.imshow(grid_mosaic(grid), interpolation="nearest")
        ax.set_title(name)
        ax.set_yticks([i * (h + 1) + h / 2 for i in range(grid.shape[0])], [str(i) for i in range(grid.shape[0])])
        ax.set_xticks([])
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """``fig`` as a PNG at ``path``, written atomically (``flowdppo.files``); the figure is closed."""
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
