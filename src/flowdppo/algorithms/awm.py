"""Advantage Weighted Matching (AWM, arXiv 2509.25050): the flow-matching loss weighted by the advantage.

Per element (final sample ``x0`` noised to ``x_s = (1 - s) x0 + s eps``), the "log-prob" of the sample
is minus its velocity-matching error against the target ``eps - x0``:

- ``mse = mean((v - (eps - x0))^2)``;
- ``lp = -mse`` (``awm.weighting=uniform``), ``-s * mse`` (``t``), or the public default
  ``-s * ((mse + 1e-10)^p - 1e-10^p) / p`` (``ghuber``, ``p = awm.huber_p``);
- ``rho = exp(lp - lp_old)``, ``lp_old`` the rollout policy's value on the same ``(x_s, s, eps)``, frozen
  before the update; ``A`` clamped to ``+-awm.adv_clip_max`` and divided by it;
- loss ``max(-A rho, -A clip(rho, 1 - eps, 1 + eps))`` (the PPO clip, ``eps = awm.clip_range``),
  averaged; ``loss.beta > 0`` adds ``beta * mean((v - v_ref)^2)`` to the frozen base and
  ``awm.ema_kl > 0`` adds ``ema_kl * mean((v - v_ema)^2)`` to a slowly-updated copy of the weights
  (``w_ema <- d w_ema + (1 - d) w`` after each rollout's update, ``d = min(ema_decay_rate * steps,
  ema_decay_max)``). Rollouts run the current weights.
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
from flowdppo.losses import ppo_clip
from flowdppo.rollout import Trajectory
from flowdppo.settings import Section, require

WEIGHTINGS = ("ghuber", "uniform", "t")
HUBER_DELTA = 1e-10


def matching_log_prob(
    v: Tensor, target: Tensor, sigma: Tensor, weighting: str = "ghuber", huber_p: float = 0.25
) -> Tensor:
    """AWM's per-sample log-prob surrogate from ``mse = mean((v - target)^2)`` -> (E,), float64.

    ``uniform``: ``-mse``; ``t``: ``-s mse``; ``ghuber``: ``-s ((mse + d)^p - d^p) / p`` with ``d = 1e-10``.
    """
    mse = mean_squared(v.double(), target.double())
    sigma = sigma.double()
    if weighting == "uniform":
        return -mse
    if weighting == "t":
        return -sigma * mse
    if weighting == "ghuber":
        return -sigma * ((mse + HUBER_DELTA) ** huber_p - HUBER_DELTA**huber_p) / huber_p
    raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")


@dataclass
class AWMConfig(Section):
    """Advantage Weighted Matching (algorithm awm)."""

    clip_range: float = 1.0
    """PPO clip epsilon on the ratio of matching log-probs."""
    adv_clip_max: float = 5.0
    """Advantages clamped to +-adv_clip_max, then divided by it."""
    train_timesteps: int = 6
    """Noise levels each final sample is trained at."""
    timesteps: str = "stratified"
    """How they are drawn: "stratified" (one per stratum of the schedule's steps 1..K-1), "schedule", "uniform"."""
    weighting: str = "ghuber"
    """Log-prob surrogate: "ghuber" -s((mse + d)^p - d^p)/p, "t" -s mse, "uniform" -mse."""
    huber_p: float = 0.25
    """p of the ghuber weighting."""
    ema_kl: float = 1.0
    """Weight of mean((v - v_ema)^2) to the slowly-updated policy (0: off)."""
    ema_decay_rate: float = 0.001
    """Slow policy w_ema <- d w_ema + (1 - d) w after each update, d = min(rate * optimizer steps, max)."""
    ema_decay_max: float = 0.3
    """Upper bound of d, in [0, 1] (0: the slow policy is the current weights after every update)."""

    @classmethod
    def choices(cls) -> dict[str, tuple]:
        return {"timesteps": TIMESTEP_MODES, "weighting": WEIGHTINGS}

    def check(self, prefix: str = "awm.") -> None:
        self.check_choices(prefix)
        require(self, prefix, "> 0", "clip_range", "adv_clip_max", "train_timesteps", "huber_p")
        require(self, prefix, ">= 0", "ema_kl", "ema_decay_rate")
        if problem := decay_error(f"{prefix}ema_decay_max", self.ema_decay_max):
            raise ConfigError(problem)


class AWM(LikelihoodFree):
    name = "awm"
    reads = ("awm.", "loss.beta")
    sections = {"awm": AWMConfig}
    presets = {"awm": {"sampler": LIKELIHOOD_FREE_SAMPLER, "loss": {"beta": 1e-4}}}

    @classmethod
    def config_error(cls, cfg) -> str | None:
        return timesteps_error("awm", cfg.awm.timesteps, cfg.awm.train_timesteps, cfg.sampler.num_steps)

    def slow_decay(self) -> tuple[float, float]:
        return self.cfg.awm.ema_decay_rate, self.cfg.awm.ema_decay_max

    def elements(
        self, traj: Trajectory, advantages: Tensor, policy: nn.Module, rng: torch.Generator, dist: Distributed
    ) -> Elements:
        awm = self.cfg.awm
        elements = noised_elements(traj, advantages, awm.timesteps, awm.train_timesteps, rng, dist)
        data = elements.data
        target = data["eps"] - data["x0"]
        data["log_probs"] = self.log_prob(velocities(policy, elements, traj.cond, self.cfg), target, data["sigma"])
        if awm.ema_kl > 0:
            with self.slow.swapped_in(policy):  # the EMA policy
                data["v_ema"] = velocities(policy, elements, traj.cond, self.cfg)
        return elements

    def log_prob(self, v: Tensor, target: Tensor, sigma: Tensor) -> Tensor:
        return matching_log_prob(v, target, sigma, self.cfg.awm.weighting, self.cfg.awm.huber_p)

    def loss(
        self, velocity, base_velocity, mb: dict[str, Tensor], cond: Any, first: bool, dist: Distributed
    ) -> tuple[Tensor, dict[str, Tensor]]:
        awm = self.cfg.awm
        v = velocity(mb["noised"], mb["sigma"], cond)
        log_ratio = self.log_prob(v, mb["eps"] - mb["x0"], mb["sigma"]) - mb["log_probs"]
        if first:
            check_unit_ratio(log_ratio.detach(), self.cfg.consistency_tolerance, self.epoch, dist)
        advantages = mb["advantages"].detach().double().clamp(-awm.adv_clip_max, awm.adv_clip_max) / awm.adv_clip_max
        per_element, clipped = ppo_clip(log_ratio, advantages, awm.clip_range)
        loss = per_element.mean().float()
        rho = log_ratio.detach().exp()
        metrics = {
            "policy_loss": loss.detach(),
            "ratio_mean": rho.mean(),
            "ratio_max": rho.max(),
            "ratio_min": rho.min(),
            "masked_fraction": clipped.float().mean(),
        }
        loss = with_reference_kl(loss, metrics, self.cfg.loss.beta, lambda: velocity_kl(v, base_velocity, mb, cond))
        if awm.ema_kl > 0:
            ema_kl = mean_squared(v, mb["v_ema"]).mean()
            loss = loss + awm.ema_kl * ema_kl
            metrics["ema_kl"] = ema_kl.detach()
        return loss, metrics


def check_unit_ratio(log_ratio: Tensor, tolerance: float, epoch: int, dist: Distributed) -> None:
    """Before any update the ratio to the rollout policy is 1 (same weights, same noised samples)."""
    worst = float(log_ratio.abs().max())
    if dist.any(worst > tolerance, log_ratio.device):
        raise ConsistencyError(
            f"epoch {epoch}: the policy's matching log-prob differs from the rollout policy's "
            f"before any update (max |log rho| {worst:.3g}, tolerance {tolerance:g})"
        )
