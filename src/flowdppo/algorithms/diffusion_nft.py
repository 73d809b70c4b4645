"""DiffusionNFT (arXiv 2509.16117): online RL on the forward process, with no likelihood.

Per element (final sample ``x0`` noised to ``x_s = (1 - s) x0 + s eps``), with ``v`` the current velocity
and ``v_old`` the sampling policy's (no gradient):

- implicit policies ``v+ = b v + (1 - b) v_old`` (positive), ``v- = (1 + b) v_old - b v`` (negative);
- optimality weight ``r = clip(A, -c, c) / (2 c) + 1/2`` in ``[0, 1]``;
- x0-prediction error ``L(u) = mean((x_s - s u - x0)^2) / w`` with the adaptive weight
  ``w = max(detach(mean|x_s - s u - x0|), 1e-5)`` (computed for each of ``v+``, ``v-``);
- loss ``(r L(v+) + (1 - r) L(v-)) / b``, averaged over elements; ``loss.beta > 0`` adds
  ``beta * mean((v - v_ref)^2)`` to the frozen base.

The sampling ("old") policy is a slowly-updated copy of the trained weights: after each rollout's
update, ``w_old <- d w_old + (1 - d) w`` with ``d = min(nft.old_decay_rate * steps, nft.old_decay_max)``
(``old_decay_max = 0``: roll out with the current weights). Rollouts run the old weights.
The public code also multiplies the loss by ``c``; under Adam that only changes where gradient clipping
binds, and it is left out here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flowdppo.algorithms.base import Elements, with_reference_kl
from flowdppo.algorithms.likelihood_free import (
    LIKELIHOOD_FREE_SAMPLER,
    TIMESTEP_MODES,
    LikelihoodFree,
    decay_error,
    mean_squared,
    noised_elements,
    timesteps_error,
    velocities,
    velocity_kl,
)
from flowdppo.distributed import Distributed
from flowdppo.errors import ConfigError, ConsistencyError
from flowdppo.rollout import Trajectory
from flowdppo.sde import per_sample, upcast
from flowdppo.settings import Section, require


def optimality_weight(advantages: Tensor, adv_clip_max: float) -> Tensor:
    """``r = clip(A, -c, c) / (2 c) + 1/2``: 0 for the worst samples, 1 for the best, 1/2 at ``A = 0``."""
    return advantages.clamp(-adv_clip_max, adv_clip_max) / (2 * adv_clip_max) + 0.5


def x0_error(noised: Tensor, sigma: Tensor, velocity: Tensor, x0: Tensor) -> Tensor:
    """Adaptively weighted x0-prediction error ``mean((x_s - s v - x0)^2) / max(detach(mean|.|), 1e-5)`` -> (E,)."""
    s = per_sample(upcast(sigma), x0)
    error = (upcast(noised) - s * upcast(velocity) - upcast(x0)).flatten(1)
    weight = error.detach().abs().mean(dim=1).clamp_min(1e-5)
    return error.pow(2).mean(dim=1) / weight


def nft_loss(
    v: Tensor,
    v_old: Tensor,
    noised: Tensor,
    sigma: Tensor,
    x0: Tensor,
    advantages: Tensor,
    b: float,
    adv_clip_max: float,
) -> tuple[Tensor, Tensor]:
    """Per-element DiffusionNFT loss ``(r L(v+) + (1 - r) L(v-)) / b`` and the optimality weight ``r``. (E,)"""
    v_old = v_old.detach()
    positive, negative = b * v + (1 - b) * v_old, (1 + b) * v_old - b * v
    r = optimality_weight(upcast(advantages.detach()), adv_clip_max)
    loss = (r * x0_error(noised, sigma, positive, x0) + (1 - r) * x0_error(noised, sigma, negative, x0)) / b
    return loss, r


@dataclass
class NFTConfig(Section):
    """DiffusionNFT (algorithm diffusion_nft)."""

    b: float = 1.0
    """Strength of the implicit policies v+- around the sampling policy (public: 1.0; 0.1 for OCR)."""
    adv_clip_max: float = 5.0
    """c in the optimality weight r = clip(A, -c, c) / (2c) + 1/2."""
    train_timesteps: int = 9
    """Noise levels each final sample is trained at."""
    timesteps: str = "schedule"
    """How they are drawn: "schedule" (distinct levels of the rollout schedule), "stratified", "uniform"."""
    old_decay_rate: float = 0.001
    """Sampling policy w_old <- d w_old + (1 - d) w after each update, d = min(rate * optimizer steps, max)."""
    old_decay_max: float = 0.5
    """Upper bound of d (0: roll out with the current weights)."""

    @classmethod
    def choices(cls) -> dict[str, tuple]:
        return {"timesteps": TIMESTEP_MODES}

    def check(self, prefix: str = "nft.") -> None:
        self.check_choices(prefix)
        if not self.b > 0:
            raise ConfigError(
                f"{prefix}b: must be > 0 (it divides the loss; the public recipes use 1.0 or 0.1), got {self.b}"
            )
        require(self, prefix, "> 0", "adv_clip_max", "train_timesteps")
        require(self, prefix, ">= 0", "old_decay_rate")
        if problem := decay_error(f"{prefix}old_decay_max", self.old_decay_max):
            raise ConfigError(problem)


class DiffusionNFT(LikelihoodFree):
    name = "diffusion_nft"
    reads = ("nft.", "loss.beta")
    sections = {"nft": NFTConfig}
    presets = {"diffusion_nft": {"sampler": LIKELIHOOD_FREE_SAMPLER, "loss": {"beta": 1e-4}}}

    @classmethod
    def config_error(cls, cfg) -> str | None:
        return timesteps_error("nft", cfg.nft.timesteps, cfg.nft.train_timesteps, cfg.sampler.num_steps)

    def slow_decay(self) -> tuple[float, float]:
        return self.cfg.nft.old_decay_rate, self.cfg.nft.old_decay_max

    def sampling_weights(self, policy: nn.Module):
        return self.slow.swapped_in(policy)  # rollouts run the old policy

    def elements(
        self, traj: Trajectory, advantages: Tensor, policy: nn.Module, rng: torch.Generator, dist: Distributed
    ) -> Elements:
        nft = self.cfg.nft
        elements = noised_elements(traj, advantages, nft.timesteps, nft.train_timesteps, rng, dist)
        self.on_policy = self.slow.equals(policy)
        with self.slow.swapped_in(policy):
            elements.data["v_old"] = velocities(policy, elements, traj.cond, self.cfg)
        return elements

    def loss(
        self, velocity, base_velocity, mb: dict[str, Tensor], cond: Any, first: bool, dist: Distributed
    ) -> tuple[Tensor, dict[str, Tensor]]:
        v = velocity(mb["noised"], mb["sigma"], cond)
        drift = mean_squared(v.detach(), mb["v_old"])
        if first and self.on_policy:
            check_same_velocity(drift, self.cfg.consistency_tolerance, self.epoch, dist)
        per_element, r = nft_loss(
            v,
            mb["v_old"],
            mb["noised"],
            mb["sigma"],
            mb["x0"],
            mb["advantages"],
            self.cfg.nft.b,
            self.cfg.nft.adv_clip_max,
        )
        loss = per_element.mean()
        metrics = {
            "policy_loss": loss.detach(),
            "optimality_weight": r.mean(),
            "velocity_drift": drift.mean(),
            "velocity_drift_max": drift.max(),
        }
        loss = with_reference_kl(loss, metrics, self.cfg.loss.beta, lambda: velocity_kl(v, base_velocity, mb, cond))
        return loss, metrics


def check_same_velocity(drift: Tensor, tolerance: float, epoch: int, dist: Distributed) -> None:
    """Before any update, with the sampling policy equal to the current one, ``v == v_old``."""
    worst = float(drift.max())
    if dist.any(worst > tolerance, drift.device):
        raise ConsistencyError(
            f"epoch {epoch}: the trained policy's velocity differs from the sampling policy's "
            f"before any update (max mean squared difference {worst:.3g}, tolerance {tolerance:g})"
        )
