"""Direct Group Preference Optimization (DGPO, arXiv 2510.08425): DPO between the better and worse halves of a group.

A group's samples (final samples ``x0`` of ODE rollouts) are noised forward together, at one level ``s`` drawn among
the schedule's first ``dgpo.trunc_steps + 1`` levels and, with ``dgpo.shared_noise``, one ``eps`` for the whole
group: ``x_s = (1 - s) x0 + s eps``. With ``u = eps - x0``, ``v`` the current velocity (trained without guidance, as
the public code), ``v_ref`` the frozen base at guidance ``dgpo.kl_cfg`` (or, ``dgpo.ema_reference``, the EMA copy)
and ``A`` the advantage clamped to ``+-dgpo.adv_clip_max``:

- matching errors ``l = mean((v - u)^2)``, ``l_ref = mean((v_ref - u)^2)``;
- the group's preference logit ``S = beta_dpo / G * sum_i A_i (l_i - l_ref_i)``, so that ``-S = R(G+) - R(G-)`` with
  ``R(G+-) = beta_dpo / G * sum over the positive (negative) advantages of |A_i| (l_ref_i - l_i)``: how much more the
  preferred samples improved on the reference than the rejected ones;
- the objective ``-log sigmoid(R(G+) - R(G-)) = -log sigmoid(-S)``, trained through its gradient-equivalent
  surrogate (the public code's) ``sigmoid(S) * A_i * l_i`` per element, ``sigmoid(S)`` detached: its gradient is
  ``1 / beta_dpo`` times the objective's, averaged over groups;
- PPO-style clip (``dgpo.clip_dsm``): ``rho = exp(l_old - l)`` against the EMA copy's error ``l_old``; where ``A > 0,
  rho > 1 + eps`` or ``A <= 0, rho < 1 - eps`` (``eps = dgpo.clip_range``) the element's ``l`` gets no gradient;
- ``loss.beta > 0`` adds ``beta * mean((v - v_ref)^2)`` to the base at ``dgpo.kl_cfg`` (clipped alike with
  ``dgpo.clip_kl``).

The EMA copy ``w_ema <- d w_ema + (1 - d) w``, ``d = min(dgpo.ema_decay_rate * steps, dgpo.ema_decay_max)``, is
updated after each rollout's update; rollouts run it once more than ``dgpo.ema_sampling_after`` optimizer steps have
been taken (the public ``switch_ema_ref``), the current weights before. Public defaults (the repository's OCR recipe,
``config/dgpo.py:general_ocr_sd3_4gpu``): ``beta_dpo`` 100, KL ``beta`` 0.02, clip 1e-2, 4 of the first 7 levels of a
10-step schedule, shared noise, advantages clamped to 5, EMA decay ``min(0.001 steps, 0.3)``, switch after 200 steps,
one optimizer step per rollout (the preset's mini-batch holds the digits rollout's 640 elements).

Differences: the levels are drawn per group (the public code draws them once for the whole batch), the noise once per
rollout (there: per mini-batch), the EMA copy is updated once per rollout (there: every optimizer step; the same with
one step per rollout), and the public evaluation-only EMA (decay 0.9 every 8 steps) is not kept.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flowdppo.algorithms.base import Elements, with_reference_kl
from flowdppo.algorithms.diffusion_nft import check_same_velocity
from flowdppo.algorithms.grouped import GroupLikelihoodFree, by_group, group_noised_elements, per_member
from flowdppo.algorithms.likelihood_free import LIKELIHOOD_FREE_SAMPLER, decay_error, mean_squared, noise_levels
from flowdppo.distributed import Distributed
from flowdppo.errors import ConfigError
from flowdppo.rollout import Trajectory
from flowdppo.settings import Section, require


def preference_logits(error: Tensor, ref_error: Tensor, advantages: Tensor, beta_dpo: float) -> Tensor:
    """``S = beta_dpo / G * sum_i A_i (l_i - l_ref_i)`` of each group: inputs ``(groups, G)`` -> ``(groups,)``."""
    return beta_dpo * (advantages * (error - ref_error)).mean(dim=-1)


def clipped(error: Tensor, old_error: Tensor, advantages: Tensor, clip_range: float) -> Tensor:
    """Where the PPO-style clip binds, ``rho = exp(l_old - l)``: ``A > 0, rho > 1 + eps``; ``A <= 0, rho < 1 - eps``."""
    ratio = torch.exp(old_error - error.detach())
    return torch.where(advantages > 0, ratio > 1 + clip_range, ratio < 1 - clip_range)


def dgpo_loss(error: Tensor, group_weight: Tensor, advantages: Tensor) -> Tensor:
    """Per-element surrogate ``sigmoid(S) * A * l`` (``sigmoid(S)`` of the element's group, detached). (E,)"""
    return group_weight.detach() * advantages * error


@dataclass
class DGPOConfig(Section):
    """Direct Group Preference Optimization (algorithm dgpo)."""

    beta_dpo: float = 100.0
    """DPO beta of the group preference (public: 100 for GenEval and OCR, 10 for PickScore)."""
    adv_clip_max: float = 5.0
    """Advantages clamped to +-adv_clip_max."""
    train_timesteps: int = 4
    """Noise levels each group is trained at (distinct, drawn per group)."""
    trunc_steps: int = 6
    """Levels come from the schedule's first trunc_steps + 1, the noisiest (sigmas[0..trunc_steps])."""
    shared_noise: bool = True
    """One forward noise eps per group and level (else one per sample)."""
    kl_cfg: float = 1.0
    """Guidance scale of the frozen base used as reference and KL anchor (1: none)."""
    ema_reference: bool = False
    """Use the EMA copy, not the frozen base, as the DPO reference (TDM-R1's dynamic reference)."""
    clip_range: float = 0.01
    """eps of the PPO-style clip of exp(l_old - l) against the EMA copy."""
    clip_dsm: bool = True
    """Clip the matching error's gradient where the ratio leaves [1 - eps, 1 + eps] in the advantage's direction."""
    clip_kl: bool = False
    """Clip the KL term's gradient on the same elements."""
    ema_decay_rate: float = 0.001
    """EMA copy w_ema <- d w_ema + (1 - d) w after each update, d = min(rate * optimizer steps, max)."""
    ema_decay_max: float = 0.3
    """Upper bound of d."""
    ema_sampling_after: int = 200
    """Rollouts run the EMA copy once more than this many optimizer steps have been taken."""

    def check(self, prefix: str = "dgpo.") -> None:
        require(self, prefix, "> 0", "beta_dpo", "adv_clip_max", "train_timesteps", "kl_cfg", "clip_range")
        require(self, prefix, ">= 0", "trunc_steps", "ema_decay_rate", "ema_sampling_after")
        if problem := decay_error(f"{prefix}ema_decay_max", self.ema_decay_max):
            raise ConfigError(problem)


class DGPO(GroupLikelihoodFree):
    name = "dgpo"
    reads = ("dgpo.", "loss.beta")
    sections = {"dgpo": DGPOConfig}
    presets = {"dgpo": {"sampler": LIKELIHOOD_FREE_SAMPLER, "loss": {"beta": 0.02}, "optim": {"minibatch_size": 640}}}

    @classmethod
    def config_error(cls, cfg) -> str | None:
        d, steps = cfg.dgpo, cfg.sampler.num_steps
        if d.trunc_steps >= steps:
            return f"dgpo.trunc_steps: must be below sampler.num_steps ({steps}), got {d.trunc_steps}"
        if d.train_timesteps > d.trunc_steps + 1:
            return (
                f"dgpo.train_timesteps: at most dgpo.trunc_steps + 1 = {d.trunc_steps + 1} distinct levels, got "
                f"{d.train_timesteps}; lower it or raise dgpo.trunc_steps"
            )
        if d.clip_kl and cfg.loss.beta == 0:
            return "dgpo.clip_kl: clips the KL term, which is off (loss.beta is 0); set loss.beta > 0 or drop it"
        return None

    def slow_decay(self) -> tuple[float, float]:
        return self.cfg.dgpo.ema_decay_rate, self.cfg.dgpo.ema_decay_max

    def anchor_guidance(self) -> float:
        return self.cfg.dgpo.kl_cfg

    def train_guidance(self) -> float:
        return 1.0  # the public code trains the conditional velocity, whatever the rollout's guidance

    def sampling_weights(self, policy: nn.Module):
        switched = self.optimizer_steps > self.cfg.dgpo.ema_sampling_after
        return self.slow.swapped_in(policy) if switched else nullcontext()

    def uses_ema(self) -> bool:
        d = self.cfg.dgpo
        return d.clip_dsm or d.clip_kl or d.ema_reference

    def elements(
        self, traj: Trajectory, advantages: Tensor, policy: nn.Module, rng: torch.Generator, dist: Distributed
    ) -> Elements:
        d, g = self.cfg.dgpo, self.cfg.group_size
        groups = traj.final.shape[0] // g * dist.world_size
        levels = noise_levels("schedule", traj.sigmas[: d.trunc_steps + 2], d.train_timesteps, groups, rng)
        elements = group_noised_elements(traj, advantages, levels, g, d.shared_noise, rng, dist)
        data = elements.data
        target = data["eps"] - data["x0"]
        self.on_policy = self.slow.equals(policy)
        if self.uses_ema():
            with self.slow.swapped_in(policy):
                data["v_old"] = self.element_velocities(self.trained(policy), elements, traj.cond)
        if d.ema_reference:
            data["ref_error"] = mean_squared(data["v_old"], target)
        else:
            data["ref_error"] = mean_squared(self.element_velocities(self.anchor(), elements, traj.cond), target)
        return self.hold(elements, traj.cond)

    def statistics(self, v: Tensor, data: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each element's group weight ``sigmoid(S)`` and logit ``S`` from the current velocities."""
        d, g = self.cfg.dgpo, self.cfg.group_size
        error = mean_squared(v, data["eps"] - data["x0"])
        advantages = data["advantages"].clamp(-d.adv_clip_max, d.adv_clip_max)
        logits = preference_logits(*(by_group(t, g) for t in (error, data["ref_error"], advantages)), d.beta_dpo)
        return {"group_weight": per_member(torch.sigmoid(logits), g), "preference": per_member(logits, g)}

    def loss(
        self, velocity, base_velocity, mb: dict[str, Tensor], cond: Any, first: bool, dist: Distributed
    ) -> tuple[Tensor, dict[str, Tensor]]:
        d = self.cfg.dgpo
        stats = self.current_statistics(velocity, mb)
        v = self.trained(velocity)(mb["noised"], mb["sigma"], cond)
        target = mb["eps"] - mb["x0"]
        error = mean_squared(v, target)
        advantages = mb["advantages"].detach().clamp(-d.adv_clip_max, d.adv_clip_max)
        metrics: dict[str, Tensor] = {}
        mask = torch.zeros_like(error, dtype=torch.bool)
        if "v_old" in mb:
            if first and self.on_policy:
                drift = mean_squared(v.detach(), mb["v_old"])
                check_same_velocity(drift, self.cfg.consistency_tolerance, self.epoch, dist)
            mask = clipped(error, mean_squared(mb["v_old"], target), advantages, d.clip_range)
            metrics["clipped_fraction"] = mask.float().mean()
        matched = torch.where(mask, error.detach(), error) if d.clip_dsm else error
        loss = dgpo_loss(matched, stats["group_weight"], advantages).mean()
        metrics |= {
            "policy_loss": loss.detach(),
            "group_weight": stats["group_weight"].mean(),
            "preference_logit": stats["preference"].mean(),
            "matching_error": error.detach().mean(),
        }

        def kl() -> Tensor:
            with torch.no_grad():
                v_ref = self.anchor()(mb["noised"], mb["sigma"], cond)
            value = mean_squared(v, v_ref)
            return (torch.where(mask, value.detach(), value) if d.clip_kl else value).mean()

        return with_reference_kl(loss, metrics, self.cfg.loss.beta, kl), metrics
