"""Text-to-image with a diffusers pipeline: prompts from a file, image rewards, evaluation on held-out prompts."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from flowdppo.errors import ConfigError, did_you_mean, shown
from flowdppo.policies.pipelines import PipelinePolicy, load_pipeline_policy, pipeline_policy_class
from flowdppo.prompts import EmbeddingCache, PromptBatch, load_prompts, make_batch, split_prompts
from flowdppo.rewards import Reward, load_user_reward, score
from flowdppo.rewards.image import IMAGE_REWARDS, make_image_reward
from flowdppo.rewards.remote import is_remote, load_remote_reward, named_rewards
from flowdppo.rollout import sample, sample_with_path_kl

EVAL_SEED_OFFSET = 10_007  # evaluation noise never coincides with rollout noise
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TextToImageTask:
    """Prompts are lines of ``cfg.prompts``; a group is ``G`` images of one prompt; the policy a pipeline."""

    @staticmethod
    def policy_class(cfg) -> type[PipelinePolicy]:
        """The adapter class of the pipeline ``cfg.model`` names, from its ``model_index.json`` (no weights)."""
        return pipeline_policy_class(cfg.model)

    def __init__(self, cfg, device: torch.device | str = "cpu") -> None:
        if not cfg.prompts:
            raise ConfigError(f"prompts: the {cfg.task} task needs a prompt file (.txt or .jsonl)")
        self.cfg, self.device = cfg, torch.device(device)
        self.train_records, self.eval_records = split_prompts(load_prompts(cfg.prompts), cfg.eval_prompts, cfg.seed)
        self.policy = self.load_policy(cfg.model)
        self.cache = EmbeddingCache(self.policy.encode_prompts, max_mb=cfg.prompt_cache_mb)
        if cfg.text_encoders == "free":  # every prompt of the run encoded now, then the encoders dropped
            records = self.train_records + self.eval_records
            self.cache.encode_missing([r["prompt"] for r in records], progress=True)
            self.policy.free_text_encoders()
        self.rewards = named_rewards(cfg.reward.names, self.load_reward)  # (name in logs, reward)

    def load_policy(self, model: str = "") -> PipelinePolicy:
        """The pipeline in folder (or hub id) ``model``, in ``cfg.precision``."""
        cfg = self.cfg
        if not model:
            raise ConfigError(f"model: the {cfg.task} task needs a diffusers pipeline folder or hub id")
        return load_pipeline_policy(model, cfg.resolution, DTYPES[cfg.precision], self.device,
                                    embedded_guidance=cfg.embedded_guidance, negative_prompt=cfg.negative_prompt,
                                    text_encoders=cfg.text_encoders, vae_tiling=cfg.vae_tiling,
                                    attention_backend=cfg.attention_backend, **self.policy_options())  # fmt: skip

    def policy_options(self) -> dict:
        """What a subclass adds to ``load_pipeline_policy`` (its pipeline families, its sizes)."""
        return {}

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.policy.latent_shape

    def sigmas(self) -> Tensor:
        """The model's own schedule of ``sampler.num_steps`` steps."""
        return self.policy.sigmas(self.cfg.sampler.num_steps)

    def prompts(self, num_prompts: int, group_size: int, seed: int, epoch: int) -> tuple[PromptBatch, Tensor]:
        """``num_prompts`` training prompts (a seeded shuffle per epoch), each ``group_size`` times."""
        gen = torch.Generator().manual_seed(seed * 7_919 + epoch)
        pool = len(self.train_records)
        order = torch.cat([torch.randperm(pool, generator=gen) for _ in range(-(-num_prompts // pool))])
        records = [self.train_records[i] for i in order[:num_prompts].tolist()]
        group_ids = torch.arange(num_prompts, device=self.device).repeat_interleave(group_size)
        return make_batch(records, group_size, self.cache, self.device), group_ids

    def load_reward(self, name: str) -> Reward:
        """An image reward by name (``name`` or ``name@model_path``); ``module:function`` imports your own;
        ``http://HOST:PORT`` is a reward server's (``flowdppo reward-server``)."""
        source = reward_source(name)
        if source == "remote":
            return load_remote_reward(name)
        if source == "user":
            return load_user_reward(name)
        return make_image_reward(name, self.device)

    def fixed_batch(self, records: list[dict], per_prompt: int) -> tuple[Tensor, PromptBatch]:
        """``records``, ``per_prompt`` samples each, with noise fixed by the seed (the same for every policy)."""
        gen = torch.Generator().manual_seed(self.cfg.seed + EVAL_SEED_OFFSET)
        cond = make_batch(records, per_prompt, self.cache, self.device)
        noise = torch.randn((len(cond), *self.latent_shape), generator=gen).to(self.device)
        return noise, cond

    def generate(self, velocity, noise: Tensor, cond: PromptBatch) -> Tensor:
        """ODE samples decoded to images ``(N, 3, H, W)``, ``sampler.rollout_batch_size`` at a time."""
        return self.generate_with_path_kl(velocity, None, noise, cond)[0]

    @torch.no_grad()
    def generate_with_path_kl(self, velocity, base_velocity, noise: Tensor, cond: PromptBatch
                              ) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        """``generate``, and with ``base_velocity`` the samples' path KL to the base ``(N,)``
        (``sample_with_path_kl``; else None)."""
        sigmas = self.sigmas()
        batch_size = self.cfg.sampler.rollout_batch_size or len(cond)
        images, kls = [], []
        for start in range(0, len(cond), batch_size):
            rows = slice(start, start + batch_size)
            if base_velocity is None:
                latents = sample(velocity, cond[rows], noise[rows], sigmas=sigmas)
            else:
                latents, kl = sample_with_path_kl(velocity, base_velocity, cond[rows], noise[rows], sigmas)
                kls.append(kl)
            images.append(self.policy.decode(latents))
        return torch.cat(images), torch.cat(kls) if kls else None

    def evaluate(self, velocity, per_prompt: int, base_velocity=None) -> dict[str, float]:
        """Mean of each reward over ODE samples of the held-out prompts from fixed noise: ``eval/<reward>``; with
        ``base_velocity`` also ``eval/kl_to_base`` along the same samples (Flow-SDE kernel)."""
        if not self.eval_records:
            return {}
        noise, cond = self.fixed_batch(self.eval_records, per_prompt)
        images, kl = self.generate_with_path_kl(velocity, base_velocity, noise, cond)
        measures = {f"eval/{name}": float(score(fn, name, images, cond).mean()) for name, fn in self.rewards}
        return measures | ({"eval/kl_to_base": float(kl.mean())} if kl is not None else {})

    def sample_grid(self, velocity, per_prompt: int = 4) -> np.ndarray:
        """ODE samples of up to 4 held-out (or training) prompts: ``(rows, per_prompt, H, W, 3)`` in [0, 1]."""
        records = (self.eval_records or self.train_records)[:4]
        noise, cond = self.fixed_batch(records, per_prompt)
        images = self.generate(velocity, noise, cond)
        return images.permute(0, 2, 3, 1).reshape(len(records), per_prompt, *images.shape[2:], 3).cpu().numpy()


def reward_source(name: str, key: str = "reward.names", also: tuple[str, ...] = ()) -> str:
    """Where reward ``name`` comes from, read from the name alone: "remote" (``http://HOST:PORT``), "user"
    (``module:function``) or "image" (a built-in, ``name`` or ``name@model_path``); else one line naming ``key``
    (with the closest of the image rewards and ``also``, the task's other rewards)."""
    if is_remote(name):
        return "remote"
    if ":" in name and "@" not in name:
        return "user"
    if name.partition("@")[0] in IMAGE_REWARDS:
        return "image"
    suggestion = did_you_mean(name.partition("@")[0], [*IMAGE_REWARDS, *also])
    raise ConfigError(f"{key}: unknown reward {shown(name)}{suggestion}; choose from {', '.join(IMAGE_REWARDS)} "
                      "(optionally name@model_path) or give your own as module:function")
