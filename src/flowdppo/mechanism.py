"""The per-update mechanism test: on every element replayed after an update's first optimizer step (a *moved*
element: the policy differs from the rollout's), what Flow-DPPO's mask and Flow-GRPO's clip would each drop, and
how often the ratio's sign disagrees with the true mean shift, whatever the run's own loss.

Per element (notation of ``flowdppo.losses``; ``delta = mu_new - mu_old``, ``x`` the stored next latent):

- DPPO drops: ``losses.dppo_mask`` at ``tau = loss.kl_mask_threshold``: ``D >= tau`` and ``(A > 0, rho > 1)`` or
  ``(A < 0, rho < 1)``, ``D`` the per-step KL with the run's ``loss.kl_reduce`` / ``loss.add_kl_coefficient``;
- GRPO drops: ``losses.ppo_clipped`` at ``eps = loss.clip_range``: ``(A > 0, rho > 1 + eps)`` or
  ``(A < 0, rho < 1 - eps)``, on the plain ratio ``rho = exp(logp_new - logp_old)``;
- the true mean shift ``mean_shift``: ``mean(((x - mu_old) / s) * delta)``, the change of the mean along the sampled
  noise direction (GRPO-Guard's log-ratio); it disagrees when ``sign(log rho) != sign(shift)``. With mean-reduced
  Gaussian log-probs ``log rho = shift / s - D``: if the shift were noise alone the rate would be
  ``Phi(sqrt(dim * D / 2)) - 1/2`` (``null_disagreement``).

Counts: a 2x2 table (DPPO drops no/yes x GRPO drops no/yes) for each sign of ``A`` (``SIGNS``), and elements /
disagreements in bins of ``dim * D`` (mean-reduced ``D`` times the latent elements per sample: the step's full KL)
with the fixed edges ``DIM_KL_EDGES`` (half-decades, 1e-4 to 10; bin 0 below the first edge, the last one from the
last edge up). Elements with a non-finite ratio, ``D`` or shift are counted apart (``nonfinite``). Each update's
counts are summed over processes and stored per epoch in the run's ``mechanism.json`` (``with_epoch``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from flowdppo.losses import StepBatch, dppo_mask, ppo_clipped

FILE = "mechanism.json"
SIGNS = ("pos", "neg", "zero")  # A > 0, A < 0, A == 0
DIM_KL_EDGES = tuple(10 ** (k / 2) for k in range(-8, 3))  # 1e-4, 10^-3.5, ..., 10
BINS = len(DIM_KL_EDGES) + 1
TABLE = len(SIGNS) * 4  # (sign, DPPO drops, GRPO drops), flat
SIZE = TABLE + 2 * BINS + 1  # the table, elements and disagreements per bin, the non-finite count


def mean_shift(x_next: Tensor, mean_old: Tensor, mean_new: Tensor, std: Tensor) -> Tensor:
    """``mean(((x_next - mean_old) / std) * (mean_new - mean_old))`` per element, float32, (E,): the change of the
    per-step Gaussian mean along the sampled noise direction (> 0: the new mean moved towards the sample)."""
    noise = (x_next.float() - mean_old.float()) / std.float().view(-1, *[1] * (x_next.ndim - 1))
    return (noise * (mean_new.float() - mean_old.float())).flatten(1).mean(dim=1)


def sign_disagrees(log_ratio: Tensor, shift: Tensor) -> Tensor:
    """``True`` where ``sign(log rho) != sign(shift)`` (a zero is a sign of its own)."""
    return torch.sign(log_ratio) != torch.sign(shift)


def counts(
    advantages: Tensor,
    log_ratio: Tensor,
    divergence: Tensor,
    shift: Tensor,
    dim_kl: Tensor,
    tau: float,
    clip_range: float,
) -> Tensor:
    """The mechanism counts of a set of elements (all (E,)), an int64 vector of ``SIZE`` (see the module doc):
    the sum of the counts of any split of the elements is the counts of all of them."""
    advantages, log_ratio, divergence, shift, dim_kl = (
        t.detach().double().flatten() for t in (advantages, log_ratio, divergence, shift, dim_kl)
    )
    finite = torch.isfinite(log_ratio) & torch.isfinite(divergence) & torch.isfinite(shift) & torch.isfinite(dim_kl)
    a, lr, d, sh, dk = (t[finite] for t in (advantages, log_ratio, divergence, shift, dim_kl))
    sign = torch.where(a > 0, 0, torch.where(a < 0, 1, 2))
    dppo = dppo_mask(a, torch.exp(lr), d, tau).long()
    grpo = ppo_clipped(lr, a, clip_range).long()
    table = torch.bincount(sign * 4 + dppo * 2 + grpo, minlength=TABLE)
    edges = torch.tensor(DIM_KL_EDGES, dtype=torch.float64, device=dk.device)
    where = torch.bucketize(dk, edges, right=True)  # bin i: [edges[i - 1], edges[i])
    elements = torch.bincount(where, minlength=BINS)
    disagree = torch.bincount(where[sign_disagrees(lr, sh)], minlength=BINS)
    return torch.cat([table, elements, disagree, (~finite).sum().view(1)])


def batch_counts(batch: StepBatch, x_next: Tensor, loss_cfg) -> Tensor:
    """``counts`` of a mini-batch's elements, at the run's ``loss.kl_mask_threshold`` / ``loss.clip_range``, ``D``
    with its ``loss.kl_reduce`` / ``loss.add_kl_coefficient``; ``x_next`` the stored next latents."""
    with torch.no_grad():
        dim = batch.mean_new[0].numel()
        return counts(
            batch.advantages,
            batch.logp_new - batch.logp_old,
            batch.divergence(loss_cfg.kl_reduce, loss_cfg.add_kl_coefficient),
            mean_shift(x_next, batch.mean_old, batch.mean_new, batch.std),
            dim * batch.divergence("mean"),
            loss_cfg.kl_mask_threshold,
            loss_cfg.clip_range,
        )


def summary(vector: Tensor | list[int], tau: float, clip_range: float) -> dict:
    """``counts`` as the JSON record of one update: ``table[sign][dppo][grpo]`` (0: kept, 1: dropped),
    ``bins`` with ``elements`` / ``disagree`` per ``dim * D`` bin, ``elements`` (finite) and ``nonfinite``."""
    v = [int(x) for x in (vector.tolist() if isinstance(vector, Tensor) else vector)]
    table = {s: [v[4 * k : 4 * k + 2], v[4 * k + 2 : 4 * k + 4]] for k, s in enumerate(SIGNS)}
    return {
        "tau": tau,
        "clip_range": clip_range,
        "elements": sum(v[:TABLE]),
        "nonfinite": v[-1],
        "table": table,
        "bins": {"elements": v[TABLE : TABLE + BINS], "disagree": v[TABLE + BINS : TABLE + 2 * BINS]},
    }


def as_vector(record: dict) -> list[int]:
    """The inverse of ``summary``: the count vector of a record."""
    table = [n for s in SIGNS for row in record["table"][s] for n in row]
    return [*table, *record["bins"]["elements"], *record["bins"]["disagree"], record["nonfinite"]]


def with_epoch(path: Path, epoch: int, record: dict) -> dict:
    """The content of ``mechanism.json`` once ``epoch``'s update ``record`` is in: ``epochs`` by epoch (a resumed
    run's epochs from this one on are replaced) and ``total``, their sum (``tau`` / ``clip_range`` of the last)."""
    old = json.loads(path.read_text()).get("epochs", {}) if path.is_file() else {}
    epochs = {e: r for e, r in old.items() if int(e) < epoch} | {str(epoch): record}
    total = [sum(col) for col in zip(*(as_vector(r) for r in epochs.values()), strict=True)]
    return {
        "dim_kl_edges": list(DIM_KL_EDGES),
        "total": summary(total, record["tau"], record["clip_range"]),
        "epochs": epochs,
    }


def null_disagreement(dim_kl: float) -> float:
    """``Phi(sqrt(dim * D / 2)) - 1/2``: the disagreement rate if the mean shift were noise alone (mean-reduced
    Gaussian log-probs, where ``log rho = shift / s - D`` and ``shift / s ~ N(0, 2 D / dim)``)."""
    return 0.5 * math.erf(math.sqrt(dim_kl / 2) / math.sqrt(2))
