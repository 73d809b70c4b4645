"""Sampling trajectories from a policy, recording what the update needs at the trained steps.

A rollout runs the whole schedule ``sigmas[0..K]`` (the task's, the one source of the schedule). The
trained steps are stochastic (the configured sampler) and recorded: the state ``x_t``, the sampled
``x_next``, the transition mean and std, and the log-density of ``x_next``. Every other step is a plain
Euler (ODE) step. A likelihood-free algorithm trains on ``final`` only and may roll out with no
trained step at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from flowdppo.distributed import shared_randn
from flowdppo.samplers import SamplerConfig, get_sampler, measure_sampler
from flowdppo.sde import gaussian_kl, log_prob, ode_step

VelocityFn = Callable[[Tensor, Tensor, Any], Tensor]


@dataclass
class Trajectory:
    """A batch of ``B`` rollouts with ``T`` trained steps each.

    cond:         (B,) the prompts (conditions) of the samples.
    final:        (B, ...) the generated latents at sigma = 0.
    step_index:   (T,) long, the trained steps' indices in the schedule.
    step_sigma:   (T,) sigma of each trained step; step_sigma_next (T,) the one it steps to.
    latents:      (T, B, ...) x_t at each trained step; next_latents (T, B, ...) the sampled x_next.
    means:        (T, B, ...) transition mean of the rollout policy; stds (T, B) its std.
    log_probs:    (T, B) log-density of next_latents under the rollout policy.
    kl_to_base:   (B,) sum over the measured steps of the per-step KL to the base policy (or None).
    sigmas:       (K + 1,) the whole noise schedule the rollout ran (``sigmas[1]`` caps the Flow-SDE std).
    """

    cond: Any
    final: Tensor
    step_index: Tensor
    step_sigma: Tensor
    step_sigma_next: Tensor
    latents: Tensor
    next_latents: Tensor
    means: Tensor
    stds: Tensor
    log_probs: Tensor
    kl_to_base: Tensor | None = None
    sigmas: Tensor | None = None

    @property
    def num_elements(self) -> int:
        """Trained (sample, step) elements: ``T * B``."""
        return self.log_probs.numel()


def guided_velocity(policy: Any, cfg: SamplerConfig) -> VelocityFn:
    """The policy's velocity at the sampler's guidance scale, ``rollout_batch_size`` samples per call (a module
    call: FSDP's hooks run)."""
    return in_chunks(partial(policy, guidance_scale=cfg.guidance_scale), cfg.rollout_batch_size)


def in_chunks(velocity: VelocityFn, size: int) -> VelocityFn:
    """``velocity`` called on at most ``size`` samples at a time (0: all at once); same result, less memory."""
    if size <= 0:
        return velocity

    def chunked(x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        parts = [velocity(x[i : i + size], sigma[i : i + size], cond[i : i + size]) for i in range(0, len(x), size)]
        return torch.cat(parts)

    return chunked


def initial_noise(
    generator: torch.Generator,
    cfg: SamplerConfig,
    num_prompts: int,
    group_size: int,
    rows: slice,
    shape: tuple[int, ...],
    device,
) -> Tensor:
    """This process's ``rows`` of the global batch's starting noise ``(P * G, *shape)``; with
    ``group_shared_noise`` every sample of a group starts from the same noise (DanceGRPO)."""
    if cfg.group_shared_noise:
        per_group = torch.randn((num_prompts, *shape), generator=generator, device=device)
        return per_group.repeat_interleave(group_size, dim=0)[rows]
    return shared_randn(generator, num_prompts * group_size, rows, shape, device)


@torch.no_grad()
def rollout(
    velocity: VelocityFn,
    cond: Any,
    x: Tensor,
    sigmas: Tensor,
    cfg: SamplerConfig,
    steps: list[int],
    *,
    generator: torch.Generator | None = None,
    base_velocity: VelocityFn | None = None,
    kl_steps: list[int] | None = None,
    global_batch: int | None = None,
    rows: slice = slice(None),
) -> Trajectory:
    """Sample from noise ``x`` (B, ...) through ``sigmas`` (K + 1,); stochastic and recorded at ``steps``.

    ``velocity(x, sigma (B,), cond)`` is the policy (guidance included); ``cfg`` the sampler settings.
    With ``base_velocity``, the trajectory also carries the path KL to the base:
    ``sum_t D(mu_theta(x_t), mu_base(x_t))`` over ``kl_steps`` (default: the trained steps), in the kernel
    ``samplers.measure_sampler(cfg)`` with its own std at every such step, along the policy's own samples.

    Data-parallel: ``x`` holds ``rows`` of a ``global_batch``; the step noise is drawn for the global
    batch from ``generator`` (the same on every process) and sliced, as ``distributed.shared_randn``.
    """
    kl_steps = steps if kl_steps is None else kl_steps
    sigmas = sigmas.to(x.device)
    sampler, (kl_sampler, kl_eta) = get_sampler(cfg.kind), measure_sampler(cfg)
    batch = x.shape[0]
    records: dict[str, list[Tensor]] = {k: [] for k in ("latents", "next_latents", "means", "stds", "log_probs")}
    kl = torch.zeros(batch, device=x.device) if base_velocity is not None else None
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i].expand(batch)
        v = velocity(x, sigma, cond)
        if kl is not None and i in kl_steps:
            ours = kl_sampler.step(x, v, sigmas[i], sigmas[i + 1], kl_eta, sigmas[1])
            base = kl_sampler.step(x, base_velocity(x, sigma, cond), sigmas[i], sigmas[i + 1], kl_eta, sigmas[1])
            kl += gaussian_kl(ours.mean, base.mean, ours.std)
        if i not in steps:
            x = ode_step(x, v, sigmas[i], sigmas[i + 1]).mean
            continue
        step = sampler.step(x, v, sigmas[i], sigmas[i + 1], cfg.eta, sigmas[1])
        noise = shared_randn(generator, global_batch or batch, rows, x.shape[1:], x.device, x.dtype)
        x_next = step.mean + step.std.to(x.dtype) * noise
        std = step.std.expand(batch)
        records["latents"].append(x)
        records["next_latents"].append(x_next)
        records["means"].append(step.mean)
        records["stds"].append(std)
        records["log_probs"].append(log_prob(x_next, step.mean, step.std, convention=cfg.logprob_convention))
        x = x_next
    index = torch.tensor(steps, dtype=torch.long, device=x.device)
    return Trajectory(
        cond=cond,
        final=x,
        step_index=index,
        step_sigma=sigmas[index],
        step_sigma_next=sigmas[index + 1],
        kl_to_base=kl,
        sigmas=sigmas,
        **{k: torch.stack(v) if v else x.new_zeros((0, batch)) for k, v in records.items()},
    )


@torch.no_grad()
def sample(velocity: VelocityFn, cond: Any, x: Tensor, sigmas: Tensor) -> Tensor:
    """Plain Euler (ODE) sampling from noise ``x``: ``x <- x + dt * v`` over the schedule ``sigmas``."""
    sigmas = sigmas.to(x.device)
    for i in range(len(sigmas) - 1):
        x = ode_step(x, velocity(x, sigmas[i].expand(x.shape[0]), cond), sigmas[i], sigmas[i + 1]).mean
    return x


@torch.no_grad()
def sample_with_path_kl(
    velocity: VelocityFn, base_velocity: VelocityFn, cond: Any, x: Tensor, sigmas: Tensor, kernel: str = "flow_sde"
) -> tuple[Tensor, Tensor]:
    """``sample`` (plain Euler from ``x``), and along the same path the KL to the base in one stochastic
    ``kernel`` at its default ``eta``: ``sum_t D(mu_theta(x_t), mu_base(x_t))`` over the kernel's stochastic
    steps, ``D`` the mean-reduced per-step KL (``gaussian_kl``). -> (samples (B, ...), path KL (B,)).

    Every policy measured this way shares the kernel and the states are those of the evaluated samples, so
    KL and reward come from the same policy on the same samples, whatever sampler the policy was trained with.
    """
    sigmas = sigmas.to(x.device)
    sampler = get_sampler(kernel)
    measured = sampler.stochastic_steps(len(sigmas) - 1)
    kl = torch.zeros(x.shape[0], device=x.device)
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i].expand(x.shape[0])
        v = velocity(x, sigma, cond)
        if i in measured:
            ours = sampler.step(x, v, sigmas[i], sigmas[i + 1], sampler.default_eta, sigmas[1])
            base = sampler.step(
                x, base_velocity(x, sigma, cond), sigmas[i], sigmas[i + 1], sampler.default_eta, sigmas[1]
            )
            kl += gaussian_kl(ours.mean, base.mean, ours.std)
        x = ode_step(x, v, sigmas[i], sigmas[i + 1]).mean
    return x, kl
