"""Samplers: a registry of transition kernels and of which steps of a schedule they make stochastic.

A ``Sampler`` owns its kernel (a pure function of ``flowdppo.sde``), the range of its noise level
``eta``, and which of its steps have a positive std (only those can be trained or measured). The
schedule ``sigmas[0..K]`` comes from the task (the model's own); ``trained_steps`` picks the steps of
an epoch that are stochastic and trained, the same on every process.

Add a sampler: one kernel in ``sde.py`` and one entry in ``SAMPLERS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from flowdppo.sde import Transition, cps_step, dance_sde_step, flow_sde_step, ode_step

if TYPE_CHECKING:
    from flowdppo.config import SamplerConfig


class Kernel(Protocol):
    def __call__(self, x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, eta: float,
                 sigma_max: Tensor) -> Transition: ...  # fmt: skip


def _flow_sde(x, v, sigma, sigma_next, eta, sigma_max):
    return flow_sde_step(x, v, sigma, sigma_next, eta=eta, sigma_max=sigma_max)


def _cps(x, v, sigma, sigma_next, eta, sigma_max):
    return cps_step(x, v, sigma, sigma_next, eta=eta)


def _dance_sde(x, v, sigma, sigma_next, eta, sigma_max):
    return dance_sde_step(x, v, sigma, sigma_next, eta=eta)


def _ode(x, v, sigma, sigma_next, eta, sigma_max):
    return ode_step(x, v, sigma, sigma_next)


@dataclass(frozen=True)
class Sampler:
    """A kernel and what the rest of the library needs to know about it.

    eta_range:           ``(lo, hi]``, the noise levels the kernel is defined for (``lo`` excluded).
    default_eta:         the public recipes' value.
    noiseless_last_step: the last step has std 0 (CPS: ``std = sigma_next sin(eta pi / 2)`` and
                         ``sigma_K = 0``), so it can be neither trained nor measured.
    logprob_conventions: the log-prob conventions it supports (``"cps"``: the published CPS one).
    """

    name: str
    kernel: Kernel
    eta_range: tuple[float, float]
    default_eta: float
    stochastic: bool = True
    noiseless_last_step: bool = False
    logprob_conventions: tuple[str, ...] = ("gaussian",)

    def step(self, x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, eta: float,
             sigma_max: Tensor) -> Transition:  # fmt: skip
        """One transition from ``sigma`` to ``sigma_next`` (``sigma_max``: the schedule's ``sigmas[1]``)."""
        return self.kernel(x, v, sigma, sigma_next, eta, sigma_max)

    def stochastic_steps(self, num_steps: int) -> list[int]:
        """Indices of the steps with a positive std in a ``num_steps`` schedule."""
        if not self.stochastic:
            return []
        return list(range(num_steps - 1 if self.noiseless_last_step else num_steps))


SAMPLERS: dict[str, Sampler] = {
    "flow_sde": Sampler("flow_sde", _flow_sde, (0.0, 2.0), 0.7),
    "cps": Sampler("cps", _cps, (0.0, 1.0), 0.8, noiseless_last_step=True, logprob_conventions=("gaussian", "cps")),
    "dance_sde": Sampler("dance_sde", _dance_sde, (0.0, 2.0), 0.3),
    "ode": Sampler("ode", _ode, (-1.0, float("inf")), 0.0, stochastic=False),
}

WINDOW_MODES = ("window", "random", "progressive", "all")


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {name!r}")
    return SAMPLERS[name]


def measure_sampler(cfg: SamplerConfig) -> tuple[Sampler, float]:
    """The kernel and ``eta`` the path KL to the base is measured in: the rollout's own
    (``kl_kernel="rollout"``) or a named stochastic one at its default ``eta``."""
    if cfg.kl_kernel == "rollout":
        return get_sampler(cfg.kind), cfg.eta
    sampler = get_sampler(cfg.kl_kernel)
    return sampler, sampler.default_eta


def trained_steps(cfg: SamplerConfig, seed: int, epoch: int) -> list[int]:
    """Indices of the stochastic, trained steps of ``epoch``; the same on every process and on resume.

    ``"window"``: ``W`` consecutive steps from a start drawn in ``[lo, hi)``; ``"random"``: ``k`` steps
    drawn without replacement from ``[lo, hi)``; ``"progressive"`` (MixGRPO): ``W`` consecutive steps
    starting at ``lo + epoch // window_shift_every``, held at ``hi - 1`` once it gets there;
    ``"all"``: every step with a positive std. An ODE sampler has none.
    """
    sampler = get_sampler(cfg.kind)
    if cfg.window_mode == "all" or not sampler.stochastic:
        return sampler.stochastic_steps(cfg.num_steps)
    lo, hi = cfg.window_range
    if cfg.window_mode == "progressive":
        start = min(lo + epoch // cfg.window_shift_every, hi - 1)
        return list(range(start, start + cfg.window_size))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if cfg.window_mode == "window":
        start = int(torch.randint(lo, hi, (1,), generator=gen))
        return list(range(start, start + cfg.window_size))
    perm = torch.randperm(hi - lo, generator=gen)[: cfg.window_size]
    return sorted((lo + perm).tolist())


def window_error(cfg: SamplerConfig) -> str | None:
    """Why the window settings do not fit the schedule, or None."""
    lo, hi = (list(cfg.window_range) + [None, None])[:2]
    if len(cfg.window_range) != 2 or not 0 <= lo < hi:
        return f"sampler.window_range: must be [lo, hi) with 0 <= lo < hi, got {cfg.window_range}"
    steps = get_sampler(cfg.kind).stochastic_steps(cfg.num_steps)
    if cfg.window_mode == "all" or not steps:
        return None
    top = hi - 1 + (cfg.window_size - 1 if cfg.window_mode in ("window", "progressive") else 0)
    if top > steps[-1] or (cfg.window_mode == "random" and cfg.window_size > hi - lo):
        return (f"sampler.window_size/window_range: {cfg.window_mode} of {cfg.window_size} in [{lo}, {hi}) does not "
                f"fit the {cfg.num_steps}-step schedule of {cfg.kind} (last stochastic step {steps[-1]})")
    return None


__all__ = ["SAMPLERS", "WINDOW_MODES", "Sampler", "get_sampler", "measure_sampler", "trained_steps", "window_error"]
