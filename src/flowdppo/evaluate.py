"""Evaluate a finished run (the task's measures, base vs trained) and export its LoRA adapter."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from flowdppo.checkpoint import complete_checkpoints, read_tensors
from flowdppo.config import config_from_dict, saved_config
from flowdppo.distributed import Distributed
from flowdppo.errors import ConfigError
from flowdppo.policies.lora import (
    load_lora_adapter,
    load_trainable_state_dict,
    make_trainable,
    save_lora_adapter,
    uses_lora,
)
from flowdppo.tasks import load_task
from flowdppo.trainer import make_base_velocity


def load_trained_policy(run_dir: Path, task):
    """The run's trained policy: the task's base policy with the final LoRA adapter loaded into it, or the
    fully fine-tuned policy of ``final/``."""
    final = run_dir / "final"
    if (final / "pytorch_lora_weights.safetensors").is_file():
        try:
            load_lora_adapter(task.policy, final)
        except Exception as err:  # safetensors / peft errors on a truncated or foreign file
            raise ConfigError(f"{final / 'pytorch_lora_weights.safetensors'}: unreadable ({type(err).__name__}: "
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
    """Write the run's LoRA adapter (``final/``, or the newest checkpoint) in the ``load_lora_weights`` format."""
    cfg = run_config(run_dir)
    if cfg.optim.lora_rank == 0:
        raise ConfigError(f"{run_dir} fine-tuned the whole transformer (no LoRA): its final/ is the model itself")
    task = load_task(cfg, "cpu")
    if from_checkpoint:
        found = complete_checkpoints(run_dir / "checkpoints")
        if not found:
            raise ConfigError(f"{run_dir} has no complete checkpoint")
        policy = task.policy
        make_trainable(policy, cfg.optim.lora_rank, cfg.optim.lora_alpha, cfg.optim.lora_target_modules)
        load_trainable_state_dict(policy, read_tensors(found[-1] / "trainable.safetensors"))
    else:
        policy = load_trained_policy(run_dir, task)
    out.mkdir(parents=True, exist_ok=True)
    save_lora_adapter(policy, out)
    return out
