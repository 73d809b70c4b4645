"""The run's pictures say what they show (``plots.py``), read from the figures' text objects.

- ``curves.png`` names the reward (one, or the weighted mean of several); the KL axis's tick labels never overlap;
- ``per_step.png`` says it averages over epochs and draws Flow-DPPO's tau at ``loss.kl_mask_threshold``;
- a text-to-image ``samples.png`` labels its rows with the (shortened) prompts, digits with the classes.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest

from flowdppo.config import load_config
from flowdppo.plots import (
    ROW_LABEL_CHARS,
    image_grid_figure,
    per_step_figure,
    reward_label,
    training_curves_figure,
)
from flowdppo.runs import flow_dppo_tau


def metric_rows(epochs: int = 40) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {
            "epoch": e,
            "reward_mean": 0.5 + 0.01 * e,
            "kl_to_base": 1.2345e-3 + 3.21e-6 * e,  # ticks 0.00122, 0.00124 ... overlap at default settings
            **{f"kl_mean/step_{k}": 2e-5 * rng.random() for k in range(3)},
            **{f"masked_fraction/step_{k}": 0.3 * rng.random() for k in range(3)},
        }
        for e in range(epochs)
    ]


def overlapping(labels) -> bool:
    boxes = [t.get_window_extent() for t in labels if t.get_text()]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_curves_name_the_reward_and_the_kl_ticks_do_not_overlap():
    label = reward_label(["pickscore", "temporal_consistency"], [1.0, 0.5])
    assert label == "weighted mean of pickscore (1), temporal_consistency (0.5)"
    assert reward_label(["pickscore"], [1.0]) == "pickscore"
    fig = training_curves_figure(metric_rows(), "flow_dppo", label)
    try:
        assert fig._suptitle.get_text() == f"flow_dppo - reward: {label}"
        fig.canvas.draw()
        kl_axes = fig.axes[2].xaxis
        labels = kl_axes.get_ticklabels()
        assert 2 <= len([t for t in labels if t.get_text()]) <= 6 and not overlapping(labels)
        assert not overlapping(fig.axes[1].yaxis.get_ticklabels())
    finally:
        plt.close(fig)


def test_per_step_says_it_averages_over_epochs_and_draws_tau():
    cfg = load_config(overrides=["loss.kl_mask_threshold=2e-5"])
    tau = flow_dppo_tau(cfg)
    assert tau == pytest.approx(2e-5) and flow_dppo_tau(load_config("flow_grpo")) is None  # no tau to draw
    fig = per_step_figure(metric_rows(), tau)
    try:
        assert all("(mean over epochs)" in ax.get_title() for ax in fig.axes)
        (line,) = fig.axes[0].get_lines()
        assert np.allclose(line.get_ydata(), tau) and "loss.kl_mask_threshold" in line.get_label()
    finally:
        plt.close(fig)
    fig = per_step_figure(metric_rows(), None)
    try:
        assert not fig.axes[0].get_lines()
    finally:
        plt.close(fig)


def test_sample_rows_are_labelled_by_their_prompts():
    prompts = ["a photograph of an astronaut riding a horse on the moon", "a red cat"]
    panels = {name: np.zeros((2, 3, 8, 8, 3)) for name in ("base", "trained")}
    fig = image_grid_figure(panels, prompts)
    try:
        shown = [t.get_text() for t in fig.axes[0].get_yticklabels()]
        assert shown[1] == "a red cat" and len(shown[0]) == ROW_LABEL_CHARS
        assert shown[0].startswith("a photograph of an astronaut") and shown[0].endswith("...")
        assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == []
    finally:
        plt.close(fig)
    fig = image_grid_figure({"base": np.zeros((10, 2, 8, 8))})  # digits: the classes
    try:
        assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [str(i) for i in range(10)]
    finally:
        plt.close(fig)
