"""Group-relative advantages and multi-reward aggregation, as pure tensor functions.

A group is all samples of one prompt. Standard deviations are population ones (``unbiased=False``,
as ``numpy.std``): a group of one sample then has std 0 and advantage 0 rather than NaN.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

STD_SCOPES = ("batch", "group")
AGGREGATIONS = ("sum", "gdpo")


def _group_stats(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per-element deviation from the group mean and population std of the element's group. (N,) each.

    A group whose values are all equal has deviations and std of exactly 0 (a float mean of equal values
    can miss them by a rounding error, which dividing by ``std + eps`` would magnify).
    """
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    counts = counts.to(values.dtype)
    sums = torch.zeros_like(counts).index_add_(0, inverse, values)
    lowest = torch.full_like(counts, math.inf).scatter_reduce(0, inverse, values, "amin")
    highest = torch.full_like(counts, -math.inf).scatter_reduce(0, inverse, values, "amax")
    constant = (lowest == highest)[inverse]
    centred = torch.where(constant, torch.zeros_like(values), values - (sums / counts)[inverse])
    variances = torch.zeros_like(counts).index_add_(0, inverse, centred**2) / counts
    return centred, variances.sqrt()[inverse]


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    std_scope: Literal["batch", "group"] = "batch",
    eps: float = 1e-4,
) -> Tensor:
    """``A = (r - mean_group(r)) / (std + eps)``, std over the whole batch (default) or the group. (N,)

    A constant or one-sample group gets ``A = 0`` for any ``eps``, 0 included (not ``0 / 0``)."""
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both have shape (N,), got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    if std_scope not in STD_SCOPES:
        raise ValueError(f"std_scope must be one of {STD_SCOPES}, got {std_scope!r}")
    rewards = rewards.float()
    centred, group_std = _group_stats(rewards, group_ids)
    std = group_std if std_scope == "group" else rewards.std(unbiased=False)
    return torch.where(centred == 0, torch.zeros_like(centred), centred / (std + eps))


def aggregate_rewards(
    rewards: Tensor,
    group_ids: Tensor,
    weights: Tensor | None = None,
    method: Literal["sum", "gdpo"] = "sum",
    std_scope: Literal["batch", "group"] = "batch",
    eps: float = 1e-4,
) -> Tensor:
    """Advantages from several rewards ``rewards`` (N, K) with weights (K,) (default all 1).

    ``"sum"``: ``group_advantages(sum_k w_k r_k)``.
    ``"gdpo"``: normalise each reward within its group, ``a_k = (r_k - mean_g) / (std_g + eps)``, sum
    ``s = sum_k w_k a_k``, then normalise over the batch, ``(s - mean(s)) / (std(s) + eps)``.
    """
    if rewards.ndim != 2 or rewards.shape[0] != group_ids.shape[0]:
        raise ValueError(f"rewards must have shape (N, K) with N = len(group_ids), got {tuple(rewards.shape)}")
    rewards = rewards.float()
    k = rewards.shape[1]
    weights = torch.ones(k) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if weights.shape != (k,):
        raise ValueError(f"weights must have shape ({k},), one per reward, got {tuple(weights.shape)}")
    weights = weights.to(rewards.device)
    if method == "sum":
        return group_advantages(rewards @ weights, group_ids, std_scope, eps)
    if method == "gdpo":
        per_reward = torch.stack([group_advantages(rewards[:, j], group_ids, "group", eps) for j in range(k)], dim=1)
        summed = per_reward @ weights
        return (summed - summed.mean()) / (summed.std(unbiased=False) + eps)
    raise ValueError(f"method must be one of {AGGREGATIONS}, got {method!r}")
