"""Text-to-image with a diffusers pipeline: prompts from a file, image rewards, evaluation on held-out prompts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flowdppo.config import task_options
from flowdppo.errors import ConfigError
from flowdppo.policies.pipelines import PipelinePolicy, load_pipeline_policy, pipeline_policy_class
from flowdppo.prompts import EmbeddingCache, PromptBatch, load_prompts, make_batch, split_prompts
from flowdppo.rewards import Reward, score
from flowdppo.rewards.registry import RewardContext, load_rewards
from flowdppo.rollout import sample, sample_with_path_kl
from flowdppo.settings import Section, require

EVAL_SEED_OFFSET = 10_007  # evaluation noise never coincides with rollout noise
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEXT_ENCODER_PLACEMENTS = ("keep", "offload", "free")


@dataclass
class TextToImageConfig(Section):
    """The text_to_image task's options (``text_to_image.*``)."""

    prompts: str = ""
    """Prompt file, .txt (one per line) or .jsonl ("prompt" + metadata for the rewards)."""
    eval_prompts: int = 8
    """Prompts held out of the file (seeded shuffle) for evaluation and sample grids."""
    resolution: int = 512
    """Image height = width in pixels."""
    negative_prompt: str = ""
    """The unconditional branch of classifier-free guidance (sampler.guidance_scale > 1)."""
    text_encoders: str = "offload"
    """"keep" the text encoders on the device, "offload" them to the CPU between encodings of
    new prompts, or "free" them once every prompt of the file is encoded (at the start of the run)."""
    prompt_cache_mb: float = 4096.0
    """Host memory for cached prompt embeddings; beyond it the least recently used go to disk."""
    vae_tiling: bool = False
    """Decode large images tile by tile (the VAE's enable_tiling): less memory, seams blended."""
    attention_backend: str = ""
    """The transformer's attention backend by diffusers' name (e.g. "flash", "_native_cudnn",
    "sage"; "" keeps the default, PyTorch's scaled_dot_product_attention)."""
    embedded_guidance: float = 3.5
    """Guidance value fed to a guidance-distilled model's guidance embedding (FLUX.1-dev); others ignore it."""

    @classmethod
    def choices(cls) -> dict[str, tuple]:
        return {"text_encoders": TEXT_ENCODER_PLACEMENTS}

    def check(self, prefix: str = "text_to_image.") -> None:
        self.check_choices(prefix)
        require(self, prefix, ">= 0", "eval_prompts", "resolution", "prompt_cache_mb")


class TextToImageTask:
    """Prompts are lines of the file ``text_to_image.prompts``; a group is ``G`` images of one prompt; the policy a
    pipeline. The options are the task's own section (``cfg.text_to_image``; a subclass task's, its own)."""

    reward_kinds: tuple[str, ...] = ("image",)
    """The kinds of built-in rewards the task takes (``rewards.registry``), besides module:function and
    http://HOST:PORT."""

    @staticmethod
    def policy_class(cfg) -> type[PipelinePolicy]:
        """The adapter class of the pipeline ``cfg.model`` names, from its ``model_index.json`` (no weights)."""
        return pipeline_policy_class(cfg.model)

    def __init__(self, cfg, device: torch.device | str = "cpu") -> None:
        options = task_options(cfg)
        if not options.prompts:
            raise ConfigError(f"{cfg.task}.prompts: the {cfg.task} task needs a prompt file (.txt or .jsonl)")
        self.cfg, self.options, self.device = cfg, options, torch.device(device)
        self.train_records, self.eval_records = split_prompts(
            load_prompts(options.prompts), options.eval_prompts, cfg.seed
        )
        self.policy = self.load_policy(cfg.model)
        self.cache = EmbeddingCache(self.policy.encode_prompts, max_mb=options.prompt_cache_mb)
        if options.text_encoders == "free":  # every prompt of the run encoded now, then the encoders dropped
            records = self.train_records + self.eval_records
            self.cache.encode_missing([r["prompt"] for r in records], progress=True)
            self.policy.free_text_encoders()
        self.rewards = load_rewards(
            cfg.reward.names, self.reward_kinds, RewardContext(self.device), self.wrap_reward
        )  # (name in logs, reward)

    def load_policy(self, model: str = "") -> PipelinePolicy:
        """The pipeline in folder (or hub id) ``model``, in ``cfg.precision``."""
        cfg, options = self.cfg, self.options
        if not model:
            raise ConfigError(f"model: the {cfg.task} task needs a diffusers pipeline folder or hub id")
        return load_pipeline_policy(
            model,
            options.resolution,
            DTYPES[cfg.precision],
            self.device,
            embedded_guidance=options.embedded_guidance,
            negative_prompt=options.negative_prompt,
            text_encoders=options.text_encoders,
            vae_tiling=options.vae_tiling,
            attention_backend=options.attention_backend,
            **self.policy_options(cfg),
        )

    @staticmethod
    def policy_options(cfg) -> dict:
        """What a subclass adds to ``load_pipeline_policy`` for the run ``cfg`` (its pipeline families, its sizes)."""
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

    def wrap_reward(self, reward: Reward, source: str, name: str) -> Reward:
        """What the task scores with, of a loaded reward (``registry.load_rewards``): an image task, the reward."""
        return reward

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
    def generate_with_path_kl(
        self, velocity, base_velocity, noise: Tensor, cond: PromptBatch
    ) -> tuple[Tensor, Tensor | None]:
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

    @property
    def grid_records(self) -> list[dict]:
        """The prompts of the sample grid's rows: up to 4 held-out (or training) prompts."""
        return (self.eval_records or self.train_records)[:4]

    @property
    def grid_prompts(self) -> list[str]:
        """The text of each row of the sample grid (``samples.png`` labels its rows with them)."""
        return [r["prompt"] for r in self.grid_records]

    def sample_grid(self, velocity, per_prompt: int = 4) -> np.ndarray:
        """ODE samples of the ``grid_records``: ``(rows, per_prompt, H, W, 3)`` in [0, 1]."""
        records = self.grid_records
        noise, cond = self.fixed_batch(records, per_prompt)
        images = self.generate(velocity, noise, cond)
        return images.permute(0, 2, 3, 1).reshape(len(records), per_prompt, *images.shape[2:], 3).cpu().numpy()
