"""What the likelihood-free algorithms (DiffusionNFT, AWM) share: forward-noised elements, slow weights.

They need no per-step log-probability, so any sampler (ODE included) can roll out. They train on the
rollout's final samples ``x0``: element ``(t, b)`` is sample ``b`` noised forward to level ``s``,
``x_s = (1 - s) x0 + s eps`` with fresh ``eps``, and the flow-matching target velocity is ``eps - x0``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from flowdppo.algorithms.base import Algorithm, Elements, index_cond
from flowdppo.distributed import Distributed
from flowdppo.policies.lora import trainable_parameters
from flowdppo.rollout import Trajectory, guided_velocity
from flowdppo.sde import per_sample, upcast

TIMESTEP_MODES = ("schedule", "stratified", "uniform")
# the presets roll out with the ODE and measure the path KL in Flow-SDE, as for the SDE arms
LIKELIHOOD_FREE_SAMPLER = {"kind": "ode", "kl_kernel": "flow_sde"}


def stratified_top(num_steps: int, fraction: float) -> int:
    """The first step index ``"stratified"`` never draws: ``int(K * fraction)`` (AWM's ``timestep_fraction``)."""
    return int(num_steps * fraction)


def noise_levels(
    mode: str, sigmas: Tensor, n: int, batch: int, generator: torch.Generator, fraction: float = 1.0
) -> Tensor:
    """Training noise levels ``(n, batch)`` drawn from the rollout schedule ``sigmas[0..K]``.

    ``"schedule"`` (DiffusionNFT): per sample, ``n`` distinct levels of ``sigmas[0..K-1]`` in random order;
    ``"stratified"`` (AWM): the step indices ``1..int(K * fraction) - 1`` cut into ``n`` consecutive, disjoint
    strata, one index drawn in each, per sample; ``"uniform"``: ``s ~ U(sigmas[K-1], sigmas[0])``.
    """
    levels = sigmas[:-1].to(generator.device)
    k = len(levels)
    if mode == "schedule":
        index = torch.rand((batch, k), generator=generator, device=generator.device).argsort(dim=1)[:, :n].T
    elif mode == "stratified":
        top = stratified_top(k, fraction)  # [1, top) in n strata
        edges = torch.linspace(1, top, n + 1, device=generator.device).floor().long()
        lo, width = edges[:-1, None], (edges[1:] - edges[:-1])[:, None]
        u = torch.rand((n, batch), generator=generator, device=generator.device)
        index = lo + (u * width).floor().long()
    elif mode == "uniform":
        u = torch.rand((n, batch), generator=generator, device=generator.device)
        return levels[-1] + u * (levels[0] - levels[-1])
    else:
        raise ValueError(f"timesteps must be one of {', '.join(TIMESTEP_MODES)}; got {mode!r}")
    return levels[index]


def timesteps_error(section: str, mode: str, n: int, num_steps: int, fraction: float = 1.0) -> str | None:
    """Why ``n`` training levels cannot be drawn with ``mode`` from a ``num_steps`` schedule, or None."""
    most = {"schedule": num_steps, "stratified": stratified_top(num_steps, fraction) - 1}.get(mode)
    if most is not None and n > most:
        within = f" at {section}.timestep_fraction {fraction:g}" if mode == "stratified" and fraction < 1 else ""
        return (
            f"{section}.train_timesteps: {mode} draws at most {max(most, 0)} levels from a {num_steps}-step "
            f"schedule{within}, got {n}"
        )
    return None


def decay_error(key: str, decay_max: float) -> str | None:
    """Why the upper bound of a slow copy's decay is outside [0, 1], or None: ``w_slow <- d w_slow + (1 - d) w`` with
    ``d > 1`` moves the copy away from the trained weights, growing without bound."""
    if not 0 <= decay_max <= 1:
        return (
            f"{key}: must be in [0, 1] (the slow copy is d w_slow + (1 - d) w; above 1 it runs away from the "
            f"trained weights), got {decay_max}"
        )
    return None


def noised_elements(
    traj: Trajectory,
    advantages: Tensor,
    mode: str,
    n: int,
    rng: torch.Generator,
    dist: Distributed,
    fraction: float = 1.0,
) -> Elements:
    """``n`` forward-noised copies of each final sample: element ``e = t * B + b`` holds ``x0`` (sample
    ``b``), ``eps``, ``sigma = s`` and ``noised = (1 - s) x0 + s eps``. The levels (``noise_levels``) and the
    noise are drawn for the global batch from ``rng`` (alike on every process) and sliced to this process's rows."""
    x0 = traj.final
    b = x0.shape[0]
    rows = slice(dist.rank * b, (dist.rank + 1) * b)
    sigma = noise_levels(mode, traj.sigmas, n, b * dist.world_size, rng, fraction)[:, rows].to(x0.device)
    eps = torch.randn((n, b * dist.world_size, *x0.shape[1:]), generator=rng, device=rng.device)[:, rows]
    eps = eps.to(device=x0.device, dtype=x0.dtype).flatten(0, 1)
    sample = torch.arange(b, device=x0.device).repeat(n)
    s = per_sample(sigma.flatten(), x0)
    x0_rep = x0[sample]
    data = {
        "x0": x0_rep,
        "eps": eps,
        "sigma": sigma.flatten(),
        "noised": (1 - s) * x0_rep + s * eps,
        "advantages": advantages[sample],
        "sample": sample,
    }
    return Elements(data, n, b)


@torch.no_grad()
def velocities(policy: nn.Module, elements: Elements, cond, cfg) -> Tensor:
    """The policy's velocity at every element, without gradients, ``rollout_batch_size`` at a time."""
    velocity = guided_velocity(policy, cfg.sampler)
    return velocity(elements.data["noised"], elements.data["sigma"], index_cond(cond, elements.data["sample"]))


def mean_squared(a: Tensor, b: Tensor) -> Tensor:
    """``mean((a - b)^2)`` over the non-batch dimensions, float32 or wider -> ``(E,)``."""
    return (upcast(a) - upcast(b)).pow(2).flatten(1).mean(dim=1)


def velocity_kl(v: Tensor, base_velocity, mb: dict[str, Tensor], cond: Any) -> Tensor:
    """``mean((v - v_ref)^2)`` to the frozen base on the same noised samples (the likelihood-free KL penalty)."""
    with torch.no_grad():
        v_ref = base_velocity(mb["noised"], mb["sigma"], cond)
    return mean_squared(v, v_ref).mean()


class SlowWeights:
    """A slowly-updated copy of the trained weights (the "old" policy of DiffusionNFT, AWM's EMA policy).

    ``update``: ``w_slow <- d * w_slow + (1 - d) * w`` with ``d = min(decay_rate * steps, decay_max)``,
    ``steps`` the optimizer steps so far (``d = 0`` copies the current weights).
    """

    def __init__(self, policy: nn.Module, decay_rate: float, decay_max: float) -> None:
        self.decay_rate, self.decay_max = decay_rate, decay_max
        self.weights = [p.detach().clone() for p in trainable_parameters(policy)]

    def decay(self, steps: int) -> float:
        return min(self.decay_rate * steps, self.decay_max)

    @torch.no_grad()
    def update(self, policy: nn.Module, steps: int) -> None:
        d = self.decay(steps)
        for slow, p in zip(self.weights, trainable_parameters(policy), strict=True):
            slow.mul_(d).add_(p.detach(), alpha=1 - d)

    def equals(self, policy: nn.Module) -> bool:
        return all(torch.equal(s, p) for s, p in zip(self.weights, trainable_parameters(policy), strict=True))

    @contextmanager
    def swapped_in(self, policy: nn.Module) -> Iterator[None]:
        """Inside the block the policy runs the slow weights; its own come back after."""
        params = trainable_parameters(policy)
        current = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, slow in zip(params, self.weights, strict=True):
                p.copy_(slow)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, own in zip(params, current, strict=True):
                    p.copy_(own)

    def state_dict(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}.{i}": w.detach().cpu().contiguous() for i, w in enumerate(self.weights)}

    def load_state_dict(self, state: dict[str, Tensor], prefix: str) -> None:
        for i, w in enumerate(self.weights):
            w.copy_(state[f"{prefix}.{i}"])


class LikelihoodFree(Algorithm):
    """Base of DiffusionNFT and AWM: any sampler rolls out, and a slowly-updated copy of the weights
    (``self.slow``, updated after each rollout's update and checkpointed) plays the role each gives it."""

    supports_fsdp = False  # the slow copy is not sharded

    def slow_decay(self) -> tuple[float, float]:
        """``(decay_rate, decay_max)`` of the slow copy."""
        raise NotImplementedError

    def setup(self, policy: nn.Module) -> None:
        self.slow = SlowWeights(policy, *self.slow_decay())

    def after_update(self, policy: nn.Module) -> None:
        self.slow.update(policy, self.optimizer_steps)

    def state_dict(self) -> dict[str, Tensor]:
        return {**self.slow.state_dict("slow"), "optimizer_steps": torch.tensor(self.optimizer_steps)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.slow.load_state_dict(state, "slow")
        self.optimizer_steps = int(state["optimizer_steps"])
