"""The digits task as the trainer sees it: base policy, prompts, rewards and evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowdppo.errors import ConfigError
from flowdppo.rewards.registry import RewardContext, load_rewards
from flowdppo.rollout import sample, sample_with_path_kl
from flowdppo.sde import shifted_sigmas
from flowdppo.tasks.digits.classifier import load_classifier
from flowdppo.tasks.digits.data import NUM_CLASSES, decode_latents, load_digits_split, to_unit_range
from flowdppo.tasks.digits.policy import DigitsPolicy, load_base_policy
from flowdppo.tasks.digits.rewards import ClassifierReward, feature_fid, group_diversity, prompt_accuracy

EVAL_SEED_OFFSET = 10_007  # evaluation noise never coincides with rollout noise


class DigitsTask:
    """Prompts are digit classes; a group is ``G`` samples of one class; latents are (1, 8, 8), or (u*u, 8, 8)
    with ``digits.upsample`` u (decoded to 8x8 images for rewards and evaluation by ``decode_latents``)."""

    latent_shape: tuple[int, ...] = (1, 8, 8)

    @staticmethod
    def policy_class(cfg) -> type[DigitsPolicy]:
        """The class of the policy ``cfg.model`` holds, without loading it."""
        return DigitsPolicy

    def __init__(self, cfg, device: torch.device | str = "cpu") -> None:
        self.cfg, self.device = cfg, torch.device(device)
        self.upsample = cfg.digits.upsample
        self.latent_shape = (self.upsample**2, 8, 8)
        self.classifier = load_classifier().to(self.device)
        _, _, heldout_x, heldout_y = load_digits_split()
        self.heldout_images, self.heldout_labels = to_unit_range(heldout_x).to(self.device), heldout_y.to(self.device)
        self.train_classes = torch.tensor(sorted(cfg.digits.classes) or range(NUM_CLASSES))
        self.eval_reward = ClassifierReward(self.classifier)
        self.policy = self.load_policy(cfg.model)
        context = RewardContext(self.device, classifier=self.classifier)  # the digits rewards share the classifier
        self.rewards = load_rewards(cfg.reward.names, ("digits",), context)  # (name in logs, reward)

    def load_policy(self, model: str = "") -> DigitsPolicy:
        """The shipped base policy (of ``digits.upsample`` u), or one saved by ``DigitsPolicy.save_pretrained`` in
        folder ``model``; its latent must have u's ``u*u`` channels."""
        if not model:
            return load_base_policy(upsample=self.upsample).to(self.device)
        if not Path(model).is_dir():
            raise ConfigError(f"model: no such folder {model!r}")
        try:
            policy = DigitsPolicy.from_pretrained(model)
        except (OSError, ValueError) as err:  # diffusers raises OSError/ValueError on a folder it cannot read
            raise ConfigError(f"model: {model} is not a digits policy saved with save_pretrained ({err})") from err
        if policy.latent_shape != self.latent_shape:
            raise ConfigError(
                f"model: {model} has latents {policy.latent_shape}, digits.upsample={self.upsample} "
                f"needs {self.latent_shape} (make one with `flowdppo digits pretrain --upsample "
                f"{self.upsample} --out DIR`)"
            )
        return policy.to(self.device)

    def sigmas(self) -> Tensor:
        """The linear schedule of ``sampler.num_steps`` steps with the SD3 time shift ``sampler.shift``."""
        return shifted_sigmas(self.cfg.sampler.num_steps, self.cfg.sampler.shift, device=self.device)

    def prompts(self, num_prompts: int, group_size: int, seed: int, epoch: int) -> tuple[Tensor, Tensor]:
        """``num_prompts`` classes (a seeded shuffle of 0..9 or of ``digits.classes``, repeated as needed), each
        ``group_size`` times.

        Returns ``cond`` (P*G,) labels and ``group_ids`` (P*G,).
        """
        gen = torch.Generator().manual_seed(seed * 7_919 + epoch)
        pool = self.train_classes  # 0..9, or the digits.classes
        rounds = -(-num_prompts // len(pool))
        classes = torch.cat([pool[torch.randperm(len(pool), generator=gen)] for _ in range(rounds)])[:num_prompts]
        cond = classes.repeat_interleave(group_size).to(self.device)
        group_ids = torch.arange(num_prompts).repeat_interleave(group_size).to(self.device)
        return cond, group_ids

    def eval_noise(self, per_class: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(self.cfg.seed + EVAL_SEED_OFFSET)
        noise = torch.randn((NUM_CLASSES * per_class, *self.latent_shape), generator=gen).to(self.device)
        cond = torch.arange(NUM_CLASSES).repeat_interleave(per_class).to(self.device)
        return noise, cond

    @torch.no_grad()
    def evaluate(self, velocity, per_class: int, base_velocity=None) -> dict[str, float]:
        """In-domain and out-of-domain measures of ODE samples from fixed noise, ``per_class`` per digit.

        ``eval/accuracy``: classifier accuracy on the prompted class; ``eval/reward``: mean probability
        of the prompted class; ``eval/fid``: Frechet distance to held-out real digits in the classifier's
        feature space; ``eval/diversity``: mean pairwise distance within a class; with ``base_velocity``,
        ``eval/kl_to_base``: the path KL to the base along the same samples, in the Flow-SDE kernel
        (``sample_with_path_kl``). With ``digits.classes``, ``eval/*`` covers those classes and ``eval_heldout/*``
        the others (FID against real digits of the same classes).
        """
        if per_class < 2:
            raise ConfigError(
                f"digits evaluation: at least 2 samples per class (eval_samples_per_class, eval --per-class), got "
                f"{per_class}; the diversity measure compares samples of one class"
            )
        noise, cond = self.eval_noise(per_class)
        kl = None
        if base_velocity is None:
            latents = sample(velocity, cond, noise, self.sigmas())
        else:
            latents, kl = sample_with_path_kl(velocity, base_velocity, cond, noise, self.sigmas())
        images = decode_latents(latents)  # 8x8 in [0, 1]
        trained = torch.isin(cond, self.train_classes.to(cond.device))
        measures = self.measures(images, cond, kl, trained, "eval")
        if not trained.all():
            measures |= self.measures(images, cond, kl, ~trained, "eval_heldout")
        return measures

    def measures(self, images: Tensor, cond: Tensor, kl: Tensor | None, rows: Tensor, prefix: str) -> dict[str, float]:
        """``evaluate``'s measures over the samples ``rows`` selects, keyed ``{prefix}/...``."""
        images, cond = images[rows], cond[rows]
        real = self.heldout_images[torch.isin(self.heldout_labels, cond.unique())]
        measures = {} if kl is None else {f"{prefix}/kl_to_base": float(kl[rows].mean())}
        return measures | {
            f"{prefix}/accuracy": prompt_accuracy(images, cond, self.classifier),
            f"{prefix}/reward": float(self.eval_reward(images, cond).mean()),
            f"{prefix}/fid": feature_fid(images, real, self.classifier),
            f"{prefix}/diversity": group_diversity(images, cond),
        }

    @torch.no_grad()
    def sample_grid(self, velocity, per_class: int = 8) -> np.ndarray:
        """ODE samples from fixed noise as a (10, per_class, 8, 8) array in [0, 1]."""
        noise, cond = self.eval_noise(per_class)
        images = decode_latents(sample(velocity, cond, noise, self.sigmas()))
        return images.view(NUM_CLASSES, per_class, 8, 8).cpu().numpy()
