"""FLUX.1 and FLUX.2-klein: packed 2x2 latent tokens, timestep ``sigma``, the guidance embedding if the model has
one; FLUX.1's token-count shift, FLUX.2-klein's empirical ``mu(tokens, K)``."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import Flux2KleinPipeline, FluxPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from torch import Tensor

from flowdppo.policies.base import ATTENTION_PROJECTIONS, PackedLatentPolicy


class FluxPolicy(PackedLatentPolicy):
    """FLUX.1 (``FluxTransformer2DModel``): packed 2x2 latent tokens, guidance embedding if the model has one."""

    pipeline_class = FluxPipeline
    # single-stream blocks: to_q / to_k / to_v, and the block's proj_out (attention and MLP output; not the
    # model's final proj_out, hence the block path)
    lora_target_modules = (*ATTENTION_PROJECTIONS, "single_transformer_blocks.*.proj_out")

    def encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, pooled, _ = self.pipeline.encode_prompt(prompt=prompts, prompt_2=None, device=self.device)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def transformer_output(self, x: Tensor, sigma: Tensor, embeds: dict[str, Tensor]) -> Tensor:
        text = embeds["prompt_embeds"]
        half = self.latent_size // 2
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full_like(sigma, self.embedded_guidance)
        return self.transformer(
            hidden_states=x,
            timestep=sigma,
            guidance=guidance,
            pooled_projections=embeds["pooled_prompt_embeds"],
            encoder_hidden_states=text,
            txt_ids=text.new_zeros(text.shape[1], 3),
            img_ids=self.pipeline._prepare_latent_image_ids(x.shape[0], half, half, x.device, x.dtype),
            return_dict=False,
        )[0]

    def vae_latents(self, latents: Tensor) -> Tensor:
        unpacked = self.unpack(latents)
        config = self.vae.config
        return unpacked / config.scaling_factor + config.shift_factor


class Flux2KleinPolicy(PackedLatentPolicy):
    """FLUX.2-klein (``Flux2Transformer2DModel``): 2x2-patchified latents as tokens, batch-norm latent stats."""

    pipeline_class = Flux2KleinPipeline
    # single-stream blocks: the fused QKV + MLP input projection and the output projection (a Linear named
    # to_out there; the double-stream blocks' attn.to_out is a ModuleList, hence the block path)
    lora_target_modules = (
        *ATTENTION_PROJECTIONS,
        "single_transformer_blocks.*.attn.to_qkv_mlp_proj",
        "single_transformer_blocks.*.attn.to_out",
    )

    def guides(self, guidance_scale: float) -> bool:
        """The released (step-distilled) klein models run no guidance: the pipeline skips it (``is_distilled``)."""
        return super().guides(guidance_scale) and not self.pipeline.config.get("is_distilled", False)

    def schedule_kwargs(self, num_steps: int) -> dict[str, Any]:
        """Its pipeline's ``mu`` depends on the number of steps too (an empirical fit)."""
        return {**self.base_sigmas(num_steps), "mu": compute_empirical_mu(self.tokens, num_steps)}

    def encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _ = self.pipeline.encode_prompt(prompt=prompts, device=self.device)
        return {"prompt_embeds": embeds}

    def transformer_output(self, x: Tensor, sigma: Tensor, embeds: dict[str, Tensor]) -> Tensor:
        text = embeds["prompt_embeds"]
        half = self.latent_size // 2
        guidance = torch.full_like(sigma, self.embedded_guidance) if self.transformer.config.guidance_embeds else None
        return self.transformer(
            hidden_states=x,
            timestep=sigma,
            guidance=guidance,
            encoder_hidden_states=text,
            txt_ids=self.pipeline._prepare_text_ids(text).to(x.device),
            img_ids=self.pipeline._prepare_latent_ids(x.new_empty(x.shape[0], 1, half, half)).to(x.device),
            return_dict=False,
        )[0]

    def vae_latents(self, latents: Tensor) -> Tensor:
        half = self.latent_size // 2
        patches = latents.transpose(1, 2).reshape(latents.shape[0], -1, half, half)  # tokens are row-major
        bn = self.vae.bn
        std = torch.sqrt(bn.running_var + self.vae.config.batch_norm_eps).view(1, -1, 1, 1).to(patches)
        return self.pipeline._unpatchify_latents(patches * std + bn.running_mean.view(1, -1, 1, 1).to(patches))
