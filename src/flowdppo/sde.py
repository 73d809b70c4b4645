"""Transition kernels of flow-matching samplers, as Gaussian policies.

Conventions (diffusers): ``sigma = 1`` is pure noise, ``sigma = 0`` is data,
``x_sigma = (1 - sigma) * x0 + sigma * eps`` and the model predicts the velocity ``v = eps - x0``.
A step goes from ``sigma`` to ``sigma_next < sigma``, with ``dt = sigma_next - sigma < 0``.

Every sampler step is a Gaussian policy ``x_next ~ N(mean, std^2 I)``; the functions here return that
``Transition``. ``sigma`` may be a Python float, a 0-d tensor or a per-sample tensor of shape ``(B,)``;
the returned ``std`` broadcasts against the latent, whatever its rank (4-D images, 5-D video).

Notation: ``g`` is the diffusion coefficient of the reverse SDE, ``eta`` the sampler's noise level,
``D`` the exact per-step KL between two transitions that share ``std`` (Flow-DPPO, arXiv 2606.11025).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

LOGPROB_CONVENTIONS = ("gaussian", "cps")
REDUCTIONS = ("mean", "sum")


@dataclass
class Transition:
    """One sampler step as a Gaussian: ``x_next = mean + std * noise``.

    mean: ``(B, ...)``, same shape and dtype as the latent.
    std:  broadcastable to ``mean`` (``(B, 1, ..., 1)`` or 0-d); zero for a deterministic step.
    """

    mean: Tensor
    std: Tensor


def upcast(t: Tensor | float) -> Tensor:
    """Upcast to at least float32 (bf16/fp16 -> fp32; fp64 stays fp64)."""
    t = torch.as_tensor(t)
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _as_batch_tensor(value: float | Tensor, like: Tensor) -> Tensor:
    """A float, 0-d or ``(B,)`` tensor, at least float32, that broadcasts against ``like``.

    A Python float is converted straight to that dtype (never rounded through float32 first)."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    if not isinstance(value, Tensor):
        value = torch.as_tensor(value, dtype=dtype)
    t = value.to(device=like.device, dtype=dtype)
    if t.ndim == 1:
        if t.shape[0] != like.shape[0]:
            raise ValueError(f"sigma has {t.shape[0]} entries but the latent batch has {like.shape[0]}")
        t = t.view(-1, *([1] * (like.ndim - 1)))
    elif t.ndim != 0:
        raise ValueError(f"sigma must be a float, a 0-d tensor or a (B,) tensor, got shape {tuple(t.shape)}")
    return t


def per_sample(t: Tensor, like: Tensor) -> Tensor:
    """Reshape a ``(B,)`` tensor to ``(B, 1, ..., 1)`` so it broadcasts against ``like``."""
    return t.view(-1, *([1] * (like.ndim - 1)))


def shifted_sigmas(num_steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> Tensor:
    """Decreasing schedule ``sigmas[0..K]`` from 1 to 0 with the SD3 time shift.

    ``t = linspace(1, 0, K + 1)``, ``sigma = shift * t / (1 + (shift - 1) * t)`` (shift 1: linear).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).to(device=device, dtype=torch.float32)


def ode_step(x: Tensor, v: Tensor, sigma: float | Tensor, sigma_next: float | Tensor) -> Transition:
    """Deterministic Euler step: ``x_next = x + dt * v``, ``std = 0``."""
    dt = _as_batch_tensor(sigma_next, x) - _as_batch_tensor(sigma, x)
    mean = (upcast(x) + dt * upcast(v)).to(x.dtype)
    return Transition(mean=mean, std=torch.zeros_like(dt))


def flow_sde_g(sigma: float | Tensor, x: Tensor, eta: float, sigma_stand_in: float | Tensor) -> Tensor:
    """Flow-GRPO's diffusion coefficient ``g = eta * sqrt(sigma / (1 - sigma'))``.

    ``sigma' = sigma`` except at ``sigma = 1``, where ``sigma' = sigma_stand_in`` (the schedule's
    ``sigmas[1]``) keeps ``g`` finite.
    """
    s = _as_batch_tensor(sigma, x)
    s_stand_in = torch.as_tensor(sigma_stand_in, dtype=s.dtype).to(device=x.device, dtype=s.dtype)
    denom_sigma = torch.where(s >= 1.0, s_stand_in, s)
    return eta * torch.sqrt(s / (1 - denom_sigma))


def flow_sde_step(
    x: Tensor,
    v: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    eta: float = 0.7,
    sigma_stand_in: float | Tensor | None = None,
) -> Transition:
    """Flow-SDE step (Flow-GRPO, arXiv 2505.05470, eq. 9): Euler-Maruyama on the reverse SDE.

    ``mean = x * (1 + g^2 dt / (2 sigma)) + v * (1 + g^2 (1 - sigma) / (2 sigma)) * dt``,
    ``std = g * sqrt(-dt)``, with ``g`` from ``flow_sde_g``. ``sigma_stand_in`` (the schedule's
    ``sigmas[1]``) is required when a step starts at ``sigma = 1``.
    """
    s = _as_batch_tensor(sigma, x)
    dt = _as_batch_tensor(sigma_next, x) - s
    if sigma_stand_in is None:
        if bool((s >= 1.0).any()):
            raise ValueError("sigma_stand_in (the schedule's sigmas[1]) is required for a step from sigma = 1")
        sigma_stand_in = 0.0
    g = flow_sde_g(sigma, x, eta, sigma_stand_in)
    g2 = g * g
    mean = upcast(x) * (1 + g2 * dt / (2 * s)) + upcast(v) * (1 + g2 * (1 - s) / (2 * s)) * dt  # eq. 9
    return Transition(mean=mean.to(x.dtype), std=g * torch.sqrt(-dt))


def cps_step(x: Tensor, v: Tensor, sigma: float | Tensor, sigma_next: float | Tensor, eta: float = 0.8) -> Transition:
    """Coefficients-preserving step (CPS, arXiv 2509.05952).

    ``std = sigma_next * sin(eta * pi / 2)``, ``x0_hat = x - sigma * v``, ``x1_hat = x + (1 - sigma) * v``,
    ``mean = (1 - sigma_next) * x0_hat + sqrt(sigma_next^2 - std^2) * x1_hat``.
    """
    s = _as_batch_tensor(sigma, x)
    s_next = _as_batch_tensor(sigma_next, x)
    std = s_next * math.sin(eta * math.pi / 2)
    x0_hat = upcast(x) - s * upcast(v)
    x1_hat = upcast(x) + (1 - s) * upcast(v)
    mean = (1 - s_next) * x0_hat + torch.sqrt(s_next**2 - std**2) * x1_hat
    return Transition(mean=mean.to(x.dtype), std=std)


def dance_sde_step(
    x: Tensor, v: Tensor, sigma: float | Tensor, sigma_next: float | Tensor, eta: float = 0.3
) -> Transition:
    """Dance-SDE step (DanceGRPO, arXiv 2505.07818): Euler-Maruyama with a constant diffusion ``eta``.

    ``x0_hat = x - sigma * v``, ``score = -(x - (1 - sigma) * x0_hat) / sigma^2``,
    ``mean = x + dt * v - eta^2 * score * dt / 2``, ``std = eta * sqrt(-dt)``.
    """
    s = _as_batch_tensor(sigma, x)
    dt = _as_batch_tensor(sigma_next, x) - s
    x0_hat = upcast(x) - s * upcast(v)
    score = -(upcast(x) - (1 - s) * x0_hat) / s**2  # the score of x_sigma given the model's x0 estimate
    mean = upcast(x) + dt * upcast(v) - 0.5 * eta**2 * score * dt
    return Transition(mean=mean.to(x.dtype), std=eta * torch.sqrt(-dt))


def _reduce(t: Tensor, reduce: str) -> Tensor:
    """Mean or sum over all non-batch dimensions."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    dims = tuple(range(1, t.ndim))
    return t.mean(dim=dims) if reduce == "mean" else t.sum(dim=dims)


def _check_std(std: Tensor) -> Tensor:
    std = upcast(std)
    if bool((std <= 0).any()):
        raise ValueError("std must be > 0 on a trained step (a deterministic step has no log-probability)")
    return std


def log_prob(
    x_next: Tensor,
    mean: Tensor,
    std: Tensor,
    reduce: Literal["mean", "sum"] = "mean",
    convention: Literal["gaussian", "cps"] = "gaussian",
) -> Tensor:
    """Log-density of ``x_next`` under ``N(mean, std^2)``, reduced over non-batch dims -> ``(B,)``.

    ``"gaussian"``: ``-(x - mean)^2 / (2 std^2) - log(std) - log(sqrt(2 pi))`` per element.
    ``"cps"``: the published CPS convention ``-(x - mean)^2`` (no variance, no constants); its ratio
    is not a Gaussian likelihood ratio, so never mix the two conventions in one run.
    Computed in (at least) float32 whatever the input dtype.
    """
    diff2 = (upcast(x_next) - upcast(mean)) ** 2
    if convention == "cps":
        return _reduce(-diff2, reduce)
    if convention != "gaussian":
        raise ValueError(f"convention must be one of {LOGPROB_CONVENTIONS}, got {convention!r}")
    std = _check_std(std)
    elementwise = -diff2 / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return _reduce(elementwise.expand_as(diff2), reduce)


def gaussian_kl(
    mean_a: Tensor,
    mean_b: Tensor,
    std: Tensor,
    reduce: Literal["mean", "sum"] = "mean",
    add_kl_coefficient: bool = True,
) -> Tensor:
    """Exact per-step divergence between two transitions that share ``std`` -> ``(B,)``.

    ``D = reduce((mean_a - mean_b)^2) / (2 std^2)`` (Flow-DPPO, per-step KL). ``reduce="sum"`` is the
    full ``KL(N(mean_a, std^2 I) || N(mean_b, std^2 I))``; ``reduce="mean"`` (default) divides it by the
    number of elements, the scale the public thresholds (1e-5) are calibrated for.
    ``add_kl_coefficient=False`` treats ``std`` as 1. Symmetric in ``a``, ``b``; float32 throughout.
    """
    diff2 = (upcast(mean_a) - upcast(mean_b)) ** 2
    if add_kl_coefficient:
        diff2 = diff2 / (2 * _check_std(std) ** 2)
    else:
        diff2 = diff2 / 2
    return _reduce(diff2, reduce)
