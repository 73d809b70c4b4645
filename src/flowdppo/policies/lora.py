"""Trainable parameters of a policy: LoRA adapters through peft, or the full transformer.

LoRA goes through diffusers' own peft integration (``transformer.add_adapter``), so the adapter a run
trains is exactly what ``pipeline.load_lora_weights`` loads back. The reference policy for the KL to the
base is the same network with its adapters disabled; for full fine-tuning it is a frozen copy.

Target names match as in peft (a module whose full name ends with the name, after a dot), and a ``*`` stands
for one block index: ``single_transformer_blocks.*.attn.to_out`` is the single-stream blocks' ``to_out`` and
not the double-stream blocks' ``attn.to_out`` (a ``ModuleList`` holding ``to_out.0``). A policy's preset is
``lora_target_modules`` (the image stream, every block) plus ``lora_text_modules`` (the text stream's
projections, ``optim.lora_text_stream``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import Tensor, nn

from flowdppo.errors import ConfigError

ADAPTER_NAME = "default"
LORA_FILE = "pytorch_lora_weights.safetensors"  # what pipeline.load_lora_weights(folder) reads
COMFYUI_FILE = "comfyui_lora.safetensors"  # the ComfyUI export: one file for its LoRA loader
PREFIX = "transformer."  # the transformer's keys in a pipeline LoRA file (diffusers and ComfyUI alike)


def make_trainable(
    policy: nn.Module,
    lora_rank: int,
    lora_alpha: float,
    target_modules: tuple[str, ...] | list[str] = (),
    text_stream: bool = True,
) -> None:
    """Freeze the policy, then add a LoRA adapter (rank > 0) or unfreeze the whole transformer (rank 0).

    ``target_modules`` empty: the policy's preset (``lora_targets``), with or without the text stream.
    Trained weights are kept in float32 (master weights) whatever the dtype of the frozen base.
    """
    policy.requires_grad_(False)
    if lora_rank > 0:
        explicit = tuple(target_modules)
        targets = explicit or lora_targets(policy, text_stream)
        names = [name for name, _ in policy.transformer.named_modules()]
        unmatched = [t for t in explicit if not any(re.fullmatch(target_pattern((t,)), n) for n in names)]
        if unmatched:
            raise ConfigError(f"optim.lora_target_modules: {unmatched[0]!r} names no module of the transformer")
        try:
            policy.transformer.add_adapter(lora_config(lora_rank, lora_alpha, targets), adapter_name=ADAPTER_NAME)
        except ValueError as err:  # peft: no module matches, or one that is not a layer LoRA can wrap
            raise ConfigError(f"optim.lora_target_modules: {err}") from err
    else:
        policy.transformer.requires_grad_(True)
    cast_training_params(policy.transformer, torch.float32)


def lora_targets(policy, text_stream: bool = True) -> tuple[str, ...]:
    """The policy's preset: its image-stream modules in every block, and the text stream's projections."""
    return (*policy.lora_target_modules, *(policy.lora_text_modules if text_stream else ()))


def target_pattern(target_modules) -> str:
    """One peft ``target_modules`` regex (matched against the full module name) for target names: a name
    matches a module whose name ends with it, and ``*`` is one block index."""
    names = (re.escape(name).replace(r"\*", r"\d+") for name in target_modules)
    return r"(?:.*\.)?(?:" + "|".join(names) + ")"


def lora_config(lora_rank: int, lora_alpha: float, target_modules) -> LoraConfig:
    """The adapter's peft config (training only; an exported adapter carries ``adapter_metadata``)."""
    return LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=target_pattern(target_modules))


def lora_modules(state: dict[str, Tensor]) -> list[str]:
    """The wrapped modules' full names, from an adapter's weights (``<module>.lora_A.weight`` ...)."""
    return sorted({key.split(".lora_", 1)[0] for key in state})


def adapter_metadata(state: dict[str, Tensor], lora_rank: int, lora_alpha: float) -> dict:
    """What diffusers rebuilds the adapter from (``LoraConfig(**metadata)``): rank, alpha and the wrapped modules
    by full name. Only keys every peft release knows, not peft's whole ``to_dict()``: an older peft's
    ``LoraConfig`` refuses a key it does not have. Without this metadata a loader takes alpha = rank and
    silently rescales the update."""
    return {"r": lora_rank, "lora_alpha": lora_alpha, "target_modules": lora_modules(state)}


def comfyui_state_dict(state: dict[str, Tensor], lora_alpha: float) -> dict[str, Tensor]:
    """An adapter's weights (peft names) as ComfyUI's LoRA loader reads a diffusers-format transformer LoRA:
    ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight`` and ``transformer.<module>.alpha``, a scalar.

    ComfyUI scales each update by ``alpha / rank`` from that tensor alone (no alpha: scale 1, an r 32 /
    alpha 64 adapter at half strength)."""
    out = {}
    for module in lora_modules(state):
        for part in ("lora_A.weight", "lora_B.weight"):
            out[f"{PREFIX}{module}.{part}"] = state[f"{module}.{part}"].detach().float().cpu().contiguous()
        out[f"{PREFIX}{module}.alpha"] = torch.tensor(float(lora_alpha))
    return out


def uses_lora(policy: nn.Module) -> bool:
    return bool(getattr(policy.transformer, "peft_config", None))


def trainable_state_dict(policy: nn.Module) -> dict[str, Tensor]:
    """The trained weights: the LoRA layers (peft names), or the full transformer's state."""
    if uses_lora(policy):
        return {k: v.detach() for k, v in get_peft_model_state_dict(policy.transformer).items()}
    return {k: v.detach() for k, v in policy.transformer.state_dict().items()}


def load_trainable_state_dict(policy: nn.Module, state: dict[str, Tensor]) -> None:
    if uses_lora(policy):
        result = set_peft_model_state_dict(policy.transformer, state, adapter_name=ADAPTER_NAME)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"LoRA state has keys the model does not: {result.unexpected_keys[:3]}")
    else:
        policy.transformer.load_state_dict(state)


@contextmanager
def adapters_disabled(policy: nn.Module) -> Iterator[None]:
    """Run the base model: LoRA adapters off inside the block."""
    policy.transformer.disable_adapters()
    try:
        yield
    finally:
        policy.transformer.enable_adapters()


def reference_policy(policy: nn.Module) -> nn.Module | None:
    """A frozen copy of the base for full fine-tuning; None with LoRA (the adapters are switched off).

    Only the transformer is copied: the rest (text encoders, VAE, prompt tables) is frozen and shared."""
    if uses_lora(policy):
        return None
    reference = copy.copy(policy)  # a new module object whose registries are copied below, not shared
    reference._modules, reference._parameters, reference._buffers = (dict(policy._modules), dict(policy._parameters),
                                                                     dict(policy._buffers))  # fmt: skip
    reference.transformer = copy.deepcopy(policy.transformer).requires_grad_(False).eval()
    return reference


def save_lora_adapter(policy: nn.Module, directory: Path) -> None:
    """Write the adapter in the format ``pipeline.load_lora_weights(directory)`` accepts, with the adapter's
    rank, alpha and modules as metadata (``adapter_metadata``)."""
    transformer = policy.transformer
    config = transformer.peft_config[ADAPTER_NAME]
    state = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    policy.pipeline_class.save_lora_weights(
        directory,
        transformer_lora_layers=state,
        transformer_lora_adapter_metadata=adapter_metadata(state, config.r, config.lora_alpha),
    )


def load_lora_adapter(policy: nn.Module, directory: Path) -> None:
    """Load an adapter written by ``save_lora_adapter`` into ``policy.transformer`` (safetensors)."""
    transformer = policy.transformer
    transformer.load_lora_adapter(
        str(directory), weight_name=LORA_FILE, prefix="transformer", adapter_name=ADAPTER_NAME
    )


def trainable_parameters(policy: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in policy.parameters() if p.requires_grad]
