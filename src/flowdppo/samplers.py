"""Samplers: a registry of transition kernels and of which steps of a schedule they make stochastic.

A ``Sampler`` owns its kernel (a pure function of ``flowdppo.sde``), the range of its noise level
``eta``, and which of its steps have a positive std (only those can be trained or measured). The
schedule ``sigmas[0..K]`` comes from the task (the model's own); ``trained_steps`` picks the steps of
an epoch that are stochastic and trained, the same on every process.

Add a sampler: one kernel in ``sde.py`` and one entry in ``SAMPLERS``. ``SamplerConfig`` is the ``sampler.*``
section of the config; it checks itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from flowdppo.errors import ConfigError
from flowdppo.sde import LOGPROB_CONVENTIONS, Transition, cps_step, dance_sde_step, flow_sde_step, ode_step
from flowdppo.settings import Section, register_section, require


class Kernel(Protocol):
    def __call__(
        self, x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, eta: float, sigma_stand_in: Tensor
    ) -> Transition: ...


def _flow_sde(x, v, sigma, sigma_next, eta, sigma_stand_in):
    return flow_sde_step(x, v, sigma, sigma_next, eta=eta, sigma_stand_in=sigma_stand_in)


def _cps(x, v, sigma, sigma_next, eta, sigma_stand_in):
    return cps_step(x, v, sigma, sigma_next, eta=eta)


def _dance_sde(x, v, sigma, sigma_next, eta, sigma_stand_in):
    return dance_sde_step(x, v, sigma, sigma_next, eta=eta)


def _ode(x, v, sigma, sigma_next, eta, sigma_stand_in):
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

    def step(
        self, x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, eta: float, sigma_stand_in: Tensor
    ) -> Transition:
        """One transition from ``sigma`` to ``sigma_next`` (``sigma_stand_in``: the schedule's ``sigmas[1]``)."""
        return self.kernel(x, v, sigma, sigma_next, eta, sigma_stand_in)

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
MAX_STEPS = 10_000  # sampler.num_steps beyond: a typo, not a schedule


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
        return (
            f"sampler.window_size/window_range: {cfg.window_mode} of {cfg.window_size} in [{lo}, {hi}) does not "
            f"fit the {cfg.num_steps}-step schedule of {cfg.kind} (last stochastic step {steps[-1]})"
        )
    return None


@dataclass
class SamplerConfig(Section):
    """How rollouts are sampled (``sampler.*``): the kernel, its noise, the schedule, which steps are trained."""

    kind: str = "flow_sde"
    """Kernel of the stochastic steps: "flow_sde" (Flow-GRPO), "cps", "dance_sde" (DanceGRPO) or "ode" (none)."""
    eta: float = 0.7
    """Noise level: flow_sde 0.7, cps 0.8, dance_sde 0.3 in the public recipes."""
    num_steps: int = 10
    """Steps of the sampling schedule (K)."""
    shift: float = 1.0
    """SD3 time shift of the digits schedule (1 = linear sigmas); a real model brings its own schedule."""
    guidance_scale: float = 1.0
    """Classifier-free guidance during rollout and replay (1 = off)."""
    guidance_scale_2: float = 0.0
    """Two-expert Wan 2.2 (T2V-A14B): guidance of the low-noise expert, transformer_2 (0: guidance_scale), as
    WanPipeline's guidance_scale_2; guidance runs at all only when guidance_scale > 1 (the pipeline's rule)."""
    group_shared_noise: bool = False
    """Start every sample of a group from the same initial noise (DanceGRPO)."""
    window_mode: str = "window"
    """Which steps are stochastic and trained: "window" (W consecutive, start drawn), "random" (k drawn),
    "progressive" (W consecutive sliding from lo toward later steps as training advances, MixGRPO), "all"."""
    window_size: int = 2
    """W for "window" and "progressive"; k for "random"."""
    window_range: list[int] = field(default_factory=lambda: [0, 5])
    """[lo, hi): step indices the window start ("window", "progressive") or the steps ("random") come from."""
    window_shift_every: int = 5
    """"progressive": epochs between two one-step moves of the window."""
    kl_to_base_steps: str = "all"
    """Steps the logged path KL to the base sums over: "all" stochastic-kernel steps (comparable across
    epochs, one extra base forward per step) or the epoch's "trained" steps (free with beta > 0)."""
    kl_kernel: str = "rollout"
    """Kernel the path KL to the base is measured in: "rollout" (the sampler's own, at its eta) or a named
    stochastic one at its default eta (an ODE rollout needs one; compare arms in one kernel)."""
    rollout_batch_size: int = 0
    """Samples per model call in rollouts, replays without gradients and decoding (0: the whole batch)."""
    logprob_convention: str = "gaussian"
    """"gaussian" (true density) or "cps" (the published CPS -(x - mean)^2, no variance)."""

    @classmethod
    def choices(cls) -> dict[str, tuple]:
        return {
            "kind": tuple(SAMPLERS),
            "window_mode": WINDOW_MODES,
            "logprob_convention": LOGPROB_CONVENTIONS,
            "kl_to_base_steps": ("all", "trained"),
            "kl_kernel": ("rollout", *(name for name, s in SAMPLERS.items() if s.stochastic)),
        }

    def check(self, prefix: str = "sampler.") -> None:
        self.check_choices(prefix)
        require(self, prefix, "> 0", "num_steps", "window_size", "shift", "guidance_scale", "window_shift_every")
        require(self, prefix, ">= 0", "rollout_batch_size", "guidance_scale_2")
        if self.num_steps > MAX_STEPS:
            raise ConfigError(f"{prefix}num_steps: at most {MAX_STEPS:,}, got {self.num_steps:,}")
        sampler = SAMPLERS[self.kind]
        lo, hi = sampler.eta_range
        if sampler.stochastic and not lo < self.eta <= hi:
            raise ConfigError(f"{prefix}eta: must be in ({lo}, {hi}] for {prefix}kind {self.kind}, got {self.eta}")

    def combination_error(self) -> str | None:
        """Why the settings do not fit together (the window and the schedule, the log-prob convention and the
        kernel, the KL kernel of an ODE rollout), or None; checked after the algorithm's more specific checks."""
        sampler = SAMPLERS[self.kind]
        problem = window_error(self)
        if not problem and self.logprob_convention not in sampler.logprob_conventions:
            problem = f"sampler.logprob_convention {self.logprob_convention} needs sampler.kind cps"
        if not problem and self.kl_kernel == "rollout" and not sampler.stochastic:
            problem = (
                "sampler.kl_kernel: an ode rollout has no stochastic kernel to measure the path KL to the base "
                "in; set sampler.kl_kernel=flow_sde (or cps, dance_sde)"
            )
        return problem


register_section("sampler", SamplerConfig)

__all__ = [
    "SAMPLERS",
    "WINDOW_MODES",
    "Sampler",
    "SamplerConfig",
    "get_sampler",
    "measure_sampler",
    "trained_steps",
    "window_error",
]
