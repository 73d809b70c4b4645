"""Diffusion-DPO (Wallace et al., arXiv 2311.12908) on flow matching: a preference loss on pairs, no reward model in
the loss, the frozen base as the reference.

A pair is a prompt's preferred latent ``x_w`` and rejected ``x_l``. Both are noised at one level ``s`` with one
noise ``eps`` (``x_s = (1 - s) x + s eps``, flow-matching target ``eps - x``); with ``e(v, x) = mean((v - (eps -
x))^2)`` over the latent's dimensions, ``v`` the policy's velocity and ``v_ref`` the base's (no gradient):

    loss = -log sigmoid(-beta / 2 * ((e(v_w) - e(v_ref,w)) - (e(v_l) - e(v_ref,l))))

averaged over elements (pair, level). The paper's ``T`` and its sum over dimensions (``||.||^2``) are folded into
``beta``, as the public code does (Diffusion-DPO's ``train.py`` and Flow-Factory's ``trainers/dpo.py`` take the mean
over dimensions with ``-0.5 beta``): public betas are 5000 (SD 1.5), 2500 (SDXL), 2000 (Flow-Factory's default), 100
(flow_grpo's and Flow-Factory's SD3.5 recipe).

``dpo.source=rollout`` (``--method diffusion_dpo``, online): each group of the rollout gives one pair, its best and
worst sample by advantage (flow_grpo's and Flow-Factory's choice); a group whose samples all scored alike gives none
(its pair is weighted 0). ``dpo.source=file`` (``--method diffusion_dpo_offline``): pairs from a JSONL preference file
(``dpo.pairs_file``, ``flowdppo.algorithms.examples``; by default ``digits``, the pairs ``flowdppo digits
make-pairs`` writes, made in memory from the base), no rollout. Levels are drawn logit-normal by default
(``sigmoid(N(0, 1))``, the public default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowdppo.algorithms.base import Algorithm, Elements
from flowdppo.algorithms.examples import (
    BUILT_IN_DIGITS,
    LEVEL_MODES,
    built_in_pairs,
    check_source_path,
    epoch_examples,
    load_pairs,
    policy_device,
    shared_noise_elements,
)
from flowdppo.algorithms.likelihood_free import LIKELIHOOD_FREE_SAMPLER, mean_squared, timesteps_error
from flowdppo.distributed import Distributed
from flowdppo.settings import Section, require

SOURCES = ("rollout", "file")


def dpo_loss(
    error_w: Tensor, ref_error_w: Tensor, error_l: Tensor, ref_error_l: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """Per-element Diffusion-DPO loss ``-log sigmoid(z)`` and the implicit reward margin
    ``z = -beta / 2 ((e_w - e_ref,w) - (e_l - e_ref,l))`` from the velocity errors (E,) of the policy and the
    reference on the winner and the loser. (E,) each."""
    margin = -0.5 * beta * ((error_w - ref_error_w.detach()) - (error_l - ref_error_l.detach()))
    return -F.logsigmoid(margin), margin


def best_and_worst(advantages: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each group's (``group_size`` consecutive samples) best and worst sample by advantage, and whether they differ:
    ``(winner index (P,), loser index (P,), valid (P,) float)``; ties go to the first sample."""
    grouped = advantages.view(-1, group_size)
    offset = torch.arange(grouped.shape[0], device=advantages.device) * group_size
    valid = (grouped.max(dim=1).values > grouped.min(dim=1).values).to(advantages.dtype)
    return offset + grouped.argmax(dim=1), offset + grouped.argmin(dim=1), valid


@dataclass
class DPOConfig(Section):
    """Diffusion-DPO (algorithm diffusion_dpo)."""

    beta: float = 100.0
    """beta of -log sigmoid(-beta/2 ((e_w - e_ref,w) - (e_l - e_ref,l))), e a mean squared velocity error (100:
    flow_grpo's and Flow-Factory's SD3.5 recipes; 2000 Flow-Factory's default, 5000 Diffusion-DPO on SD 1.5)."""
    source: str = "rollout"
    """Where pairs come from: "rollout" (each group's best and worst sample, online) or "file" (dpo.pairs_file,
    offline: no rollout)."""
    pairs_file: str = ""
    """With source=file: a JSONL preference file, one {"prompt", "chosen", "rejected"} a line, image paths relative to
    it (``flowdppo digits make-pairs --out FILE`` writes one), or "digits": the pairs make-pairs writes by default
    (200, the best and worst of 4 base samples), made in memory from the run's base and ranked by its rewards."""
    train_timesteps: int = 9
    """Noise levels each pair is trained at (flow_grpo: int(0.99 num_steps), 39 of its 40 steps; 9 of our 10;
    Flow-Factory's default: 1)."""
    timesteps: str = "logit_normal"
    """How they are drawn: "logit_normal" (sigmoid(N(0, 1)), public), "schedule", "stratified", "uniform"."""

    @classmethod
    def choices(cls) -> dict[str, tuple]:
        return {"source": SOURCES, "timesteps": LEVEL_MODES}

    def check(self, prefix: str = "dpo.") -> None:
        self.check_choices(prefix)
        require(self, prefix, "> 0", "beta", "train_timesteps")


class DiffusionDPO(Algorithm):
    name = "diffusion_dpo"
    reads = ("dpo.",)
    sections = {"dpo": DPOConfig}
    presets = {
        "diffusion_dpo": {"sampler": LIKELIHOOD_FREE_SAMPLER},
        "diffusion_dpo_offline": {
            "sampler": LIKELIHOOD_FREE_SAMPLER,
            "dpo": {"source": "file", "pairs_file": BUILT_IN_DIGITS},
        },
    }

    @classmethod
    def config_error(cls, cfg) -> str | None:
        dpo = cfg.dpo
        if dpo.source == "rollout" and dpo.pairs_file:
            return "dpo.pairs_file: read only with dpo.source=file (--method diffusion_dpo_offline); remove it"
        if dpo.source == "file":
            if not dpo.pairs_file:
                return (
                    "dpo.pairs_file: dpo.source=file trains on a preference file; give dpo.pairs_file=FILE (make "
                    "one with `flowdppo digits make-pairs --out pairs.jsonl`)"
                )
            if cfg.task != "digits":
                return f"dpo.source: file reads digits images only; task {cfg.task} trains with dpo.source=rollout"
            if dpo.pairs_file != BUILT_IN_DIGITS and (
                problem := check_source_path("dpo.pairs_file", dpo.pairs_file, folder=False)
            ):
                return problem
        return timesteps_error("dpo", dpo.timesteps, dpo.train_timesteps, cfg.sampler.num_steps)

    def setup(self, policy: nn.Module) -> None:
        dpo = self.cfg.dpo
        if dpo.source == "file" and dpo.pairs_file == BUILT_IN_DIGITS:  # the policy is still the base here
            self.pairs = built_in_pairs(policy, self.cfg)
        elif dpo.source == "file":  # read (and checked) once, before the run folder is written
            self.pairs = load_pairs(dpo.pairs_file, self.cfg.digits.upsample, policy_device(policy))

    def epoch_data(self, epoch: int, rng: torch.Generator, dist: Distributed):
        return epoch_examples(self.pairs, self.cfg, rng, dist) if self.cfg.dpo.source == "file" else None

    def elements(
        self, traj, advantages: Tensor, policy: nn.Module, rng: torch.Generator, dist: Distributed
    ) -> Elements:
        dpo = self.cfg.dpo
        if dpo.source == "file":  # an ExampleBatch: row b's chosen and rejected latents
            winner = torch.arange(len(traj.final), device=traj.final.device)
            x0, valid = {"chosen": traj.final, "rejected": traj.rejected}, torch.ones_like(advantages)
        else:
            winner, loser, valid = best_and_worst(advantages, self.cfg.group_size)
            x0 = {"chosen": traj.final[winner], "rejected": traj.final[loser]}
        elements = shared_noise_elements(x0, winner, dpo.timesteps, dpo.train_timesteps, traj.sigmas, rng, dist)
        elements.data["valid"] = valid[elements.data["row"]]
        return elements

    def loss(
        self, velocity, base_velocity, mb: dict[str, Tensor], cond: Any, first: bool, dist: Distributed
    ) -> tuple[Tensor, dict[str, Tensor]]:
        errors = []
        for key in ("chosen", "rejected"):
            noised, target = mb[f"noised_{key}"], mb["eps"] - mb[key]
            with torch.no_grad():
                ref_error = mean_squared(base_velocity(noised, mb["sigma"], cond), target)
            errors += [mean_squared(velocity(noised, mb["sigma"], cond), target), ref_error]
        per_element, margin = dpo_loss(*errors, self.cfg.dpo.beta)
        valid = mb["valid"].to(per_element.dtype)
        loss = (valid * per_element).mean()
        pairs = valid.sum().clamp_min(1)
        metrics = {
            "policy_loss": loss.detach(),
            "implicit_accuracy": ((margin > 0).to(valid.dtype) * valid).sum().detach() / pairs,
            "reward_margin": (margin * valid).sum().detach() / pairs,
            "chosen_error": errors[0].detach().mean(),
            "rejected_error": errors[2].detach().mean(),
            "valid_pairs": valid.mean(),
        }
        return loss, metrics
