"""The digits policy: a tiny diffusers ``SD3Transformer2DModel`` conditioned on a digit class.

The text encoders of SD3 are replaced by two learned tables indexed by the class (``0..9``, and ``10`` =
the null prompt for classifier-free guidance):

- ``prompt_embeds``: class -> one token ``encoder_hidden_states`` ``(B, 1, joint_attention_dim)``;
- ``pooled_embeds``: class -> ``pooled_projections`` ``(B, pooled_projection_dim)``.

The transformer is the same class as in SD3 / SD3.5, so LoRA (peft, on ``to_q``, ``to_k``, ``to_v``,
``to_out.0``, ``add_q_proj``, ``add_k_proj``, ``add_v_proj``, ``to_add_out``), saving and loading go
through the same code as a real model. On disk (``save_pretrained``)::

    dir/transformer/config.json
    dir/transformer/diffusion_pytorch_model.safetensors
    dir/prompt_embeddings.safetensors      # prompt_embeds.weight, pooled_embeds.weight
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from flowdppo.tasks.digits import base_weights_dir
from flowdppo.tasks.digits.data import NULL_CLASS, NUM_CLASSES, as_labels, decode_latents

TRANSFORMER_SUBFOLDER = "transformer"
EMBEDDINGS_FILE = "prompt_embeddings.safetensors"

# 582k parameters; caption_projection_dim must equal num_attention_heads * attention_head_dim.
DEFAULT_TRANSFORMER_CONFIG: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 1,
    "sample_size": 8,
    "patch_size": 2,  # 8x8 image -> 16 tokens
    "pos_embed_max_size": 4,  # 8 / patch_size
    "num_layers": 4,
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "joint_attention_dim": 32,  # width of the one prompt token
    "caption_projection_dim": 64,  # = heads * head_dim
    "pooled_projection_dim": 32,
}

# The attention projections a LoRA adapter targets (as in the SD3 LoRA recipes).
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")  # the image stream
LORA_TEXT_MODULES = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")  # the text stream (lora_text_stream)


class DigitsPolicy(nn.Module):
    """Class-conditional velocity model ``v_theta(x, sigma, c)`` on 8x8 digit latents ``(B, 1, 8, 8)``.

    The latent space is the image space scaled to ``[-1, 1]``; the transformer gets ``timestep = 1000 sigma``.
    """

    lora_target_modules: tuple[str, ...] = LORA_TARGET_MODULES  # the modules a LoRA adapter wraps
    lora_text_modules: tuple[str, ...] = LORA_TEXT_MODULES  # and those of the text stream
    pipeline_class = StableDiffusion3Pipeline  # whose save_lora_weights writes the adapter

    def __init__(self, transformer: SD3Transformer2DModel) -> None:
        super().__init__()
        self.transformer = transformer
        cfg = transformer.config
        self.prompt_embeds = nn.Embedding(NUM_CLASSES + 1, cfg.joint_attention_dim)  # row 10: null prompt
        self.pooled_embeds = nn.Embedding(NUM_CLASSES + 1, cfg.pooled_projection_dim)

    @classmethod
    def from_config(cls, **overrides: Any) -> DigitsPolicy:
        """A randomly initialised policy; ``overrides`` update ``DEFAULT_TRANSFORMER_CONFIG``."""
        config = {**DEFAULT_TRANSFORMER_CONFIG, **overrides}
        return cls(SD3Transformer2DModel(**config))

    @property
    def device(self) -> torch.device:
        return self.prompt_embeds.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def _forward(self, x: Tensor, sigma: Tensor, labels: Tensor) -> Tensor:
        """One transformer call: ``x`` (B, 1, 8, 8), ``sigma`` (B,), ``labels`` (B,) -> velocity (B, 1, 8, 8)."""
        dtype = self.transformer.dtype
        encoder_hidden_states = self.prompt_embeds(labels).unsqueeze(1).to(dtype)  # (B, 1, joint_dim)
        pooled = self.pooled_embeds(labels).to(dtype)  # (B, pooled_dim)
        out = self.transformer(
            hidden_states=x.to(dtype),
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled,
            timestep=sigma.float() * 1000,  # diffusers time convention; sinusoids in float32
            return_dict=False,
        )[0]
        return out.to(x.dtype)

    def velocity(self, x: Tensor, sigma: float | Tensor, cond: Any, guidance_scale: float = 1.0) -> Tensor:
        """Velocity ``v = eps - x0`` at ``x`` (B, 1, 8, 8), noise level ``sigma`` (float or (B,)).

        ``cond``: digit labels (B,) (tensor, ints or digit strings). ``guidance_scale`` ``w = 1``: one
        conditional call; ``w != 1``: ``v_u + w (v_c - v_u)`` from one batched call of size 2B, where
        ``v_u`` uses the null class.
        """
        batch = x.shape[0]
        labels = as_labels(cond, device=x.device)
        if labels.shape[0] != batch:
            raise ValueError(f"got {labels.shape[0]} prompts for a batch of {batch} latents")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.expand(batch) if sigma.ndim == 0 else sigma.reshape(batch)
        if guidance_scale == 1.0:
            return self._forward(x, sigma, labels)
        null = torch.full_like(labels, NULL_CLASS)
        v_u, v_c = self._forward(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([null, labels])).chunk(2)
        return v_u + guidance_scale * (v_c - v_u)  # classifier-free guidance

    def forward(self, x: Tensor, sigma: float | Tensor, cond: Any, guidance_scale: float = 1.0) -> Tensor:
        """Same as ``velocity`` (so wrappers such as DDP call the right thing)."""
        return self.velocity(x, sigma, cond, guidance_scale)

    def enable_gradient_checkpointing(self) -> None:
        """diffusers' activation checkpointing of the transformer blocks (used only while gradients are on)."""
        self.transformer.enable_gradient_checkpointing()

    def shard_units(self) -> list[nn.Module]:
        """The transformer blocks, each sharded on its own by FSDP2."""
        return list(self.transformer.transformer_blocks)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(u*u, 8, 8)``: one channel for the 8x8 task, ``u*u`` for digits upsampled ``u`` times."""
        return (self.transformer.config.in_channels, 8, 8)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents in ``[-1, 1]`` -> 8x8 images in ``[0, 1]``, float32: ``clamp((x + 1) / 2, 0, 1)``; a latent of
        ``u*u`` channels is first ``pixel_shuffle``d to ``8u x 8u`` and block-averaged back (``decode_latents``)."""
        return decode_latents(latents.float())

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write ``transformer/`` (diffusers ``save_pretrained``) and ``prompt_embeddings.safetensors``."""
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(save_directory / TRANSFORMER_SUBFOLDER)
        tables = {
            "prompt_embeds.weight": self.prompt_embeds.weight.detach().float().cpu().contiguous(),
            "pooled_embeds.weight": self.pooled_embeds.weight.detach().float().cpu().contiguous(),
        }
        save_file(tables, str(save_directory / EMBEDDINGS_FILE))

    @classmethod
    def from_pretrained(cls, pretrained_path: str | Path, torch_dtype: torch.dtype | None = None) -> DigitsPolicy:
        """Load a directory written by ``save_pretrained`` (diffusers loader + safetensors, no pickle)."""
        pretrained_path = Path(pretrained_path)
        emb_file = pretrained_path / EMBEDDINGS_FILE
        if not (pretrained_path / TRANSFORMER_SUBFOLDER).is_dir() or not emb_file.is_file():
            raise FileNotFoundError(
                f"{pretrained_path} is not a digits policy directory: expected "
                f"'{TRANSFORMER_SUBFOLDER}/' and '{EMBEDDINGS_FILE}' (written by DigitsPolicy.save_pretrained)"
            )
        transformer = SD3Transformer2DModel.from_pretrained(
            pretrained_path, subfolder=TRANSFORMER_SUBFOLDER, torch_dtype=torch_dtype, use_safetensors=True
        )
        tables = load_file(str(emb_file))
        policy = cls(transformer)
        policy.prompt_embeds.load_state_dict({"weight": tables["prompt_embeds.weight"]})
        policy.pooled_embeds.load_state_dict({"weight": tables["pooled_embeds.weight"]})
        return policy.eval()


def load_base_policy(torch_dtype: torch.dtype | None = None, upsample: int = 1) -> DigitsPolicy:
    """The shipped, pretrained base policy of the digits task (``tasks/digits/weights/base``), or of
    ``digits.upsample=upsample`` (``weights/base_u4``, ``weights/base_u8``)."""
    return DigitsPolicy.from_pretrained(base_weights_dir(upsample), torch_dtype=torch_dtype)
