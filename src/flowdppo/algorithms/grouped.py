"""What the group-level likelihood-free algorithms (DGPO, CRD) share: group-shared noise levels, group statistics.

Their loss of one sample needs a statistic of its whole group at the same noise level (DGPO: the group's preference
logit, CRD: the group mean of the implicit reward), computed from the current weights as the public code does on
its complete-group mini-batches. Here the mini-batches are shuffled elements, so the statistics are computed over all
the rollout's elements without gradients, once before the first optimizer step and again after each one (one extra
no-grad forward of the rollout's elements per optimizer step); the loss reads its elements' values. A process holds
whole groups (``dist.share(prompts_per_epoch)``), so no statistic needs a collective.

Element ``e = t * B + b`` is sample ``b`` (group ``b // G``, groups contiguous as the tasks give them) at draw ``t``;
every sample of a group shares its noise level ``s`` at draw ``t``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from flowdppo.algorithms.base import Elements, index_cond
from flowdppo.algorithms.likelihood_free import LikelihoodFree, SlowWeights
from flowdppo.distributed import Distributed
from flowdppo.policies.lora import adapters_disabled, reference_policy
from flowdppo.rollout import Trajectory, in_chunks
from flowdppo.sde import per_sample


def group_noised_elements(
    traj: Trajectory,
    advantages: Tensor,
    levels: Tensor,
    group_size: int,
    shared_noise: bool,
    rng: torch.Generator,
    dist: Distributed,
) -> Elements:
    """``n`` forward-noised copies of each final sample, ``levels`` ``(n, P)`` one noise level per group of the global
    batch and draw: element ``e = t * B + b`` holds ``x0``, ``eps``, ``sigma``, ``noised = (1 - s) x0 + s eps``, its
    advantage, ``sample = b`` and ``element = e``. ``shared_noise``: one ``eps`` per group and draw (DGPO), else one
    per sample. The noise is drawn for the global batch from ``rng`` (alike on every process), sliced to this
    process's groups."""
    x0 = traj.final
    b, n = x0.shape[0], levels.shape[0]
    p = b // group_size
    sigma = levels[:, dist.rank * p : (dist.rank + 1) * p].to(x0.device).repeat_interleave(group_size, dim=1)
    count = p if shared_noise else b  # noise draws per process and level
    eps = torch.randn((n, count * dist.world_size, *x0.shape[1:]), generator=rng, device=rng.device)
    eps = eps[:, dist.rank * count : (dist.rank + 1) * count].to(device=x0.device, dtype=x0.dtype)
    if shared_noise:
        eps = eps.repeat_interleave(group_size, dim=1)
    eps, sigma = eps.flatten(0, 1), sigma.flatten()
    sample = torch.arange(b, device=x0.device).repeat(n)
    s, x0_rep = per_sample(sigma, x0), x0[sample]
    data = {
        "x0": x0_rep,
        "eps": eps,
        "sigma": sigma,
        "noised": (1 - s) * x0_rep + s * eps,
        "advantages": advantages[sample],
        "sample": sample,
        "element": torch.arange(n * b, device=x0.device),
    }
    return Elements(data, n, b)


def by_group(values: Tensor, group_size: int) -> Tensor:
    """Per-element values ``(E,)``, ``e = t * B + b``, as ``(E / G, G)``: one row per group and draw."""
    return values.view(-1, group_size)


def per_member(values: Tensor, group_size: int) -> Tensor:
    """One value per group and draw ``(E / G,)`` back to every element of it ``(E,)``."""
    return values.repeat_interleave(group_size)


def guided_base(policy: nn.Module, frozen: nn.Module | None, scale: float, chunk: int):
    """The frozen base's velocity at guidance ``scale``: ``frozen`` (a copy, full fine-tuning), or the policy with its
    LoRA adapters off; ``chunk`` samples per call (0: all)."""

    def velocity(x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        if frozen is not None:
            return frozen(x, sigma, cond, guidance_scale=scale)
        with adapters_disabled(policy):
            return policy(x, sigma, cond, guidance_scale=scale)

    return in_chunks(velocity, chunk)


class GroupLikelihoodFree(LikelihoodFree):
    """Base of DGPO and CRD: group statistics refreshed from the current weights every optimizer step
    (``statistics``), and the frozen base at the guidance scale ``anchor_guidance`` (a second frozen copy of the
    transformer only for full fine-tuning with a scale other than the sampler's)."""

    def anchor_guidance(self) -> float:
        """Guidance scale of the base velocity the algorithm compares against."""
        raise NotImplementedError

    def train_guidance(self) -> float:
        """Guidance scale the trained velocity runs at (the sampler's by default)."""
        return self.cfg.sampler.guidance_scale

    def statistics(self, v: Tensor, data: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-element statistics ``(E,)`` of the rollout's elements ``data`` from the current velocities ``v``."""
        raise NotImplementedError

    def slow_weights(self, policy: nn.Module) -> SlowWeights:
        """The slowly-updated copy ``self.slow`` (DGPO's EMA, CRD's old model)."""
        return SlowWeights(policy, *self.slow_decay())

    def setup(self, policy: nn.Module) -> None:
        self.slow = self.slow_weights(policy)
        self.policy, self.base_velocity, self.pending = policy, None, None
        other_scale = self.anchor_guidance() != self.cfg.sampler.guidance_scale
        self.frozen = reference_policy(policy) if other_scale else None  # None with LoRA: the adapters go off

    def update(self, policy, optimizer, traj, advantages, rng, base_velocity, **kwargs) -> dict[str, float]:
        self.base_velocity = base_velocity  # the trainer's base, at the sampler's guidance
        try:
            return super().update(policy, optimizer, traj, advantages, rng, base_velocity, **kwargs)
        finally:
            self.pending = self.stats = None  # the rollout's elements are not kept between rollouts

    def anchor(self):
        """The base velocity at ``anchor_guidance`` (the trainer's own base when it is the sampler's scale)."""
        scale, chunk = self.anchor_guidance(), self.cfg.sampler.rollout_batch_size
        if scale == self.cfg.sampler.guidance_scale and self.base_velocity is not None:
            return self.base_velocity
        return guided_base(self.policy, self.frozen, scale, chunk)

    def trained(self, policy):
        """``policy`` (a module or its partial) at ``train_guidance``."""
        return partial(policy, guidance_scale=self.train_guidance())

    def hold(self, elements: Elements, cond: Any) -> Elements:
        """Keep the rollout's elements for the statistics; they are computed at the first mini-batch."""
        self.pending, self.stats_at = (elements, cond), None
        return elements

    def element_velocities(self, velocity, elements: Elements, cond: Any) -> Tensor:
        """``velocity(x, sigma, cond)`` on every element, no gradients, ``sampler.rollout_batch_size`` at a time."""
        data = elements.data
        run = in_chunks(velocity, self.cfg.sampler.rollout_batch_size)
        with torch.no_grad():
            return run(data["noised"], data["sigma"], index_cond(cond, data["sample"]))

    def current_statistics(self, velocity, mb: dict[str, Tensor]) -> dict[str, Tensor]:
        """The mini-batch's statistics, recomputed over all elements when an optimizer step came since the last."""
        if self.stats_at != self.optimizer_steps:
            elements, cond = self.pending
            v = self.element_velocities(self.trained(velocity), elements, cond)
            self.stats, self.stats_at = self.statistics(v, elements.data), self.optimizer_steps
        return {key: value[mb["element"]] for key, value in self.stats.items()}
