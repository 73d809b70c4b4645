"""On-policy distillation (DiffusionOPD, arXiv 2605.15055): the student matches its teachers' transitions, step by
step, along its own trajectories.

The student rolls out with a stochastic sampler (Flow-SDE, ``eta`` 0.7, every step trained). At each trained step
``(x_t, sigma_t)`` of sample ``b`` the teacher ``k(b)`` its prompt is routed to (``opd.route``) gives its transition
mean through the same kernel, ``mu_T = mean(x_t, v_T(x_t, sigma_t, c))``, computed once per rollout without
gradients; the student's ``mu_S`` is replayed with gradients. Both transitions share the step's std ``s_t``, so the
per-step KL is exact and symmetric (``KL(student || teacher)``, the paper's reverse KL, equals its forward one):

    D = KL(N(mu_S, s_t^2 I) || N(mu_T, s_t^2 I)) = reduce((mu_S - mu_T)^2) / (2 s_t^2)

with ``reduce`` the mean over the latent's ``n`` elements (``opd.kl_reduce=mean``, as the public code) or their sum
(the full KL); the loss is the mean of ``D`` over the mini-batch's elements. Its gradient is
``(mu_S - mu_T) / (n s_t^2) . d mu_S / d theta``, a squared difference of means scaled by the step's variance; no
reward or advantage enters it (the rewards are logged only). Teachers are frozen LoRA adapters on the same base
(``algorithms.teachers``); ``teacher_kl`` (and ``teacher_kl_max``) log ``D`` over the update's mini-batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowdppo.algorithms.base import Algorithm, Elements, index_cond
from flowdppo.algorithms.policy_gradient import flat_steps, replay_step
from flowdppo.algorithms.teachers import (
    TEACHER_PREFIX,
    adapter_files,
    load_teacher,
    prompt_texts,
    read_routes,
    route,
    teacher_active,
)
from flowdppo.distributed import Distributed
from flowdppo.errors import ConfigError
from flowdppo.losses import reference_kl
from flowdppo.policies.lora import reference_policy, uses_lora
from flowdppo.rollout import Trajectory, in_chunks
from flowdppo.samplers import get_sampler
from flowdppo.sde import REDUCTIONS
from flowdppo.settings import Section


@dataclass
class OPDConfig(Section):
    """On-policy distillation (algorithm opd)."""

    teachers: list[str] = field(default_factory=list)
    """The teachers: run folders (their final/ LoRA adapter) or LoRA adapters (a .safetensors file, or a folder
    holding pytorch_lora_weights.safetensors), of this run's base model."""
    route: list[str] = field(default_factory=list)
    """Which prompts each teacher teaches, one entry per teacher: comma-separated prompts (digits: classes,
    "0,1,2,3,4"), a prompt file (.txt / .jsonl), or "" (every prompt no other entry names). Empty with one
    teacher: every prompt."""
    guidance_scales: list[float] = field(default_factory=list)
    """Each teacher's classifier-free guidance scale (empty: sampler.guidance_scale, the student's)."""
    kl_reduce: str = "mean"
    """Reduction of the per-step KL over the latent: "mean" (the public code's) or "sum" (the full KL)."""

    @classmethod
    def choices(cls) -> dict[str, tuple]:
        return {"kl_reduce": REDUCTIONS}

    def check(self, prefix: str = "opd.") -> None:
        self.check_choices(prefix)
        if any(not w > 0 for w in self.guidance_scales):
            raise ConfigError(f"{prefix}guidance_scales: each must be > 0, got {self.guidance_scales}")


class OPD(Algorithm):
    name = "opd"
    reads = ("opd.",)
    sections = {"opd": OPDConfig}
    presets = {"opd": {"sampler": {"kind": "flow_sde", "eta": 0.7, "window_mode": "all"}}}
    supports_fsdp = False

    @classmethod
    def config_error(cls, cfg) -> str | None:
        opd, teachers = cfg.opd, len(cfg.opd.teachers)
        if not teachers:
            return (
                "opd.teachers: opd distils one or more teachers into the student; give opd.teachers=[RUN_DIR, ...] "
                "(runs of this base model with LoRA, or LoRA files)"
            )
        if len(opd.route) not in (0, teachers) or (teachers > 1 and not opd.route):
            return (
                f"opd.route: one entry per teacher ({teachers} teachers, {len(opd.route)} entries): the prompts each "
                'teaches, e.g. opd.route=["0,1,2,3,4","5,6,7,8,9"] for digits classes'
            )
        if len(opd.guidance_scales) not in (0, teachers):
            return f"opd.guidance_scales: one per teacher ({teachers}) or none, got {len(opd.guidance_scales)}"
        if not get_sampler(cfg.sampler.kind).stochastic:
            return (
                f"sampler.kind: opd matches per-step Gaussian transitions, which an {cfg.sampler.kind} sampler "
                "does not have; use flow_sde (or cps, dance_sde)"
            )
        if cfg.optim.fsdp:
            return "optim.fsdp: opd keeps its teachers on an unsharded network; train without optim.fsdp"
        return None

    def setup(self, policy: nn.Module) -> None:
        """Load every teacher (frozen) beside the student's adapter, or onto a frozen copy of a fully fine-tuned
        student's transformer; read the routes."""
        cfg = self.cfg
        self.routes = read_routes(cfg.opd.route)
        shared = uses_lora(policy)
        self.host = policy if shared else reference_policy(policy)
        for k, path in enumerate(cfg.opd.teachers):
            load_teacher(self.host, f"{TEACHER_PREFIX}{k}", adapter_files(Path(path), cfg), path, shared)
        scales = cfg.opd.guidance_scales or [cfg.sampler.guidance_scale] * len(cfg.opd.teachers)
        self.velocities = [
            in_chunks(partial(self.host, guidance_scale=w), cfg.sampler.rollout_batch_size) for w in scales
        ]

    def elements(
        self, traj: Trajectory, advantages: Tensor, policy: nn.Module, rng: torch.Generator, dist: Distributed
    ) -> Elements:
        """The trained steps as elements (``flat_steps``) with their std, teacher and teacher mean ``mu_T``."""
        self.sigma_stand_in = traj.sigmas[1]  # caps the Flow-SDE std of a step from sigma = 1
        t, b = traj.log_probs.shape
        data = flat_steps(traj)
        data["stds"] = traj.stds.flatten()
        data["teacher"] = self.teacher_of(traj.cond, dist or Distributed(), traj.final.device)[data["sample"]]
        data["teacher_means"] = self.teacher_means(data, traj.cond)
        return Elements(data, t, b)

    def teacher_of(self, cond: Any, dist: Distributed, device: torch.device) -> Tensor:
        """The teacher index of each sample (``opd.route``); a prompt routed nowhere stops every process."""
        try:
            teachers, problem = route(prompt_texts(cond), self.routes), None
        except ConfigError as err:
            teachers, problem = [0] * len(cond), err
        if dist.any(problem is not None, device):  # every process stops, none waits in a collective
            raise problem or ConfigError("opd.route: a prompt on another process goes to no teacher (see its message)")
        return torch.tensor(teachers, device=device)

    @torch.no_grad()
    def teacher_means(self, data: dict[str, Tensor], cond: Any) -> Tensor:
        """``mu_T`` of every element, each through the kernel with its own teacher's velocity."""
        means = torch.empty_like(data["latents"])
        for k, velocity in enumerate(self.velocities):
            rows = (data["teacher"] == k).nonzero().flatten()
            if len(rows):
                part = {key: value[rows] for key, value in data.items()}
                with teacher_active(self.host, f"{TEACHER_PREFIX}{k}"):
                    means[rows], _ = replay_step(
                        velocity, part, index_cond(cond, part["sample"]), self.cfg, self.sigma_stand_in
                    )
        return means

    def loss(
        self, velocity, base_velocity, mb: dict[str, Tensor], cond: Any, first: bool, dist: Distributed
    ) -> tuple[Tensor, dict[str, Tensor]]:
        mean, _ = replay_step(velocity, mb, cond, self.cfg, self.sigma_stand_in)
        kl = reference_kl(mean, mb["teacher_means"], mb["stds"], self.cfg.opd.kl_reduce)  # D per element
        return kl.mean(), {"teacher_kl": kl.detach().mean(), "teacher_kl_max": kl.detach().max()}
