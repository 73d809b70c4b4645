"""Trainable parameters of a policy: LoRA adapters through peft, or the full transformer.

LoRA goes through diffusers' own peft integration (``transformer.add_adapter``), so the adapter a run
trains is exactly what ``pipeline.load_lora_weights`` loads back. The reference policy for the KL to the
base is the same network with its adapters disabled; for full fine-tuning it is a frozen copy.
"""

from __future__ import annotations

import copy
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


def make_trainable(
    policy: nn.Module, lora_rank: int, lora_alpha: float, target_modules: tuple[str, ...] | list[str] = ()
) -> None:
    """Freeze the policy, then add a LoRA adapter (rank > 0) or unfreeze the whole transformer (rank 0).

    ``target_modules`` empty: the policy's own ``lora_target_modules``. Trained weights are kept in
    float32 (master weights) whatever the dtype of the frozen base.
    """
    policy.requires_grad_(False)
    if lora_rank > 0:
        config = lora_config(lora_rank, lora_alpha, target_modules or policy.lora_target_modules)
        try:
            policy.transformer.add_adapter(config, adapter_name=ADAPTER_NAME)
        except ValueError as err:  # peft: a target module name the model does not have
            raise ConfigError(f"optim.lora_target_modules: {err}") from err
    else:
        policy.transformer.requires_grad_(True)
    cast_training_params(policy.transformer, torch.float32)


def lora_config(lora_rank: int, lora_alpha: float, target_modules) -> LoraConfig:
    """The adapter's peft config (also the metadata an exported adapter carries)."""
    return LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=list(target_modules))


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
    """Write the adapter in the format ``pipeline.load_lora_weights(directory)`` accepts.

    The adapter config (rank, alpha, targets) is stored as metadata; without it a loader falls back to
    alpha = rank and silently rescales the update.
    """
    transformer = policy.transformer
    state = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    policy.pipeline_class.save_lora_weights(
        directory,
        transformer_lora_layers=state,
        transformer_lora_adapter_metadata=transformer.peft_config[ADAPTER_NAME].to_dict(),
    )


def load_lora_adapter(policy: nn.Module, directory: Path) -> None:
    """Load an adapter written by ``save_lora_adapter`` into ``policy.transformer`` (safetensors)."""
    transformer = policy.transformer
    transformer.load_lora_adapter(
        str(directory), weight_name=LORA_FILE, prefix="transformer", adapter_name=ADAPTER_NAME
    )


def trainable_parameters(policy: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in policy.parameters() if p.requires_grad]
