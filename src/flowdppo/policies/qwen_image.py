"""Qwen-Image: packed 2x2 latent tokens, masked text tokens, true CFG rescaled per token."""

from __future__ import annotations

import torch
from diffusers import QwenImagePipeline
from torch import Tensor

from flowdppo.policies.base import PackedLatentPolicy
from flowdppo.policies.limits import QWEN_MAX_TEXT_TOKENS


class QwenImagePolicy(PackedLatentPolicy):
    """Qwen-Image (``QwenImageTransformer2DModel``): packed 2x2 latent tokens, masked text tokens."""

    pipeline_class = QwenImagePipeline
    flow_sigmas_option = False

    def guided(self, v_c: Tensor, v_u: Tensor, guidance_scale: float) -> Tensor:
        """Qwen-Image's true CFG: ``v_u + w (v_c - v_u)`` rescaled per token to the norm of ``v_c``."""
        combined = super().guided(v_c, v_u, guidance_scale)
        return combined * (v_c.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))

    def encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        # at most 512 text tokens, as the pipeline's __call__ (its encode_prompt alone allows 1024)
        embeds, mask = self.pipeline.encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=QWEN_MAX_TEXT_TOKENS
        )
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def transformer_output(self, x: Tensor, sigma: Tensor, embeds: dict[str, Tensor]) -> Tensor:
        half = self.latent_size // 2
        return self.transformer(
            hidden_states=x,
            timestep=sigma,
            encoder_hidden_states=embeds["prompt_embeds"],
            encoder_hidden_states_mask=embeds["prompt_embeds_mask"],
            img_shapes=[[(1, half, half)]] * x.shape[0],
            return_dict=False,
        )[0]

    def vae_latents(self, latents: Tensor) -> Tensor:
        unpacked = self.unpack(latents)  # (B, C, 1, h, w)
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(unpacked)
        std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(unpacked)
        return unpacked * std + mean
