"""Evaluate a finished run (the task's measures, base vs trained) and export its LoRA adapter."""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from flowdppo.checkpoint import complete_checkpoints, read_tensors
from flowdppo.config import config_from_dict, saved_config
from flowdppo.distributed import Distributed
from flowdppo.errors import CheckpointError, ConfigError
from flowdppo.policies.lora import (
    COMFYUI_FILE,
    LORA_FILE,
    PREFIX,
    adapter_metadata,
    comfyui_state_dict,
    expert_state,
    load_lora_adapter,
    lora_file,
    lora_files,
    uses_lora,
)
from flowdppo.tasks import load_task, task_class
from flowdppo.trainer import make_base_velocity


def load_trained_policy(run_dir: Path, task):
    """The run's trained policy: the task's base policy with the final LoRA adapter loaded into it (checked against
    the adapter the run's settings build), or the fully fine-tuned policy of ``final/``."""
    final = run_dir / "final"
    if lora_files(final):
        try:
            load_lora_adapter(task.policy, final, run_config(run_dir).optim)
        except ConfigError:
            raise
        except Exception as err:  # safetensors / peft errors on a truncated or damaged file
            raise ConfigError(f"{final}/{LORA_FILE}: unreadable ({type(err).__name__}: "
                              f"{' '.join(str(err).split())}); export from a checkpoint with --checkpoint") from err
        return task.policy
    if final.is_dir():
        return task.load_policy(str(final))
    raise ConfigError(f"{run_dir} has no final weights (final/): did the run finish?")


def run_config(run_dir: Path):
    return config_from_dict(saved_config(run_dir, str(run_dir)))


@torch.no_grad()
def evaluate_run(run_dir: Path, per_class: int = 50) -> dict[str, dict[str, float]]:
    """``{"base": measures, "trained": measures}`` on the same fixed noise."""
    cfg = run_config(run_dir)
    task = load_task(cfg, Distributed().device(cfg.device))
    trained = load_trained_policy(run_dir, task)
    w = cfg.sampler.guidance_scale
    # with LoRA the base is the same network with its adapters off: the model is loaded once
    reference = None if uses_lora(trained) else task.policy
    velocities = {"base": make_base_velocity(trained, reference, w), "trained": partial(trained, guidance_scale=w)}
    return {name: task.evaluate(v, per_class) for name, v in velocities.items()}


EXPORT_FORMATS = ("diffusers", "comfyui")


def export_lora(run_dir: Path, out: Path, from_checkpoint: bool = False, fmt: str = "diffusers") -> Path:
    """Write the run's LoRA adapter (``final/``, or the newest checkpoint) without loading the model; returns what
    was written (the first file, with two experts).

    ``diffusers``: ``out/pytorch_lora_weights.safetensors`` for ``pipeline.load_lora_weights(out)`` (``final/``
    already holds it; a checkpoint's peft weights go through the pipeline's ``save_lora_weights``), with the
    adapter's rank, alpha and modules as metadata. ``comfyui``: ``out/comfyui_lora.safetensors``, the same
    weights under ``transformer.<module>.lora_A/B.weight`` with ``transformer.<module>.alpha`` tensors, the only
    place ComfyUI reads the scale from. A two-expert model (Wan 2.2 A14B) gets one file per trained expert, the
    low-noise one named ``..._transformer_2.safetensors`` (``lora_file``; diffusers: load it with
    ``load_lora_weights(out, weight_name=..., load_into_transformer_2=True)``)."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format: must be one of {', '.join(EXPORT_FORMATS)}; got {fmt!r}")
    cfg = run_config(run_dir)
    optim = cfg.optim
    if optim.lora_rank == 0:
        raise ConfigError(f"{run_dir} fine-tuned the whole transformer (no LoRA): its final/ is the model itself")
    if from_checkpoint:
        found = complete_checkpoints(run_dir / "checkpoints")
        if not found:
            raise ConfigError(f"{run_dir} has no complete checkpoint")
        weights = read_tensors(found[-1] / "trainable.safetensors")  # peft names (<expert>.<name>: two experts)
        per_expert = {name: expert_state(weights, f"{name}.") for name in ("transformer", "transformer_2")}
        per_expert = {name: part for name, part in per_expert.items() if part} or {"transformer": weights}
    else:
        adapters = lora_files(run_dir / "final")
        if not adapters:
            raise ConfigError(f"{run_dir} has no final adapter ({run_dir / 'final' / LORA_FILE}): did the run "
                              f"finish? (or use --checkpoint)")  # fmt: skip
        per_expert = {}
        for name, adapter in adapters.items():
            try:
                final = read_tensors(adapter)  # a damaged file is named here, not copied
            except CheckpointError as err:
                raise ConfigError(f"{err}; export from the newest checkpoint with --checkpoint") from err
            per_expert[name] = {k.removeprefix(PREFIX): v for k, v in final.items()}
        if fmt == "diffusers":
            out.mkdir(parents=True, exist_ok=True)
            for adapter in adapters.values():
                shutil.copyfile(adapter, out / adapter.name)
            return out / next(iter(adapters.values())).name
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, weights in per_expert.items():
        if fmt == "comfyui":
            save_file(comfyui_state_dict(weights, optim.lora_alpha), str(out / lora_file(name, COMFYUI_FILE)))
        else:
            pipeline_class = task_class(cfg).policy_class(cfg).pipeline_class
            pipeline_class.save_lora_weights(out, transformer_lora_layers=weights, weight_name=lora_file(name),
                                             transformer_lora_adapter_metadata=adapter_metadata(
                                                 weights, optim.lora_rank, optim.lora_alpha))  # fmt: skip
        written.append(out / lora_file(name, COMFYUI_FILE if fmt == "comfyui" else LORA_FILE))
    return written[0]
