"""Checkpoints: safetensors for tensors, JSON for the rest, written atomically.

A checkpoint is a folder ``checkpoints/epoch_000010/`` holding ``trainable.safetensors`` (LoRA or full
weights), ``optimizer.safetensors`` + ``optimizer.json`` and ``state.json`` (epoch, RNG state). It is
written to a temporary folder and renamed into place, so a crash mid-write leaves no partial
checkpoint; only folders with ``state.json`` count as complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flowdppo.policies.lora import load_trainable_state_dict, trainable_state_dict

STATE_FILE = "state.json"


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (``state.{param}.{name}``) and JSON-able rest."""
    state = optimizer.state_dict()
    tensors = {}
    for param_id, slots in state["state"].items():
        for name, value in slots.items():
            tensors[f"state.{param_id}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, {"param_groups": state["param_groups"]}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(
    directory: Path, policy: nn.Module, optimizer: torch.optim.Optimizer, rng: torch.Generator, epoch: int,
    keep: int,
) -> None:  # fmt: skip
    """Write the checkpoint of ``epoch`` atomically and keep only the newest ``keep`` checkpoints."""
    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in trainable_state_dict(policy).items()}
    save_file(weights, str(tmp / "trainable.safetensors"))
    opt_tensors, opt_rest = optimizer_to_flat(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(opt_rest))
    save_file({"rng": rng.get_state()}, str(tmp / "rng.safetensors"))
    (tmp / STATE_FILE).write_text(json.dumps({"epoch": epoch}))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    for old in complete_checkpoints(directory.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders with a state file, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("epoch_*") if (p / STATE_FILE).is_file())


def load_checkpoint(
    directory: Path | None, policy: nn.Module, optimizer: torch.optim.Optimizer, rng: torch.Generator
) -> int:
    """Restore weights, optimizer and RNG from ``directory``; returns the epoch to continue from."""
    if directory is None:
        return 0
    load_trainable_state_dict(policy, load_file(str(directory / "trainable.safetensors")))
    rest = json.loads((directory / "optimizer.json").read_text())
    optimizer.load_state_dict(optimizer_from_flat(load_file(str(directory / "optimizer.safetensors")), rest))
    rng.set_state(load_file(str(directory / "rng.safetensors"))["rng"])
    return int(json.loads((directory / STATE_FILE).read_text())["epoch"])
