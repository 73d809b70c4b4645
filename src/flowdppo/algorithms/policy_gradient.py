"""Policy gradient on the sampler's per-step Gaussian policies: Flow-DPPO, Flow-GRPO, Flow-CPS, GRPO-Guard.

Elements are the rollout's trained ``(step, sample)`` pairs. Each mini-batch replays its steps with
gradients (``mu_theta``, ``logp_new``) against the anchor frozen before the update (``mu_old``,
``logp_old``: recorded by the rollout, or a no-grad replay with ``optim.anchor=replay``), and the
configured loss of ``flowdppo.losses`` (``loss.loss_mode``) turns them into per-element losses,
averaged over the mini-batch; ``loss.beta > 0`` adds ``beta * mean((mu_theta - mu_ref)^2) / (2 s^2)``
to the frozen base.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from flowdppo.algorithms.base import (
    ELEMENT_DIM_KL,
    ELEMENT_LOG_RATIO,
    Algorithm,
    Elements,
    index_cond,
    with_reference_kl,
)
from flowdppo.distributed import Distributed
from flowdppo.errors import ConsistencyError
from flowdppo.losses import LOSSES, StepBatch, get_loss, loss_kwargs, reference_kl
from flowdppo.rollout import Trajectory, guided_velocity
from flowdppo.samplers import get_sampler
from flowdppo.sde import REDUCTIONS, log_prob
from flowdppo.settings import Section, require


@dataclass
class LossConfig(Section):
    """The per-step policy-gradient losses (``loss.*``, algorithm policy_gradient; ``loss.beta`` every algorithm)."""

    loss_mode: str = "flow_dppo"
    """The per-step loss: flow_dppo (Flow-DPPO's KL mask), flow_grpo / flow_cps (the PPO ratio clip), grpo_guard,
    unconstrained (-A rho on every element: a control); a loss added to ``losses.LOSSES`` too."""
    kl_mask_threshold: float = 1e-5
    """Flow-DPPO threshold tau on the mean-reduced per-step KL."""
    clip_range: float = 1e-4
    """PPO ratio clip epsilon (flow_grpo, flow_cps, grpo_guard)."""
    adv_clip_max: float = 5.0
    """Advantage clamp of the clipping baselines."""
    kl_reduce: str = "mean"
    """Reduction of the per-step KL: "mean" (thresholds are calibrated for it) or "sum"."""
    add_kl_coefficient: bool = True
    """Divide the mean drift by 2 std^2 (True) or by 2 (False)."""
    beta: float = 0.0
    """Weight of the KL penalty to the frozen base (adapters disabled)."""

    @classmethod
    def choices(cls) -> dict[str, tuple]:
        return {"loss_mode": tuple(sorted(LOSSES)), "kl_reduce": REDUCTIONS}

    def check(self, prefix: str = "loss.") -> None:
        self.check_choices(prefix)
        require(self, prefix, "> 0", "kl_mask_threshold", "clip_range", "adv_clip_max")
        require(self, prefix, ">= 0", "beta")


SDE = {"kind": "flow_sde", "eta": 0.7}


class PolicyGradient(Algorithm):
    name = "policy_gradient"
    reads = ("loss.",)
    sections = {"loss": LossConfig}
    presets = {
        "flow_dppo": {"sampler": SDE, "loss": {"loss_mode": "flow_dppo"}},
        "flow_grpo": {"sampler": SDE, "loss": {"loss_mode": "flow_grpo", "clip_range": 1e-4}},
        "flow_cps": {
            "sampler": {"kind": "cps", "eta": 0.8, "logprob_convention": "cps"},
            "loss": {"loss_mode": "flow_cps", "clip_range": 1e-4},
        },
        "grpo_guard": {"sampler": SDE, "loss": {"loss_mode": "grpo_guard", "clip_range": 2e-6}},
        "flow_dppo_cps": {"sampler": {"kind": "cps", "eta": 0.8}, "loss": {"loss_mode": "flow_dppo"}},
        "unconstrained": {"sampler": SDE, "loss": {"loss_mode": "unconstrained"}},  # -A rho, no trust test: a control
        "dance_grpo": {
            "sampler": {"kind": "dance_sde", "eta": 0.3, "group_shared_noise": True},
            "loss": {"loss_mode": "flow_grpo", "clip_range": 1e-4},
        },
    }

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        loss = get_loss(cfg.loss.loss_mode)
        self.loss_fn = partial(loss.fn, **loss_kwargs(loss.fn, cfg.loss))

    @classmethod
    def config_error(cls, cfg) -> str | None:
        s, loss = cfg.sampler, get_loss(cfg.loss.loss_mode)
        if not get_sampler(s.kind).stochastic:
            return (
                f"sampler.kind: {cfg.loss.loss_mode} trains per-step log-probabilities, which an {s.kind} sampler "
                "does not have; use flow_sde, cps or dance_sde (or a likelihood-free method: diffusion_nft, awm)"
            )
        if loss.samplers and s.kind not in loss.samplers:
            return f"loss.loss_mode {cfg.loss.loss_mode} needs sampler.kind {' or '.join(loss.samplers)}, got {s.kind}"
        if s.logprob_convention not in loss.logprob_conventions:
            return (
                f"loss.loss_mode {cfg.loss.loss_mode} needs sampler.logprob_convention "
                f"{' or '.join(loss.logprob_conventions)} (got {s.logprob_convention})"
            )
        return None

    def elements(
        self, traj: Trajectory, advantages: Tensor, policy: nn.Module, rng: torch.Generator, dist: Distributed
    ) -> Elements:
        """The trained steps as elements (``flat_steps``) with the anchor and the advantages."""
        if self.cfg.optim.anchor == "replay":
            traj = replay_anchor(policy, traj, self.cfg)
        self.sigma_stand_in = traj.sigmas[1]  # caps the Flow-SDE std of a step from sigma = 1
        t, b = traj.log_probs.shape
        data = flat_steps(traj)
        data.update(
            {
                "means": traj.means.flatten(0, 1),
                "stds": traj.stds.flatten(),
                "log_probs": traj.log_probs.flatten(),
                "step_index": traj.step_index.repeat_interleave(b),
                "advantages": advantages[data["sample"]],
            }
        )
        return Elements(data, t, b)

    def loss(
        self, velocity, base_velocity, mb: dict[str, Tensor], cond: Any, first: bool, dist: Distributed
    ) -> tuple[Tensor, dict[str, Tensor]]:
        mean_new, logp_new = replay_step(velocity, mb, cond, self.cfg, self.sigma_stand_in)
        batch = StepBatch(
            logp_new=logp_new,
            logp_old=mb["log_probs"],
            advantages=mb["advantages"],
            mean_new=mean_new,
            mean_old=mb["means"],
            std=mb["stds"],
            dt=mb["sigma_next"] - mb["sigma"],
            step_index=mb["step_index"],
        )
        if first:
            check_consistency(batch, self.cfg.consistency_tolerance, self.epoch, dist)
        per_element, metrics = self.loss_fn(batch)
        with torch.no_grad():  # the mechanism's per-element values (Algorithm.update summarises them)
            dim = mean_new[0].numel()
            metrics[ELEMENT_DIM_KL] = dim * batch.divergence("mean")  # the full KL of the step
            metrics[ELEMENT_LOG_RATIO] = batch.logp_new - batch.logp_old  # the plain ratio, any loss

        def base_kl() -> Tensor:
            with torch.no_grad():
                mean_ref, _ = replay_step(base_velocity, mb, cond, self.cfg, self.sigma_stand_in)
            return reference_kl(mean_new, mean_ref, mb["stds"], self.cfg.loss.kl_reduce).mean()

        return with_reference_kl(per_element.mean(), metrics, self.cfg.loss.beta, base_kl), metrics


def flat_steps(traj: Trajectory) -> dict[str, Tensor]:
    """A trajectory's (T, B, ...) step records as (T*B, ...) elements: element ``e`` is step ``e // B`` of
    sample ``e % B``."""
    t, b = traj.log_probs.shape
    return {
        "latents": traj.latents.flatten(0, 1),
        "next_latents": traj.next_latents.flatten(0, 1),
        "sigma": traj.step_sigma.repeat_interleave(b),
        "sigma_next": traj.step_sigma_next.repeat_interleave(b),
        "sample": torch.arange(b, device=traj.final.device).repeat(t),
    }


def replay_step(velocity, mb: dict[str, Tensor], cond: Any, cfg, sigma_stand_in: Tensor) -> tuple[Tensor, Tensor]:
    """Recompute the transitions of some elements with the current weights: (mean, log-prob)."""
    x, s = mb["latents"], cfg.sampler
    v = velocity(x, mb["sigma"], cond)
    step = get_sampler(s.kind).step(x, v, mb["sigma"], mb["sigma_next"], s.eta, sigma_stand_in)
    return step.mean, log_prob(mb["next_latents"], step.mean, step.std, convention=s.logprob_convention)


@torch.no_grad()
def replay_anchor(policy: nn.Module, traj: Trajectory, cfg) -> Trajectory:
    """Recompute ``mu_old`` and ``logp_old`` with a no-grad replay of every trained element."""
    velocity = guided_velocity(policy, cfg.sampler)
    t, b = traj.log_probs.shape
    mb = flat_steps(traj)
    means, log_probs = replay_step(velocity, mb, index_cond(traj.cond, mb["sample"]), cfg, traj.sigmas[1])
    traj.means, traj.log_probs = means.view_as(traj.means), log_probs.view(t, b)
    return traj


def check_consistency(batch: StepBatch, tolerance: float, epoch: int, dist: Distributed | None = None) -> None:
    """Before any update the replay must reproduce the rollout: ``rho == 1`` and ``D == 0``."""
    with torch.no_grad():
        max_log_ratio = (batch.logp_new - batch.logp_old).abs().max().item()
        max_divergence = batch.divergence().max().item()
    failed = max_log_ratio > tolerance or max_divergence > tolerance
    if (dist or Distributed()).any(failed, batch.logp_new.device):  # every process stops, none waits
        raise ConsistencyError(
            f"epoch {epoch}: the replayed policy differs from the rollout policy before any update "
            f"(max |log rho| {max_log_ratio:.3g}, max D {max_divergence:.3g}, tolerance {tolerance:g}). "
            "The rollout and the replay must run the same weights and numerics; if your rollout engine "
            "differs on purpose, set optim.anchor=replay."
        )
