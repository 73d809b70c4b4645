"""Policies over diffusers text-to-video pipelines: Wan 2.1 / 2.2 (``WanPipeline``).

``WanPolicy`` gives the trainer what ``Policy`` asks for in Wan's own terms:

- latents ``(B, C, F, h, w)`` with ``F = (num_frames - 1) / 4 + 1``, ``h = height / s``, ``w = width / s`` (the
  VAE's temporal and spatial factors, ``s`` 8, or 16 for Wan 2.2 TI2V-5B's 48-channel VAE); ``num_frames = 4k + 1``,
  sizes multiples of ``s x 2`` (patches ``(1, 2, 2)``);
- ``encode_text``: the pipeline's own UMT5 encoding (prompts cleaned, 512 tokens as its ``__call__``, zero-padded
  past each prompt);
- ``velocity``: one ``WanTransformer3DModel`` call with ``timestep = 1000 sigma`` (the scheduler's timesteps), per
  token (``(B, F h w / 4)``, all equal) where the pipeline has ``expand_timesteps`` (TI2V-5B, text-to-video);
  classifier-free guidance as the other adapters (conditional and negative prompt batched in one call);
- two experts (Wan 2.2 T2V-A14B: ``transformer_2`` and ``boundary_ratio`` ``b``): as ``WanPipeline.__call__``, a
  sample at ``timestep >= 1000 b`` goes through ``transformer`` (high noise) with ``guidance_scale``, one below
  through ``transformer_2`` (low noise) with ``guidance_scale_2`` (0: ``guidance_scale``); a batch of mixed noise
  levels is split by expert and put back in order;
- ``sigmas(K)``: the scheduler's own ``K + 1`` levels (Wan 2.1 ships ``UniPCMultistepScheduler`` with flow sigmas
  ``shift s / (1 + (s - 1) sigma)``; the sampler here is Euler over those levels);
- ``decode``: ``z std + mean`` with the VAE's ``latents_mean`` / ``latents_std``, the causal 3-D decoder, videos
  ``(B, F, 3, H, W)`` in ``[0, 1]``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline, WanPipeline
from torch import Tensor, nn

from flowdppo.errors import ConfigError
from flowdppo.policies.base import ATTENTION_PROJECTIONS, PipelinePolicy
from flowdppo.policies.comfyui import WAN_NAMES
from flowdppo.policies.limits import positions_error

WAN_MAX_TEXT_TOKENS = 512  # WanPipeline.__call__'s max_sequence_length (its encode_prompt alone: 226)


def video_size_error(
    height: int, width: int, num_frames: int, spatial: int, patch: tuple[int, ...], temporal: int
) -> str:
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
    """Wan 2.1 / 2.2 text-to-video (``WanTransformer3DModel``, one or two experts): latents ``(B, C, F, h, w)``,
    timestep ``1000 sigma``."""

    pipeline_class = WanPipeline
    lora_target_modules = ATTENTION_PROJECTIONS  # self-attention (attn1) and text cross-attention (attn2) alike
    lora_text_modules = ()  # no joint text stream (attn2's keys / values read the text and are in the preset)
    comfyui_names = WAN_NAMES  # ComfyUI's Wan model keeps the original Wan names (blocks.N.self_attn.q ...)

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        resolution: int,
        height: int = 0,
        width: int = 0,
        num_frames: int = 81,
        guidance_scale_2: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.size = (height or resolution, width or resolution, num_frames)  # before the base checks it
        if pipeline.transformer is None:
            raise ConfigError("model: this Wan pipeline has no `transformer` (the high-noise expert); it is required")
        boundary = pipeline.config.get("boundary_ratio")
        if boundary is not None and pipeline.transformer_2 is None:
            raise ConfigError(f"model: boundary_ratio {boundary} is set but the pipeline has no transformer_2")
        if boundary is None and guidance_scale_2:
            raise ConfigError(
                "sampler.guidance_scale_2: only for a two-expert Wan 2.2 model (transformer_2 and "
                "boundary_ratio); this model has one transformer"
            )
        super().__init__(pipeline, resolution, **kwargs)
        # the low-noise expert, registered (trained, sharded, moved) like transformer; None for one expert (a
        # transformer_2 without boundary_ratio is never run by the pipeline, nor here)
        self.transformer_2 = pipeline.transformer_2 if boundary is not None else None
        self.boundary_ratio = boundary
        self.guidance_scale_2 = guidance_scale_2
        self.expand_timesteps = bool(pipeline.config.get("expand_timesteps", False))
        self.num_train_timesteps = pipeline.scheduler.config.get("num_train_timesteps", 1000)

    @property
    def experts(self) -> dict[str, nn.Module]:
        """``{"transformer": high noise, "transformer_2": low noise}`` (Wan 2.2 A14B), or the one transformer."""
        if self.transformer_2 is None:
            return {"transformer": self.transformer}
        return {"transformer": self.transformer, "transformer_2": self.transformer_2}

    def low_noise(self, sigma: Tensor) -> Tensor:
        """Which samples the low-noise expert takes: ``timestep < boundary_ratio T`` (``WanPipeline.__call__``'s
        rule, ``timestep = T sigma``, ``T = 1000``); all False with one expert."""
        if self.boundary_ratio is None:
            return torch.zeros(sigma.shape, dtype=torch.bool, device=sigma.device)
        return sigma * self.num_train_timesteps < self.boundary_ratio * self.num_train_timesteps

    def guidance_scales(self, sigma: Tensor, guidance_scale: float) -> float | Tensor:
        """``guidance_scale`` for the high-noise expert's samples, ``guidance_scale_2`` (0: the same) for the
        low-noise expert's: ``(B, 1, 1, 1, 1)``."""
        if self.boundary_ratio is None or not self.guidance_scale_2:
            return guidance_scale
        scales = torch.where(self.low_noise(sigma), self.guidance_scale_2, guidance_scale).to(torch.float32)
        return scales.view(-1, *[1] * len(self.latent_shape))

    def set_size(self, pipeline: DiffusionPipeline, resolution: int) -> None:
        height, width, num_frames = self.size
        spatial, temporal = pipeline.vae_scale_factor_spatial, pipeline.vae_scale_factor_temporal
        p_t, p_h, p_w = pipeline.transformer.config.patch_size
        error = video_size_error(height, width, num_frames, spatial, (1, p_h, p_w), temporal)
        latent_frames = (num_frames - 1) // temporal + 1
        for option, value, patches, largest in (  # the patches along each axis vs the position embedding's
            ("num_frames", num_frames, latent_frames // p_t, lambda n: (n * p_t - 1) * temporal + 1),
            ("height", height, height // (spatial * p_h), lambda n: n * spatial * p_h),
            ("width", width, width // (spatial * p_w), lambda n: n * spatial * p_w),
        ):
            error = error or positions_error(pipeline.transformer, option, value, patches, largest)
        if error:
            raise ConfigError(error)
        self.height, self.width, self.num_frames = height, width, num_frames
        self.resolution = height
        self.latent_frames = latent_frames
        self.latent_hw = (height // spatial, width // spatial)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.transformer.config.in_channels, self.latent_frames, *self.latent_hw)

    @property
    def tokens(self) -> int:
        """Video tokens the transformer sees: ``F (h / 2) (w / 2)``."""
        return self.latent_frames * (self.latent_hw[0] // 2) * (self.latent_hw[1] // 2)

    def shard_units(self) -> list[nn.Module]:
        """Wan's transformer blocks (``blocks``, of every expert), each sharded on its own by FSDP2."""
        return [block for expert in self.experts.values() for block in expert.blocks]

    def schedule_kwargs(self, num_steps: int) -> dict[str, Any]:
        return {"num_inference_steps": num_steps}  # the scheduler's static (flow) shift, as WanPipeline.__call__

    def encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            do_classifier_free_guidance=False,
            device=self.device,
            max_sequence_length=WAN_MAX_TEXT_TOKENS,
        )
        return {"prompt_embeds": embeds.to(self.dtype)}

    def transformer_output(self, x: Tensor, sigma: Tensor, embeds: dict[str, Tensor]) -> Tensor:
        """Each sample through its expert (``low_noise``): one call per expert present in the batch."""
        low = self.low_noise(sigma)
        if not low.any():
            return self.expert_output(self.transformer, x, sigma, embeds)
        if low.all():
            return self.expert_output(self.transformer_2, x, sigma, embeds)
        parts, order = [], []
        for expert, rows in ((self.transformer, ~low), (self.transformer_2, low)):
            index = rows.nonzero().squeeze(1)
            parts.append(self.expert_output(expert, x[index], sigma[index], {k: t[index] for k, t in embeds.items()}))
            order.append(index)
        return torch.cat(parts)[torch.cat(order).argsort()]  # back in the batch's order

    def expert_output(self, expert: nn.Module, x: Tensor, sigma: Tensor, embeds: dict[str, Tensor]) -> Tensor:
        """One ``WanTransformer3DModel`` call: ``timestep = 1000 sigma`` ``(B,)``, or ``(B, tokens)`` with
        ``expand_timesteps`` (TI2V-5B: one timestep per video token, all equal in text-to-video)."""
        timestep = sigma * self.num_train_timesteps
        if self.expand_timesteps:
            timestep = timestep[:, None].expand(-1, self.tokens)
        return expert(
            hidden_states=x, timestep=timestep, encoder_hidden_states=embeds["prompt_embeds"], return_dict=False
        )[0]

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
