"""Policies: the only place that knows about a concrete model.

A policy maps a noisy latent, its noise level and a condition to a velocity; the trainer, the rollout
and the losses see nothing else of the model.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from torch import Tensor, nn


class Policy(Protocol):
    """What the rollout, the trainer and the export need from a model; the model facts live here."""

    transformer: nn.Module  # the network LoRA adapters are attached to
    lora_target_modules: ClassVar[tuple[str, ...]]  # the modules a LoRA adapter wraps by default, every block
    lora_text_modules: ClassVar[tuple[str, ...]]  # the text stream's, added with optim.lora_text_stream
    pipeline_class: ClassVar[type]  # the diffusers pipeline whose save_lora_weights writes the adapter

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the transformer blocks' activations in the backward pass instead of keeping them."""
        ...

    def shard_units(self) -> list[nn.Module]:
        """The blocks FSDP2 shards one by one (the transformer blocks of every kind)."""
        ...

    def velocity(self, x: Tensor, sigma: Tensor, cond: Any, guidance_scale: float = 1.0) -> Tensor:
        """Velocity ``v = eps - x0`` at latent ``x`` (B, ...) and noise level ``sigma`` (B,).

        ``guidance_scale`` 1 is the plain conditional model; ``w > 1`` is classifier-free guidance
        ``v_uncond + w * (v_cond - v_uncond)``.
        """
        ...

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any, guidance_scale: float = 1.0) -> Tensor:
        """The same as ``velocity`` (``forward``): the trainer calls the module, so DDP's and FSDP's hooks run."""
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, ...) -> images (B, C, H, W) in [0, 1] for the rewards."""
        ...
