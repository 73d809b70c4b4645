"""Trainable parameters of a policy: LoRA adapters through peft, or the full transformer.

LoRA goes through diffusers' own peft integration (``transformer.add_adapter``), so the adapter a run
trains is exactly what ``pipeline.load_lora_weights`` loads back. The reference policy for the KL to the
base is the same network with its adapters disabled; for full fine-tuning it is a frozen copy.

Target names match as in peft (a module whose full name ends with the name, after a dot), and a ``*`` stands
for one block index: ``single_transformer_blocks.*.attn.to_out`` is the single-stream blocks' ``to_out`` and
not the double-stream blocks' ``attn.to_out`` (a ``ModuleList`` holding ``to_out.0``). A policy's preset is
``lora_target_modules`` (the image stream, every block) plus ``lora_text_modules`` (the text stream's
projections, ``optim.lora_text_stream``).

A model with two experts (Wan 2.2 A14B: ``transformer`` for high noise, ``transformer_2`` for low noise, the
policy's ``experts``) gets an adapter on each (or on those ``optim.trained_experts`` names); its reference is each
expert with its adapter off; its trained weights are keyed ``<expert>.<name>``; its export is one
``load_lora_weights`` file per expert (``lora_file``), the low-noise one loaded with ``load_into_transformer_2=True``.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from torch import Tensor, nn

from flowdppo.errors import ConfigError, cut, did_you_mean, shown
from flowdppo.policies.comfyui import ComfyUINames

ADAPTER_NAME = "default"
LORA_FILE = "pytorch_lora_weights.safetensors"  # what pipeline.load_lora_weights(folder) reads
COMFYUI_FILE = "comfyui_lora.safetensors"  # the ComfyUI export: one file for its LoRA loader
PREFIX = "transformer."  # the transformer's keys in a pipeline LoRA file


def experts(policy: nn.Module) -> dict[str, nn.Module]:
    """The policy's denoising networks by pipeline component name (``policy.experts``; else its ``transformer``)."""
    return dict(getattr(policy, "experts", None) or {"transformer": policy.transformer})


def chosen_experts(policy: nn.Module, names: tuple[str, ...] | list[str] = ()) -> dict[str, nn.Module]:
    """The experts named in ``names`` (empty: all of them); an unknown name is a ``ConfigError``."""
    every = experts(policy)
    unknown = [name for name in names if name not in every]
    if unknown:
        raise ConfigError(
            f"optim.trained_experts: {shown(unknown[0])} is not an expert of this model"
            f"{did_you_mean(unknown[0], every)}; it has {', '.join(every)}"
        )
    return {name: module for name, module in every.items() if not names or name in names}


def make_trainable(
    policy: nn.Module,
    lora_rank: int,
    lora_alpha: float,
    target_modules: tuple[str, ...] | list[str] = (),
    text_stream: bool = True,
    trained_experts: tuple[str, ...] | list[str] = (),
) -> None:
    """Freeze the policy, then add a LoRA adapter (rank > 0) or unfreeze the whole network (rank 0), on each of
    ``trained_experts`` (empty: every expert, e.g. both of Wan 2.2 A14B).

    ``target_modules`` empty: the policy's preset (``lora_targets``), with or without the text stream.
    Trained weights are kept in float32 (master weights) whatever the dtype of the frozen base. Settings under
    which nothing could be trained (targets that name no layer, a rank above a targeted layer's sides, no trainable
    parameter at all) are a ``ConfigError`` naming the option.
    """
    policy.requires_grad_(False)
    for module in chosen_experts(policy, trained_experts).values():
        if lora_rank > 0:
            add_lora(
                module,
                lora_rank,
                lora_alpha,
                tuple(target_modules) or lora_targets(policy, text_stream),
                bool(target_modules),
            )
        else:
            module.requires_grad_(True)
        cast_training_params(module, torch.float32)
    if not any(p.numel() for p in trainable_parameters(policy)):
        raise ConfigError(
            "optim: these settings leave no parameter to train (optim.lora_rank, "
            "optim.lora_target_modules, optim.trained_experts); the policy could never move"
        )


def layer_sides(layer: nn.Module) -> tuple[int, int] | None:
    """(input, output) sizes of a layer LoRA wraps (a Linear's features, a convolution's channels, an Embedding's
    count and width); None for any other module."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, nn.modules.conv._ConvNd):
        return layer.in_channels, layer.out_channels
    if isinstance(layer, nn.Embedding):
        return layer.num_embeddings, layer.embedding_dim
    return None


def add_lora(module: nn.Module, rank: int, alpha: float, targets: tuple[str, ...], explicit: bool) -> None:
    """``module.add_adapter`` on the modules ``targets`` names (``target_pattern``), checked first: each explicit
    target names a module, some module is named, and ``rank`` is at most the smaller side of every named layer
    (beyond it B A cannot gain rank); a module peft cannot wrap is named in one line."""
    names = dict(module.named_modules())
    unmatched = [t for t in targets if explicit and not any(re.fullmatch(target_pattern((t,)), n) for n in names)]
    if unmatched:
        raise ConfigError(f"optim.lora_target_modules: {shown(unmatched[0])} names no module of the transformer")
    matched = {n: m for n, m in names.items() if re.fullmatch(target_pattern(targets), n)}
    if not matched:
        layers = [n for n, m in names.items() if isinstance(m, nn.Linear)][:3]
        raise ConfigError(
            f"optim.lora_target_modules: none of {', '.join(targets)} names a module of this "
            f"{type(module).__name__}; name its layers, e.g. {', '.join(layers)}"
        )
    sides = {n: s for n, m in matched.items() if (s := layer_sides(m))}
    if sides:
        name, (inputs, outputs) = min(sides.items(), key=lambda item: min(item[1]))
        if rank > min(inputs, outputs):
            raise ConfigError(
                f"optim.lora_rank: at most {min(inputs, outputs):,} for these layers ({name} is "
                f"{inputs:,} -> {outputs:,}: a higher rank adds nothing), got {rank:,}"
            )
    try:
        module.add_adapter(lora_config(rank, alpha, targets), adapter_name=ADAPTER_NAME)
    except ValueError as err:  # peft: a module that is not a layer LoRA can wrap
        other = next((n for n in matched if n not in sides), None)
        if other is None:
            raise ConfigError(f"optim.lora_target_modules: {cut(' '.join(str(err).split()))}") from err
        inner = [f"{other}.{n}" for n, m in matched[other].named_modules() if isinstance(m, nn.Linear)][:2]
        hint = f"; name its layers instead, e.g. {', '.join(inner)}" if inner else ""
        raise ConfigError(
            f"optim.lora_target_modules: {other} ({type(matched[other]).__name__}) is not a layer "
            f"LoRA wraps (Linear, convolution, Embedding){hint}"
        ) from err


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


def comfyui_state_dict(state: dict[str, Tensor], lora_alpha: float, names: ComfyUINames) -> dict[str, Tensor]:
    """An adapter's weights (peft names) keyed as ComfyUI's LoRA loader maps them for the family ``names``
    (``policies.comfyui``): ``<key>.lora_A.weight`` / ``.lora_B.weight`` and ``<key>.alpha``, a scalar, with
    ``<key>`` ``transformer.<module>`` (SD3, FLUX, Qwen-Image) or the original Wan name under ``diffusion_model.``.

    ComfyUI scales each update by ``alpha / rank`` from that tensor alone (no alpha: scale 1, an r 32 /
    alpha 64 adapter at half strength). Every module is named before any tensor is copied."""
    keys = {module: names.key(module) for module in lora_modules(state)}
    out = {}
    for module, key in keys.items():
        for part in ("lora_A.weight", "lora_B.weight"):
            out[f"{key}.{part}"] = state[f"{module}.{part}"].detach().float().cpu().contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(lora_alpha))
    return out


def uses_lora(policy: nn.Module) -> bool:
    return any(getattr(module, "peft_config", None) for module in experts(policy).values())


def trained_experts(policy: nn.Module) -> dict[str, nn.Module]:
    """The experts being trained: with LoRA those holding an adapter, else those with trainable weights (a policy
    with one expert: that one, always)."""
    every = experts(policy)
    if len(every) == 1:
        return every
    if uses_lora(policy):
        return {name: m for name, m in every.items() if getattr(m, "peft_config", None)}
    return {name: m for name, m in every.items() if any(p.requires_grad for p in m.parameters())}


def expert_prefix(policy: nn.Module, name: str) -> str:
    """How an expert's keys start in the trained weights: ``""`` with one expert, ``"<name>."`` with several."""
    return f"{name}." if len(experts(policy)) > 1 else ""


def trainable_state_dict(policy: nn.Module) -> dict[str, Tensor]:
    """The trained weights: the LoRA layers (peft names), or the full network's state, of each trained expert
    (keys ``<expert>.<name>`` for a two-expert model)."""
    lora, state = uses_lora(policy), {}
    for name, module in trained_experts(policy).items():
        weights = get_peft_model_state_dict(module) if lora else module.state_dict()
        state.update({expert_prefix(policy, name) + k: v.detach() for k, v in weights.items()})
    return state


def expert_state(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The keys of ``state`` that start with ``prefix``, without it (every key for ``prefix`` "")."""
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def load_trainable_state_dict(policy: nn.Module, state: dict[str, Tensor]) -> None:
    """The inverse of ``trainable_state_dict``."""
    lora, used = uses_lora(policy), set()
    for name, module in experts(policy).items():
        prefix = expert_prefix(policy, name)
        part = expert_state(state, prefix)
        used.update(prefix + k for k in part)
        if lora and getattr(module, "peft_config", None):
            if not part:
                raise ValueError(f"LoRA state has no weights for the expert {name}")
            result = set_peft_model_state_dict(module, part, adapter_name=ADAPTER_NAME)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"LoRA state has keys the model does not: {result.unexpected_keys[:3]}")
        elif not lora and (part or not prefix):
            module.load_state_dict(part)
    if set(state) - used:
        raise ValueError(f"trained state has keys of no expert of this model: {sorted(set(state) - used)[:3]}")


@contextmanager
def adapters_disabled(policy: nn.Module) -> Iterator[None]:
    """Run the base model: LoRA adapters off inside the block (on every expert)."""
    adapted = [m for m in experts(policy).values() if getattr(m, "peft_config", None)]
    for module in adapted:
        module.disable_adapters()
    try:
        yield
    finally:
        for module in adapted:
            module.enable_adapters()


def reference_policy(policy: nn.Module) -> nn.Module | None:
    """A frozen copy of the base for full fine-tuning; None with LoRA (the adapters are switched off).

    Only the trained experts are copied: the rest (text encoders, VAE, prompt tables, an expert not trained) is
    frozen and shared."""
    if uses_lora(policy):
        return None
    reference = copy.copy(policy)  # a new module object whose registries are copied below, not shared
    reference._modules, reference._parameters, reference._buffers = (
        dict(policy._modules),
        dict(policy._parameters),
        dict(policy._buffers),
    )
    for name, module in trained_experts(policy).items():
        setattr(reference, name, copy.deepcopy(module).requires_grad_(False).eval())
    return reference


def lora_file(expert: str, base: str = LORA_FILE) -> str:
    """The file of an expert's adapter: ``base`` for ``transformer``, ``<stem>_<expert>.safetensors`` otherwise
    (``pytorch_lora_weights_transformer_2.safetensors``)."""
    return base if expert == "transformer" else base.replace(".safetensors", f"_{expert}.safetensors")


def lora_files(directory: Path) -> dict[str, Path]:
    """The adapter files in ``directory`` by expert (``transformer``, ``transformer_2``)."""
    found = {name: Path(directory) / lora_file(name) for name in ("transformer", "transformer_2")}
    return {name: path for name, path in found.items() if path.is_file()}


def save_lora_adapter(policy: nn.Module, directory: Path) -> None:
    """Write each trained expert's adapter (``lora_file``) in the format ``pipeline.load_lora_weights(directory)``
    accepts (``weight_name=lora_file(expert)``, ``load_into_transformer_2=True`` for ``transformer_2``), with the
    adapter's rank, alpha and modules as metadata (``adapter_metadata``)."""
    for name, module in trained_experts(policy).items():
        config = module.peft_config[ADAPTER_NAME]
        state = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(module).items()}
        policy.pipeline_class.save_lora_weights(
            directory,
            transformer_lora_layers=state,
            transformer_lora_adapter_metadata=adapter_metadata(state, config.r, config.lora_alpha),
            weight_name=lora_file(name),
        )


def load_lora_adapter(policy: nn.Module, directory: Path, optim) -> None:
    """Load the adapters written by ``save_lora_adapter`` into the policy's experts, as the run's ``optim`` settings
    built them (``make_trainable``). Files of another rank, alpha, model or target modules are refused in one line
    (``adapter_mismatch``) instead of half-loading with a page of peft warnings."""
    make_trainable(
        policy,
        optim.lora_rank,
        optim.lora_alpha,
        optim.lora_target_modules,
        optim.lora_text_stream,
        optim.trained_experts,
    )
    expected = {k: tuple(v.shape) for k, v in trainable_state_dict(policy).items()}
    every, state = experts(policy), {}
    for name, path in lora_files(directory).items():
        if name not in every:
            raise ConfigError(f"{path}: an adapter for {name}, which this model does not have")
        with safe_open(str(path), "pt") as file:
            metadata = json.loads((file.metadata() or {}).get("lora_adapter_metadata", "{}"))
            weights = {k: file.get_tensor(k) for k in file.keys()}
        alpha = metadata.get(f"{PREFIX}lora_alpha", optim.lora_alpha)
        prefix = expert_prefix(policy, name)
        weights = {prefix + k.removeprefix(PREFIX): v for k, v in weights.items()}
        problem = adapter_mismatch(
            {k: s for k, s in expected.items() if k.startswith(prefix)},
            {k: tuple(v.shape) for k, v in weights.items()},
            optim.lora_rank,
        )
        if not problem and alpha != optim.lora_alpha:
            problem = f"an adapter of lora_alpha {alpha:g}, but the run trained {optim.lora_alpha:g} (optim.lora_alpha)"
        if problem:
            raise ConfigError(
                f"{path}: {problem}; it is not this run's adapter: restore it, or write it from the "
                f"run's newest checkpoint with `flowdppo export {Path(directory).parent} --checkpoint "
                f"--out {directory}`"
            )
        state.update(weights)
    load_trainable_state_dict(policy, state)


def adapter_mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], rank: int) -> str:
    """How the weight shapes of an adapter file (``found``) differ from those of the run's adapter (``expected``, of
    the same expert): "" if they fit."""
    ranks = sorted({shape[0] for key, shape in found.items() if key.endswith("lora_A.weight")})
    if ranks and ranks != [rank]:
        return f"an adapter of rank {', '.join(map(str, ranks))}, but the run trained rank {rank} (optim.lora_rank)"
    foreign = sorted(set(found) - set(expected))
    if foreign:
        return (
            f"an adapter for another model or other target modules: {len(foreign)} of its {len(found)} weights "
            f"(e.g. {foreign[0]}) are not in the run's adapter"
        )
    for key, shape in found.items():
        if shape != expected[key]:
            return f"an adapter for another model: {key} is {shape} in it, {expected[key]} in this model"
    missing = sorted(set(expected) - set(found))
    if missing:
        return f"an adapter of other target modules: it lacks {len(missing)} of the run's weights (e.g. {missing[0]})"
    return ""


def trainable_parameters(policy: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in policy.parameters() if p.requires_grad]
