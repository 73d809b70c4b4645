"""Evaluate a finished run (the task's measures, base vs trained) and export its LoRA adapter."""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import torch

from flowdppo.checkpoint import complete_checkpoints, read_tensors
from flowdppo.config import config_from_dict, saved_config
from flowdppo.distributed import Distributed
from flowdppo.errors import CheckpointError, ConfigError
from flowdppo.policies.lora import LORA_FILE, load_lora_adapter, lora_config, uses_lora
from flowdppo.tasks import load_task, task_class
from flowdppo.trainer import make_base_velocity


def load_trained_policy(run_dir: Path, task):
    """The run's trained policy: the task's base policy with the final LoRA adapter loaded into it, or the
    fully fine-tuned policy of ``final/``."""
    final = run_dir / "final"
    if (final / LORA_FILE).is_file():
        try:
            load_lora_adapter(task.policy, final)
        except Exception as err:  # safetensors / peft errors on a truncated or foreign file
            raise ConfigError(f"{final / LORA_FILE}: unreadable ({type(err).__name__}: "
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


def export_lora(run_dir: Path, out: Path, from_checkpoint: bool = False) -> Path:
    """Write the run's LoRA adapter (``final/``, or the newest checkpoint) in the ``load_lora_weights`` format,
    without loading the model: ``final/`` already holds it; a checkpoint's peft weights are written with the
    pipeline's ``save_lora_weights`` and the adapter's rank / alpha / targets as metadata."""
    cfg = run_config(run_dir)
    if cfg.optim.lora_rank == 0:
        raise ConfigError(f"{run_dir} fine-tuned the whole transformer (no LoRA): its final/ is the model itself")
    policy_class = task_class(cfg).policy_class(cfg)
    if from_checkpoint:
        found = complete_checkpoints(run_dir / "checkpoints")
        if not found:
            raise ConfigError(f"{run_dir} has no complete checkpoint")
        weights = read_tensors(found[-1] / "trainable.safetensors")
    else:
        adapter = run_dir / "final" / LORA_FILE
        if not adapter.is_file():
            raise ConfigError(f"{run_dir} has no final adapter ({adapter}): did the run finish? (or use --checkpoint)")
        try:
            read_tensors(adapter)  # a damaged file is named here, not copied
        except CheckpointError as err:
            raise ConfigError(f"{err}; export from the newest checkpoint with --checkpoint") from err
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(adapter, out / LORA_FILE)
        return out
    config = lora_config(cfg.optim.lora_rank, cfg.optim.lora_alpha,
                         cfg.optim.lora_target_modules or policy_class.lora_target_modules)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    policy_class.pipeline_class.save_lora_weights(out, transformer_lora_layers=weights,
                                                  transformer_lora_adapter_metadata=config.to_dict())  # fmt: skip
    return out
