"""Policies over diffusers text-to-image pipelines: SD3 / SD3.5, FLUX.1, FLUX.2-klein, Qwen-Image.

Each adapter loads the pipeline with ``from_pretrained`` (a local folder or a hub id), and gives the
trainer what ``Policy`` asks for, in the model's own terms:

- ``encode_prompts``: the pipeline's own ``encode_prompt`` (its text encoders, its templates);
- ``velocity(x, sigma, prompts)``: one transformer call on latents in the transformer's own layout
  (SD3: ``(B, C, h, w)``; FLUX / FLUX.2 / Qwen-Image: packed tokens ``(B, h/2 * w/2, 4C)``), with
  ``timestep = 1000 sigma`` (SD3) or ``sigma`` (the others) as their pipelines pass it;
- ``sigmas(K)``: the scheduler's own ``K + 1`` noise levels (SD3: its static shift; FLUX / Qwen-Image:
  the shift ``mu`` computed from the image's token count, FLUX.2-klein: its empirical ``mu(tokens, K)``);
- ``decode``: the VAE's de-normalisation and decoder, images in ``[0, 1]``.

The model's output is the flow velocity ``v = eps - x0`` (diffusers' ``x_next = x + (sigma_next -
sigma) v``). Classifier-free guidance (``guidance_scale > 1``) runs the conditional and the unconditional
branch (the negative prompt, empty by default) in one batched transformer call; FLUX.1-dev's distilled
guidance is ``embedded_guidance`` (its guidance embedding).

The shared base (guidance, text encoders, decoding) is ``base.py``; each family is its own module (``sd3.py``,
``flux.py``, ``qwen_image.py``); this one holds the registry ``FAMILIES`` and the loading.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline

from flowdppo.errors import ConfigError
from flowdppo.policies.base import (
    ATTENTION_PROJECTIONS,
    TEXT_PROJECTIONS,
    PackedLatentPolicy,
    PipelinePolicy,
    cat_padded,
    text_encoder_names,
)
from flowdppo.policies.flux import Flux2KleinPolicy, FluxPolicy
from flowdppo.policies.qwen_image import QwenImagePolicy
from flowdppo.policies.sd3 import SD3Policy
from flowdppo.progress import status

__all__ = [  # the adapters' names, importable from here wherever they live
    "ATTENTION_PROJECTIONS",
    "FAMILIES",
    "TEXT_PROJECTIONS",
    "Flux2KleinPolicy",
    "FluxPolicy",
    "PackedLatentPolicy",
    "PipelinePolicy",
    "QwenImagePolicy",
    "SD3Policy",
    "cat_padded",
    "load_pipeline_policy",
    "pipeline_policy_class",
    "text_encoder_names",
]

FAMILIES: dict[str, type[PipelinePolicy]] = {
    "StableDiffusion3Pipeline": SD3Policy,
    "FluxPipeline": FluxPolicy,
    "Flux2KleinPipeline": Flux2KleinPolicy,
    "QwenImagePipeline": QwenImagePolicy,
}


def pipeline_policy_class(
    model: str, families: dict[str, type[PipelinePolicy]] | None = None, task: str = "text_to_image"
) -> type[PipelinePolicy]:
    """The adapter class for the pipeline named in ``model``'s ``model_index.json`` (read alone, no weights),
    among ``families`` (default: the image ``FAMILIES``) of ``task``."""
    families = FAMILIES if families is None else families
    try:
        class_name = DiffusionPipeline.load_config(model)["_class_name"]
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"model: {model!r} is not a diffusers pipeline folder or hub id ({err})") from err
    if class_name not in families:
        raise ConfigError(f"model: {model} is a {class_name}; task={task} supports: {', '.join(families)}")
    return families[class_name]


def load_pipeline_policy(
    model: str,
    resolution: int,
    torch_dtype: torch.dtype,
    device: torch.device | str,
    families: dict[str, type[PipelinePolicy]] | None = None,
    task: str = "text_to_image",
    **kwargs: Any,
) -> PipelinePolicy:
    """The adapter for the pipeline class named in ``model``'s ``model_index.json`` (a folder or hub id)."""
    family = pipeline_policy_class(model, families, task)
    class_name = family.pipeline_class.__name__
    status(f"loading the {class_name} {model}")
    try:
        return family.from_pretrained(model, resolution, torch_dtype, device, **kwargs)
    except ConfigError:
        raise
    except (OSError, ValueError) as err:
        raise ConfigError(f"model: cannot load {model} as a {class_name} ({err})") from err
