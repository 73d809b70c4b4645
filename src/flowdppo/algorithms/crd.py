"""Centered Reward Distillation (CRD, arXiv 2603.14128): match the model's implicit reward to the external one, both
centered within the prompt's group, where the intractable normalizer cancels.

A group's final samples are noised forward at one level ``s`` (``crd.timesteps``), each with its own ``eps``:
``x_s = (1 - s) x0 + s eps``, ``u = eps - x0``. With ``v`` the current velocity, ``v_old`` the old model's (a
snapshot of the weights, no gradient):

- implicit reward ``r = -(mean((v - u)^2) / w - mean((v_old - u)^2) / w_old)``, ``w = max(detach(mean|v - u|),
  1e-5)`` and alike ``w_old`` (``crd.adaptive``; else ``w = w_old = 1``);
- external reward ``p = clip(A, -c, c) / (2 c) + 1/2`` in ``[0, 1]`` (``c = crd.adv_clip_max``);
- centering over the group's samples with weights ``q``: uniform ``1/G`` (``crd.weight_temp < 0``), or both
  ``softmax(p / T)`` and ``softmax(-p / T)`` (``T = crd.weight_temp > 0``, the two losses averaged):
  ``R = p - sum_j q_j p_j``, ``R_theta = r - detach(sum_j q_j r_j)``;
- loss ``(beta R_theta - R)^2`` (``crd.loss_type=mse``) or ``BCE(logit beta R_theta, target sigmoid(R))``
  (``bce``), averaged and multiplied by ``c / beta`` (``beta = crd.beta``);
- KL anchor to the frozen base with guidance ``crd.kl_cfg``: ``loss.beta * mean(k (v - v_cfg)^2)``, the
  reward-adaptive weight ``k = m + p (1 - m)``, ``m = crd.kl_min / loss.beta`` (``crd.reward_adaptive_kl``; else
  ``k = 1``): from ``kl_min`` for the worst samples to ``loss.beta`` for the best.

Two snapshots of the weights, ``w_snap <- d w_snap + (1 - d) w`` after each rollout's update, with ``d`` the
schedule ``[start_step, start, slope, end]``: ``start`` before ``start_step`` optimizer steps, then
``min(start + slope (steps - start_step), end)``. The old model (``crd.old_decay``) gives ``v_old``; the sampling
model (``crd.sampling_decay``) rolls out. Public defaults (Flow-Factory's CRD trainer and its SD3.5 OCR example, the
paper's Table 3): ``beta`` 1, mse, adaptive, uniform centering, ``c`` 5, ``kl_cfg`` 4.5, KL ``beta`` 0.1,
reward-adaptive KL from 1e-4, old decay ``[0, 0.25, 0.005, 0.999]``, sampling decay ``[75, 0, 0.0075, 0.999]``, two
optimizer steps per rollout (the preset's mini-batch is half the digits rollout's 1,600 elements).

Differences: the centering runs over each prompt's group at one shared level (the paper's within-prompt centering;
Flow-Factory centers over its gathered micro-batch, which mixes prompts), its means from the current weights over the
whole group (``grouped``); 10 distinct levels of the 10-step schedule replace the 20 stratified draws (each level
about twice); the frozen base as the implicit reward's reference (``use_old_for_loss=false``) and the hard-pool
centering (``weight_temp=0``) are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowdppo.algorithms.base import Elements, with_reference_kl
from flowdppo.algorithms.diffusion_nft import check_same_velocity, optimality_weight
from flowdppo.algorithms.grouped import GroupLikelihoodFree, by_group, group_noised_elements, per_member
from flowdppo.algorithms.likelihood_free import (
    LIKELIHOOD_FREE_SAMPLER,
    TIMESTEP_MODES,
    SlowWeights,
    mean_squared,
    noise_levels,
    timesteps_error,
)
from flowdppo.distributed import Distributed
from flowdppo.errors import ConfigError
from flowdppo.rollout import Trajectory
from flowdppo.sde import upcast
from flowdppo.settings import Section, require

LOSS_TYPES = ("mse", "bce")


def implicit_reward(v: Tensor, v_old: Tensor, target: Tensor, adaptive: bool = True) -> Tensor:
    """``r = -(mean((v - u)^2) / w - mean((v_old - u)^2) / w_old)``, ``w = max(detach(mean|v - u|), 1e-5)`` (1 when
    not ``adaptive``) -> (E,)."""
    error, old_error = mean_squared(v, target), mean_squared(v_old, target)
    if adaptive:
        error = error / adaptive_weight(v, target)
        old_error = old_error / adaptive_weight(v_old, target)
    return -(error - old_error)


def adaptive_weight(v: Tensor, target: Tensor) -> Tensor:
    """``max(mean|v - u|, 1e-5)`` over the non-batch dimensions, detached, float32 or wider -> (E,)."""
    return (upcast(v.detach()) - upcast(target)).abs().flatten(1).mean(dim=1).clamp_min(1e-5)


def centering_weights(p: Tensor, temperature: float) -> list[Tensor]:
    """The centering weights of each direction over a group's samples, ``p`` ``(groups, G)``: ``[1/G]`` for a
    negative temperature, else ``[softmax(p / T), softmax(-p / T)]``."""
    if temperature < 0:
        return [torch.full_like(p, 1 / p.shape[-1])]
    return [torch.softmax(p / temperature, dim=-1), torch.softmax(-p / temperature, dim=-1)]


def crd_loss(r: Tensor, r_center: Tensor, p: Tensor, p_center: Tensor, beta: float, loss_type: str = "mse") -> Tensor:
    """Per-element ``(beta R_theta - R)^2`` or ``BCE(beta R_theta, sigmoid(R))``, ``R_theta = r - detach(r_center)``,
    ``R = p - p_center``. (E,)"""
    logit, centered = beta * (r - r_center.detach()), (p - p_center).detach()
    if loss_type == "mse":
        return (logit - centered).pow(2)
    if loss_type == "bce":
        return F.binary_cross_entropy_with_logits(logit, torch.sigmoid(centered), reduction="none")
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")


def reward_adaptive_weight(p: Tensor, beta: float, kl_min: float) -> Tensor:
    """``k = m + p (1 - m)``, ``m = kl_min / beta``: ``beta k`` runs from ``kl_min`` (``p = 0``) to ``beta``."""
    m = kl_min / beta
    return m + p * (1 - m)


class ScheduledWeights(SlowWeights):
    """A snapshot blended toward the weights with CRD's decay schedule ``[start_step, start, slope, end]``."""

    def __init__(self, policy: nn.Module, schedule: list[float]) -> None:
        super().__init__(policy, 0.0, 0.0)
        self.schedule = schedule

    def decay(self, steps: int) -> float:
        start_step, start, slope, end = self.schedule
        return start if steps < start_step else min(start + slope * (steps - start_step), end)


def schedule_error(key: str, schedule: list[float]) -> str | None:
    """Why a decay schedule is not ``[start_step >= 0, start in [0, 1], slope >= 0, end in [0, 1]]``, or None."""
    ok = len(schedule) == 4 and schedule[0] >= 0 and schedule[2] >= 0 and all(0 <= schedule[i] <= 1 for i in (1, 3))
    if ok:
        return None
    return f"{key}: must be [start_step >= 0, start in [0, 1], slope >= 0, end in [0, 1]], got {schedule}"


@dataclass
class CRDConfig(Section):
    """Centered Reward Distillation (algorithm crd)."""

    beta: float = 1.0
    """beta of the reward matching: beta (r - mean r) is matched to the centered external reward."""
    loss_type: str = "mse"
    """"mse" (squared difference) or "bce" (binary cross-entropy to sigmoid of the centered reward)."""
    adaptive: bool = True
    """Divide each matching error of the implicit reward by its detached mean absolute value."""
    weight_temp: float = -1.0
    """Centering weights: negative = uniform over the group; T > 0 = softmax(+-p / T), two directions averaged."""
    adv_clip_max: float = 5.0
    """c of the external reward p = clip(A, -c, c) / (2c) + 1/2."""
    train_timesteps: int = 10
    """Noise levels each group is trained at (the public 20 draws over 10 steps use each level about twice)."""
    timesteps: str = "schedule"
    """How they are drawn per group: "schedule" (distinct levels of the rollout schedule), "stratified", "uniform"."""
    kl_cfg: float = 4.5
    """Guidance scale of the frozen base the KL anchors to (1: none)."""
    reward_adaptive_kl: bool = True
    """Weight each sample's KL by m + p (1 - m), from kl_min (worst) to loss.beta (best)."""
    kl_min: float = 1e-4
    """KL weight of the worst samples with reward_adaptive_kl."""
    old_decay: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.005, 0.999])
    """Old model's schedule [start_step, start, slope, end] of d in w_old <- d w_old + (1 - d) w."""
    sampling_decay: list[float] = field(default_factory=lambda: [75.0, 0.0, 0.0075, 0.999])
    """Sampling model's schedule (d = 0 before start_step: rollouts run the current weights)."""

    @classmethod
    def choices(cls) -> dict[str, tuple]:
        return {"loss_type": LOSS_TYPES, "timesteps": TIMESTEP_MODES}

    def check(self, prefix: str = "crd.") -> None:
        self.check_choices(prefix)
        require(self, prefix, "> 0", "beta", "adv_clip_max", "train_timesteps", "kl_cfg", "kl_min")
        if self.weight_temp == 0:
            raise ConfigError(f"{prefix}weight_temp: 0 is not supported; use a negative value (uniform) or T > 0")
        for key in ("old_decay", "sampling_decay"):
            if problem := schedule_error(prefix + key, getattr(self, key)):
                raise ConfigError(problem)


class CRD(GroupLikelihoodFree):
    name = "crd"
    reads = ("crd.", "loss.beta")
    sections = {"crd": CRDConfig}
    presets = {"crd": {"sampler": LIKELIHOOD_FREE_SAMPLER, "loss": {"beta": 0.1}, "optim": {"minibatch_size": 800}}}

    @classmethod
    def config_error(cls, cfg) -> str | None:
        crd, beta = cfg.crd, cfg.loss.beta
        if problem := timesteps_error("crd", crd.timesteps, crd.train_timesteps, cfg.sampler.num_steps):
            return problem
        if crd.reward_adaptive_kl and 0 < beta < crd.kl_min:
            return (
                f"crd.kl_min: must not exceed loss.beta ({beta:g}) with crd.reward_adaptive_kl (the KL weight runs "
                f"from kl_min for the worst samples to loss.beta for the best), got {crd.kl_min:g}"
            )
        return None

    def slow_weights(self, policy: nn.Module) -> SlowWeights:
        return ScheduledWeights(policy, self.cfg.crd.old_decay)  # the old model

    def anchor_guidance(self) -> float:
        return self.cfg.crd.kl_cfg

    def setup(self, policy: nn.Module) -> None:
        super().setup(policy)
        self.sampling = ScheduledWeights(policy, self.cfg.crd.sampling_decay)

    def sampling_weights(self, policy: nn.Module):
        return self.sampling.swapped_in(policy)

    def after_update(self, policy: nn.Module) -> None:
        super().after_update(policy)
        self.sampling.update(policy, self.optimizer_steps)

    def state_dict(self) -> dict[str, Tensor]:
        return {**super().state_dict(), **self.sampling.state_dict("sampling")}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        self.sampling.load_state_dict(state, "sampling")

    def elements(
        self, traj: Trajectory, advantages: Tensor, policy: nn.Module, rng: torch.Generator, dist: Distributed
    ) -> Elements:
        crd, g = self.cfg.crd, self.cfg.group_size
        groups = traj.final.shape[0] // g * dist.world_size
        levels = noise_levels(crd.timesteps, traj.sigmas, crd.train_timesteps, groups, rng)
        elements = group_noised_elements(traj, advantages, levels, g, False, rng, dist)
        self.on_policy = self.slow.equals(policy)
        with self.slow.swapped_in(policy):  # the old model
            elements.data["v_old"] = self.element_velocities(self.trained(policy), elements, traj.cond)
        return self.hold(elements, traj.cond)

    def statistics(self, v: Tensor, data: dict[str, Tensor]) -> dict[str, Tensor]:
        """The centering means ``sum_j q_j r_j`` and ``sum_j q_j p_j`` of each element's group, per direction."""
        crd, g = self.cfg.crd, self.cfg.group_size
        r = by_group(implicit_reward(v, data["v_old"], data["eps"] - data["x0"], crd.adaptive), g)
        p = by_group(optimality_weight(data["advantages"], crd.adv_clip_max), g)
        stats = {}
        for k, q in enumerate(centering_weights(p, crd.weight_temp)):
            stats[f"r_center_{k}"] = per_member((q * r).sum(-1), g)
            stats[f"p_center_{k}"] = per_member((q * p).sum(-1), g)
        return stats

    def loss(
        self, velocity, base_velocity, mb: dict[str, Tensor], cond: Any, first: bool, dist: Distributed
    ) -> tuple[Tensor, dict[str, Tensor]]:
        crd = self.cfg.crd
        stats = self.current_statistics(velocity, mb)
        v = self.trained(velocity)(mb["noised"], mb["sigma"], cond)
        if first and self.on_policy:
            check_same_velocity(mean_squared(v.detach(), mb["v_old"]), self.cfg.consistency_tolerance, self.epoch, dist)
        r = implicit_reward(v, mb["v_old"], mb["eps"] - mb["x0"], crd.adaptive)
        p = optimality_weight(mb["advantages"].detach(), crd.adv_clip_max)
        directions = len(stats) // 2
        per_element = sum(
            crd_loss(r, stats[f"r_center_{k}"], p, stats[f"p_center_{k}"], crd.beta, crd.loss_type)
            for k in range(directions)
        )
        loss = per_element.mean() / directions * crd.adv_clip_max / crd.beta
        metrics = {"policy_loss": loss.detach(), "implicit_reward": r.detach().mean()}

        def kl() -> Tensor:
            with torch.no_grad():
                v_cfg = self.anchor()(mb["noised"], mb["sigma"], cond)
            value = mean_squared(v, v_cfg)
            metrics["anchor_kl"] = value.detach().mean()
            if crd.reward_adaptive_kl:
                value = reward_adaptive_weight(p, self.cfg.loss.beta, crd.kl_min) * value
            return value.mean()

        return with_reference_kl(loss, metrics, self.cfg.loss.beta, kl), metrics
