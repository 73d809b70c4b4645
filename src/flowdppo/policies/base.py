"""The base of the diffusers pipeline adapters: ``PipelinePolicy`` (loading, text encoding, guidance, decoding)
and ``PackedLatentPolicy`` (packed 2x2 latent tokens, the token-count shift of FLUX.1 / Qwen-Image).

Text encoders (``text_encoders``): "keep" them on the device for the whole run, "offload" them to the CPU
between encodings (moved to the device only to encode prompts not yet cached), or "free" them once every
prompt of the run is encoded (``free_text_encoders``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import Tensor, nn

from flowdppo.errors import ConfigError
from flowdppo.policies.comfyui import DIFFUSERS_NAMES, ComfyUINames
from flowdppo.policies.limits import positions_error
from flowdppo.prompts import PromptBatch

# LoRA presets (names as peft matches them, a suffix of the module's name; ``*`` is one block index): the image
# stream's attention projections, in every block of every kind, and the joint attention's text-stream projections
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_PROJECTIONS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class PipelinePolicy(nn.Module):
    """The velocity, schedule, text encoding and VAE decoding of one diffusers pipeline family."""

    pipeline_class: ClassVar[type[DiffusionPipeline]]
    lora_target_modules: ClassVar[tuple[str, ...]] = ATTENTION_PROJECTIONS  # reaches every block
    lora_text_modules: ClassVar[tuple[str, ...]] = TEXT_PROJECTIONS  # with optim.lora_text_stream
    comfyui_names: ClassVar[ComfyUINames] = DIFFUSERS_NAMES  # the LoRA keys ComfyUI's loader maps

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        resolution: int,
        embedded_guidance: float = 3.5,
        negative_prompt: str = "",
        text_encoders: str = "keep",
        vae_tiling: bool = False,
        attention_backend: str = "",
        vae_slicing: bool = False,
    ) -> None:
        super().__init__()
        self.set_size(pipeline, resolution)
        self.pipeline = pipeline  # text encoders, tokenizers, scheduler (not trained, not registered)
        self.transformer = pipeline.transformer
        self.vae = pipeline.vae
        self.embedded_guidance = embedded_guidance
        self.negative_prompt = negative_prompt
        self.text_encoders = text_encoders
        self.source = ""  # the folder or hub id the pipeline was loaded from (set by from_pretrained)
        self.freed: list[str] = []  # text encoders dropped by free_text_encoders
        self._null: dict[str, Tensor] | None = None
        if vae_tiling:
            if not hasattr(self.vae, "enable_tiling"):
                raise ConfigError(f"vae_tiling: the {type(self.vae).__name__} of this model cannot decode in tiles")
            self.vae.enable_tiling()
        if vae_slicing:
            if not hasattr(self.vae, "enable_slicing"):
                raise ConfigError(
                    f"vae_slicing: the {type(self.vae).__name__} of this model cannot decode one sample at a time"
                )
            self.vae.enable_slicing()
        if attention_backend:
            try:
                for name, component in pipeline.components.items():  # every expert (Wan 2.2's transformer_2)
                    if name.startswith("transformer") and component is not None:
                        component.set_attention_backend(attention_backend)
            except (ValueError, RuntimeError, ImportError) as err:
                raise ConfigError(f"attention_backend: {err}") from err

    def set_size(self, pipeline: DiffusionPipeline, resolution: int) -> None:
        """Check ``resolution`` against the VAE's downsampling times the 2x2 patches; the latent side ``h = w``."""
        multiple = pipeline.vae_scale_factor * 2
        if resolution <= 0 or resolution % multiple:
            raise ConfigError(f"resolution: must be a positive multiple of {multiple} for this model, got {resolution}")
        error = positions_error(
            pipeline.transformer, "resolution", resolution, resolution // multiple, lambda patches: patches * multiple
        )
        if error:
            raise ConfigError(error)
        self.resolution = resolution
        self.latent_size = resolution // pipeline.vae_scale_factor  # h = w of the VAE latent

    @classmethod
    def from_pretrained(
        cls, model: str, resolution: int, torch_dtype: torch.dtype, device: torch.device | str, **kwargs: Any
    ) -> PipelinePolicy:
        """Load the pipeline (frozen, eval mode) in ``torch_dtype`` onto ``device`` (text encoders stay on
        the CPU unless ``text_encoders="keep"``)."""
        pipeline = cls.pipeline_class.from_pretrained(model, dtype=torch_dtype, use_safetensors=True)
        pipeline.set_progress_bar_config(disable=True)
        on_device = kwargs.get("text_encoders", "keep") == "keep"
        for name, component in pipeline.components.items():
            if isinstance(component, nn.Module):
                component.requires_grad_(False).eval()
                if on_device or name not in text_encoder_names(pipeline):
                    component.to(device)
        policy = cls(pipeline, resolution, **kwargs)
        policy.source = model
        return policy

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def experts(self) -> dict[str, nn.Module]:
        """The denoising networks by pipeline component name: ``{"transformer": ...}`` (Wan 2.2 A14B: two)."""
        return {"transformer": self.transformer}

    def enable_gradient_checkpointing(self) -> None:
        """diffusers' activation checkpointing of the transformer blocks of every expert (used only while
        gradients are on)."""
        for expert in self.experts.values():
            expert.enable_gradient_checkpointing()

    def shard_units(self) -> list[nn.Module]:
        """Every transformer block FSDP2 shards on its own: double- and single-stream (FLUX) alike."""
        blocks = [getattr(self.transformer, name, ()) for name in ("transformer_blocks", "single_transformer_blocks")]
        return [block for kind in blocks for block in kind]

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def tokens(self) -> int:
        """Image tokens the transformer sees: ``(h / 2) * (w / 2)``."""
        return (self.latent_size // 2) ** 2

    def save_pretrained(self, directory) -> None:
        """The whole pipeline (fully fine-tuned transformer included), loadable with ``from_pretrained``
        (freed text encoders are read again from the source, on the CPU)."""
        pipeline = self.pipeline
        if self.freed:
            pipeline = self.pipeline_class.from_pretrained(
                self.source, **self.experts, vae=self.vae, dtype=self.dtype, use_safetensors=True
            )
        pipeline.save_pretrained(directory)

    # ---- what each family defines -------------------------------------------------------------
    latent_shape: tuple[int, ...]

    def schedule_kwargs(self, num_steps: int) -> dict[str, Any]:
        """Arguments of ``scheduler.set_timesteps`` that give the pipeline's own schedule."""
        raise NotImplementedError

    def encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{name: (n, ...)}`` embeddings of ``prompts`` from the pipeline's text encoders (on the device)."""
        raise NotImplementedError

    def transformer_output(self, x: Tensor, sigma: Tensor, embeds: dict[str, Tensor]) -> Tensor:
        """One transformer call on ``x`` (B, *latent_shape) in the model's dtype."""
        raise NotImplementedError

    def vae_latents(self, latents: Tensor) -> Tensor:
        """Transformer-layout latents -> de-normalised VAE latents."""
        raise NotImplementedError

    # ---- shared ------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{name: (n, ...)}`` embeddings of ``prompts``; offloaded text encoders visit the device meanwhile."""
        if self.freed:
            raise RuntimeError(
                f"text_encoders=free: cannot encode {prompts[:1]}, the encoders were dropped after "
                f"every prompt of the run was encoded"
            )
        names = text_encoder_names(self.pipeline)
        if self.text_encoders != "offload":
            return self.encode_text(prompts)
        for name in names:
            getattr(self.pipeline, name).to(self.device)
        try:
            return self.encode_text(prompts)
        finally:
            for name in names:
                getattr(self.pipeline, name).to("cpu")

    def free_text_encoders(self) -> None:
        """Drop the text encoders (their memory is released); the negative prompt is encoded first."""
        self.null_embeddings()
        self.freed = text_encoder_names(self.pipeline)
        for name in self.freed:
            setattr(self.pipeline, name, None)

    def sigmas(self, num_steps: int) -> Tensor:
        """The scheduler's ``num_steps + 1`` noise levels, from 1 down to 0 (float32, CPU)."""
        scheduler = self.pipeline.scheduler
        try:
            scheduler.set_timesteps(**self.schedule_kwargs(num_steps), device="cpu")
        except OverflowError as err:  # math.exp of a shift mu linear in the token count
            raise ConfigError(
                f"resolution: {self.tokens:,} image tokens shift the schedule beyond what the scheduler "
                f"computes ({err}); use a smaller resolution"
            ) from err
        return scheduler.sigmas.float().cpu()

    def unpack(self, latents: Tensor) -> Tensor:
        """Packed 2x2 tokens -> VAE latents, with the pipeline's own ``_unpack_latents`` (FLUX, Qwen-Image)."""
        return self.pipeline._unpack_latents(latents, self.resolution, self.resolution, self.pipeline.vae_scale_factor)

    def velocity(self, x: Tensor, sigma: float | Tensor, cond: PromptBatch, guidance_scale: float = 1.0) -> Tensor:
        """Velocity ``v = eps - x0`` at ``x`` (B, *latent_shape), with guidance as the pipeline runs it."""
        batch = x.shape[0]
        if len(cond) != batch:
            raise ValueError(f"got {len(cond)} prompts for a batch of {batch} latents")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.expand(batch) if sigma.ndim == 0 else sigma.reshape(batch)
        x_in, embeds = x.to(self.dtype), cond.embeddings()
        if not self.guides(guidance_scale):
            return self.transformer_output(x_in, sigma, embeds).float().to(x.dtype)
        null = {k: t.expand(batch, *t.shape[1:]) for k, t in self.null_embeddings().items()}
        both = {k: cat_padded(embeds[k], null[k]) for k in embeds}  # one call: [conditional, unconditional]
        v_c, v_u = self.transformer_output(torch.cat([x_in, x_in]), torch.cat([sigma, sigma]), both).float().chunk(2)
        return self.guided(v_c, v_u, self.guidance_scales(sigma, guidance_scale)).to(x.dtype)

    def guides(self, guidance_scale: float) -> bool:
        """Whether the pipeline runs classifier-free guidance at this scale (its own rule: ``w > 1``)."""
        return guidance_scale > 1.0

    def guidance_scales(self, sigma: Tensor, guidance_scale: float) -> float | Tensor:
        """The guidance scale of each sample at noise levels ``sigma`` (B,): ``guidance_scale`` for all (a
        two-expert model gives its low-noise expert's samples their own)."""
        return guidance_scale

    def guided(self, v_c: Tensor, v_u: Tensor, guidance_scale: float) -> Tensor:
        """Classifier-free guidance ``v_u + w (v_c - v_u)``."""
        return v_u + guidance_scale * (v_c - v_u)

    def forward(self, x: Tensor, sigma: float | Tensor, cond: PromptBatch, guidance_scale: float = 1.0) -> Tensor:
        """Same as ``velocity`` (so wrappers such as DDP call the right thing)."""
        return self.velocity(x, sigma, cond, guidance_scale)

    def null_embeddings(self) -> dict[str, Tensor]:
        """The negative prompt's embeddings (1, ...), the unconditional branch of guidance."""
        if self._null is None:
            self._null = self.encode_prompts([self.negative_prompt])
        return self._null

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images ``(B, 3, H, W)`` in ``[0, 1]``, float32 (a video VAE's one frame, Qwen-Image)."""
        images = self.vae.decode(self.vae_latents(latents.to(self.vae.dtype)), return_dict=False)[0]
        images = images[:, :, 0] if images.ndim == 5 else images  # (B, 3, frames, H, W) -> (B, 3, H, W)
        return ((images.float() + 1) / 2).clamp(0, 1)


class PackedLatentPolicy(PipelinePolicy):
    """Latents as the transformer takes them: ``(h/2 * w/2)`` tokens of ``in_channels`` (2x2 patches), and
    the sigmas ``linspace(1, 1/K, K)`` shifted by ``mu``, linear in the token count (FLUX.1, Qwen-Image)."""

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.tokens, self.transformer.config.in_channels)

    flow_sigmas_option: ClassVar[bool] = True  # a scheduler with use_flow_sigmas computes its own (FLUX pipelines)

    def schedule_kwargs(self, num_steps: int) -> dict[str, Any]:
        return {**self.base_sigmas(num_steps), "mu": calculate_mu(self.pipeline.scheduler.config, self.tokens)}

    def base_sigmas(self, num_steps: int) -> dict[str, Any]:
        """The unshifted ``linspace(1, 1/K, K)``, unless the scheduler makes its own (``use_flow_sigmas``, which
        the FLUX pipelines honour and Qwen-Image's does not)."""
        if self.flow_sigmas_option and self.pipeline.scheduler.config.get("use_flow_sigmas", False):
            return {"num_inference_steps": num_steps}
        return {"sigmas": linear_sigmas(num_steps)}


def text_encoder_names(pipeline: DiffusionPipeline) -> list[str]:
    """The pipeline's text encoder components still present (``text_encoder``, ``text_encoder_2``, ...)."""
    return [name for name, c in pipeline.components.items() if name.startswith("text_encoder") and c is not None]


def cat_padded(a: Tensor, b: Tensor) -> Tensor:
    """``a`` and ``b`` stacked along the batch, the shorter text sequence (dim 1) right-padded with zeros
    (a zero mask entry: padding, for the models that take a text mask)."""
    if a.ndim > 1 and a.shape[1] != b.shape[1]:
        length = max(a.shape[1], b.shape[1])
        a, b = (torch.nn.functional.pad(t, (0, 0) * (t.ndim - 2) + (0, length - t.shape[1])) for t in (a, b))
    return torch.cat([a, b])


def linear_sigmas(num_steps: int) -> np.ndarray:
    """The FLUX / Qwen-Image pipelines' unshifted sigmas ``linspace(1, 1/K, K)``."""
    return np.linspace(1.0, 1 / num_steps, num_steps)


def calculate_mu(config, tokens: int, default_max_shift: float = 1.15) -> float:
    """The resolution-dependent shift: ``mu`` linear in the token count between the config's anchors (a config
    without ``max_shift`` takes the pipeline's own fallback: 1.15, SD3's 1.16)."""
    return calculate_shift(
        tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", default_max_shift),
    )
