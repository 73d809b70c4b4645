"""Evaluate a finished run: the task's in-domain and out-of-domain measures, base vs trained."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import yaml

from flowdppo.config import config_from_dict
from flowdppo.errors import ConfigError
from flowdppo.policies.lora import load_lora_adapter
from flowdppo.tasks import get_task


def load_trained_policy(run_dir: Path, task, model: str = ""):
    """The base policy ``model`` with the run's final weights (LoRA adapter or full policy) loaded."""
    final = run_dir / "final"
    if (final / "pytorch_lora_weights.safetensors").is_file():
        policy = task.load_policy(model)
        load_lora_adapter(policy, final)
        return policy
    if final.is_dir():
        return task.load_policy(str(final))
    raise ConfigError(f"{run_dir} has no final weights (final/): did the run finish?")


@torch.no_grad()
def evaluate_run(run_dir: Path, per_class: int = 50) -> dict[str, dict[str, float]]:
    """``{"base": measures, "trained": measures}`` on the same fixed noise."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no config.yaml)")
    cfg = config_from_dict(yaml.safe_load(config_path.read_text()))
    task = get_task(cfg.task, cfg.device)
    base, trained = task.load_policy(cfg.model), load_trained_policy(run_dir, task, cfg.model)
    w = cfg.sampler.guidance_scale
    return {
        name: task.evaluate(partial(policy.velocity, guidance_scale=w), per_class, cfg.seed, cfg.sampler.num_steps)
        for name, policy in (("base", base), ("trained", trained))
    }
