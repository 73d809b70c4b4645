"""Policies over diffusers text-to-video pipelines: Wan 2.1 (``WanPipeline``, one transformer).

``WanPolicy`` gives the trainer what ``Policy`` asks for in Wan's own terms:

- latents ``(B, C, F, h, w)`` with ``F = (num_frames - 1) / 4 + 1``, ``h = height / 8``, ``w = width / 8`` (the
  VAE's temporal and spatial factors); ``num_frames = 4k + 1``, sizes multiples of ``8 x 2`` (patches ``(1, 2, 2)``);
- ``encode_text``: the pipeline's own UMT5 encoding (prompts cleaned, 512 tokens as its ``__call__``, zero-padded
  past each prompt);
- ``velocity``: one ``WanTransformer3DModel`` call with ``timestep = 1000 sigma`` (the scheduler's timesteps);
  classifier-free guidance as the other adapters (conditional and negative prompt batched in one call);
- ``sigmas(K)``: the scheduler's own ``K + 1`` levels (Wan 2.1 ships ``UniPCMultistepScheduler`` with flow sigmas
  ``shift s / (1 + (s - 1) sigma)``; the sampler here is Euler over those levels);
- ``decode``: ``z std + mean`` with the VAE's ``latents_mean`` / ``latents_std``, the causal 3-D decoder, videos
  ``(B, F, 3, H, W)`` in ``[0, 1]``.

Not here yet: Wan 2.2 A14B's two experts (``transformer_2`` below ``boundary_ratio``) and TI2V-5B's per-token
timesteps (``expand_timesteps``): such pipelines are refused.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline, WanPipeline
from torch import Tensor, nn

from flowdppo.errors import ConfigError
from flowdppo.policies.pipelines import ATTENTION_PROJECTIONS, PipelinePolicy

WAN_MAX_TEXT_TOKENS = 512  # WanPipeline.__call__'s max_sequence_length (its encode_prompt alone: 226)


def video_size_error(height: int, width: int, num_frames: int, spatial: int, patch: tuple[int, ...],
                     temporal: int) -> str:  # fmt: skip
    """The first problem of a video size for a VAE of factors ``(temporal, spatial)`` and ``(t, h, w)`` patches:
    ``num_frames = temporal k + 1`` and ``height, width`` positive multiples of ``spatial x patch``; "" if none."""
    if num_frames < 1 or (num_frames - 1) % (temporal * patch[0]):
        step = temporal * patch[0]
        return f"num_frames: must be {step}k + 1 (1, {step + 1}, {2 * step + 1}, ...) for this VAE, got {num_frames}"
    for key, size, multiple in (("height", height, spatial * patch[1]), ("width", width, spatial * patch[2])):
        if size <= 0 or size % multiple:
            return f"{key}: must be a positive multiple of {multiple} for this model (VAE x patch), got {size}"
    return ""


class WanPolicy(PipelinePolicy):
    """Wan 2.1 text-to-video (``WanTransformer3DModel``): latents ``(B, C, F, h, w)``, timestep ``1000 sigma``."""

    pipeline_class = WanPipeline
    lora_target_modules = ATTENTION_PROJECTIONS  # self-attention (attn1) and text cross-attention (attn2) alike
    lora_text_modules = ()  # no joint text stream (attn2's keys / values read the text and are in the preset)

    def __init__(self, pipeline: DiffusionPipeline, resolution: int, height: int = 0, width: int = 0,
                 num_frames: int = 81, **kwargs: Any) -> None:  # fmt: skip
        self.size = (height or resolution, width or resolution, num_frames)  # before the base checks it
        super().__init__(pipeline, resolution, **kwargs)
        if pipeline.transformer is None or pipeline.transformer_2 is not None or pipeline.config.expand_timesteps:
            raise ConfigError("model: only single-transformer Wan 2.1 pipelines are supported so far (not Wan 2.2 "
                              "A14B's two experts or TI2V-5B's per-token timesteps)")  # fmt: skip

    def set_size(self, pipeline: DiffusionPipeline, resolution: int) -> None:
        height, width, num_frames = self.size
        spatial, temporal = pipeline.vae_scale_factor_spatial, pipeline.vae_scale_factor_temporal
        error = video_size_error(height, width, num_frames, spatial, (1, *pipeline.transformer.config.patch_size[1:]),
                                 temporal)  # fmt: skip
        if error:
            raise ConfigError(error)
        self.height, self.width, self.num_frames = height, width, num_frames
        self.resolution = height
        self.latent_frames = (num_frames - 1) // temporal + 1
        self.latent_hw = (height // spatial, width // spatial)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.transformer.config.in_channels, self.latent_frames, *self.latent_hw)

    @property
    def tokens(self) -> int:
        """Video tokens the transformer sees: ``F (h / 2) (w / 2)``."""
        return self.latent_frames * (self.latent_hw[0] // 2) * (self.latent_hw[1] // 2)

    def shard_units(self) -> list[nn.Module]:
        """Wan's transformer blocks (``blocks``), each sharded on its own by FSDP2."""
        return list(self.transformer.blocks)

    def schedule_kwargs(self, num_steps: int) -> dict[str, Any]:
        return {"num_inference_steps": num_steps}  # the scheduler's static (flow) shift, as WanPipeline.__call__

    def encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _ = self.pipeline.encode_prompt(prompt=prompts, do_classifier_free_guidance=False, device=self.device,
                                                max_sequence_length=WAN_MAX_TEXT_TOKENS)  # fmt: skip
        return {"prompt_embeds": embeds.to(self.dtype)}

    def transformer_output(self, x: Tensor, sigma: Tensor, embeds: dict[str, Tensor]) -> Tensor:
        return self.transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=embeds["prompt_embeds"],
                                return_dict=False)[0]  # fmt: skip

    def vae_latents(self, latents: Tensor) -> Tensor:
        """``z std + mean`` per latent channel."""
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(latents)
        return latents * std + mean

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``(B, C, F, h, w)`` -> videos ``(B, frames, 3, H, W)`` in ``[0, 1]``, float32."""
        video = self.vae.decode(self.vae_latents(latents.to(self.vae.dtype)), return_dict=False)[0]  # (B, 3, T, H, W)
        return ((video.float() + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)


VIDEO_FAMILIES: dict[str, type[PipelinePolicy]] = {"WanPipeline": WanPolicy}
