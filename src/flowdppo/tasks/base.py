"""The Task protocol: what the trainer, ``flowdppo eval`` and ``flowdppo export`` ask of a task.

A task is built from the run's config, ready to use: its base policy loaded, its rewards resolved. The
schedule (``sigmas``) is the one source of noise levels for rollouts, evaluation and sample grids.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
from torch import Tensor

from flowdppo.policies import Policy
from flowdppo.rewards import Reward


class Task(Protocol):
    policy: Policy
    """The base policy, loaded from ``cfg.model`` (the trainer makes it trainable)."""
    rewards: list[tuple[str, Reward]]
    """``(name in logs, reward)`` for each of ``cfg.reward.names`` (``rewards.registry.load_rewards``: a reward
    server's reward is ``remote:NAME``, NAME the one it declares)."""

    @staticmethod
    def policy_class(cfg) -> type:
        """The class of the policy ``cfg.model`` holds, found without loading any weights."""
        ...

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent (without the batch dimension)."""
        ...

    def load_policy(self, model: str = "") -> Policy:
        """A fresh base policy from ``model`` (a folder; "" = the task's default)."""
        ...

    def sigmas(self) -> Tensor:
        """The noise schedule ``sigmas[0..K]`` of ``cfg.sampler.num_steps`` steps, decreasing to 0."""
        ...

    def prompts(self, num_prompts: int, group_size: int, seed: int, epoch: int) -> tuple[Any, Tensor]:
        """``num_prompts`` prompts of the epoch, each ``group_size`` times: ``(cond, group_ids)``, (P*G,) each."""
        ...

    def evaluate(self, velocity, per_prompt: int, base_velocity=None) -> dict[str, float]:
        """``eval/*`` measures of ODE samples from fixed noise, ``per_prompt`` per evaluation prompt; with
        ``base_velocity`` also ``eval/kl_to_base``, the path KL to the base along the same samples in the
        Flow-SDE kernel (``rollout.sample_with_path_kl``)."""
        ...

    def sample_grid(self, velocity) -> np.ndarray:
        """ODE samples from fixed noise, ``(rows, columns, H, W[, 3])`` in ``[0, 1]``, for the run's picture."""
        ...
