"""The key names ComfyUI's LoRA loader maps, per model family.

ComfyUI patches the weights of its own model of each family, which keeps that family's original checkpoint names;
its loader (``comfy/lora.py``: ``model_lora_keys_unet``) maps a LoRA file's module keys onto them:

- SD3 / SD3.5, FLUX.1, FLUX.2, Qwen-Image: diffusers' names under ``transformer.``
  (``transformer.transformer_blocks.0.attn.to_q``), which ``comfy.utils.mmdit_to_diffusers`` /
  ``flux_to_diffusers`` map onto the fused MMDiT / FLUX weights, and which Qwen-Image's model has as they are;
- Wan 2.1 / 2.2: only its model's own (the original Wan) names, under ``diffusion_model.`` (or ``lora_unet_``):
  ``blocks.0.self_attn.q``, ``cross_attn``, ``ffn.0``; diffusers' ``WanTransformer3DModel`` names
  (``blocks.0.attn1.to_q``) map to nothing there, so they are renamed (``WAN_MODULES``).

A family declares its names with ``comfyui_names`` on its policy class; a module's weights are then
``<key>.lora_A.weight`` / ``<key>.lora_B.weight`` with ``<key>.alpha`` (``lora.comfyui_state_dict``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flowdppo.errors import ConfigError

# diffusers WanTransformer3DModel -> original Wan module names (ComfyUI's WanModel; ``*``: one block index)
WAN_MODULES = (
    ("blocks.*.attn1.to_q", "blocks.*.self_attn.q"),
    ("blocks.*.attn1.to_k", "blocks.*.self_attn.k"),
    ("blocks.*.attn1.to_v", "blocks.*.self_attn.v"),
    ("blocks.*.attn1.to_out.0", "blocks.*.self_attn.o"),
    ("blocks.*.attn2.to_q", "blocks.*.cross_attn.q"),
    ("blocks.*.attn2.to_k", "blocks.*.cross_attn.k"),
    ("blocks.*.attn2.to_v", "blocks.*.cross_attn.v"),
    ("blocks.*.attn2.to_out.0", "blocks.*.cross_attn.o"),
    ("blocks.*.attn2.add_k_proj", "blocks.*.cross_attn.k_img"),
    ("blocks.*.attn2.add_v_proj", "blocks.*.cross_attn.v_img"),
    ("blocks.*.ffn.net.0.proj", "blocks.*.ffn.0"),
    ("blocks.*.ffn.net.2", "blocks.*.ffn.2"),
    ("patch_embedding", "patch_embedding"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("proj_out", "head.head"),
)


@dataclass(frozen=True)
class ComfyUINames:
    """How a family's LoRA modules are keyed for ComfyUI: ``prefix`` + the module's name, renamed by ``modules``
    (diffusers -> ComfyUI pairs, ``*`` one block index; none: diffusers' own names)."""

    model: str  # the family, for messages
    prefix: str
    modules: tuple[tuple[str, str], ...] = ()

    def key(self, module: str) -> str:
        """The ComfyUI key of a diffusers module name; a module ComfyUI's model has no name for is a
        ``ConfigError`` (its loader would skip it)."""
        if not self.modules:
            return self.prefix + module
        for diffusers, comfy in self.modules:
            match = re.fullmatch(re.escape(diffusers).replace(r"\*", r"(\d+)"), module)
            if match:
                return self.prefix + comfy.replace("*", match.group(1) if match.groups() else "")
        raise ConfigError(
            f"--format comfyui: the adapter's module {module!r} has no name in ComfyUI's "
            f"{self.model} model; export --format diffusers, or train without it "
            f"(optim.lora_target_modules)"
        )


DIFFUSERS_NAMES = ComfyUINames("diffusers-named", "transformer.")  # SD3 / SD3.5, FLUX.1, FLUX.2, Qwen-Image
WAN_NAMES = ComfyUINames("Wan", "diffusion_model.", WAN_MODULES)


def comfyui_names(policy_class: type) -> ComfyUINames:
    """The family's names (its policy class's ``comfyui_names``; diffusers' own for a class without one, the
    built-in digits policy)."""
    return getattr(policy_class, "comfyui_names", DIFFUSERS_NAMES)
