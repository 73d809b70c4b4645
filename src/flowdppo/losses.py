"""Policy losses of Flow-DPPO and its ratio-clipping baselines, as pure tensor functions.

Each loss takes a ``StepBatch`` of trained elements (one element = one sample at one trained step)
and returns ``(per_element_loss, metrics)``. The trainer averages the per-element loss over all
elements, masked zeros included. Add a loss: one function here and one line in ``LOSSES``; its keyword
arguments are filled from the ``loss`` config fields of the same names.

Notation (per element): ``logp`` the log-density of the stored next latent, ``rho = exp(logp_new -
logp_old)``, ``A`` the (detached) advantage, ``mu`` the transition mean, ``s`` the transition std,
``D = mean((mu_new - mu_old)^2) / (2 s^2)`` the exact per-step KL (``flowdppo.sde.gaussian_kl``).

All the losses share one form: ``-A * rho`` on the elements a trust test keeps, a constant with zero
gradient on the others. The test is the PPO ratio clip for the baselines and the asymmetric
divergence mask for Flow-DPPO. Built with ``torch.where`` on a ratio that is 1 where the element is
dropped, so an overflowing ratio cannot turn ``inf * 0`` into NaN.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flowdppo.sde import gaussian_kl, per_sample, upcast


@dataclass
class StepBatch:
    """The trained elements of one mini-batch; ``E`` elements, latent shape ``(...)``.

    logp_new:   (E,) log-density of ``x_next`` under the current policy (carries the gradient).
    logp_old:   (E,) the same under the frozen rollout policy (the anchor).
    advantages: (E,) one scalar per trajectory, detached.
    mean_new:   (E, ...) transition mean of the current policy (carries the gradient).
    mean_old:   (E, ...) transition mean of the rollout policy.
    std:        (E,) transition std of the step (shared by old and new policy).
    dt:         (E,) ``sigma_next - sigma`` of the step (negative).
    step_index: (E,) long, index of the step in the schedule (for per-step metrics).
    """

    logp_new: Tensor
    logp_old: Tensor
    advantages: Tensor
    mean_new: Tensor
    mean_old: Tensor
    std: Tensor
    dt: Tensor
    step_index: Tensor

    def __post_init__(self) -> None:
        n = self.logp_new.shape[0]
        for name in ("logp_new", "logp_old", "advantages", "std", "dt", "step_index"):
            t = getattr(self, name)
            if t.shape != (n,):
                raise ValueError(f"StepBatch.{name} must have shape ({n},) like logp_new, got {tuple(t.shape)}")
        for name in ("mean_new", "mean_old"):
            t = getattr(self, name)
            if t.ndim < 2 or t.shape[0] != n:
                raise ValueError(f"StepBatch.{name} must have shape ({n}, ...), got {tuple(t.shape)}")
        if self.mean_new.shape != self.mean_old.shape:
            raise ValueError(
                f"StepBatch.mean_new {tuple(self.mean_new.shape)} and mean_old "
                f"{tuple(self.mean_old.shape)} must have the same shape"
            )
        if bool((self.std <= 0).any()):
            raise ValueError("StepBatch.std must be > 0 on every trained step (an ODE step cannot be trained)")

    def divergence(self, reduce: str = "mean", add_kl_coefficient: bool = True) -> Tensor:
        """Exact per-step KL ``D`` between current and rollout policy, float32, (E,)."""
        std = per_sample(upcast(self.std), self.mean_new)
        return gaussian_kl(self.mean_new, self.mean_old.detach(), std, reduce, add_kl_coefficient)


def masked_policy_gradient(log_ratio: Tensor, advantages: Tensor, keep: Tensor, dropped_value: Tensor) -> Tensor:
    """``-A * exp(log_ratio)`` where ``keep``, ``dropped_value`` (no gradient) elsewhere."""
    safe_log_ratio = torch.where(keep, log_ratio, torch.zeros_like(log_ratio))
    return torch.where(keep, -advantages * torch.exp(safe_log_ratio), dropped_value.detach())


def ppo_clipped(log_ratio: Tensor, advantages: Tensor, clip_range: float) -> Tensor:
    """The PPO clip's drop test, ``True`` where ``(A > 0 and rho > 1 + eps) or (A < 0 and rho < 1 - eps)``."""
    rho = torch.exp(log_ratio.detach())
    return ((advantages > 0) & (rho > 1 + clip_range)) | ((advantages < 0) & (rho < 1 - clip_range))


def ppo_clip(log_ratio: Tensor, advantages: Tensor, clip_range: float) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate ``max(-A rho, -A clip(rho, 1 - eps, 1 + eps))`` and its clip indicator.

    The max picks the clipped (constant) branch exactly when ``A > 0, rho > 1 + eps`` or
    ``A < 0, rho < 1 - eps``; everywhere else it is ``-A rho``.
    """
    rho = torch.exp(log_ratio.detach())
    clipped = ppo_clipped(log_ratio, advantages, clip_range)
    dropped_value = -advantages * torch.clamp(rho, 1 - clip_range, 1 + clip_range)
    return masked_policy_gradient(log_ratio, advantages, ~clipped, dropped_value), clipped


def _metrics(
    log_ratio: Tensor, divergence: Tensor, advantages: Tensor, dropped: Tensor, step_index: Tensor
) -> dict[str, Tensor]:
    """Diagnostics every loss returns, detached 0-d tensors.

    ``masked_fraction`` is the fraction of elements whose gradient the trust test drops: Flow-DPPO's
    divergence mask, or the PPO ratio clip of the baselines (their "clip fraction").
    """
    log_ratio, divergence, dropped = log_ratio.detach(), divergence.detach(), dropped.float()
    rho = torch.exp(log_ratio)
    pos, neg = advantages > 0, advantages < 0
    metrics = {
        "ratio_mean": rho.mean(),
        "ratio_min": rho.min(),
        "ratio_max": rho.max(),
        "log_ratio_mean": log_ratio.mean(),
        "kl_mean": divergence.mean(),
        "kl_max": divergence.max(),
        "masked_fraction": dropped.mean(),
        "masked_fraction_pos_adv": dropped[pos].mean() if pos.any() else dropped.new_zeros(()),
        "masked_fraction_neg_adv": dropped[neg].mean() if neg.any() else dropped.new_zeros(()),
    }
    for step in torch.unique(step_index).tolist():
        at_step = step_index == step
        metrics[f"kl_mean/step_{step}"] = divergence[at_step].mean()
        metrics[f"masked_fraction/step_{step}"] = dropped[at_step].mean()
    return metrics


def flow_grpo_loss(
    batch: StepBatch,
    clip_range: float = 1e-4,
    adv_clip_max: float = 5.0,
    kl_reduce: str = "mean",
    add_kl_coefficient: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Flow-GRPO (arXiv 2505.05470): PPO ratio clipping, advantage clamped to ``+-adv_clip_max``.

    ``loss = max(-A rho, -A clip(rho, 1 - eps, 1 + eps))``, ``A = clamp(A, -adv_clip_max, adv_clip_max)``.
    Also the Flow-CPS loss: the same clip on a ratio built from CPS's log-prob convention.
    """
    _check_positive(clip_range=clip_range, adv_clip_max=adv_clip_max)
    advantages = torch.clamp(batch.advantages.detach(), -adv_clip_max, adv_clip_max)
    log_ratio = batch.logp_new - batch.logp_old.detach()
    loss, clipped = ppo_clip(log_ratio, advantages, clip_range)
    divergence = batch.divergence(kl_reduce, add_kl_coefficient)
    return loss, _metrics(log_ratio, divergence, advantages, clipped, batch.step_index)


def grpo_guard_loss(
    batch: StepBatch,
    clip_range: float = 2e-6,
    adv_clip_max: float = 5.0,
    kl_reduce: str = "mean",
    add_kl_coefficient: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO-Guard (arXiv 2510.22319): PPO clip on a ratio renormalised to remove its KL bias.

    ``log rho_g = s * (logp_new - logp_old) + mean((mu_new - mu_old)^2) / (2 s)``, per sample ``s = std``;
    for ``x_next = mu_old + s * eps`` this is ``mean(eps * (mu_new - mu_old))``, zero-mean over ``eps``.
    Then the PPO clip; the per-element loss is divided by ``|dt|``.
    """
    _check_positive(clip_range=clip_range, adv_clip_max=adv_clip_max)
    advantages = torch.clamp(batch.advantages.detach(), -adv_clip_max, adv_clip_max)
    s = upcast(batch.std)  # (E,), shaped like the log-prob: one scale per sample
    mean_sq_drift = ((upcast(batch.mean_new) - upcast(batch.mean_old.detach())) ** 2).flatten(1).mean(dim=1)
    log_ratio = s * (batch.logp_new - batch.logp_old.detach()) + mean_sq_drift / (2 * s)
    loss, clipped = ppo_clip(log_ratio, advantages, clip_range)
    loss = loss / batch.dt.abs()
    divergence = batch.divergence(kl_reduce, add_kl_coefficient)
    return loss, _metrics(log_ratio, divergence, advantages, clipped, batch.step_index)


def dppo_mask(advantages: Tensor, ratio: Tensor, divergence: Tensor, kl_mask_threshold: float) -> Tensor:
    """Flow-DPPO's asymmetric divergence mask, ``True`` where the element is dropped.

    ``M = 0`` iff ``D >= tau`` and the update still pushes away from the rollout policy in the
    advantage's direction: ``(A > 0 and rho > 1) or (A < 0 and rho < 1)``. Corrective updates pass.
    """
    moving_away = ((advantages > 0) & (ratio > 1)) | ((advantages < 0) & (ratio < 1))
    return (divergence >= kl_mask_threshold) & moving_away


def flow_dppo_loss(
    batch: StepBatch, kl_mask_threshold: float = 1e-5, kl_reduce: str = "mean", add_kl_coefficient: bool = True
) -> tuple[Tensor, dict[str, Tensor]]:
    """Flow-DPPO (arXiv 2606.11025): ``loss = -A * rho * M``, ``M`` from ``dppo_mask`` (detached).

    No ratio clipping, no advantage clamp; ``D`` is the exact per-step KL (mean-reduced by default).
    """
    _check_positive(kl_mask_threshold=kl_mask_threshold)
    advantages = batch.advantages.detach()
    log_ratio = batch.logp_new - batch.logp_old.detach()
    divergence = batch.divergence(kl_reduce, add_kl_coefficient)
    masked = dppo_mask(advantages, torch.exp(log_ratio.detach()), divergence.detach(), kl_mask_threshold)
    loss = masked_policy_gradient(log_ratio, advantages, ~masked, torch.zeros_like(log_ratio))
    return loss, _metrics(log_ratio, divergence, advantages, masked, batch.step_index)


def unconstrained_loss(
    batch: StepBatch, kl_reduce: str = "mean", add_kl_coefficient: bool = True
) -> tuple[Tensor, dict[str, Tensor]]:
    """The control with no trust test: ``loss = -A * rho`` on every element, no clip, no advantage clamp.

    Flow-DPPO with ``tau = inf``: where it reaches the same reward-vs-KL frontier as the trust-region methods,
    the trust test is not what limits them (the regime where it matters is not reached).
    """
    advantages = batch.advantages.detach()
    log_ratio = batch.logp_new - batch.logp_old.detach()
    divergence = batch.divergence(kl_reduce, add_kl_coefficient)
    kept = torch.ones_like(log_ratio, dtype=torch.bool)
    loss = masked_policy_gradient(log_ratio, advantages, kept, torch.zeros_like(log_ratio))
    return loss, _metrics(log_ratio, divergence, advantages, ~kept, batch.step_index)


MECHANISM_QUANTILES = (0.5, 0.9, 0.99)


def scaled_divergence_quantiles(
    scaled_divergence: Tensor, quantiles: tuple[float, ...] = MECHANISM_QUANTILES
) -> dict[str, Tensor]:
    """Quantiles of ``dim * D`` over a set of elements -> ``{"dim_kl_p50": q, "dim_kl_p90": ..., ...}``.

    ``scaled_divergence`` (E,) holds ``dim * D`` per element, ``D`` the mean-reduced per-step KL
    (``StepBatch.divergence("mean")``) and ``dim`` the latent elements per sample, i.e. the full
    (sum-reduced) KL of the step. With mean-reduced log-probs ``log rho = n - D``, ``n ~ N(0, 2 D / dim)``,
    so ``dim * D`` sets the ratio's signal-to-noise: the paper's regime needs it well above 0.
    Quantiles interpolate linearly between order statistics (``numpy.quantile``'s default), in float64.
    """
    values = scaled_divergence.detach().double().flatten()
    if values.numel() == 0:
        raise ValueError("scaled_divergence_quantiles: no elements")
    qs = torch.quantile(values, torch.tensor(quantiles, dtype=torch.float64, device=values.device))
    return {f"dim_kl_p{round(100 * q)}": value for q, value in zip(quantiles, qs, strict=True)}


def log_ratio_moments(log_ratio: Tensor, prefix: str = "first_moved_log_ratio") -> dict[str, Tensor]:
    """Mean and (population, ``ddof = 0``) standard deviation of ``log rho`` over a set of elements.

    -> ``{f"{prefix}_mean": m, f"{prefix}_std": s}``, float64. Fed with the plain ratio
    ``logp_new - logp_old`` of the first mini-batch replayed after an update's first optimizer step (the
    first one the policy has moved for), it shows the single-sample ratio's bias (``E[log rho] = -D``) and
    noise.
    """
    values = log_ratio.detach().double().flatten()
    if values.numel() == 0:
        raise ValueError("log_ratio_moments: no elements")
    return {f"{prefix}_mean": values.mean(), f"{prefix}_std": values.std(correction=0)}


def reference_kl(mean_new: Tensor, mean_ref: Tensor, std: Tensor, kl_reduce: str = "mean") -> Tensor:
    """``mean((mu_new - mu_ref)^2) / (2 s^2)`` per element, ``mu_ref`` from the frozen base (the penalty is
    ``loss.beta`` times its mean). (E,)"""
    return gaussian_kl(mean_new, mean_ref.detach(), per_sample(upcast(std), mean_new), kl_reduce)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


LossFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class Loss:
    """A registered loss: the function, and what it needs of the sampler.

    Its hyper-parameters are its keyword arguments, filled from the ``loss`` config fields of the same
    names (``loss_kwargs``). samplers: the sampler kinds it is defined for (empty: any stochastic one);
    logprob_conventions: the log-prob conventions its ratio may be built from.
    """

    fn: LossFn
    samplers: tuple[str, ...] = ()
    logprob_conventions: tuple[str, ...] = ("gaussian", "cps")


LOSSES: dict[str, Loss] = {
    "flow_grpo": Loss(flow_grpo_loss),
    "flow_cps": Loss(flow_grpo_loss, samplers=("cps",), logprob_conventions=("cps",)),  # same clip, CPS's ratio
    "grpo_guard": Loss(grpo_guard_loss, samplers=("flow_sde",), logprob_conventions=("gaussian",)),  # Flow-SDE's
    "flow_dppo": Loss(flow_dppo_loss),
    "unconstrained": Loss(unconstrained_loss),
}


def get_loss(loss_mode: str) -> Loss:
    """The loss registered as ``loss_mode``."""
    if loss_mode not in LOSSES:
        raise ValueError(f"loss_mode must be one of {sorted(LOSSES)}, got {loss_mode!r}")
    return LOSSES[loss_mode]


def loss_kwargs(fn: LossFn, loss_cfg: Any) -> dict[str, Any]:
    """The hyper-parameters ``fn`` takes (its keyword arguments), read from the same-named config fields."""
    names = [name for name in inspect.signature(fn).parameters if name != "batch"]
    missing = [name for name in names if not hasattr(loss_cfg, name)]
    if missing:
        raise TypeError(f"{fn.__name__} takes {missing}, which the loss config does not have: add the field(s)")
    return {name: getattr(loss_cfg, name) for name in names}


__all__ = [
    "LOSSES",
    "Loss",
    "loss_kwargs",
    "masked_policy_gradient",
    "ppo_clip",
    "ppo_clipped",
    "StepBatch",
    "dppo_mask",
    "flow_dppo_loss",
    "flow_grpo_loss",
    "get_loss",
    "grpo_guard_loss",
    "log_ratio_moments",
    "reference_kl",
    "scaled_divergence_quantiles",
    "unconstrained_loss",
]
