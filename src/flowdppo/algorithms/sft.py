"""Supervised fine-tuning (SFT) with the flow-matching loss, on data or on the policy's own best samples.

Per element (a latent ``x0`` noised to ``x_s = (1 - s) x0 + s eps``, ``s`` logit-normal by default):

    loss = mean((v(x_s, s) - (eps - x0))^2)

averaged over elements; ``loss.beta > 0`` adds ``beta * mean((v - v_ref)^2)`` to the frozen base.

``sft.source=data`` (``--method sft``): ``x0`` from ``sft.data``, a folder of captioned images or ``digits``, the
digits task's real training digits each prompted with its class (``flowdppo.algorithms.examples``); no rollout.
``sft.source=self`` (``--method rft``, rejection-sampling fine-tuning): each epoch rolls out and trains on the
``sft.top_k`` best samples of each group by advantage. flow_grpo's online SFT (``train_sd3_sft.py``) is its
``top_k = 1`` (a 0/1 weight on each group's best sample, logit-normal levels, unit loss weighting); it samples from a
reference copy refreshed every ``ref_update_step``, here the current policy (the refresh at every step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flowdppo.algorithms.base import Algorithm, Elements, with_reference_kl
from flowdppo.algorithms.examples import (
    BUILT_IN_DIGITS,
    LEVEL_MODES,
    check_source_path,
    epoch_examples,
    load_data,
    policy_device,
    shared_noise_elements,
)
from flowdppo.algorithms.likelihood_free import LIKELIHOOD_FREE_SAMPLER, mean_squared, timesteps_error, velocity_kl
from flowdppo.distributed import Distributed
from flowdppo.settings import Section, require

SOURCES = ("data", "self")


def flow_matching_loss(v: Tensor, eps: Tensor, x0: Tensor) -> Tensor:
    """Per-element flow-matching error ``mean((v - (eps - x0))^2)`` over the non-batch dimensions. (E,)"""
    return mean_squared(v, eps - x0)


def top_k_per_group(advantages: Tensor, group_size: int, k: int) -> Tensor:
    """Indices of the ``k`` best samples by advantage of each group (``group_size`` consecutive samples), ``(P * k,)``
    group by group, each group's best first."""
    grouped = advantages.view(-1, group_size)
    offset = torch.arange(grouped.shape[0], device=advantages.device)[:, None] * group_size
    return (offset + grouped.topk(k, dim=1).indices).flatten()


@dataclass
class SFTConfig(Section):
    """Supervised fine-tuning (algorithm sft)."""

    source: str = "data"
    """What is fitted: "data" (sft.data, no rollout) or "self" (each group's top_k rollout samples: rejection-sampling
    fine-tuning)."""
    data: str = BUILT_IN_DIGITS
    """With source=data: a folder with captions.jsonl (one {"image", "prompt"} a line), or "digits" (the real training
    digits, each prompted with its class)."""
    top_k: int = 1
    """With source=self: samples kept per group, the best by advantage (flow_grpo's online SFT: 1)."""
    train_timesteps: int = 9
    """Noise levels each latent is trained at (flow_grpo: int(0.99 num_steps), 39 of its 40 steps; 9 of our 10)."""
    timesteps: str = "logit_normal"
    """How they are drawn: "logit_normal" (sigmoid(N(0, 1)), flow_grpo's), "schedule", "stratified", "uniform"."""

    @classmethod
    def choices(cls) -> dict[str, tuple]:
        return {"source": SOURCES, "timesteps": LEVEL_MODES}

    def check(self, prefix: str = "sft.") -> None:
        self.check_choices(prefix)
        require(self, prefix, "> 0", "top_k", "train_timesteps")


class SFT(Algorithm):
    name = "sft"
    reads = ("sft.", "loss.beta")
    sections = {"sft": SFTConfig}
    presets = {
        "sft": {"sampler": LIKELIHOOD_FREE_SAMPLER, "sft": {"source": "data"}},
        "rft": {"sampler": LIKELIHOOD_FREE_SAMPLER, "sft": {"source": "self"}},
    }

    @classmethod
    def config_error(cls, cfg) -> str | None:
        sft = cfg.sft
        if sft.source == "self" and sft.top_k >= cfg.group_size:
            return (
                f"sft.top_k: keeps the best of each group, so it must be below group_size ({cfg.group_size}), got "
                f"{sft.top_k}"
            )
        if sft.source == "data":
            if cfg.task != "digits":
                return f"sft.source: data reads digits images only; task {cfg.task} trains with sft.source=self"
            if sft.data != BUILT_IN_DIGITS and (problem := check_source_path("sft.data", sft.data, folder=True)):
                return problem
        return timesteps_error("sft", sft.timesteps, sft.train_timesteps, cfg.sampler.num_steps)

    def setup(self, policy: nn.Module) -> None:
        if self.cfg.sft.source == "data":  # read (and checked) once, before the run folder is written
            digits = self.cfg.digits
            self.data = load_data(self.cfg.sft.data, digits.upsample, digits.classes, policy_device(policy))

    def epoch_data(self, epoch: int, rng: torch.Generator, dist: Distributed):
        return epoch_examples(self.data, self.cfg, rng, dist) if self.cfg.sft.source == "data" else None

    def elements(
        self, traj, advantages: Tensor, policy: nn.Module, rng: torch.Generator, dist: Distributed
    ) -> Elements:
        sft = self.cfg.sft
        if sft.source == "data":
            kept = torch.arange(len(traj.final), device=traj.final.device)
        else:
            kept = top_k_per_group(advantages, self.cfg.group_size, sft.top_k)
        x0 = {"x0": traj.final[kept]}
        return shared_noise_elements(x0, kept, sft.timesteps, sft.train_timesteps, traj.sigmas, rng, dist)

    def loss(
        self, velocity, base_velocity, mb: dict[str, Tensor], cond: Any, first: bool, dist: Distributed
    ) -> tuple[Tensor, dict[str, Tensor]]:
        v = velocity(mb["noised_x0"], mb["sigma"], cond)
        loss = flow_matching_loss(v, mb["eps"], mb["x0"]).mean()
        metrics = {"policy_loss": loss.detach()}
        noised = {"noised": mb["noised_x0"], "sigma": mb["sigma"]}
        loss = with_reference_kl(loss, metrics, self.cfg.loss.beta, lambda: velocity_kl(v, base_velocity, noised, cond))
        return loss, metrics
