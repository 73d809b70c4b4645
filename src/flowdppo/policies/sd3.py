"""Stable Diffusion 3 / 3.5: latents ``(B, C, h, w)``, timestep ``1000 sigma``, the scheduler's static shift."""

from __future__ import annotations

from typing import Any

from diffusers import StableDiffusion3Pipeline
from torch import Tensor

from flowdppo.policies.base import PipelinePolicy, calculate_mu


class SD3Policy(PipelinePolicy):
    """Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``): latents ``(B, C, h, w)``, timestep ``1000 sigma``."""

    pipeline_class = StableDiffusion3Pipeline

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.transformer.config.in_channels, self.latent_size, self.latent_size)

    def schedule_kwargs(self, num_steps: int) -> dict[str, Any]:
        config = self.pipeline.scheduler.config
        if not config.get("use_dynamic_shifting"):
            return {"num_inference_steps": num_steps}  # the static shift of the scheduler config
        tokens = (self.latent_size // self.transformer.config.patch_size) ** 2
        return {"num_inference_steps": num_steps, "mu": calculate_mu(config, tokens, default_max_shift=1.16)}

    def encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def transformer_output(self, x: Tensor, sigma: Tensor, embeds: dict[str, Tensor]) -> Tensor:
        return self.transformer(
            hidden_states=x,
            timestep=sigma * 1000,
            encoder_hidden_states=embeds["prompt_embeds"],
            pooled_projections=embeds["pooled_prompt_embeds"],
            return_dict=False,
        )[0]

    def vae_latents(self, latents: Tensor) -> Tensor:
        config = self.vae.config
        return latents / config.scaling_factor + config.shift_factor
